"""A Redis connection: a real server (REDIS_URL, of any topology) or the embedded in-process store, behind one
guard. The state store and the cache store (CACHE_REDIS_URL) are one `Store` each, so each has its own bypass.

Every Redis call goes through `Store.call`, which bounds it in time and turns `redis.RedisError` (and a cluster
client's `RedisClusterException`, which is not one), our `TopologyError` (a topology that cannot serve: sentinels
that no longer know the master, uncovered slots), `OSError` and timeouts into `StoreUnavailable`. After a
failure the store is left alone for `retry_interval_s` (callers get `StoreUnavailable` at once instead of waiting
on a dead server), then tried again: recovery needs no restart.
Operator work (admin API, CLI, usage reports, ledger flushes) goes through `Store.operator_call`: it may be slow
without being a sign of trouble, so its failure is its own and never makes the hot path bypass Redis (and it does
not wait out the hot path's `retry_interval_s` either).
A connection in the pool that the server closed (Redis restarted) is replaced by a fresh one when it is taken
from the pool, before anything is sent on it; a command itself is never sent twice (see `connect`).
`on_error(op)` hears of every call that failed from its caller's view: raised, timed out, refused at once while
Redis is left alone, or answered with an error reply inside a pipeline run with `raise_on_error=False`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from ..config import RedisSettings
from ..telemetry.looplag import LoopLag
from .topology import (
    CLUSTER_CONNECT_SHARE,
    NodeSubscriber,
    TopologyError,
    build_client,
    confirm_master,
    is_cluster,
    is_sentinel,
)

log = logging.getLogger("proxy.store")
# A timeout noticed later than this fraction of its limit past its deadline is blamed on a stalled event loop.
_STALL_FACTOR = 0.5
# With a LoopLag: stalls of the loop at least this long (or a fifth of the call's limit, if shorter) count as time
# the call did not have; shorter ones are a busy loop's ordinary lateness, which Redis must be fast enough for.
_STALL_AT_LEAST_S = 0.05
T = TypeVar("T")


# redis-py puts the failed command of a pipeline, key and value included, before Redis's reply: "Command # 1 (SET
# ep:emb:... <value> EX 0) of pipeline caused error: invalid expire time in 'set' command".
_PIPELINE_NOTE = "of pipeline caused error: "


def failure(exc: BaseException) -> str:
    """What went wrong, for a log line: the exception's type, and for an error reply Redis's own words
    ("ResponseError: invalid expire time in 'set' command"), never a key or a value: not the command redis-py
    adds to a pipeline's error, nor the arguments Redis quotes for an unknown command; one line, 200 characters."""
    if not isinstance(exc, ResponseError):
        return type(exc).__name__
    text = str(exc).rpartition(_PIPELINE_NOTE)[2].strip()
    text = text.splitlines()[0].split(", with args beginning with", 1)[0][:200] if text else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StoreUnavailable(Exception):
    """Redis could not be reached in time; the caller degrades (cache bypass, offline key copy)."""


def in_process_redis() -> Any:
    """An in-process Redis (fakeredis, with Lua): the embedded store, and the quota fallback while Redis is down.

    Its connections are in-memory objects, but its pool refuses (MaxConnectionsError) beyond 100 at once, which
    100 concurrent requests reach; the pool is made as large as the number of requests in flight can be."""
    import fakeredis  # only the embedded mode and the quota fallback need it

    return fakeredis.FakeAsyncRedis(max_connections=1_000_000)


def connect(settings: RedisSettings, var: str = "REDIS_URL") -> tuple[Any, bool]:
    """A Redis client of `settings.type` (stores/topology.py) and whether it is the embedded store. Raises
    TopologyError when the URL does not fit the type (`var` names it)."""
    if not settings.url:
        return in_process_redis(), True
    client = build_client(
        settings,
        var,
        # No per-socket timeout: Store.call bounds every call as a whole (redis-py's own costs a wait_for task per
        # command, and would break the blocking read of the key-change subscription every socket_timeout_s).
        socket_timeout=None,
        # Nor a connect limit of the hot path's: a call's own limit bounds its connect (socket_timeout_s for the
        # hot path, operator_timeout_s for operator work), so operator work on a loaded host is not failed by a
        # connect that took longer than the hot path would wait (on a cluster, a share of it per node).
        socket_connect_timeout=connect_limit(settings),
        max_connections=settings.max_connections,
        decode_responses=False,
        # A command is never sent twice: after a connection error it may have run (a quota charge would count
        # twice), so the error goes to Store.call. What makes a Redis restart harmless is the check of each pooled
        # connection when it is taken from the pool: one the server closed is replaced by a fresh connection
        # before anything is sent on it. redis-py 8.1 skips that check while maintenance notifications are on
        # (8.2 no longer does), which its default turns on: they are for managed clusters' failovers, which a
        # plain Redis never sends, so they are off (tests/test_redispy_internals.py).
        retry=Retry(NoBackoff(), 0),
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return client, False


def connect_limit(settings: RedisSettings) -> float:
    """How long redis-py may take to open one connection. The call that opens it bounds it too (Store.call), so this
    only matters to operator work: operator_timeout_s, or on a cluster a share of it per node, since a topology
    refresh tries the nodes one after another and a node whose host is gone (SYNs dropped, no refusal) would take
    the operator call's whole limit before any other node was asked."""
    limit = settings.operator_timeout_s * (CLUSTER_CONNECT_SHARE if settings.type == "cluster" else 1.0)
    return max(settings.socket_timeout_s, limit)


class Store:
    def __init__(
        self,
        client: Any,
        settings: RedisSettings,
        *,
        embedded: bool = False,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] | None = None,
        name: str = "redis",
        lag: LoopLag | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.embedded = embedded
        self.name = name  # in log lines: which store ("redis" for the state store, "cache redis")
        # A cluster: no MULTI/EXEC or MGET across hash slots; the key-change subscription is on one node at a time.
        self.cluster = is_cluster(client)
        self.sentinel = is_sentinel(client)
        self.subscriber: Any = NodeSubscriber(client, settings, socket_connect_timeout=settings.socket_timeout_s) \
            if self.cluster else client
        self._timeout = settings.socket_timeout_s
        self.operator_timeout_s = settings.operator_timeout_s  # for callers that pass mark_down=False
        self._retry_interval = settings.retry_interval_s
        self._clock = clock
        self._on_error = on_error
        self._lag = lag  # how long this process's event loop was blocked (see `_stalled`)
        self._on_event = on_event  # "bypass" when the hot path starts bypassing Redis, "stalled" (see `call`)
        self._down_until = 0.0
        self._down = False

    @property
    def timeout_s(self) -> float:
        """A hot-path call's time limit (`socket_timeout_s`)."""
        return self._timeout

    @property
    def available(self) -> bool:
        return not self._down or self._clock() >= self._down_until

    async def call(
        self, op: str, fn: Callable[[Any], Awaitable[T]], *, timeout_s: float | None = None, mark_down: bool = True
    ) -> T:
        """`fn(client)` within `timeout_s` (default `socket_timeout_s`). With `mark_down=False` (operator work) a
        failure is counted and raised but does not make everyone else bypass Redis for `retry_interval_s`, and
        the call is tried even while they do (a shutdown flush, say, right after the hot path gave up on Redis)."""
        if mark_down and not self.available:
            self._count(op)
            raise StoreUnavailable("redis is marked unavailable")
        limit = self._timeout if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + limit
        try:
            async with asyncio.timeout_at(deadline):  # no task per call (wait_for would make one)
                result = await fn(self.client)
        except (RedisError, RedisClusterException, TopologyError, OSError, TimeoutError) as exc:
            # A timeout while this process's event loop was blocked (a long computation, an overloaded process) is
            # not Redis failing: the reply may be sitting unread. Only this call gives up; marking Redis down would
            # send everyone upstream (paid for) and deepen the overload.
            stalled = isinstance(exc, TimeoutError) and self._stalled(start, loop.time(), deadline, limit)
            if stalled and self._on_event is not None:
                self._on_event("stalled")
            if self.cluster and not isinstance(exc, TopologyError):
                # After a connection error redis-py re-reads the cluster's slot map before its next single command,
                # but 8.1 not after one in a pipeline when no retries are configured (none are: a retry could run a
                # command twice), and neither 8.1 nor 8.2 after a call this time limit cut short; cache reads and
                # writes are pipelines: a promoted replica would never be found. Ask for the re-read as its own
                # commands do (tests/test_redispy_internals.py).
                self.client._initialize = True
            if mark_down and not stalled:
                self._mark_down(op, exc)
            else:
                self._count(op)
            raise StoreUnavailable(f"redis {op} failed: {type(exc).__name__}") from exc
        if self._down and mark_down:  # only the hot path's own calls end its bypass
            self._down = False
            log.warning("%s reachable again; %s back in use", self.name,
                        "the cache" if self.name == "cache redis" else "cache and key store")
        if isinstance(result, list) and any(
                isinstance(x, RedisError) and not isinstance(x, NoScriptError) for x in result):
            self._count(op)  # an error reply in a pipeline (NOSCRIPT excepted: the script is simply sent again)
        return result

    def _stalled(self, start: float, now: float, deadline: float, limit: float) -> bool:
        """Whether a call that timed out at `now` lost its time to the event loop rather than to Redis: its timer
        fired well after the deadline, or (with a LoopLag) the loop was blocked for so much of the call that Redis
        had less than `limit` of it: a stall that began just after the command was sent and outlived the deadline
        by a little hides a reply that came in time."""
        if now - deadline > _STALL_FACTOR * limit:
            return True
        if self._lag is None:
            return False
        return now - start - self._lag.blocked(start, now, at_least=min(_STALL_AT_LEAST_S, limit / 5)) < limit

    async def operator_call(self, op: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """`call` for operator work (admin API, CLI, reports, ledger flushes): `operator_timeout_s`, and its
        failure never makes the request path bypass Redis. On a Sentinel set it first makes sure the sentinels
        agree on the master and that `fn` talks to that one (confirm_master): a key, a limit or a ledger flush
        written to a master being demoted would be lost, silently; refused, it is retried (503, the next flush).
        The request path does not ask the sentinels per call: a cache entry lost in a switch is a later miss, a
        quota charge lost leaves a counter a little low for its window."""
        if self.sentinel:
            async def confirmed(client: Any) -> T:
                await confirm_master(client)
                return await fn(client)

            return await self.call(op, confirmed, timeout_s=self.operator_timeout_s, mark_down=False)
        return await self.call(op, fn, timeout_s=self.operator_timeout_s, mark_down=False)

    def _count(self, op: str) -> None:
        if self._on_error is not None:
            self._on_error(op)

    def _mark_down(self, op: str, exc: BaseException) -> None:
        if not self._down:
            log.warning("%s %s failed (%s); bypassing it for %.1fs at a time", self.name, op, failure(exc),
                        self._retry_interval)
            if self._on_event is not None:
                self._on_event("bypass")
        self._down = True
        self._down_until = self._clock() + self._retry_interval
        self._count(op)

    async def ping(self) -> bool:
        try:
            await self.call("ping", lambda r: r.ping())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        if self.subscriber is not self.client:
            await self.subscriber.aclose()
        await self.client.aclose()
