"""Cache purges by generation: no scan, no delete, whatever the cache holds.

Every model has a purge generation (and, under cache scope "team", every team and model has one too) that is part
of the hashed prefix of each of its cache keys (rediskeys.DigestBuilder). A purge moves it on: one script
(`lua/genbump.lua`) on the hash `{prefix}:cache-gen` in the state store, one PUBLISH of `{generation} {field}` on
`{prefix}:cache-gen:changed` and, when the cache has a store of its own (CACHE_REDIS_URL), the same number written
to the same hash there. From then on the model's keys are new keys: the old entries, in Redis and in every
process's in-process tier, are never read again and leave by TTL or eviction (their memory is not freed at once).

A generation never goes back, even when a store loses the hash (restarted without persistence, failed over to a
replica that missed the write, the copy evicted): readers take the highest number among both stores and what they
already knew, a purge counts on from the highest number the purger can see (`lua/genbump.lua`), and each periodic
read writes back whatever a store lacks (`lua/genraise.lua`, which never lowers a number). The copy beside the
entries keeps a purge in force when the state store alone loses its data: the entries it hides cannot outlive it
unless their own store keeps them.

Each process keeps the generations in memory, so the hot path reads a dict, never Redis. It applies a published
purge as it arrives (announcements.py: the subscription it shares with key changes), reads the stores again after
each (re)subscription, and every `cache.generations_refresh_s` in case a message was lost. A reply that raced a
newer message never takes a process back. The generations are in force only while some store confirms them: until
one has answered (start-up), and again after UNCONFIRMED_AFTER refresh intervals in which none has (a process cut
off from both cannot hear of purges), the cache is bypassed, so a purged model's old entries are not served.

A request in flight across a purge may still write an entry under the old generation: no one reads it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..config.limits import check_team
from .guard import Store, StoreUnavailable
from .rediskeys import RedisKeys

log = logging.getLogger("proxy.generations")
_MAX_TOKENS = 10_000  # (model, team) pairs whose key part is remembered; beyond, the memo starts again
# Refresh intervals without an answer from any store after which the generations count as unknown (cache bypassed).
UNCONFIRMED_AFTER = 3


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
    def __init__(self, store: Store, keys: RedisKeys, models: Iterable[str], scope: str, *,
                 cache_store: Store | None = None) -> None:
        self._store = store  # the state store: purges are counted and announced there
        self._copy = cache_store if cache_store is not store else None  # the cache's own store, if any
        self._stores = (store,) if self._copy is None else (store, self._copy)
        self._keys = keys
        self.models = tuple(models)
        self.team_scope = scope == "team"
        self._gens: dict[str, int] = {}  # field -> the highest generation seen anywhere; never lowered
        self._read = False  # some store has answered once (what the first answer holds is not news)
        self._in_force = False  # confirmed by a store lately: token() answers
        self._tokens: dict[tuple[str, str | None], str] = {}  # memo of token()
        self._stale = asyncio.Event()
        self._unconfirmed_after_s: float | None = None  # set by run()
        self._expiry: asyncio.TimerHandle | None = None
        lua = resources.files("proxy") / "lua"
        self._bump = store.client.register_script((lua / "genbump.lua").read_text())
        raise_text = (lua / "genraise.lua").read_text()
        self._raise_state = store.client.register_script(raise_text)
        self._raise_copy = self._copy.client.register_script(raise_text) if self._copy is not None else None

    @property
    def loaded(self) -> bool:
        """The generations are in force (else the cache is bypassed)."""
        return self._in_force

    def generations(self) -> dict[str, int]:
        """field -> generation, as this process knows them (fields: `m:{model}`, `t:{team}:{model}`)."""
        return dict(self._gens)

    def token(self, model: str, team: str | None) -> str | None:
        """The generation part of `model`'s cache keys: `team` is the request's team under scope "team", else None.
        "" for a model never purged (its keys are as they were before purges existed); None while unknown."""
        try:
            return self._tokens[(model, team)]
        except KeyError:
            pass
        if not self._in_force:
            return None
        gens = self._gens
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
        """Read the generations from every store; each answer counts as it arrives. Off the hot path, write back
        what a store lacks. Raises StoreUnavailable when no store answers."""
        async def one(store: Store) -> dict[str, int]:
            found = await self._read_store(store, hot_path)
            self._merge(found)
            self._confirm()
            return found

        results = await asyncio.gather(*(one(s) for s in self._stores), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        for exc in failures:
            if not isinstance(exc, StoreUnavailable):
                raise exc
        if len(failures) == len(results):
            raise failures[0]
        if not hot_path:
            for store, found in zip(self._stores, results, strict=True):
                if not isinstance(found, BaseException):
                    await self._restore(store, found)

    async def _read_store(self, store: Store, hot_path: bool) -> dict[str, int]:
        async def read(r: Any) -> dict[bytes, bytes]:
            raw: dict[bytes, bytes] = await r.hgetall(self._keys.cache_generations())
            return raw

        if hot_path:  # a request waits: the hot path's timeout, and a failure makes the others bypass Redis
            raw = await store.call("cache-gen", read)
        else:
            raw = await store.operator_call("cache-gen", read)
        found = {}
        for k, v in raw.items():
            n = _number(v)
            if n is None:
                log.warning("cache generation %r in %s is not a number: ignored", k[:200], store.name)
            else:
                found[k.decode(errors="replace")] = n
        return found

    async def _restore(self, store: Store, found: dict[str, int]) -> None:
        """Write back to `store` the generations it lacks (lost with a restart or a failover, never copied there)."""
        behind = sorted((f, n) for f, n in self._gens.items() if n > found.get(f, 0))
        if not behind:
            return
        try:
            await store.operator_call("cache-gen", lambda r: self._raise(
                store, r, [x for f, n in behind for x in (f, n)]))
        except StoreUnavailable:  # counted in redis_errors_total; the next read tries again
            return
        log.warning("%s lacked %d cache purge generation(s) (%s): written back", store.name, len(behind),
                    ", ".join(f"{f} {n}" for f, n in behind[:5]))

    def _raise(self, store: Store, r: Any, pairs: list[Any]) -> Any:
        """`lua/genraise.lua` in `store` (through its client `r`): field, generation pairs, never lowered."""
        script = self._raise_copy if store is self._copy and self._raise_copy is not None else self._raise_state
        return script(keys=[self._keys.cache_generations()], args=pairs, client=r)

    def _merge(self, found: dict[str, int]) -> None:
        gens = self._gens
        changed = [f for f, n in found.items() if n > gens.get(f, 0)]
        for f in changed:
            gens[f] = found[f]
        if changed:
            self._tokens.clear()
        if self._read:  # the first read brings purges made before this process started: not news
            for f in changed:
                log.info("cache purge in force: %s generation %d", f, gens[f])

    def _confirm(self) -> None:
        if not self._in_force:
            if self._read:
                log.warning("cache purge generations confirmed again: the cache is in use again")
            self._in_force = True
            self._tokens.clear()
        self._read = True
        if self._unconfirmed_after_s is not None:
            if self._expiry is not None:
                self._expiry.cancel()
            self._expiry = asyncio.get_running_loop().call_later(self._unconfirmed_after_s, self._unconfirmed)

    def _unconfirmed(self) -> None:
        """No store has answered for a while: a purge made meanwhile would go unseen, so the cache is bypassed (each
        request tries the stores again, counted in redis_errors_total{op="cache-gen"} when they fail)."""
        self._expiry = None
        self._in_force = False
        self._tokens.clear()
        log.warning("no store has confirmed the cache purge generations for %.1fs: the cache is bypassed until one "
                    "answers", self._unconfirmed_after_s or 0.0)

    def announced(self, data: bytes) -> None:
        """A purge published by any process: `{generation} {field}`. Never raises: the subscription it arrives on
        also carries key changes."""
        number, _, field = data.decode(errors="replace").partition(" ")
        n = _number(number.encode())
        if n is None or not field:
            log.warning("unreadable cache purge announcement %r: reading the generations again", data[:200])
            self.stale()
            return
        self._merge({field: n})
        if not self._in_force:  # not read yet, or unconfirmed: a read puts them back in force
            self.stale()

    def stale(self) -> None:
        """Read the generations again soon (after a (re)subscription: a purge may have gone unheard)."""
        self._stale.set()

    async def run(self, interval_s: float) -> None:
        """Re-read the generations every `interval_s`, and at once when `stale()` is called, until cancelled.
        Unconfirmed for UNCONFIRMED_AFTER intervals, they are out of force."""
        self._unconfirmed_after_s = UNCONFIRMED_AFTER * interval_s
        if self._in_force:
            self._confirm()  # starts the clock
        try:
            while True:
                try:
                    async with asyncio.timeout(interval_s):
                        await self._stale.wait()
                except TimeoutError:
                    pass
                self._stale.clear()
                with contextlib.suppress(StoreUnavailable):  # counted in redis_errors_total; tried again later
                    await self.refresh()
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            self._unconfirmed_after_s = None

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
        """Move the generation of `model` (for `team` alone under scope "team") past every number any store or this
        process knows, announce it to every process, and copy it to the cache store. Raises PurgeRefused,
        StoreUnavailable (the state store: nothing changed)."""
        field = self.field(model, team)
        gens_key = self._keys.cache_generations()
        known = self._gens.get(field, 0)
        if self._copy is not None:  # all that is left of the count if the state store lost it
            with contextlib.suppress(StoreUnavailable):
                held = await self._copy.operator_call("cache-gen", lambda r: r.hget(gens_key, field))
                known = max(known, _number(held) or 0)

        async def bump(r: Any) -> int:
            n = int(await self._bump(keys=[gens_key], args=[field, known], client=r))
            await r.publish(self._keys.cache_generation_changes(), f"{n} {field}")
            return n

        n = await self._store.operator_call("cache-purge", bump)
        self._merge({field: n})
        if not self._in_force:
            self.stale()
        if self._copy is not None:
            copy = self._copy
            try:
                await copy.operator_call("cache-purge", lambda r: self._raise(copy, r, [field, n]))
            except StoreUnavailable:
                log.warning("cache purge %s generation %d not copied to %s (unreachable): the next read of the "
                            "generations by any instance that reaches it copies it", field, n, copy.name)
        return Purge(model, team, n)


def _number(raw: bytes | None) -> int | None:
    """A stored or announced generation: ASCII digits ("²" passes str.isdigit, not int)."""
    if raw is None or not raw.isdigit():
        return None
    return int(raw)
