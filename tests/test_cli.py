"""`embedding-proxy keys ...` against a real Redis, and the keys it prints working against the proxy."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.main import LOG_LEVELS, build_parser
from tests.conftest import Upstream, make_settings, settle

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("PROXY_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_keys_create_refuses_a_name_beyond_200_characters(redis_url: str) -> None:
    long = cli(redis_url, "keys", "create", "--team", "search", "--name", "n" * 201)
    assert long.returncode == 2 and long.stdout == ""
    assert long.stderr == "error: key names are at most 200 characters (this one has 201)\n"
    assert cli(redis_url, "keys", "list", "--json").stdout.strip() == "[]"


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

    # the proxy would trust a verified key for a minute: only the pushed change can refuse it sooner
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, "[keys]\ncache_s = 60.0\n"))
    headers = {"Authorization": f"Bearer {key}"}
    resp = await proxy.client.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers=headers)
    assert resp.status == 200
    await settle(proxy)  # the cache write lands before cli() blocks this event loop

    search_id = next(r["id"] for r in records if r["team"] == "search")
    revoked = cli(redis_url, "keys", "revoke", search_id)
    assert revoked.returncode == 0, revoked.stderr
    await asyncio.sleep(0.05)  # the revocation arrives over pub/sub, in milliseconds (this process was blocked)
    resp = await proxy.client.post("/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers=headers)
    assert resp.status == 401
    assert cli(redis_url, "keys", "revoke", "key_doesnotexist").returncode == 1
    assert cli(redis_url, "keys", "create", "--team", "Bad Team!").returncode == 2


def test_limit_flags_say_that_zero_means_unlimited() -> None:
    done = subprocess.run([sys.executable, "-m", "proxy", "keys", "create", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and " ".join(done.stdout.split()).count("(0 or omitted: unlimited)") == 4


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


async def test_teams_keys_quotas_rotation_and_usage_commands(
    make_proxy: Any, upstream: Upstream, redis_url: str, tmp_path: Any
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text("[teams.search]\nrpm = 100\n[quotas]\nteam_cache_s = 0.0\n")
    conf = ["--config", str(config)]
    assert cli(redis_url, *conf, "teams", "set", "ads", "--tpm", "5000", "--tokens-per-day", "90000").returncode == 0
    assert cli(redis_url, *conf, "teams", "set", "ads", "--tpm", "0").stdout.strip() == "ads: tokens_per_day=90000"
    teams = json.loads(cli(redis_url, *conf, "teams", "list", "--json").stdout)
    assert {"team": "search", "limits": {"rpm": 100, "tpm": None, "tokens_per_day": None,
                                         "tokens_per_month": None}, "source": "config"} in teams
    assert next(t for t in teams if t["team"] == "ads")["source"] == "runtime"
    assert "tokens_per_day=90000" in cli(redis_url, *conf, "teams", "list").stdout
    assert cli(redis_url, "teams", "set", "ads", "--rpm", "-3").returncode == 2
    # a configured team changed at run time, then reset: the config's limits apply again
    assert cli(redis_url, *conf, "teams", "set", "search", "--rpm", "5").stdout.strip() == "search: rpm=5"
    reset = cli(redis_url, *conf, "teams", "reset", "search")
    assert reset.returncode == 0 and reset.stdout.strip() == "search: rpm=100 (from the config)"
    teams = json.loads(cli(redis_url, *conf, "teams", "list", "--json").stdout)
    assert next(t for t in teams if t["team"] == "search") == {
        "team": "search", "limits": {"rpm": 100, "tpm": None, "tokens_per_day": None, "tokens_per_month": None},
        "source": "config"}
    assert cli(redis_url, *conf, "teams", "reset", "Not A Team").returncode == 2

    made = cli(redis_url, "keys", "create", "--team", "ads", "--rpm", "1", "--models", MODEL, "--name", "etl",
               "--expires-in", "1d", "--json")
    doc = json.loads(made.stdout)
    assert doc["limits"]["rpm"] == 1 and doc["models"] == [MODEL] and doc["name"] == "etl"
    # Changes must show on the very next request: no in-process copies (pub/sub propagation: test_quota_http.py).
    # The CLI runs synchronously and stalls this test's event loop: a Redis call in flight meanwhile must not time
    # out (that would mark Redis down and serve the last verified key record, as designed for outages).
    config = "[quotas]\nteam_cache_s = 0.0\n[keys]\ncache_s = 0.0\n[redis]\nsocket_timeout_s = 10.0\n"
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, config))
    headers = {"Authorization": f"Bearer {doc['key']}"}
    body = {"model": MODEL, "input": "one two three"}
    assert (await proxy.client.post("/v1/embeddings", json=body, headers=headers)).status == 200
    assert (await proxy.client.post("/v1/embeddings", json=body, headers=headers)).status == 429
    assert cli(redis_url, "keys", "limits", doc["id"], "--rpm", "0").returncode == 0
    assert (await proxy.client.post("/v1/embeddings", json=body, headers=headers)).status == 200
    shown = json.loads(cli(redis_url, "keys", "show", doc["id"], "--json").stdout)
    assert shown[0]["limits"]["rpm"] is None and "key" not in shown[0]

    rotated = cli(redis_url, "keys", "rotate", doc["id"], "--grace", "1h")
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.splitlines()[0]
    assert new_key.startswith("sk-gateway-") and new_key != doc["key"] and "keeps working until" in rotated.stderr
    new_headers = {"Authorization": f"Bearer {new_key}"}
    for h in (headers, new_headers):  # both work during the grace period
        r = await proxy.client.post("/v1/embeddings", json=body, headers=h)
        assert r.status == 200, await r.text()
    assert cli(redis_url, "keys", "rotate", "key_nope").returncode == 1
    old_revoked = cli(redis_url, "keys", "revoke", doc["id"])
    assert old_revoked.returncode == 0, old_revoked.stderr
    refused = cli(redis_url, "keys", "rotate", doc["id"])
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"Key {doc['id']} is revoked: it cannot be rotated" in refused.stderr

    await proxy.client.close()  # flushes the usage ledger
    usage = cli(redis_url, "usage", "--team", "ads", "--by", "key", "--format", "json")
    assert usage.returncode == 0, usage.stderr
    rows = json.loads(usage.stdout)
    by_key = {r["key"]: r["requests"] for r in rows}
    assert len(by_key) == 2 and by_key[doc["id"]] == 3  # the old key 3, its replacement 1
    assert sum(r["total_tokens"] for r in rows) == 4 * 3
    assert by_key[doc["id"]] + next(v for k, v in by_key.items() if k != doc["id"]) == 4
    # each key's name and team beside its id (issue 18): the replacement kept the name
    assert sorted((r["team"], r["key"], r["key_name"]) for r in rows) == sorted(("ads", k, "etl") for k in by_key)
    table = cli(redis_url, "usage", "--team", "ads", "--by", "key").stdout.splitlines()
    assert table[0].split()[:3] == ["team", "key", "key_name"]
    assert all(line.split()[:3] == ["ads", k, "etl"] for line, k in zip(table[1:], sorted(by_key), strict=True))
    csv_out = cli(redis_url, "usage", "--format", "csv").stdout.splitlines()
    assert csv_out[0] == ("team,requests,upstream_tokens,cached_tokens,total_tokens,upstream_cost_usd,saved_usd,"
                          "failed_tokens,unconfirmed_tokens")
    assert csv_out[1].startswith("ads,4,3,9,12,")
    table = cli(redis_url, "usage", "--by", "model").stdout
    assert "ads" in table and MODEL in table
    assert cli(redis_url, "usage", "--since", "2026-02-30").returncode == 2
    assert cli(redis_url, "usage", "--since", "2026-02-02", "--until", "2026-02-01").returncode == 2


def _parsers(parser: argparse.ArgumentParser, name: str = "embedding-proxy"
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command line: the top one, each command's and each subcommand's."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


SERVERS = {"embedding-proxy serve", "embedding-proxy mock-upstream"}  # they run until stopped: logs, not a report


def test_every_command_option_and_positional_is_explained() -> None:
    """Issue 18: `--host`, `--port`, `--json` and the positionals had no help text, `check-config` no description.
    Walks every parser the table builds: each has a description, each argument a help text (a subcommand list
    included), and every command that prints a result takes --json."""
    missing = []
    for name, parser in _parsers(build_parser()):
        if not (parser.description or "").strip():
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = "/".join(action.option_strings) or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {label}: no help")
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {a.dest}: no help" for a in action._choices_actions if not a.help]
        leaf = not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        if leaf and name not in SERVERS and "--json" not in parser._option_string_actions:
            missing.append(f"{name}: prints a result but has no --json")
    assert missing == []


def test_log_level_help_lists_every_level() -> None:
    (action,) = [a for a in build_parser()._actions if "--log-level" in a.option_strings]
    assert action.help is not None and all(level.lower() in action.help for level in LOG_LEVELS)
    assert list(action.choices or ()) == list(LOG_LEVELS)


def test_help_lists_every_environment_variable_the_readme_lists() -> None:
    """The epilog of `embedding-proxy --help` names each variable of the README's table (Configuration)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("| variable | meaning |", 1)[1].split("\n\n", 1)[0]
    names = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    assert {"PROXY_CONFIG", "UPSTREAM_BASE_URL", "REDIS_TYPE", "CACHE_REDIS_URL", "PROXY_ADMIN_KEY"} <= names
    done = subprocess.run([sys.executable, "-m", "proxy", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "environment variables" in done.stdout
    epilog = done.stdout.split("environment variables", 1)[1]
    assert sorted(n for n in names if not re.search(rf"\b{n}\b", epilog)) == []


def test_json_wherever_something_is_printed(redis_url: str) -> None:
    """Each command that prints a result prints it as JSON with --json, in the admin API's shapes."""
    made = json.loads(cli(redis_url, "keys", "create", "--team", "ads", "--json").stdout)
    limited = json.loads(cli(redis_url, "keys", "limits", made["id"], "--rpm", "7", "--json").stdout)
    assert (limited["id"], limited["limits"]["rpm"], "key" in limited) == (made["id"], 7, False)
    assert json.loads(cli(redis_url, "teams", "set", "ads", "--tpm", "900", "--json").stdout) == {
        "team": "ads", "limits": {"rpm": None, "tpm": 900, "tokens_per_day": None, "tokens_per_month": None}}
    assert json.loads(cli(redis_url, "teams", "reset", "ads", "--json").stdout)["limits"]["tpm"] is None
    revoked = json.loads(cli(redis_url, "keys", "revoke", made["id"], "--json").stdout)
    assert revoked["revoked"] is True and revoked["id"] == made["id"]
    purged = json.loads(cli(redis_url, "cache", "purge", "--model", MODEL, "--json").stdout)
    assert purged == {"object": "cache.purge", "model": MODEL, "team": None, "generation": 1, "scope": "shared"}
    assert cli(redis_url, "usage", "--json").stdout == cli(redis_url, "usage", "--format", "json").stdout
    both = cli(redis_url, "usage", "--json", "--format", "csv")
    assert both.returncode == 2 and "two formats" in both.stderr
    checked = cli(redis_url, "check-config", "--json")
    doc = json.loads(checked.stdout)
    assert checked.returncode == 0 and doc["ok"] is True and doc["store"] == "redis (single)"
    assert doc["warnings"] and all(f"WARNING: {w}" in checked.stderr for w in doc["warnings"])  # no persistence
    strict = cli(redis_url, "check-config", "--json", "--strict")
    assert strict.returncode == 1 and json.loads(strict.stdout)["ok"] is False
