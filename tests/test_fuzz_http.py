"""Headers and framing, fuzzed over raw sockets on every route: never a 5xx, errors in OpenAI's shape, nothing sent
upstream, nothing written to Redis.

Each case is one connection carrying bytes a client library would never send: header values that are not UTF-8 in
every header the proxy reads, bodies that do not decompress, chunked bodies that break off, huge query strings,
odd content types, JSON the proxy must refuse. No body here is a valid request, so whatever the headers say
(a working gateway key, the admin key) nothing may reach the upstream or change Redis.

Answers that did not pass the proxy's middleware (no `x-request-id`) are aiohttp's own answers to HTTP it cannot
parse (a NUL or a raw non-ASCII byte in the request line, a request line or header over 8190 bytes, a bad chunk
size, Content-Length with Transfer-Encoding, a Content-Encoding aiohttp cannot decode: br and zstd without their
libraries): those must be plain 400s. Replay a failure with FUZZ_SEED=<seed> (the seed is in the message).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import os
import random
import zlib
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from proxy.http.accesslog import AccessLog
from proxy.http.app import ACCESS_LOG, KEYSTORE, METRICS, create_app
from tests.conftest import RedisServer, Upstream, make_settings
from tests.helpers import RawAnswer, raw_http, served, until

pytestmark = pytest.mark.redis
SEED = int(os.environ.get("FUZZ_SEED", "20260909"))
CASES = 700
ADMIN = "fuzz-admin-secret-0123456789"
MAX_BODY = 64 * 1024
MODEL = b"text-embedding-3-small"

# Header bytes that are not UTF-8 (or are, but not ASCII): aiohttp passes them on as lone surrogates. Nine in ten
# odd values are those; the rest are bytes aiohttp's parser refuses itself (control bytes, a value over 8190 bytes).
NOT_UTF8 = [b"\xff\xfe", b"\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"caf\xc3\xa9", b"", b" ",
            b"\xff" * 200, b"%FF", b"\\u0000"]
UNPARSEABLE = [b"\x00", b"\x7f", b"\x1b[31m", b"a" * 9000]


def odd(rng: random.Random) -> bytes:
    return rng.choice(NOT_UTF8 if rng.random() < 0.9 else UNPARSEABLE)
# Request bodies that no route accepts: each one is refused before the upstream or a Redis write.
BAD_JSON = [
    b'{"model": "' + MODEL + b'", "input": "\\ud800"}',
    b'{"model": "' + MODEL + b'", "input": ' + b"[" * 600 + b"1" + b"]" * 600 + b"}",
    b"[" * 2000 + b"]" * 2000,
    b'{"model": "' + MODEL + b'", "input": "x", "dimensions": 1e999}',
    b'{"model": "' + MODEL + b'", "input": "x", "dimensions": 1e308}',
    b'{"model": "' + MODEL + b'", "input": "x", "dimensions": -0.0}',
    b'{"model": "' + MODEL + b'", "input": [[[1]]]}',
    b'{"model": "' + MODEL + b'", "input": [' + b"[1]," * 2100 + b"[1]]}",
    b'{"model": "\\u0000", "input": "x"}',
    b'{"model": "' + MODEL + b'", "input": "x", "encoding_format": "\\udfff"}',
    b'{"model": "' + MODEL + b'", "input": "\xff\xfe"}',
    b'{"team": "abc\\n"}',
    b'{"team": "search", "expires_in_s": 1e300}',
    b'{"team": "search", "expires_in_s": 1e999}',
    b'{"team": "search", "expires_in_s": -1}',
    b'{"team": "\\ud800"}',
    b'{"grace_s": 1e300}',
    b'{"grace_s": "1"}',
    b'{"rpm": 1e300}',
    b'{"rpm": -1}',
    b'{"tpm": true}',
    b'{"rpm": 5, "unknown": 1}',
    b"null",
    b'"\\ud800"',
    b"\xff\xfe{\x00}",
    b"{" * 5000,
]
KEY_IDS = [b"key_0000000000000000", b"%FF%FE", b"key_%0A", b"..%2F..%2Fetc", b"%ED%A0%80", b"k" * 3000, b"%00"]
TEAMS = [b"nobody", b"abc%0A", b"%FF", b"UPPER", b"a" * 100, b"%00", b"-x", b"%ED%A0%80"]
MODELS = [MODEL, b"%FF", b"%00", b"nope", b"x" * 2000]
QUERIES = [b"", b"", b"?team=%FF%FE", b"?team=abc%0A", b"?team=nobody", b"?since=0001-01-01&until=9999-12-31",
           b"?since=2024-02-30", b"?since=1e999", b"?by=%00&format=%FF", b"?by=key&format=csv&team=%C3%A9",
           b"?a=" + b"%FF" * 2000, b"?" + b"x" * 9000, b"?team=\xff", b"?&&&==&", b"?since=" + b"9" * 5000,
           b"?" + b"%" * 100]
METHODS = [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"PROPFIND", b"G\xffT"]


@dataclass(frozen=True)
class Case:
    method: bytes
    raw: bytes
    half_close: bool  # the client stops sending mid-body: there may be nobody left to answer


# (method, path, mutating) of every route; path parameters are drawn per case.
ROUTES = [
    (b"POST", b"/v1/embeddings", False), (b"GET", b"/v1/models", False), (b"GET", b"/v1/models/{model}", False),
    (b"GET", b"/admin/keys", False), (b"POST", b"/admin/keys", True), (b"GET", b"/admin/keys/{id}", False),
    (b"PATCH", b"/admin/keys/{id}", True), (b"POST", b"/admin/keys/{id}/revoke", True),
    (b"POST", b"/admin/keys/{id}/rotate", True), (b"GET", b"/admin/teams", False),
    (b"GET", b"/admin/teams/{team}", False), (b"PUT", b"/admin/teams/{team}", True),
    (b"DELETE", b"/admin/teams/{team}", True), (b"GET", b"/admin/usage", False), (b"GET", b"/healthz", False),
    (b"GET", b"/readyz", False), (b"GET", b"/metrics", False), (b"GET", b"/nowhere", False),
    (b"GET", b"/admin/ui", False), (b"GET", b"/admin/ui/", False), (b"GET", b"/admin/ui/app.js", False),
    (b"GET", b"/admin/ui/nothing", False),
]


def make_case(rng: random.Random, key: bytes, key_id: bytes) -> Case:
    method, path, mutating = rng.choice(ROUTES)
    if rng.random() < 0.1:
        method = rng.choice(METHODS)  # mostly a 405, sometimes a request line aiohttp refuses
        mutating = True
    # A mutating route only ever names keys and teams that do not exist, or gets a body it refuses.
    path = path.replace(b"{model}", rng.choice(MODELS)).replace(b"{team}", rng.choice(TEAMS))
    path = path.replace(b"{id}", key_id if not mutating and rng.random() < 0.3 else rng.choice(KEY_IDS))
    target = path + rng.choice(QUERIES)
    version = b"HTTP/1.0" if rng.random() < 0.05 else b"HTTP/1.1"
    headers = [b"Host: 127.0.0.1", b"Connection: close"]
    credentials = [b"Bearer " + key, b"Bearer " + ADMIN.encode(), b"Bearer sk-gateway-" + b"A" * 43]
    if rng.random() < 0.5:  # the route's own credentials: the case reaches the handler
        headers.append(b"Authorization: Bearer " + (ADMIN.encode() if path.startswith(b"/admin") else key))
    elif rng.random() < 0.8:
        value = rng.choice([*credentials, b"Bearer " + odd(rng), odd(rng), b"Basic Zm9vOmJhcg==",
                            b"Bearer", rng.choice(credentials) + odd(rng), b"bearer " + ADMIN.encode()])
        headers.append(b"Authorization: " + value)
    if rng.random() < 0.3:
        headers.append(b"api-key: " + rng.choice([key, ADMIN.encode(), odd(rng), key + b"\xff"]))
    if rng.random() < 0.5:
        headers.append(b"x-request-id: " + rng.choice([b"fuzz-1", b"abc\xff", b"a" * 200, b"../x", odd(rng)]))
    if rng.random() < 0.5:
        headers.append(b"Content-Type: " + rng.choice([
            b"application/json", b"text/plain", b"application/json; charset=\xff", b"multipart/form-data; boundary=x",
            b"application/x-www-form-urlencoded", b"\xff/\xfe", b";;;", b"application/json; charset=utf-16",
            odd(rng)]))
    for name in (b"Accept", b"Accept-Encoding", b"Expect", b"Cookie", b"Origin"):
        if rng.random() < 0.1:
            headers.append(name + b": " + rng.choice([b"100-continue", b"*/*", b"gzip", odd(rng)]))
    body, half_close = frame_body(rng, headers, method in (b"POST", b"PUT", b"PATCH") or rng.random() < 0.2)
    raw = method + b" " + target + b" " + version + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
    return Case(method, raw, half_close)


def frame_body(rng: random.Random, headers: list[bytes], wants_body: bool) -> tuple[bytes, bool]:
    """The body's bytes (headers gain their framing); True when the client then half-closes mid-body."""
    payload = rng.choice(BAD_JSON)
    mode = rng.choice(["length", "gzip-bad", "gzip-of-bad", "encoding", "chunked", "chunked-cut", "chunk-size-bad",
                       "short", "length-and-chunked", "too-large"]) if wants_body else "none"
    if mode == "none":
        return b"", False
    if mode == "gzip-bad":
        headers.append(b"Content-Encoding: " + rng.choice([b"gzip", b"deflate", b"br", b"zstd", b"x-unknown"]))
        payload = rng.choice([b"not compressed", gzip.compress(b"{}")[:-6], zlib.compress(b"{}")[:3], b"\xff" * 40])
    elif mode == "gzip-of-bad":
        headers.append(b"Content-Encoding: gzip")
        payload = gzip.compress(payload)
    elif mode == "encoding":
        headers.append(b"Content-Encoding: " + rng.choice([b"identity", b"gzip, deflate", b"\xff", b"GZIP", odd(rng)]))
    elif mode == "too-large":
        payload = b'{"input": "' + b"x" * (MAX_BODY + 10) + b'"}'
    if mode.startswith("chunk") or mode == "length-and-chunked":
        headers.append(b"Transfer-Encoding: " + rng.choice([b"chunked", b"Chunked", b"gzip, chunked"]))
        chunks = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
        if mode == "length-and-chunked":
            headers.append(b"Content-Length: %d" % len(chunks))
        if mode == "chunked-cut":
            return chunks[: rng.randrange(1, len(chunks) - 5)], True
        if mode == "chunk-size-bad":
            return b"zz\r\n" + payload + b"\r\n0\r\n\r\n", False
        return chunks, False
    if mode == "short":
        headers.append(b"Content-Length: %d" % (len(payload) + rng.randrange(1, 1000)))
        return payload, True
    headers.append(b"Content-Length: %d" % len(payload))
    return payload, False


def check(case: Case, answer: RawAnswer | None) -> str | None:
    """What is wrong with this answer, or None."""
    if answer is None:
        return None if case.half_close else "no answer"
    if answer.status == 0:
        return "no answer within 5 s"
    if answer.status >= 500:
        return f"status {answer.status}"
    ours = b"x-request-id" in answer.headers
    if not ours:  # aiohttp's own answer to HTTP it cannot parse
        return None if answer.status == 400 else f"aiohttp answered {answer.status}"
    if answer.status < 400 or case.method == b"HEAD":  # an answer to HEAD has no body
        return None
    if answer.headers.get(b"content-type", b"").split(b";")[0] != b"application/json":
        return f"error {answer.status} is not JSON"
    body = orjson.loads(answer.body)
    if set(body) != {"error"} or set(body["error"]) != {"message", "type", "param", "code"}:
        return f"error {answer.status} is not in OpenAI's shape: {body}"
    if not isinstance(body["error"]["message"], str) or "Traceback" in body["error"]["message"]:
        return f"bad error message: {body}"
    return None


def snapshot(server: RedisServer) -> dict[bytes, bytes | None]:
    client = server.client()
    try:
        return {k: client.dump(k) for k in sorted(client.keys("*"))}  # type: ignore[misc]
    finally:
        client.close()


async def _index_built(app: Any, redis_server: RedisServer) -> None:
    """Until the background build of the team key indexes (keyindexbuild.py) marked them built and let its lock go."""
    client = redis_server.client()
    try:
        for _ in range(400):
            if await app[KEYSTORE].index.built() and not client.exists("ep:meta:teamkeys-lock"):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the team key indexes were not built within 20 s")
    finally:
        client.close()


async def test_fuzzed_headers_and_framing_never_5xx_never_upstream_never_redis(
    upstream: Upstream, redis_server: RedisServer, redis_url: str, caplog: Any
) -> None:
    access = io.BytesIO()
    config = f"[server]\nmax_body_bytes = {MAX_BODY}\n"
    app = create_app(make_settings(upstream.base_url, redis_url, config, PROXY_ADMIN_KEY=ADMIN),
                     access_log=AccessLog(access))
    caplog.set_level(logging.WARNING, logger="proxy")
    failures, statuses = [], set()
    async with served(app) as port:
        key, record = await app[KEYSTORE].create("search")
        await _index_built(app, redis_server)  # the team indexes' one-time build, started with the app, is over
        before = snapshot(redis_server)
        rng = random.Random(SEED)
        cases = [make_case(rng, key.encode(), record.id.encode()) for _ in range(CASES)]
        for start in range(0, CASES, 20):
            batch = cases[start:start + 20]
            answers = await asyncio.gather(*(raw_http(port, c.raw, half_close=c.half_close) for c in batch))
            for n, (case, answer) in enumerate(zip(batch, answers, strict=True)):
                statuses.add(None if answer is None else answer.status)
                if (problem := check(case, answer)) is not None:
                    failures.append(f"case {start + n} (FUZZ_SEED={SEED}): {problem}\n  sent {case.raw[:300]!r}")
        await until(lambda: app[METRICS].in_flight_now == 0)  # handlers whose client went away end on their own
        app[ACCESS_LOG].flush()
        after = snapshot(redis_server)
    assert not failures, "\n".join(failures[:10])
    assert {400, 401, 404, 405, 413} <= statuses  # the fuzz reached auth, routing, body checks and the size limit
    assert upstream.state.requests == 0
    assert after == before
    assert [r.getMessage() for r in caplog.records if r.name.startswith("proxy") and r.levelno >= logging.ERROR] == []
    logged = [orjson.loads(line)["status"] for line in access.getvalue().splitlines()]
    assert len(logged) > CASES // 2 and max(logged) < 500  # requests nobody was left to answer are logged too
