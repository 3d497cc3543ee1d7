"""The Redis connection: a real server (REDIS_URL) or the embedded in-process store, behind one guard.

Every Redis call goes through `Store.call`, which bounds it in time and turns `redis.RedisError`, `OSError` and
timeouts into `StoreUnavailable`. After a failure the store is left alone for `retry_interval_s` (callers get
`StoreUnavailable` at once instead of waiting on a dead server), then tried again: recovery needs no restart.
`on_error(op)` hears of every call that failed from its caller's view: raised, timed out, refused at once while
Redis is left alone, or answered with an error reply inside a pipeline run with `raise_on_error=False`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from .config import RedisSettings

log = logging.getLogger("proxy.store")
T = TypeVar("T")


class StoreUnavailable(Exception):
    """Redis could not be reached in time; the caller degrades (cache bypass, offline key copy)."""


def connect(settings: RedisSettings) -> tuple[Any, bool]:
    """A Redis client and whether it is the embedded store."""
    if not settings.url:
        import fakeredis  # only the embedded mode needs it

        return fakeredis.FakeAsyncRedis(), True
    client = aioredis.Redis.from_url(
        settings.url,
        # No per-socket timeout: Store.call bounds every call as a whole (redis-py's own costs a wait_for task per
        # command, and would break the blocking read of the key-change subscription every socket_timeout_s).
        socket_timeout=None,
        socket_connect_timeout=settings.socket_timeout_s,
        max_connections=settings.max_connections,
        decode_responses=False,
    )
    return client, False


class Store:
    def __init__(
        self,
        client: Any,
        settings: RedisSettings,
        *,
        embedded: bool = False,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.embedded = embedded
        self._timeout = settings.socket_timeout_s
        self._retry_interval = settings.retry_interval_s
        self._clock = clock
        self._on_error = on_error
        self._down_until = 0.0
        self._down = False

    @property
    def available(self) -> bool:
        return not self._down or self._clock() >= self._down_until

    async def call(self, op: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        if not self.available:
            self._count(op)
            raise StoreUnavailable("redis is marked unavailable")
        try:
            async with asyncio.timeout(self._timeout):  # cheaper than wait_for: no extra task per call
                result = await fn(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._mark_down(op, exc)
            raise StoreUnavailable(f"redis {op} failed: {type(exc).__name__}") from exc
        if self._down:
            self._down = False
            log.warning("redis reachable again; cache and key store back in use")
        if isinstance(result, list) and any(
                isinstance(x, RedisError) and not isinstance(x, NoScriptError) for x in result):
            self._count(op)  # an error reply in a pipeline (NOSCRIPT excepted: the script is simply sent again)
        return result

    def _count(self, op: str) -> None:
        if self._on_error is not None:
            self._on_error(op)

    def _mark_down(self, op: str, exc: BaseException) -> None:
        if not self._down:
            log.warning("redis %s failed (%s); bypassing it for %.1fs at a time", op, type(exc).__name__,
                        self._retry_interval)
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
        await self.client.aclose()
