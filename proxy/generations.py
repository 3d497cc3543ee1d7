"""Cache purges by generation: no scan, no delete, whatever the cache holds.

Every model has a purge generation (and, under cache scope "team", every team and model has one too) that is part
of the hashed prefix of each of its cache keys (rediskeys.DigestBuilder). A purge adds one to it: one HINCRBY on
the hash `{prefix}:cache-gen` in the state store, then one PUBLISH of `{generation} {field}` on
`{prefix}:cache-gen:changed`. From then on the model's keys are new keys: the old entries, in Redis and in every
process's in-process tier, are never read again and leave by TTL or eviction (their memory is not freed at once).

Each process keeps the generations in memory, so the hot path reads a dict, never Redis. It applies a published
purge as it arrives (announcements.py: the subscription it shares with key changes), reads the hash again after
each (re)subscription, and every `cache.generations_refresh_s` in case a message was lost. Generations only grow:
a reply that raced a newer message never takes a process back. Until the hash has been read once (the state store
down since start-up) the cache is bypassed, so a purged model's old entries are never served.

A request in flight across a purge may still write an entry under the old generation: no one reads it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .limits import check_team
from .rediskeys import RedisKeys
from .store import Store, StoreUnavailable

log = logging.getLogger("proxy.generations")
_MAX_TOKENS = 10_000  # (model, team) pairs whose key part is remembered; beyond, the memo starts again


class PurgeRefused(ValueError):
    """A purge that cannot be made: an unknown model, a team under the shared scope, a bad team name."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True)
class Purge:
    model: str
    team: str | None
    generation: int  # the generation now in force for (model, team)


class CacheGenerations:
    def __init__(self, store: Store, keys: RedisKeys, models: Iterable[str], scope: str) -> None:
        self._store = store  # the state store
        self._keys = keys
        self.models = tuple(models)
        self.team_scope = scope == "team"
        self._gens: dict[str, int] | None = None  # field -> generation; None until read once
        self._tokens: dict[tuple[str, str | None], str] = {}  # memo of token()
        self._stale = asyncio.Event()

    @property
    def loaded(self) -> bool:
        return self._gens is not None

    def generations(self) -> dict[str, int]:
        """field -> generation, as this process knows them (fields: `m:{model}`, `t:{team}:{model}`)."""
        return dict(self._gens or {})

    def token(self, model: str, team: str | None) -> str | None:
        """The generation part of `model`'s cache keys: `team` is the request's team under scope "team", else None.
        "" for a model never purged (its keys are as they were before purges existed); None while unknown."""
        try:
            return self._tokens[(model, team)]
        except KeyError:
            pass
        gens = self._gens
        if gens is None:
            return None
        m = gens.get(f"m:{model}", 0)
        t = gens.get(f"t:{team}:{model}", 0) if team is not None else 0
        token = f"{m}.{t}" if t else (str(m) if m else "")
        if len(self._tokens) >= _MAX_TOKENS:
            self._tokens.clear()
        self._tokens[(model, team)] = token
        return token

    async def token_now(self, model: str, team: str | None) -> str:
        """`token`, reading the generations first if they are unknown. Raises StoreUnavailable."""
        token = self.token(model, team)
        if token is None:
            await self.refresh(hot_path=True)
            token = self.token(model, team)
        return token or ""

    async def refresh(self, *, hot_path: bool = False) -> None:
        """Read the generations from the state store. Raises StoreUnavailable."""
        async def read(r: Any) -> dict[bytes, bytes]:
            raw: dict[bytes, bytes] = await r.hgetall(self._keys.cache_generations())
            return raw

        if hot_path:  # a request waits: the hot path's timeout, and a failure makes the others bypass Redis
            raw = await self._store.call("cache-gen", read)
        else:
            raw = await self._store.operator_call("cache-gen", read)
        found = {}
        for k, v in raw.items():
            try:
                found[k.decode()] = int(v)
            except ValueError:
                log.warning("cache generation %r is not a number: ignored", k[:200])
        self._merge(found)

    def _merge(self, found: dict[str, int]) -> None:
        first = self._gens is None  # the first read: purges made before this process started, not news
        gens = self._gens if self._gens is not None else {}
        changed = [f for f, n in found.items() if n > gens.get(f, 0)]
        for f in changed:
            gens[f] = found[f]
        if first or changed:
            self._gens = gens
            self._tokens.clear()
        if not first:
            for f in changed:
                log.info("cache purge in force: %s generation %d", f, gens[f])

    def announced(self, data: bytes) -> None:
        """A purge published by any process: `{generation} {field}`."""
        number, _, field = data.decode(errors="replace").partition(" ")
        if not number.isdigit() or not field:
            log.warning("unreadable cache purge announcement %r: reading the generations again", data[:200])
            self.stale()
            return
        if self._gens is None:  # not read yet: the first read brings this purge too
            self.stale()
            return
        self._merge({field: int(number)})

    def stale(self) -> None:
        """Read the generations again soon (after a (re)subscription: a purge may have gone unheard)."""
        self._stale.set()

    async def run(self, interval_s: float) -> None:
        """Re-read the generations every `interval_s`, and at once when `stale()` is called, until cancelled."""
        while True:
            try:
                async with asyncio.timeout(interval_s):
                    await self._stale.wait()
            except TimeoutError:
                pass
            self._stale.clear()
            with contextlib.suppress(StoreUnavailable):  # counted in redis_errors_total; tried again later
                await self.refresh()

    def field(self, model: str, team: str | None) -> str:
        """The hash field a purge of `model` (for `team`, or every team) bumps. Raises PurgeRefused."""
        if model not in self.models:
            raise PurgeRefused(f"Unknown model '{model}'. Known models: {', '.join(self.models)}.", "model")
        if team is None:
            return f"m:{model}"
        if not self.team_scope:
            raise PurgeRefused(
                "The cache scope is shared: every team's requests read and write the same entries, so one team's "
                "cannot be purged alone. Purge the model for every team (no team), or use cache.scope = \"team\".",
                "team")
        try:
            check_team(team)
        except ValueError as exc:
            raise PurgeRefused(f"Invalid team name: {exc}.", "team") from None
        return f"t:{team}:{model}"

    async def purge(self, model: str, team: str | None = None) -> Purge:
        """Bump the generation of `model` (for `team` alone under scope "team") and announce it to every process.
        Raises PurgeRefused, StoreUnavailable."""
        field = self.field(model, team)

        async def bump(r: Any) -> int:
            n = int(await r.hincrby(self._keys.cache_generations(), field, 1))
            await r.publish(self._keys.cache_generation_changes(), f"{n} {field}")
            return n

        n = await self._store.operator_call("cache-purge", bump)
        if self._gens is not None:
            self._merge({field: n})
        else:
            self.stale()
        return Purge(model, team, n)
