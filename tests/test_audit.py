"""The audit log (issue 17): every admin change and every refusal, written before the answer, with actor, target,
before and after, client address and request id; durable in Redis, append-only, trimmed by age; read as JSON and
CSV with filters; one JSON line per entry; never a credential. Against a real Redis, over HTTP and the CLI."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from typing import Any

import orjson
import pytest

from proxy.accounts.audit import AuditEntry, AuditLog
from proxy.config import RedisSettings
from proxy.http.accesslog import AccessLog
from proxy.http.app import ACCESS_LOG
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import Proxy, RedisServer, Upstream, make_settings
from tests.helpers import Clock

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
ADMIN = "root-admin-key-for-audit-tests-0123456789"
CONFIG = "[quotas]\nteam_cache_s = 0.0\n[teams.ads]\nrpm = 100\n"


class Lines(io.BytesIO):
    """The proxy's stdout: access log and audit lines."""

    def close(self) -> None:  # the app's shutdown must not lose what the test reads
        pass


async def make(make_proxy: Any, upstream: Upstream, redis_url: str, config: str = "") -> tuple[Proxy, Lines]:
    out = Lines()
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, CONFIG + config, PROXY_ADMIN_KEY=ADMIN),
                                access_log=AccessLog(out, flush_interval_s=0.01))
    return p, out


async def call(p: Proxy, method: str, path: str, body: Any = None, key: str = ADMIN,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    resp = await p.client.request(method, path, json=body,
                                  headers={"Authorization": f"Bearer {key}", **(headers or {})})
    if resp.content_type == "application/json":
        return resp.status, await resp.json()
    return resp.status, await resp.text()


def stored(redis_server: RedisServer) -> list[dict[str, Any]]:
    """The stream as Redis holds it, oldest first."""
    client = redis_server.client()
    try:
        return [orjson.loads(body[b"e"]) for _, body in client.xrange("ep:audit")]
    finally:
        client.close()


def raw_store(redis_server: RedisServer) -> bytes:
    client = redis_server.client()
    try:
        return b"\n".join(body[b"e"] for _, body in client.xrange("ep:audit"))
    finally:
        client.close()


async def test_every_change_is_recorded_before_the_answer_with_its_before_and_after(
        make_proxy: Any, upstream: Upstream, redis_server: RedisServer, redis_url: str) -> None:
    p, out = await make(make_proxy, upstream, redis_url)
    secrets: list[str] = [ADMIN]
    rid = "audit-req-1"
    status, created = await call(p, "POST", "/admin/keys", {"team": "ads", "name": "svc", "rpm": 5},
                                 headers={"x-request-id": rid, "X-Admin-Client": "console"})
    assert status == 201
    secrets.append(created["key"])
    [entry] = stored(redis_server)  # in Redis when the answer arrived: no wait
    assert entry["action"] == "keys.create" and entry["outcome"] == "ok" and entry["actor"] == "root"
    assert entry["actor_kind"] == "root" and entry["how"] == "console" and entry["request_id"] == rid
    assert entry["team"] == "ads" and entry["key_id"] == created["id"] and entry["status"] == 201
    assert entry["after"]["limits"]["rpm"] == 5 and entry["client"] == "127.0.0.1" and entry["before"] is None

    key_id = created["id"]
    assert (await call(p, "PATCH", f"/admin/keys/{key_id}", {"rpm": 7}))[0] == 200
    status, rotated = await call(p, "POST", f"/admin/keys/{key_id}/rotate", {"grace_s": 60})
    secrets.append(rotated["key"])
    assert (await call(p, "POST", f"/admin/keys/{rotated['id']}/revoke"))[0] == 200
    assert (await call(p, "PUT", "/admin/teams/ads", {"tpm": 9000}))[0] == 200
    assert (await call(p, "DELETE", "/admin/teams/ads"))[0] == 200
    assert (await call(p, "POST", "/admin/cache/purge", {"model": MODEL}))[0] == 200
    status, made = await call(p, "POST", "/admin/admins", {"name": "ads-lead", "role": "team", "teams": ["ads"]})
    secrets.append(made["credential"])
    # the team admin: a change of its own team, then a refusal
    status, own = await call(p, "POST", "/admin/keys", {"team": "ads"}, key=made["credential"])
    secrets.append(own["key"])
    assert (await call(p, "POST", "/admin/keys", {"team": "search"}, key=made["credential"]))[0] == 403
    assert (await call(p, "POST", "/admin/admins/ads-lead/revoke"))[0] == 200
    reads = len(stored(redis_server))
    assert (await call(p, "GET", "/admin/keys"))[0] == 200  # reads are not changes
    assert len(stored(redis_server)) == reads

    status, doc = await call(p, "GET", "/admin/audit")
    entries = doc["data"]
    assert [e["action"] for e in entries] == [
        "admins.revoke", "keys.create", "keys.create", "admins.create", "cache.purge", "teams.delete",
        "teams.update", "keys.revoke", "keys.rotate", "keys.update", "keys.create"]  # newest first
    by = {(e["action"], e["outcome"], e["actor"]): e for e in entries}
    assert by[("keys.update", "ok", "root")]["before"] == {"limits": {"rpm": 5, "tpm": None, "tokens_per_day": None,
                                                                       "tokens_per_month": None}}
    assert by[("keys.update", "ok", "root")]["after"]["limits"]["rpm"] == 7
    assert by[("keys.rotate", "ok", "root")]["after"]["replaced_by"]["id"] == rotated["id"]
    assert by[("keys.revoke", "ok", "root")]["before"] == {"revoked": False}
    assert by[("keys.revoke", "ok", "root")]["after"] == {"revoked": True}
    assert by[("teams.update", "ok", "root")]["before"]["limits"]["rpm"] == 100
    assert by[("teams.update", "ok", "root")]["after"]["limits"]["tpm"] == 9000
    assert by[("cache.purge", "ok", "root")]["model"] == MODEL
    assert by[("admins.create", "ok", "root")]["admin"] == "ads-lead"
    assert by[("admins.create", "ok", "root")]["after"]["teams"] == ["ads"]
    refused = by[("keys.create", "refused", "ads-lead")]
    assert refused["team"] == "search" and refused["status"] == 403
    assert refused["reason"].startswith("permission_denied: ") and refused["actor_kind"] == "admin"
    assert by[("keys.create", "ok", "ads-lead")]["team"] == "ads"

    # one JSON line per entry, and no byte of the audit log or the access log holds a credential
    p.app[ACCESS_LOG].flush()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    audit_lines = [line for line in lines if line.get("event") == "audit"]
    assert len(audit_lines) == len(entries) and {line["request_id"] for line in audit_lines} >= {rid}
    assert any(line.get("path") == "/admin/keys/{id}/revoke" for line in lines)  # the access log is there too
    everything = out.getvalue() + raw_store(redis_server)
    for secret in secrets:
        assert secret.encode() not in everything, secret[:12]
        assert secret[-20:].encode() not in everything


async def test_filters_csv_and_a_team_admin_sees_its_teams_entries(
        make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p, _ = await make(make_proxy, upstream, redis_url)
    for team in ("ads", "search", "ads"):
        assert (await call(p, "POST", "/admin/keys", {"team": team}))[0] == 201
    assert (await call(p, "PUT", "/admin/teams/search", {"rpm": 3}))[0] == 200
    status, made = await call(p, "POST", "/admin/admins", {"name": "lead", "role": "team", "teams": ["ads"]})
    lead = made["credential"]

    async def actions(query: str, key: str = ADMIN) -> list[str]:
        status, doc = await call(p, "GET", "/admin/audit" + query, key=key)
        assert status == 200, doc
        return [f"{e['action']}:{e['team']}" for e in doc["data"]]

    assert await actions("?team=search") == ["teams.update:search", "keys.create:search"]
    assert await actions("?action=keys") == ["keys.create:ads", "keys.create:search", "keys.create:ads"]
    assert await actions("?action=teams.update&actor=root") == ["teams.update:search"]
    assert await actions("?actor=nobody") == []
    assert await actions("?limit=2") == ["admins.create:", "teams.update:search"]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert len(await actions(f"?since={today}&until={today}")) == 5
    assert await actions("?until=2000-01-01") == []
    assert await actions(f"?since={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(time.time() + 3600))}Z") == []
    # the team admin: its teams' entries only; another team named is refused (and that refusal is audited)
    assert await actions("", key=lead) == ["keys.create:ads", "keys.create:ads"]
    status, body = await call(p, "GET", "/admin/audit?team=search", key=lead)
    assert status == 403
    assert (await actions("?actor=lead"))[0] == "audit.list:search"

    status, text = await call(p, "GET", "/admin/audit?format=csv&team=ads")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["action"] for r in rows] == ["keys.create", "keys.create"] and rows[0]["time"].endswith("Z")
    assert orjson.loads(rows[0]["after"])["team"] == "ads" and rows[0]["before"] == ""
    for query, param in [("?since=yesterday", "since"), ("?until=2026-13-01", "until"), ("?format=xml", "format"),
                         ("?limit=0", "limit"), ("?limit=x", "limit"), ("?since=2026-02-02&until=2026-02-01",
                                                                        "until")]:
        status, body = await call(p, "GET", "/admin/audit" + query)
        assert status == 400 and body["error"]["param"] == param, (query, body)


async def test_the_client_address_comes_from_x_forwarded_for_only_through_a_trusted_proxy(
        make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    spoof = {"X-Forwarded-For": "198.51.100.7"}
    direct, _ = await make(make_proxy, upstream, redis_url)
    assert (await call(direct, "POST", "/admin/keys", {"team": "ads"}, headers=spoof))[0] == 201
    trusted = '[admin]\ntrusted_proxies = ["127.0.0.0/8", "10.0.0.0/8"]\n'
    behind, _ = await make(make_proxy, upstream, redis_url, trusted)
    assert (await call(behind, "POST", "/admin/keys", {"team": "ads"},
                       headers={"X-Forwarded-For": "203.0.113.9, 10.1.2.3"}))[0] == 201
    _, doc = await call(behind, "GET", "/admin/audit")
    assert [e["client"] for e in doc["data"]] == ["203.0.113.9", "127.0.0.1"]


async def test_entries_older_than_the_retention_leave_when_the_next_is_written(redis_url: str) -> None:
    settings = RedisSettings(url=redis_url)
    store = Store(connect(settings)[0], settings)
    client = store.client
    now_ms = int((await client.time())[0]) * 1000
    day = 86_400_000
    for age_days in (400, 30, 2):  # entries written earlier, as Redis ids say
        await client.xadd("ep:audit", {"e": orjson.dumps(AuditEntry("keys.create", "ok", "root",
                                                                    ts=(now_ms - age_days * day) / 1000).to_dict())},
                          id=f"{now_ms - age_days * day}-0")
    log = AuditLog(store, RedisKeys("ep"), retention_days=7, lines=None, clock=Clock(0.0))  # the writer's clock is off
    await log.record(AuditEntry("keys.revoke", "ok", "root"))
    kept = [orjson.loads(body[b"e"]) for _, body in await client.xrange("ep:audit")]
    assert [e["action"] for e in kept] == ["keys.create", "keys.revoke"]  # the 2-day-old one and the new one
    await store.close()


def test_the_command_line_acts_as_root_or_as_a_named_admin_and_is_audited(redis_server: RedisServer,
                                                                           tmp_path: Any) -> None:
    redis_server.flush()
    config = tmp_path / "proxy.toml"
    config.write_text(CONFIG)
    base = {k: v for k, v in os.environ.items() if k not in ("PROXY_CONFIG", "PROXY_ADMIN_CREDENTIAL")}
    env = {**base, "REDIS_URL": redis_server.url}

    def cli(*args: str, credential: str = "") -> subprocess.CompletedProcess[str]:
        e = {**env, **({"PROXY_ADMIN_CREDENTIAL": credential} if credential else {})}
        return subprocess.run([sys.executable, "-m", "proxy", "--config", str(config), *args], env=e,
                              capture_output=True, text=True, timeout=60)

    made = cli("admins", "create", "ads-lead", "--role", "team", "--team", "ads")
    assert made.returncode == 0, made.stderr
    credential = made.stdout.splitlines()[0]
    assert credential.startswith("sk-admin-") and "store this credential now" in made.stderr
    viewer = cli("admins", "create", "auditor", "--role", "viewer").stdout.splitlines()[0]
    listed = cli("admins", "list")
    assert "ads-lead" in listed.stdout and "team" in listed.stdout and credential not in listed.stdout

    # the team admin issues, rotates and revokes its own team's keys from the CLI
    key = cli("keys", "create", "--team", "ads", "--json", credential=credential)
    assert key.returncode == 0, key.stderr
    doc = orjson.loads(key.stdout)
    rotated = cli("keys", "rotate", doc["id"], "--json", credential=credential)
    assert rotated.returncode == 0, rotated.stderr
    new = orjson.loads(rotated.stdout)
    assert cli("keys", "revoke", new["id"], credential=credential).returncode == 0
    # ... and nothing else
    other = cli("keys", "create", "--team", "search")
    other_id = other.stderr.split("id ")[1].split(",")[0]
    for args in (("keys", "create", "--team", "search"), ("keys", "revoke", other_id),
                 ("teams", "set", "ads", "--rpm", "5"), ("cache", "purge", "--model", MODEL),
                 ("admins", "create", "x", "--role", "viewer"), ("keys", "create", "--team", "ads", "--rpm", "101")):
        refused = cli(*args, credential=credential)
        assert refused.returncode == 1 and "permission denied" in refused.stderr, (args, refused.stderr)
    assert cli("keys", "create", "--team", "ads", credential=viewer).returncode == 1
    shown = cli("keys", "list", credential=credential)
    assert doc["id"] in shown.stdout and other_id not in shown.stdout

    # revoked: refused at once
    assert cli("admins", "revoke", "ads-lead").returncode == 0
    gone = cli("keys", "list", credential=credential)
    assert gone.returncode == 1 and "revoked" in gone.stderr

    audit = orjson.loads(cli("audit", "--format", "json").stdout)
    assert all(e["how"] == "cli" for e in audit)
    mine = [(e["action"], e["outcome"]) for e in audit if e["actor"] == "ads-lead"]
    assert mine.count(("keys.create", "ok")) == 1 and ("keys.rotate", "ok") in mine and ("keys.revoke", "ok") in mine
    assert sum(outcome == "refused" for _, outcome in mine) == 6
    assert [e["actor"] for e in audit if e["action"] == "admins.create" and e["outcome"] == "ok"] == ["root", "root"]
    table = cli("audit", "--actor", "ads-lead", "--action", "keys.revoke")
    assert table.returncode == 0 and "keys.revoke" in table.stdout and other_id in table.stdout
    everything = raw_store(redis_server).decode()
    assert credential not in everything and viewer not in everything and doc["key"] not in everything
