"""The embedded default: no REDIS_URL runs the same code on an in-process store, and `serve --demo` works offline."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import aiohttp
import pytest

from tests.conftest import Proxy, Upstream, free_port, make_settings, settle

MODEL = "text-embedding-3-small"


async def test_embedded_store_serves_caches_and_enforces_quotas(
    make_proxy: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.app")
    settings = make_settings(upstream.base_url, "", "[teams.demo]\nrpm = 3\n")
    assert settings.redis.url == ""
    p: Proxy = await make_proxy(settings)
    assert any("embedded in-process store" in r.message for r in caplog.records)
    key = await p.new_key("demo")
    body = {"model": MODEL, "input": ["one", "two"]}
    first = await p.embed(key, body)
    assert first.status == 200 and first.headers["x-cache"] == "miss"
    await settle(p)
    second = await p.embed(key, body)
    assert second.headers["x-cache"] == "hit" and second.headers["x-ratelimit-remaining-requests"] == "1"
    assert (await p.embed(key, body)).status == 200
    refused = await p.embed(key, body)
    assert refused.status == 429 and (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    ready = await (await p.client.get("/readyz")).json()
    assert ready["redis"] == "embedded"


async def test_serve_demo_prints_a_working_key_offline() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROXY_CONFIG", "UPSTREAM_BASE_URL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(port), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        key = None
        while key is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "serve --demo exited before printing a key"
            if line.startswith("gateway key for team 'demo'"):
                key = line.rsplit(" ", 1)[1].strip()
        assert key.startswith("sk-gateway-")
        async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/v1/embeddings", json={"model": MODEL, "input": "hello world"},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
            assert len(body["data"][0]["embedding"]) == 1536 and body["usage"]["prompt_tokens"] == 2
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0  # a clean shutdown on SIGTERM


async def test_serve_on_port_0_prints_the_port_it_listens_on() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROXY_CONFIG")}
    env["UPSTREAM_BASE_URL"] = "http://127.0.0.1:9/v1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", "0", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = ""
        while " listening on " not in line:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "serve exited before it was listening"
        port = int(line.split(" listening on http://127.0.0.1:", 1)[1].split()[0].rstrip(";"))
        assert port != 0
        while not line.startswith("try: curl"):
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "serve exited before printing its example"
        assert f" http://127.0.0.1:{port}/v1/embeddings " in line
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_embedded_store_serves_many_concurrent_requests(make_proxy: Any, upstream: Upstream) -> None:
    """fakeredis refuses more than 100 connections at once by default; the embedded store must not."""
    p: Proxy = await make_proxy(make_settings(upstream.base_url, "", "[teams.demo]\nrpm = 100000\n"))
    key = await p.new_key("demo")
    responses = await asyncio.gather(*(p.embed(key, {"model": MODEL, "input": f"c{i % 50}"}) for i in range(400)))
    assert sorted({r.status for r in responses}) == [200]
