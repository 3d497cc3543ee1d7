"""Issue 21, point 5: client connections are bounded, against a real `embedding-proxy serve` process.

Before: no timeout was passed to aiohttp, so an idle or slowloris connection was kept for about an hour whatever it
trickled, a body sent at 1 byte/s was read for as long as the client liked, and under `ulimit -n 1024` a couple of
thousand idle connections exhausted a worker's descriptors: every new connection, /healthz included, was then
reset. Deadlines and the cap are short settings here; their defaults are in README "Connections".
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer
from tests.stack import (
    CONFIG,
    MODEL,
    Server,
    create_keys,
    http,
    scrape,
    start_mock,
    start_proxy,
    value,
)

pytestmark = pytest.mark.redis
DEADLINES = CONFIG + """
[connections]
header_timeout_s = 1.0
keepalive_timeout_s = 2.0
min_body_rate_bytes_s = 1000
body_grace_s = 0.5
"""
WAIT_S = 15.0  # generous: the deadlines above are 1-2 s; before, nothing closed these connections for an hour


def _start(workdir: Path, mock_url: str, redis_url: str, config: str, nofile: int | None = None) -> tuple[Server, int]:
    """`embedding-proxy serve --workers 1` (with its file-descriptor limit set to `nofile`)."""
    proxy, url = start_proxy(workdir, mock_url, redis_url, config, workers=1, nofile=nofile)
    return proxy, int(url.rsplit(":", 1)[1])


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)


def _read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the proxy sends until it closes the connection, and how long that took."""
    start, got = time.monotonic(), b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return got, time.monotonic() - start
        got += chunk


class Stack:
    def __init__(self, workdir: Path, redis: RedisServer) -> None:
        redis.flush()
        self.mock, self.mock_url = start_mock(workdir)
        self.proxy, self.port = _start(workdir, self.mock_url, redis.url, DEADLINES)
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = create_keys(redis.url, ["search"])["search"][0]


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("connections"), redis_server)
    yield s
    s.proxy.stop()
    s.mock.stop()


def test_a_partial_request_line_is_answered_408_and_closed_within_the_header_deadline(stack: Stack) -> None:
    s = _connect(stack.port)
    s.sendall(b"POST /v1/embe")
    for _ in range(3):  # trickled bytes do not push the deadline back
        time.sleep(0.2)
        s.sendall(b"d")
    got, _ = _read_until_closed(s)
    status, _, body = got.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408 "), got
    assert json.loads(body)["error"]["code"] == "request_timeout"
    # headers that never end are a slowloris too
    s = _connect(stack.port)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):
        time.sleep(0.2)
        s.sendall(b"X-Slow: 1\r\n")
    assert _read_until_closed(s)[0].startswith(b"HTTP/1.1 408 ")


def test_a_connection_that_sends_nothing_is_closed_after_the_header_deadline(stack: Stack) -> None:
    got, _ = _read_until_closed(_connect(stack.port))
    assert got == b""  # nothing to answer: closed without a word


def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_time(stack: Stack) -> None:
    s = _connect(stack.port)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in answer
    s.settimeout(1.0)  # well before keepalive_timeout_s (2 s): still open, and it serves the next request
    with pytest.raises(TimeoutError):
        s.recv(1)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    s.settimeout(WAIT_S)
    got, waited = _read_until_closed(s)
    assert got == b"" and waited < WAIT_S
    samples = scrape(stack.url + "/metrics")[1]
    assert value(samples, "embedding_proxy_connections_closed_total", reason="keepalive_timeout") >= 1


def test_a_body_trickled_below_the_minimum_rate_gets_408(stack: Stack) -> None:
    s = _connect(stack.port)
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + stack.key.encode() + b"\r\nContent-Length: 1000\r\n\r\n{")
    s.settimeout(0.1)
    got, start = b"", time.monotonic()
    while not got and time.monotonic() - start < WAIT_S:
        try:
            s.sendall(b" ")  # 10 bytes a second: below 1,000
            got = s.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    status, _, body = got.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in status, got
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "1000 bytes per second" in error["message"]
    samples = scrape(stack.url + "/metrics")[1]
    assert value(samples, "embedding_proxy_connections_closed_total", reason="body_timeout") >= 1
    # an ordinary request is not affected
    status_code, doc = http("POST", stack.url + "/v1/embeddings", {"model": MODEL, "input": "fast enough"},
                            {"Authorization": f"Bearer {stack.key}"})
    assert status_code == 200, doc


# --- the cap, within a lowered file-descriptor limit --------------------------------------------------------------

# 256 descriptors, 20 Redis and 10 upstream connections: 256 - (20 + 10 + 64 kept) = 162 client connections.
SMALL_POOLS = CONFIG.replace("[upstreams.default]\n", "[upstreams.default]\npool_size = 10\n") + """
[redis]
max_connections = 20
"""


@pytest.fixture
def capped(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[Server, int]]:
    redis_server.flush()
    mock, mock_url = start_mock(tmp_path)
    proxy, port = _start(tmp_path, mock_url, redis_server.url, SMALL_POOLS, nofile=256)
    yield proxy, port
    proxy.stop()
    mock.stop()


def test_idle_connections_beyond_the_descriptors_close_the_oldest_and_healthz_is_answered(
        capped: tuple[Server, int]) -> None:
    proxy, port = capped
    assert "at most 162 open" in proxy.stderr() and "capped at 162" in proxy.stderr()
    served = _connect(port)  # a client already served, its connection kept alive: the oldest of all
    served.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert served.recv(65536).startswith(b"HTTP/1.1 200 ")
    idle = []
    for _ in range(300):  # more than the process has descriptors for
        idle.append(_connect(port))
    time.sleep(0.5)
    status, doc = http("GET", f"http://127.0.0.1:{port}/healthz", timeout=WAIT_S)
    assert (status, doc) == (200, {"status": "ok"})
    # the policy: the oldest connections that never had a request answered were closed to make room; the newest
    # are still open, and so is the client served before them all
    served.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert served.recv(65536).startswith(b"HTTP/1.1 200 ")
    for s in idle[:50]:
        s.settimeout(WAIT_S)
        assert _read_until_closed(s)[0] == b""
    for s in idle[-20:]:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    samples = scrape(f"http://127.0.0.1:{port}/metrics")[1]
    assert value(samples, "embedding_proxy_connection_limit") == 162
    assert value(samples, "embedding_proxy_connections_closed_total", reason="evicted") >= 300 - 162
    assert value(samples, "embedding_proxy_max_fds") == 256
    assert 0 < value(samples, "embedding_proxy_open_fds") < 256
    assert "client connections at the cap (162 per process" in proxy.stderr()
    for s in [served, *idle]:
        s.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused_at_once(
        redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.flush()
    mock, mock_url = start_mock(tmp_path)
    # three connections at most; bodies may take their time (30 s of grace)
    config = CONFIG + "[connections]\nmax_connections = 3\nbody_grace_s = 30\n"
    proxy, port = _start(tmp_path, mock_url, redis_server.url, config)
    try:
        key = create_keys(redis_server.url, ["search"])["search"][0]
        busy = []
        for _ in range(3):  # each sending a body, slowly but fast enough: busy, never closed for room
            s = _connect(port)
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 100000\r\n\r\n{")
            busy.append(s)
        time.sleep(0.3)
        got, _ = _read_until_closed(_connect(port))
        status, _, body = got.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in status, got
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        for s in busy:
            s.close()
    finally:
        proxy.stop()
        mock.stop()
