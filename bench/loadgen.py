"""An open-loop HTTP/1.1 load generator on raw asyncio protocols (no HTTP client library on the hot path).

Why not a packaged tool: none of the open-loop ones (wrk2, vegeta, k6, oha) is packaged in Debian, PyPI or npm;
`wrk`, `hey` and `autocannon` are closed-loop and hide queueing delay (coordinated omission).

Open loop, as wrk2: request i is due at t0 + i / rate whatever happened before, and its latency is measured from
that scheduled time, so a stalled server is charged for every request that had to wait behind it. Connections are
opened before the clock starts and reused (keep-alive); a request due while every connection is busy waits in a
backlog, and that wait counts. Every run is bounded in count (rate x duration) and in time (a hard deadline).
Percentiles are exact, over every sample (numpy), not bucketed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_HEADER_END = b"\r\n\r\n"


def build_request(port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 POST (or GET when `body` is empty and path starts with 'GET ')."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ConnectionClosed(Exception):
    pass


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time. Responses have a Content-Length or are chunked."""

    def __init__(self, on_done: Callable[[_Conn, int, bytes | None], None], keep_body: bool) -> None:
        self.transport: Any = None  # uvloop's TCPTransport does not subclass asyncio's transport classes
        self._buf = bytearray()
        self._need = -1  # body bytes still expected (of this chunk, when chunked); -1 while reading the head
        self._chunked = False
        self._body: bytearray | None = None
        self._status = 0
        self._on_done = on_done
        self.keep_body = keep_body
        self.closed = False
        self.tag: Any = None  # what the owner is waiting for on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tag is not None:
            self._on_done(self, -1, None)

    def send(self, request: bytes, tag: Any) -> None:
        assert self.transport is not None
        self.tag = tag
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        # Large answers (a 2048-vector batch is 17 MB) are counted, not stored, unless the caller wants the body.
        while data:
            if self._need < 0 and not self._chunked:
                self._buf += data
                end = self._buf.find(_HEADER_END)
                if end < 0:
                    return
                head = bytes(self._buf[:end]).lower()
                self._status = int(head[9:12])
                data = bytes(self._buf[end + 4 :])
                self._buf.clear()
                self._body = bytearray() if self.keep_body else None
                if b"\r\ntransfer-encoding: chunked" in head:
                    self._chunked = True
                    continue
                i = head.find(b"\r\ncontent-length:")
                if i < 0:
                    raise ConnectionClosed("response without Content-Length")
                j = head.find(b"\r\n", i + 2)
                self._need = int(head[i + 17 : j if j >= 0 else len(head)])
            if self._need < 0:  # chunked, between chunks: the next chunk's size line
                data = self._chunk_head(data)
                continue
            take = min(self._need, len(data))
            if self._body is not None:
                self._body += data[:take]
            self._need -= take
            data = data[take:]
            if self._need:
                return
            if self._chunked:
                self._need = -1
                continue
            self._finish()

    def _chunk_head(self, data: bytes) -> bytes:
        """Read a chunk's size line (after the previous chunk's CRLF); the rest of `data`."""
        self._buf += data
        start = 2 if self._buf.startswith(b"\r\n") else 0
        end = self._buf.find(b"\r\n", start)
        if end < 0:
            return b""
        size = int(bytes(self._buf[start:end]).split(b";")[0], 16)
        if size == 0:  # the last chunk: then an empty trailer line
            if len(self._buf) < end + 4:
                return b""
            rest = bytes(self._buf[end + 4 :])
            self._buf.clear()
            self._chunked = False
            self._finish()
            return rest
        rest = bytes(self._buf[end + 2 :])
        self._buf.clear()
        self._need = size
        return rest

    def _finish(self) -> None:
        self._need = -1
        body, self._body = self._body, None
        self._on_done(self, self._status, None if body is None else bytes(body))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class RunResult:
    offered_rps: float
    sent: int
    completed: int
    errors: int  # status not expected, connection lost, or not answered before the deadline
    wall_s: float
    latencies_s: np.ndarray  # one per request; inf when not answered
    send_lag_s: np.ndarray  # how late the generator put each request on the wire (its own health)
    statuses: dict[int, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # what the caller measured around the run (CPU, Redis)

    @property
    def achieved_rps(self) -> float:
        return self.completed / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if len(self.latencies_s) else float("inf")

    def summary(self) -> dict[str, Any]:
        return {
            "offered_rps": round(self.offered_rps, 1),
            "achieved_rps": round(self.achieved_rps, 1),
            "sent": self.sent,
            "completed": self.completed,
            "errors": self.errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": ms(self.pct(50)),
            "p90_ms": ms(self.pct(90)),
            "p99_ms": ms(self.pct(99)),
            "p999_ms": ms(self.pct(99.9)),
            "max_ms": ms(float(np.max(self.latencies_s))) if len(self.latencies_s) else None,
            "send_lag_p99_ms": ms(float(np.percentile(self.send_lag_s, 99))) if len(self.send_lag_s) else None,
            **self.extra,
        }


def ms(seconds: float) -> float | None:
    return None if not np.isfinite(seconds) else round(seconds * 1e3, 3)


class Target:
    """A pool of keep-alive connections to one 127.0.0.1 port."""

    def __init__(self, port: int, connections: int = 64) -> None:
        self.port = port
        self.size = connections
        self._conns: list[_Conn] = []
        self._handler: Callable[[_Conn, int, bytes | None], None] = lambda c, s, b: None

    def _dispatch(self, conn: _Conn, status: int, body: bytes | None) -> None:
        self._handler(conn, status, body)

    async def open(self, n: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        want = self.size if n is None else n
        self._conns = [c for c in self._conns if not c.closed]
        while len(self._conns) < want:
            _, proto = await loop.create_connection(lambda: _Conn(self._dispatch, False), "127.0.0.1", self.port)
            self._conns.append(proto)

    def close(self) -> None:
        for c in self._conns:
            c.close()
        self._conns = []

    async def request(self, request: bytes, limit_s: float = 30.0, keep_body: bool = True) -> tuple[int, bytes]:
        """One request on one connection, waiting for the answer (closed loop)."""
        await self.open(1)
        conn = next(c for c in self._conns if not c.closed)
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

        def done(c: _Conn, status: int, body: bytes | None) -> None:
            c.tag = None
            if not fut.done():
                if status < 0:
                    fut.set_exception(ConnectionClosed("connection lost"))
                else:
                    fut.set_result((status, body or b""))

        self._handler = done
        conn.keep_body = keep_body
        conn.send(request, 1)
        try:
            return await asyncio.wait_for(fut, limit_s)
        finally:
            conn.keep_body = False

    async def timed(self, request: bytes, limit_s: float = 30.0) -> tuple[float, int]:
        """Seconds for one request (closed loop) and its status."""
        started = time.perf_counter()
        status, _ = await self.request(request, limit_s, keep_body=False)
        return time.perf_counter() - started, status

    async def open_loop(
        self,
        make: Callable[[int], bytes],
        rate: float,
        duration_s: float,
        *,
        expect: Sequence[int] = (200,),
        grace_s: float = 5.0,
        rotate: bool = False,
    ) -> RunResult:
        """`rate` x `duration_s` requests (request i is `make(i)`) at fixed scheduled times; `rotate`: each on the
        connection idle longest (the server's worker processes each get their share: by default the one idle
        shortest, so a low rate goes over one connection, to one worker)."""
        await self.open()
        conns = [c for c in self._conns if not c.closed]
        n = max(1, int(rate * duration_s))
        sched = np.empty(n)
        lat = np.full(n, np.inf)
        lag = np.zeros(n)
        statuses: collections.Counter[int] = collections.Counter()
        idle = list(conns)
        backlog: collections.deque[int] = collections.deque()
        state = {"completed": 0, "errors": 0}
        all_done = asyncio.get_running_loop().create_future()
        expected = frozenset(expect)

        loop = asyncio.get_running_loop()
        reopening: set[asyncio.Task[None]] = set()

        def start(conn: _Conn, i: int) -> None:
            conn.send(make(i), i)

        def free(conn: _Conn) -> None:
            if backlog:
                start(conn, backlog.popleft())
            else:
                idle.append(conn)

        async def reopen() -> None:
            with contextlib.suppress(OSError):
                _, conn = await loop.create_connection(lambda: _Conn(self._dispatch, False), "127.0.0.1", self.port)
                self._conns.append(conn)
                conns.append(conn)
                free(conn)

        def replace() -> None:
            # a kept-alive connection the server closed (its idle timeout, or after an answer): a fresh one instead
            task = loop.create_task(reopen())
            reopening.add(task)
            task.add_done_callback(reopening.discard)

        def take_idle() -> _Conn | None:
            while idle:
                conn = idle.pop(0 if rotate else -1)
                if not conn.closed:
                    return conn
                replace()
            return None

        def done(conn: _Conn, status: int, body: bytes | None) -> None:
            i = conn.tag
            conn.tag = None
            now = time.perf_counter()
            if i is None:
                return
            statuses[status] += 1
            if status in expected:
                lat[i] = now - sched[i]
                state["completed"] += 1
            else:
                state["errors"] += 1
            if conn.closed:
                replace()
            else:
                free(conn)
            if state["completed"] + state["errors"] == n and not all_done.done():
                all_done.set_result(None)

        self._handler = done
        t0 = time.perf_counter() + 0.01
        sched[:] = t0 + np.arange(n) / rate
        i = 0
        while i < n:
            now = time.perf_counter()
            while i < n and sched[i] <= now:  # everything due by now goes out in this wake-up
                lag[i] = now - sched[i]  # the generator's own lateness (a backlog wait is the server's)
                if (conn := take_idle()) is not None:
                    start(conn, i)
                else:
                    backlog.append(i)
                i += 1
            if i < n:
                wait = sched[i] - time.perf_counter()
                await asyncio.sleep(wait if wait > 0 else 0)
        deadline = max(grace_s, 1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(all_done), deadline)
        wall = time.perf_counter() - t0
        self._handler = lambda c, s, b: None
        for task in list(reopening):
            task.cancel()
        unanswered = n - state["completed"] - state["errors"]
        if unanswered:  # drop the busy connections: their late answers must not land in the next run
            for c in conns:
                if c.tag is not None:
                    c.close()
        return RunResult(rate, n, state["completed"], state["errors"] + unanswered,
                         min(wall, duration_s + deadline), lat, lag, dict(statuses))


    async def closed_loop(
        self, make: Callable[[int], bytes], concurrency: int, count: int, duration_s: float, *,
        expect: Sequence[int] = (200,), grace_s: float = 30.0,
    ) -> RunResult:
        """`concurrency` clients, each sending its next request when its last one is answered, until `count`
        requests were sent or `duration_s` passed (then the ones in flight are waited for, up to `grace_s`).
        Latency is from each request's own send; `offered_rps` is the concurrency."""
        await self.open(concurrency)
        conns = [c for c in self._conns if not c.closed][:concurrency]
        sent_at = np.zeros(count)
        lat = np.full(count, np.inf)
        statuses: collections.Counter[int] = collections.Counter()
        state = {"next": 0, "completed": 0, "errors": 0, "in_flight": 0}
        all_done = asyncio.get_running_loop().create_future()
        expected = frozenset(expect)
        stop_at = time.perf_counter() + duration_s

        def start(conn: _Conn) -> None:
            i = state["next"]
            state["next"] += 1
            state["in_flight"] += 1
            sent_at[i] = time.perf_counter()
            conn.send(make(i), i)

        def done(conn: _Conn, status: int, body: bytes | None) -> None:
            i = conn.tag
            conn.tag = None
            if i is None:
                return
            now = time.perf_counter()
            state["in_flight"] -= 1
            statuses[status] += 1
            if status in expected:
                lat[i] = now - sent_at[i]
                state["completed"] += 1
            else:
                state["errors"] += 1
            if not conn.closed and state["next"] < count and now < stop_at:
                start(conn)
            elif not state["in_flight"] and not all_done.done():
                all_done.set_result(None)

        self._handler = done
        t0 = time.perf_counter()
        for c in conns:
            if state["next"] < count:
                start(c)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(all_done), duration_s + grace_s)
        wall = time.perf_counter() - t0
        self._handler = lambda c, s, b: None
        sent = state["next"]
        unanswered = sent - state["completed"] - state["errors"]
        if unanswered:
            for c in conns:
                if c.tag is not None:
                    c.close()
        return RunResult(float(concurrency), sent, state["completed"], state["errors"] + unanswered, wall,
                         lat[:sent], np.zeros(sent), dict(statuses))


@dataclass
class Search:
    """The highest offered rate whose p99 stayed within the budget with no errors (and the steps tried)."""

    best_rps: float
    best: RunResult | None
    steps: list[dict[str, Any]]
    generator_bound: bool


def passes(r: RunResult, p99_budget_s: float) -> bool:
    return r.errors == 0 and r.pct(99) <= p99_budget_s


async def search_rate(
    run: Callable[[float], Any],
    *,
    start_rps: float,
    p99_budget_s: float,
    max_rps: float,
    refine: int,
) -> Search:
    """Double the rate until the budget breaks, then bisect `refine` times. `run(rate)` returns a RunResult."""
    steps: list[dict[str, Any]] = []
    best: RunResult | None = None
    lo, hi = 0.0, 0.0

    async def attempt(rate: float) -> RunResult:  # a failing rate is tried twice: the machine is shared
        r: RunResult = await run(rate)
        if not passes(r, p99_budget_s):
            steps.append({**r.summary(), "pass": False, "retried": True})
            await asyncio.sleep(0.5)
            r = await run(rate)
        return r

    rate = start_rps
    lag_bound = False
    while rate <= max_rps:
        r = await attempt(rate)
        steps.append({**r.summary(), "pass": passes(r, p99_budget_s)})
        if passes(r, p99_budget_s):
            best, lo = r, rate
            rate *= 2
        else:
            hi = rate
            break
        await asyncio.sleep(0.2)
    if hi == 0.0:  # never failed up to max_rps
        return Search(lo, best, steps, False)
    if lo == 0.0:  # failed at the first rate: go down instead
        rate = start_rps
        while rate >= 25:
            rate /= 2
            r = await attempt(rate)
            steps.append({**r.summary(), "pass": passes(r, p99_budget_s)})
            if passes(r, p99_budget_s):
                best, lo = r, rate
                break
            hi = rate
        if lo == 0.0:
            return Search(0.0, None, steps, False)
    for _ in range(refine):
        mid = (lo + hi) / 2
        await asyncio.sleep(0.2)
        r = await attempt(mid)
        steps.append({**r.summary(), "pass": passes(r, p99_budget_s)})
        if passes(r, p99_budget_s):
            best, lo = r, mid
        else:
            hi = mid
    if best is not None:
        # If the generator itself ran late at the failing rate, the figure is a floor, not the server's limit.
        lag_bound = bool(np.percentile(best.send_lag_s, 99) > p99_budget_s / 2)
    return Search(lo, best, steps, lag_bound)
