"""`embedding-proxy keys ...` against a real Redis, and the keys it prints working against the proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import Upstream, make_settings

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("PROXY_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_keys_create_list_revoke(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    created = cli(redis_url, "keys", "create", "--team", "search")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[0]
    assert key.startswith("sk-gateway-") and len(key) >= len("sk-gateway-") + 32

    as_json = cli(redis_url, "keys", "create", "--team", "ads", "--name", "batch jobs", "--json")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["key"].startswith("sk-gateway-") and doc["team"] == "ads" and doc["name"] == "batch jobs"

    listed = cli(redis_url, "keys", "list", "--json")
    records = json.loads(listed.stdout)
    assert {r["team"] for r in records} == {"search", "ads"}
    assert key not in listed.stdout and doc["key"] not in listed.stdout

    import redis

    raw = redis.Redis.from_url(redis_url)
    stored = b"".join(k + b"".join(raw.hgetall(k).values()) for k in raw.keys("ep:key:*"))
    assert key.encode() not in stored and doc["key"].encode() not in stored  # only hashes are stored

    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    headers = {"Authorization": f"Bearer {key}"}
    resp = await proxy.client.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers=headers)
    assert resp.status == 200

    search_id = next(r["id"] for r in records if r["team"] == "search")
    revoked = cli(redis_url, "keys", "revoke", search_id)
    assert revoked.returncode == 0, revoked.stderr
    resp = await proxy.client.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers=headers)
    assert resp.status == 401
    assert cli(redis_url, "keys", "revoke", "key_doesnotexist").returncode == 1
    assert cli(redis_url, "keys", "create", "--team", "Bad Team!").returncode == 2


def test_keys_need_redis() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROXY_CONFIG")}
    done = subprocess.run([sys.executable, "-m", "proxy", "keys", "list"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "REDIS_URL" in done.stderr


def test_check_config_names_file_and_key(tmp_path: Any) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[cache]\nscop = "team"\n')
    done = subprocess.run([sys.executable, "-m", "proxy", "--config", str(bad), "check-config"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert str(bad) in done.stderr and "cache.scop" in done.stderr
