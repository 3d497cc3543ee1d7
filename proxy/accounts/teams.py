"""Teams and their quota limits: from `[teams.NAME]` in the config, or set at run time (CLI, admin API).

A team's limits stored in Redis replace its configured ones as a whole (`teams set` starts from the limits in
force and changes only the flags given). Each process keeps what it read for `quotas.team_cache_s`, so a change
reaches every instance within that time without a Redis read on every request; requests that need a team's limits
at the same moment share one read. While Redis is unreachable the
last limits read (or the configured ones) stay in force.
A day or month limit that takes effect where none was in force counts what the team used in its window so far
(quotaseed.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..config.limits import Limits, check_team
from ..singleflight import SingleFlight
from ..stores.guard import Store, StoreUnavailable
from ..stores.rediskeys import RedisKeys
from .quotaseed import forget_counters, newly_limited


class TeamStore:
    def __init__(
        self,
        store: Store,
        keys: RedisKeys,
        configured: Mapping[str, Limits],
        cache_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keys = keys
        self._configured = configured
        self._cache_s = cache_s
        self._clock = clock
        self._wall_clock = wall_clock  # quota windows
        self._cached: dict[str, tuple[Limits, float]] = {}
        # a team's limits read from Redis, one read shared by the requests that need it at the same moment
        self._reads: SingleFlight[str, Limits | None] = SingleFlight()

    async def limits(self, team: str) -> Limits:
        """The limits in force for `team` (unlimited if it has none)."""
        hit = self._cached.get(team)
        now = self._clock()
        if hit is not None and now - hit[1] < self._cache_s:
            return hit[0]
        try:
            stored = await self._reads.run(team, functools.partial(self._read, team))
        except StoreUnavailable:
            return hit[0] if hit is not None else self._configured.get(team, Limits())
        limits = stored if stored is not None else self._configured.get(team, Limits())
        if len(self._cached) > 10_000:
            self._cached.clear()
        self._cached[team] = (limits, now)
        return limits

    async def in_force(self, team: str) -> Limits:
        """The limits in force for `team`, read now (admin API): no process cache, no fallback on failure."""
        stored = await self._read(team, operator=True)
        return stored if stored is not None else self._configured.get(team, Limits())

    async def _read(self, team: str, *, operator: bool = False) -> Limits | None:
        def read(r: Any) -> Any:
            return r.hgetall(self._keys.team(team))

        raw = await (self._store.operator_call("team-get", read) if operator else self._store.call("team-get", read))
        return Limits.from_redis({k.decode(): v.decode() for k, v in raw.items()}) if raw else None

    async def set(self, team: str, changes: Mapping[str, int | None]) -> Limits:
        """Change some of a team's limits (0 or None clears one: unlimited) and store the result."""
        check_team(team)
        current = await self._read(team, operator=True)
        before = current if current is not None else self._configured.get(team, Limits())
        limits = before.merged(changes)
        await self._forget_counters(team, before, limits)

        async def write(r: Any) -> None:
            pipe = r.pipeline(transaction=not self._store.cluster)  # a cluster: two slots
            pipe.hset(self._keys.team(team), mapping=limits.to_redis())
            pipe.sadd(self._keys.teams(), team)
            await pipe.execute()

        await self._store.operator_call("team-set", write)
        self._cached.pop(team, None)
        self._reads.forget(team)
        return limits

    async def reset(self, team: str) -> Limits:
        """Drop the limits set at run time: the team's configured limits (or none) apply again. Returns them."""
        check_team(team)
        current = await self._read(team, operator=True)
        configured = self._configured.get(team, Limits())
        await self._forget_counters(team, current if current is not None else configured, configured)

        async def write(r: Any) -> None:
            pipe = r.pipeline(transaction=not self._store.cluster)  # a cluster: two slots
            pipe.delete(self._keys.team(team))
            pipe.srem(self._keys.teams(), team)
            await pipe.execute()

        await self._store.operator_call("team-set", write)
        self._cached.pop(team, None)
        self._reads.forget(team)
        return self._configured.get(team, Limits())

    async def _forget_counters(self, team: str, before: Limits, after: Limits) -> None:
        """Before a day or month limit takes effect where none was in force: its counter is deleted, so that the
        next charge seeds it from the ledger (it holds only what was charged before the limit was lifted)."""
        if names := newly_limited(before, after):
            await forget_counters(self._store, self._keys, team, None, names, self._wall_clock(), "team-set")

    async def all(self) -> dict[str, tuple[Limits, str]]:
        """Every known team: its limits in force and where they come from (`config` or `runtime`)."""

        async def read(r: Any) -> dict[str, Limits]:
            names = sorted(n.decode() for n in await r.smembers(self._keys.teams()))
            pipe = r.pipeline(transaction=False)
            for n in names:
                pipe.hgetall(self._keys.team(n))
            raws = await pipe.execute()
            return {
                n: Limits.from_redis({k.decode(): v.decode() for k, v in raw.items()})
                for n, raw in zip(names, raws, strict=True)
                if raw
            }

        stored = await self._store.operator_call("team-list", read)
        out = {name: (limits, "config") for name, limits in self._configured.items()}
        out.update({name: (limits, "runtime") for name, limits in stored.items()})
        return dict(sorted(out.items()))
