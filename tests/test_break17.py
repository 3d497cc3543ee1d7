"""Trying to break issue 17's promises (roles, audit log, sessions) against a real Redis and the app over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

import pytest

from proxy.http.app import KEYSTORE
from tests.conftest import Proxy, Upstream, make_settings

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
ADMIN = "root-admin-key-for-break17-tests-0123456789"
CONFIG = "[quotas]\nteam_cache_s = 0.0\n[teams.ads]\nrpm = 100\ntpm = 50000\n"
TRUSTED = '[admin]\ntrusted_proxies = ["127.0.0.0/8"]\n'


async def make(make_proxy: Any, upstream: Upstream, redis_url: str, config: str = "") -> Proxy:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, CONFIG + config, PROXY_ADMIN_KEY=ADMIN))
    return p


async def call(p: Proxy, method: str, path: str, body: Any = None, key: str | None = ADMIN,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    hdrs = {"Authorization": f"Bearer {key}"} if key else {}
    resp = await p.client.request(method, path, json=body, headers={**hdrs, **(headers or {})})
    text = await resp.text()
    return resp.status, (await resp.json()) if resp.content_type == "application/json" else text


async def new_admin(p: Proxy, name: str, role: str, teams: list[str] | None = None) -> str:
    status, body = await call(p, "POST", "/admin/admins", {"name": name, "role": role, "teams": teams or []})
    assert status == 201, body
    return str(body["credential"])


async def raw(p: Proxy, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (headers aiohttp's client would refuse to send)."""
    server = p.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return int(data.split(b" ", 2)[1]), data


async def test_non_utf8_x_forwarded_for_through_a_trusted_proxy_is_no_500_and_the_change_is_audited(
        make_proxy: Any, upstream: Upstream, redis_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    """X-Forwarded-For bytes that are not UTF-8 (any client can send them through the load balancer, which appends
    its own hop) made the audit entry unserialisable: the key was created, the answer was a 500 and no entry was
    stored; a refused revoke by a team admin was a 500 with no entry either."""
    p = await make(make_proxy, upstream, redis_url, TRUSTED)
    lead = await new_admin(p, "ads-lead", "team", ["ads"])
    _, other = await p.app[KEYSTORE].create("search", name="not yours")
    status, data = await raw(p, b"POST /admin/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN.encode()
                             + b"\r\nX-Forwarded-For: \xff\xfe, 203.0.113.9\xff\r\nContent-Type: application/json\r\n",
                             b'{"team":"ads"}')
    assert status == 201, data
    status, data = await raw(p, b"POST /admin/keys/" + other.id.encode() + b"/revoke HTTP/1.1\r\nHost: x\r\n"
                             b"Authorization: Bearer " + lead.encode() + b"\r\nX-Forwarded-For: 198.51.100.4, \xff\r\n")
    assert status == 403 and b"permission_denied" in data, data
    status, doc = await call(p, "GET", "/admin/audit?limit=2")
    assert status == 200
    refused, created = doc["data"]
    assert (refused["action"], refused["outcome"], refused["key_id"]) == ("keys.revoke", "refused", other.id)
    assert (created["action"], created["outcome"], created["team"]) == ("keys.create", "ok", "ads")
    # a garbage hop is never taken for an address: the nearest hop a trusted proxy wrote is
    assert refused["client"] == "127.0.0.1" and created["client"] == "127.0.0.1"
    # valid hops still work as before
    status, _ = await call(p, "POST", "/admin/keys", {"team": "ads"},
                           headers={"X-Forwarded-For": "not-an-ip, 203.0.113.9"})
    assert status == 201
    _, doc = await call(p, "GET", "/admin/audit?limit=1")
    assert doc["data"][0]["client"] == "203.0.113.9"
    # what the test produced (audit lines, logs): no credential
    out, err = capfd.readouterr()
    assert '"event":"audit"' in out and lead not in out + err and ADMIN not in out + err


async def test_the_audit_team_filter_is_a_checked_team_name_never_written_raw_into_the_log(
        make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    """`GET /admin/audit?team=` took any string: a team admin's refused read wrote it into the audit log as the
    entry's team (NULs, any text up to the request line's limit, `=HYPERLINK(...)` into the CSV a platform admin
    opens in a spreadsheet), where every other route answers 400 for a bad team name."""
    p = await make(make_proxy, upstream, redis_url)
    lead = await new_admin(p, "ads-lead", "team", ["ads"])
    for bad in ("=HYPERLINK(\"http://x\")", "ads\x00", "ADS", "x" * 2000):
        for key in (lead, ADMIN):
            status, body = await call(p, "GET", "/admin/audit?" + urlencode({"team": bad}), key=key)
            assert status == 400 and body["error"]["param"] == "team", (bad, body)
    status, doc = await call(p, "GET", "/admin/audit?format=csv")
    assert status == 200 and "HYPERLINK" not in doc and "x" * 100 not in doc
    assert (await call(p, "GET", "/admin/audit?team=ads", key=lead))[0] == 200
    assert (await call(p, "GET", "/admin/audit?team=search", key=lead))[0] == 403
