"""The embedding cache: one Redis string per (model, dimensions, kind, input).

Values are packed losslessly by entrycodec.py (6,126 bytes for a 1536-d entry instead of 6,148: one jemalloc size
class less). A whole batch is read with one MGET (the MGETs of concurrent requests share one pipeline; on a cluster
one MGET per hash slot, see stores/slots.py) and written with one pipeline of SET ... EX (on a cluster, grouped per
node by redis-py).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .entrycodec import Entry, decode_entries, decode_entry, encode_entries, encode_entry
from .guard import Store, StoreUnavailable
from .rediskeys import RedisKeys, seed_from_secret
from .slots import mget_batches


class ReadFailed(StoreUnavailable):
    """A cache read failed. `extra`: the replies of what `also` queued in its pipeline, when Redis answered them
    (only the MGET failed); `sent`: no reply came back after the pipeline was sent (a timeout), so what `also`
    queued may have run in Redis."""

    def __init__(self, message: str, extra: list[Any] | None = None, sent: bool = False) -> None:
        super().__init__(message)
        self.extra = extra or []
        self.sent = sent


@dataclass(frozen=True, slots=True)
class _Read:
    keys: Sequence[str]
    also: Callable[[Any], None] | None
    future: asyncio.Future[list[Any]]  # its replies: the MGET's, then those of what `also` queued


# The longest start-up waits for the shared cache secret (an operator read: it never marks Redis down).
START_READ_S = 2.0


class EmbeddingCache:
    def __init__(self, store: Store, keys: RedisKeys, *, ttl_s: int, secret: str = "", state: Store | None = None
                 ) -> None:
        self._store = store  # where the entries live: the cache store (the state store unless one is set)
        self._state = state if state is not None else store  # where the shared cache secret lives
        self._keys = keys
        self._ttl = ttl_s
        self._seed: int | None = seed_from_secret(secret) if secret else None
        self._reads: list[_Read] = []  # reads waiting for this loop turn's pipeline
        self._tasks: set[asyncio.Task[None]] = set()

    async def seed(self, *, at_start: bool = False) -> int:
        """The hash seed. Without PROXY_CACHE_SECRET every instance adopts the first secret stored in Redis. At
        start-up (`at_start`) it is read as operator work, which never marks Redis down, within `START_READ_S` (or
        `operator_timeout_s` when shorter): a slow Redis (a cluster still forming, a loaded host) is not marked down
        for the requests that follow, and a Redis whose host is gone holds the start (the port, /healthz) back no
        longer than that. A request that finds it unknown reads it within its own limit."""
        if self._seed is None:
            if self._state.embedded:
                self._seed = seed_from_secret(secrets.token_urlsafe(32))
            elif at_start:
                limit = max(self._state.timeout_s, min(self._state.operator_timeout_s, START_READ_S))
                self._seed = seed_from_secret(await self._state.call(
                    "cache-secret", self._shared_secret, timeout_s=limit, mark_down=False))
            else:
                self._seed = seed_from_secret(await self._state.call("cache-secret", self._shared_secret))
        return self._seed

    @property
    def carries_quota(self) -> bool:
        """Whether a read's pipeline may carry the quota script too (`get_many`'s `also`): only where the cache
        is the state store and one server (a cluster routes by slot; a cache store does not hold the counters)."""
        return self._store is self._state and not self._store.cluster

    async def _shared_secret(self, r: object) -> str:
        key = self._keys.cache_secret()
        await r.set(key, secrets.token_urlsafe(32), nx=True)  # type: ignore[attr-defined]
        value: bytes = await r.get(key)  # type: ignore[attr-defined]
        return value.decode()

    async def get_many(
        self, keys: Sequence[str], dims: int, also: Callable[[Any], None] | None = None
    ) -> tuple[list[Entry | None], list[Any]]:
        """An MGET of `keys`, plus what `also` queues in the same pipeline (the quota check); its replies come back
        as they are, errors included. Raises StoreUnavailable; callers then go upstream.

        Reads that concurrent requests make in the same event-loop turn go to Redis together, in one pipeline (one
        round trip, one write, one wake-up for all of them): under load most of a Redis round trip's cost is paid
        once per turn instead of once per request; a lone request waits one loop turn at most."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._reads:
            loop.call_soon(self._send_reads)
        self._reads.append(_Read(keys, also, future))
        values, *extra = await future
        if isinstance(values, Exception):
            raise ReadFailed(f"redis mget failed: {values}", extra)
        return decode_entries(values, dims), extra

    def _send_reads(self) -> None:
        reads, self._reads = self._reads, []
        task = asyncio.ensure_future(self._run_reads(reads))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_reads(self, reads: list[_Read]) -> None:
        spans: list[tuple[int, int]] = []

        async def run(r: Any) -> list[Any]:
            if self._store.cluster:  # no `also` here (see carries_quota): one reply per read
                spans.extend((i, i + 1) for i in range(len(reads)))
                return await mget_batches(r, [read.keys for read in reads])
            if len(reads) == 1 and reads[0].also is None:
                spans.append((0, 1))
                return [await r.mget(reads[0].keys)]
            pipe = r.pipeline(transaction=False)
            for read in reads:
                start = len(pipe)
                pipe.mget(read.keys)
                if read.also is not None:
                    read.also(pipe)
                spans.append((start, len(pipe)))
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

        failure, sent = "no reply", True
        try:
            replies = await self._store.call("mget", run)
            for read, (start, end) in zip(reads, spans, strict=True):
                if not read.future.done():
                    read.future.set_result(replies[start:end])
        except StoreUnavailable as exc:
            # Refused at once (Redis left alone) or a connection error: nothing ran. A timeout: it may have.
            failure, sent = str(exc), isinstance(exc.__cause__, TimeoutError)
        finally:  # whatever happened (a failure, cancellation at shutdown), nobody waits forever
            for read in reads:
                if not read.future.done():
                    read.future.set_exception(ReadFailed(f"redis mget failed: {failure}", sent=sent))

    async def set_many(self, items: Sequence[tuple[str, Entry]]) -> None:
        values = encode_entries([entry for _, entry in items])  # outside the call: not part of its time limit

        async def write(r: object) -> None:
            pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
            for (key, _), value in zip(items, values, strict=True):
                # execute_command skips set()'s option parsing: 20-28% less proxy CPU per written entry
                pipe.execute_command("SET", key, value, "EX", self._ttl)
            await pipe.execute()

        await self._store.call("set", write)


__all__ = ["EmbeddingCache", "Entry", "ReadFailed", "StoreUnavailable", "decode_entry", "encode_entry"]
