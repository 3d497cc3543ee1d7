"""Bad bytes and bounds: bodies that do not decode, header bytes that are not UTF-8, names with a final newline,
expiries and report ranges without a bound, and an error answer that cannot be built. Each is a 4xx in OpenAI's
shape (or a bounded value), never a 500."""

from __future__ import annotations

import asyncio
import io
import math
from typing import Any

import orjson
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.accounts.keys import MAX_LIFETIME_S, hash_key
from proxy.config import ConfigError, parse
from proxy.config.limits import check_team
from proxy.errors import ProxyError, RateLimited
from proxy.http.accesslog import AccessLog
from proxy.http.app import ACCESS_LOG, KEYSTORE, METRICS, create_app, retry_after_header
from tests.conftest import Proxy, Upstream, make_settings
from tests.helpers import raw_http, served, until
from tests.test_cli import cli
from tests.test_errors import assert_openai_error

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
ADMIN = "bad-input-admin-key"


async def start(make_proxy: Any, upstream: Upstream, redis_url: str, **env: str) -> Proxy:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, **{"PROXY_ADMIN_KEY": ADMIN, **env}))
    return p


def port(p: Proxy) -> int:
    assert p.client.server.port is not None
    return p.client.server.port


def request(method: str, path: str, *headers: bytes, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close", *headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decompress_is_400(
    make_proxy: Any, upstream: Upstream, redis_url: str, encoding: str
) -> None:
    p = await start(make_proxy, upstream, redis_url)
    key = await p.new_key()
    headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
    for path, auth in (("/v1/embeddings", key), ("/admin/keys", ADMIN)):
        resp = await p.client.post(path, data=b'{"model": "x"}', headers={**headers, "Authorization": f"Bearer {auth}"})
        assert resp.status == 400, path
        body = await resp.json()
        assert_openai_error(body, param=None, code="invalid_body")
        assert "Content-Encoding" in body["error"]["message"]
    assert upstream.state.requests == 0


async def test_a_body_cut_short_is_logged_as_400_without_a_traceback(
    upstream: Upstream, redis_url: str, caplog: Any
) -> None:
    access = io.BytesIO()
    app = create_app(make_settings(upstream.base_url, redis_url), access_log=AccessLog(access))
    async with served(app) as proxy_port:
        key, _ = await app[KEYSTORE].create("search")
        auth = b"Authorization: Bearer " + key.encode()
        cut = [  # Content-Length promises more than comes; a chunk breaks off
            request("POST", "/v1/embeddings", auth, b"Content-Length: 100") + b'{"model"',
            request("POST", "/v1/embeddings", auth, b"Transfer-Encoding: chunked") + b'40\r\n{"model": ',
        ]
        for data in cut:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writer.write(data)
            await until(lambda: app[METRICS].in_flight_now == 1)  # the handler is reading the body
            writer.write_eof()
            assert await reader.read() == b""  # nobody is left to answer
            writer.close()
            await until(lambda: app[METRICS].in_flight_now == 0)
        app[ACCESS_LOG].flush()
    assert [orjson.loads(line)["status"] for line in access.getvalue().splitlines()] == [400, 400]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("proxy")] == []


@pytest.mark.parametrize("header,code", [
    (b"Authorization: Bearer \xff\xfe", "invalid_api_key"), (b"Authorization: \xff", "missing_api_key"),
    (b"api-key: \xc3\x28", "invalid_api_key"),
    (b"Authorization: Bearer " + ADMIN.encode() + b"\x80", "invalid_api_key"),
])
async def test_header_bytes_that_are_not_utf8_are_401_on_admin_routes(
    make_proxy: Any, upstream: Upstream, redis_url: str, header: bytes, code: str
) -> None:
    p = await start(make_proxy, upstream, redis_url)
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys/key_x/revoke"), ("GET", "/admin/usage"),
                         ("GET", "/v1/models")):
        answer = await raw_http(port(p), request(method, path, header, b"x-request-id: r\xff"))
        assert answer is not None and answer.status == 401, (path, answer)
        assert_openai_error(answer.json(), param=None, code=code)
        assert answer.headers[b"x-request-id"] != b"r\xff"  # not echoed: a fresh id instead


async def test_an_admin_key_that_is_not_utf8_still_matches_its_own_bytes(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    # os.environ holds bytes that are not UTF-8 as surrogates, the way aiohttp decodes the header
    p = await start(make_proxy, upstream, redis_url, PROXY_ADMIN_KEY="admin-\udcff\udcfe")
    answer = await raw_http(port(p), request("GET", "/admin/teams", b"Authorization: Bearer admin-\xff\xfe"))
    assert answer is not None and answer.status == 200
    assert hash_key("sk-\udcff") != hash_key("sk-\udcfe")  # hashing any str works, and keeps them apart


async def test_team_names_with_a_final_newline_are_refused(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await start(make_proxy, upstream, redis_url)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    created = await p.client.post("/admin/keys", json={"team": "abc\n"}, headers=auth)
    assert created.status == 400
    assert_openai_error(await created.json(), param="team")
    for method in ("GET", "PUT", "DELETE"):
        resp = await p.client.request(method, "/admin/teams/abc%0A", json={"rpm": 5}, headers=auth)
        assert resp.status == 400, method
        assert_openai_error(await resp.json(), param="team")
    for query in ("team=abc%0A", "team=%FF%FE"):
        for path in ("/admin/keys", "/admin/usage"):
            resp = await p.client.get(f"{path}?{query}", headers=auth)
            assert resp.status == 400, (path, query)
            assert_openai_error(await resp.json(), param="team")
    with pytest.raises(ValueError):
        check_team("abc\n")
    with pytest.raises(ConfigError, match="team names"):
        parse('[teams."abc\\n"]\nrpm = 1\n', "x.toml", {})
    assert redis.Redis.from_url(redis_url).keys("ep:team*") == []


@pytest.mark.parametrize("field,path,body", [
    ("expires_in_s", "/admin/keys", {"team": "search", "expires_in_s": 1e300}),
    ("expires_in_s", "/admin/keys", {"team": "search", "expires_in_s": MAX_LIFETIME_S + 1}),
    ("grace_s", "/admin/keys/{id}/rotate", {"grace_s": 1e300}),
])
async def test_expiry_and_grace_are_bounded(
    make_proxy: Any, upstream: Upstream, redis_url: str, field: str, path: str, body: dict[str, Any]
) -> None:
    p = await start(make_proxy, upstream, redis_url)
    _, record = await p.app[KEYSTORE].create("search")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    resp = await p.client.post(path.format(id=record.id), json=body, headers=auth)
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == field and "3650 days" in err["message"]
    longest = await p.client.post("/admin/keys", json={"team": "search", "expires_in_s": MAX_LIFETIME_S},
                                  headers=auth)
    assert longest.status == 201
    listed = await p.client.get("/admin/keys", headers=auth)
    assert listed.status == 200 and len((await listed.json())["data"]) == 2


async def test_cli_bounds_durations_and_lists_past_a_bad_record(redis_url: str) -> None:
    too_long = cli(redis_url, "keys", "create", "--team", "search", "--expires-in", "3651d")
    assert too_long.returncode == 2 and "longer than 3650 days" in too_long.stderr
    assert cli(redis_url, "keys", "create", "--team", "search", "--expires-in", "3650d").returncode == 0
    # records written before the bound (an expiry of 1e300) or damaged by hand: the others are still listed
    raw = redis.Redis.from_url(redis_url)
    for key_id, fields in (("key_huge", {"expires_at": "1e300"}), ("key_broken", {"created_at": "not a number"})):
        raw.hset(f"ep:key:{key_id}-digest", mapping={"id": key_id, "team": "old", **fields})
        raw.set(f"ep:keyid:{key_id}", f"{key_id}-digest")
        raw.zadd("ep:keys", {key_id: 1.0})
    listed = cli(redis_url, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert "key_huge" in listed.stdout and "1e+300" in listed.stdout and "key_broken" not in listed.stdout
    assert "search" in listed.stdout


async def test_usage_range_is_bounded_by_the_retention(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, "[usage]\nretention_days = 30\n",
                                              PROXY_ADMIN_KEY=ADMIN))
    auth = {"Authorization": f"Bearer {ADMIN}"}
    huge = await p.client.get("/admin/usage?since=0001-01-01&until=9999-12-31", headers=auth)
    assert huge.status == 400
    err = (await huge.json())["error"]
    assert err["param"] == "since" and "3652059 days" in err["message"] and "usage.retention_days" in err["message"]
    assert "at most 30" in err["message"]
    assert (await p.client.get("/admin/usage?since=2025-01-01&until=2025-01-31", headers=auth)).status == 400
    ok = await p.client.get("/admin/usage?since=2025-01-01&until=2025-01-30", headers=auth)
    assert ok.status == 200 and (await ok.json())["data"] == []
    cli_run = cli(redis_url, "usage", "--since", "0001-01-01", "--until", "9999-12-31")
    assert cli_run.returncode == 2 and "usage.retention_days" in cli_run.stderr


def test_retry_after_is_whole_seconds_within_bounds() -> None:
    month = str(31 * 86400)
    assert [retry_after_header(v) for v in (math.inf, 1e300, math.nan, -math.inf, 0.2, 2.5, 60.0)] == [
        month, month, "1", "1", "1", "3", "60"]


class Unbuildable(ProxyError):
    status = 429

    def body(self) -> dict[str, Any]:
        raise RuntimeError("cannot build this body")


async def test_the_error_middleware_answers_and_logs_whatever_the_error_holds(redis_url: str) -> None:
    async def infinite_wait(request: web.Request) -> web.Response:
        raise RateLimited("Slow down.", retry_after=float("1e309"))

    async def unbuildable(request: web.Request) -> web.Response:
        raise Unbuildable("x")

    access = io.BytesIO()
    app = create_app(make_settings("http://127.0.0.1:9/v1", redis_url), access_log=AccessLog(access))
    app.router.add_get("/test/infinite", infinite_wait)
    app.router.add_get("/test/unbuildable", unbuildable)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        slow = await client.get("/test/infinite")
        assert slow.status == 429 and slow.headers["Retry-After"] == str(31 * 86400)
        assert_openai_error(await slow.json(), code="rate_limit_exceeded")
        broken = await client.get("/test/unbuildable")
        assert broken.status == 500
        assert_openai_error(await broken.json(), code="internal_error")
        app[ACCESS_LOG].flush()
        assert [orjson.loads(line)["status"] for line in access.getvalue().splitlines()] == [429, 500]
    finally:
        await client.close()


async def test_unknown_expectations_are_ignored_everywhere(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await start(make_proxy, upstream, redis_url)
    for path, status, code in (("/healthz", 200, None), ("/nowhere", 404, "unknown_url"),
                               ("/v1/embeddings", 401, "missing_api_key")):
        for expect in (b"Expect: \xff\xfe", b"Expect: something-else"):
            answer = await raw_http(port(p), request("GET", path, expect))
            assert answer is not None and answer.status == status, path
            if answer.status != 200:
                assert b"x-request-id" in answer.headers
                assert_openai_error(answer.json(), code=code)
    continued = await raw_http(port(p), request("POST", "/admin/teams", b"Expect: 100-continue",
                                                b"Authorization: Bearer " + ADMIN.encode(), body=b"{}"))
    assert continued is not None and continued.status == 405
    assert_openai_error(continued.json(), code="method_not_allowed")
