"""Client connections, bounded (README "Connections"): how long a client may take to send a request's headers, how
long an idle keep-alive connection stays, and how many connections a process keeps open.

aiohttp has no header deadline of its own, and its keep-alive timer (about an hour by default) is not pushed back
by trickled bytes: a slowloris or idle client held a descriptor for an hour, and a few thousand of them exhausted a
worker's descriptors, after which every new connection, /healthz included, was reset with nothing in the log. Here
every connection of the server's protocol (`_Handler`, aiohttp's RequestHandler that tells its guard when a request
starts arriving, is being served, and is done) is in one of three states: idle (waiting for a request, nothing of it
yet), headers (part of a request has come, not all of its headers) and busy (a request is being read, handled or
answered). Once a second (`ConnectionGuard.sweep`) the guard closes:
- a connection in `headers` past `header_timeout_s` (from the connection's start for its first request, from the
  first byte of a later one), with a 408 in OpenAI's shape; a new connection that sent nothing in that time, silently;
- an idle keep-alive connection past `keepalive_timeout_s`, silently.
A connection beyond the cap (`max_connections`, within the process's file descriptors: fdlimit.py) closes the oldest
connection waiting for its first request (a new or slow client's), else the keep-alive connection idle longest; when
every connection is busy, the new one is refused at once with 503 and Retry-After. A busy connection is never closed
here: its body has a minimum rate (bodyrate.py), its handler its own deadlines.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from aiohttp.web_server import Server

from ..config import Settings
from ..config.connections import ConnectionSettings
from ..errors import ProxyError, RequestTimeout, ServiceUnavailable
from ..telemetry.metrics import Metrics
from .answers import SERVER
from .fdlimit import open_fds, plan

log = logging.getLogger("proxy.connections")
IDLE, HEADERS, BUSY = "idle", "headers", "busy"
_LOG_EVERY_S = 10.0  # the connection cap and a shortage of descriptors are logged at most this often
_FDS_WARN_SHARE = 0.9  # descriptors open past this share of the limit are logged


def raw_answer(err: ProxyError) -> bytes:
    """A whole HTTP/1.1 answer with `err` in OpenAI's shape, written before any request was read."""
    body = err.to_json()
    head = [f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}", f"Server: {SERVER}",
            "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"]
    if err.retry_after is not None:
        head.append(f"Retry-After: {math.ceil(err.retry_after)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Handler(RequestHandler):
    """aiohttp's protocol for one connection, telling its guard what the connection is doing."""

    __slots__ = ("_guard", "fresh", "since", "state")

    def __init__(self, manager: Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self.state = IDLE
        self.since = 0.0  # when the current deadline started
        self.fresh = True  # no request answered yet: the header deadline counts from the connection's start

    @property
    def waiting(self) -> bool:
        """Whether the connection waits for a request (none queued, none being served): only then is it closed."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.lost(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.state == IDLE and data:
            self._guard.reading(self)
        super().data_received(data)

    async def _handle_request(
        self, request: BaseRequest, start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[StreamResponse]],
    ) -> tuple[StreamResponse, bool]:
        self._guard.busy(self)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._guard.idle(self)

    def close_with(self, answer: bytes | None) -> None:
        if answer and self.transport is not None:
            self.transport.write(answer)
        self.force_close()


class _Server(Server):
    """aiohttp's Server making `_Handler`s."""

    def __init__(self, made: Server, guard: ConnectionGuard) -> None:
        super().__init__(made.request_handler, request_factory=made.request_factory,
                         handler_cancellation=made.handler_cancellation, **made._kwargs)
        self._guard = guard

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, guard=self._guard, **self._kwargs)


class _Runner(web.AppRunner):
    __slots__ = ("_guard",)

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> Server:
        return _Server(await super()._make_server(), self._guard)

    async def setup(self) -> None:
        await super().setup()
        self._guard.start()

    async def cleanup(self) -> None:
        try:
            await super().cleanup()
        finally:
            self._guard.stop()


class ConnectionGuard:
    """The connections of one process (every runner it makes: the API and the metrics port)."""

    def __init__(self, settings: ConnectionSettings, max_connections: int, *, metrics: Metrics | None = None,
                 fd_limit: int | None = None) -> None:
        self.settings = settings
        self.max_connections = max_connections
        self._metrics = metrics
        self._fd_limit = fd_limit
        self._open: set[_Handler] = set()
        # Connections not busy, oldest first: those that never had a request answered (new, or a slow client's
        # first request), and idle keep-alive ones. At the cap the first kind goes first: a client that has been
        # served is likelier to be a real one than a connection that has sent nothing whole yet.
        self._new: dict[_Handler, None] = {}
        self._kept: dict[_Handler, None] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._runners = 0
        self._pressure = {"evicted": 0, "refused": 0}  # since the last log line about the cap
        self._logged_at = {"cap": -math.inf, "fds": -math.inf}
        self._timed_out = raw_answer(RequestTimeout(
            f"The request's headers did not arrive within {settings.header_timeout_s:g} seconds."))
        self._refused = raw_answer(ServiceUnavailable(
            "The proxy has as many connections open as it can keep; retry shortly.", code="too_many_connections",
            retry_after=1))
        self.announcement = ""
        self.sweep_interval_s = max(0.05, min(1.0, settings.header_timeout_s / 4, settings.keepalive_timeout_s / 4))

    @classmethod
    def for_process(cls, settings: Settings, metrics: Metrics | None = None) -> ConnectionGuard:
        """The guard of a server process: raises the file-descriptor limit and sizes the cap within it."""
        fds = plan(settings)
        if metrics is not None:
            metrics.connection_limit.set(fds.max_connections)
            metrics.max_fds.set(fds.soft)
        guard = cls(settings.connections, fds.max_connections, metrics=metrics, fd_limit=fds.soft)
        # said once the server listens (`announce`): a start that fails says one line, its reason
        c = settings.connections
        guard.announcement = (
            f"client connections: at most {fds.max_connections} open (file descriptors: limit {fds.soft}, raised "
            f"from {fds.soft_before}; {fds.reserved} kept for Redis, the upstreams and the process); headers within "
            f"{c.header_timeout_s:g}s, idle keep-alive {c.keepalive_timeout_s:g}s")
        return guard

    def announce(self) -> None:
        """Logs the bounds this process keeps (after its server started listening)."""
        if self.announcement:
            log.info("%s", self.announcement)

    def runner(self, app: web.Application) -> web.AppRunner:
        """An AppRunner whose connections this guard bounds. aiohttp's own keep-alive timer stays as a backstop,
        a little after the guard's."""
        return _Runner(app, self, access_log=None,
                       keepalive_timeout=self.settings.keepalive_timeout_s + 2 * self.sweep_interval_s)

    @property
    def open(self) -> int:
        return len(self._open)

    # --- what the connections tell it ------------------------------------------------------------------------

    def opened(self, h: _Handler) -> None:
        h.state, h.since, h.fresh = IDLE, self._now(), True
        self._open.add(h)
        self._new[h] = None
        if len(self._open) <= self.max_connections:
            return
        victim = next(itertools.chain(self._first_waiting(self._new, h), self._first_waiting(self._kept, h)), None)
        if victim is not None:
            self._close(victim, "evicted", None)
        else:
            self._close(h, "refused", self._refused)
        self._log_pressure(self._now())

    @staticmethod
    def _first_waiting(connections: dict[_Handler, None], but: _Handler) -> Iterator[_Handler]:
        """The oldest of `connections` that waits for a request (at most one; a few at the front may not yet)."""
        for c in connections:
            if c is not but and c.waiting:
                yield c
                return

    def reading(self, h: _Handler) -> None:
        h.state = HEADERS
        if not h.fresh:
            h.since = self._now()

    def busy(self, h: _Handler) -> None:
        h.state = BUSY
        self._new.pop(h, None)
        self._kept.pop(h, None)

    def idle(self, h: _Handler) -> None:
        if h in self._open:
            h.state, h.since, h.fresh = IDLE, self._now(), False
            self._kept[h] = None

    def lost(self, h: _Handler) -> None:
        self._open.discard(h)
        self._new.pop(h, None)
        self._kept.pop(h, None)

    # --- the sweep -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._runners += 1
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def stop(self) -> None:
        self._runners -= 1
        if self._runners <= 0 and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        while True:
            try:
                self.sweep()  # at once too: the gauges have their values from the start
            except Exception:  # a bug: logged, and the deadlines still hold at the next sweep
                log.exception("connection sweep failed")
            await asyncio.sleep(self.sweep_interval_s)

    def sweep(self) -> None:
        """Close the connections past their deadline; update the gauges; log a shortage."""
        now, s = self._now(), self.settings
        counts = {IDLE: 0, HEADERS: 0}
        expired: list[_Handler] = []
        for h in (*self._new, *self._kept):
            counts[h.state] = counts.get(h.state, 0) + 1
            limit = s.header_timeout_s if h.fresh or h.state == HEADERS else s.keepalive_timeout_s
            if now - h.since >= limit and h.waiting:
                expired.append(h)
        for h in expired:
            if h.state == HEADERS:
                self._close(h, "header_timeout", self._timed_out)
            else:
                self._close(h, "header_timeout" if h.fresh else "keepalive_timeout", None)
        self._log_pressure(now)
        fds = open_fds()
        if fds is not None and self._fd_limit and fds >= _FDS_WARN_SHARE * self._fd_limit \
                and now - self._logged_at["fds"] >= _LOG_EVERY_S:
            self._logged_at["fds"] = now
            log.warning("%d of %d file descriptors open: new connections may be refused by the kernel (EMFILE) "
                        "(%d client connections open)", fds, self._fd_limit, len(self._open))
        if self._metrics is not None:
            m = self._metrics
            for state, n in ((IDLE, counts.get(IDLE, 0)), (HEADERS, counts.get(HEADERS, 0)),
                             (BUSY, len(self._open) - len(self._new) - len(self._kept))):
                m.child(m.connections, state).set(n)
            if fds is not None:
                m.open_fds.set(fds)

    def _close(self, h: _Handler, reason: str, answer: bytes | None) -> None:
        self.lost(h)
        h.state = BUSY  # closing: no longer a candidate for anything
        h.close_with(answer)
        if reason in self._pressure:
            self._pressure[reason] += 1
        if self._metrics is not None:
            self._metrics.add(self._metrics.connections_closed, reason)

    def _log_pressure(self, now: float) -> None:
        if not any(self._pressure.values()) or now - self._logged_at["cap"] < _LOG_EVERY_S:
            return
        self._logged_at["cap"] = now
        log.warning("client connections at the cap (%d per process: connections.max_connections within the "
                    "file-descriptor limit): %d idle connection(s) closed to make room, %d new one(s) refused with "
                    "503 (none idle)", self.max_connections, self._pressure["evicted"], self._pressure["refused"])
        self._pressure = dict.fromkeys(self._pressure, 0)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()
