"""What `embedding-proxy cache stats` and `GET /admin/cache` report, at a cost that does not grow with the cache.

Per server of the cache store (every master of a cluster): its keys (DBSIZE), memory (INFO memory), policy and
evictions (INFO stats). How many of those keys are cache entries: counted by a SCAN when the server holds at most
SCAN_LIMIT keys (exact), else estimated from SAMPLE random keys (RANDOMKEY, one pipeline): the share of entries
among them times DBSIZE (it matters when the cache shares the state store). Entries per model are not reported: a
key is a content hash and a value a vector, neither names its model, so counting them would mean reading the whole
cache. Per model there are its purge generations and its token hit ratio today (UTC), from the usage ledger: every
instance's requests, flushed every `usage.flush_interval_s`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from redis.exceptions import ResponseError

from ..config import RedisSettings
from ..telemetry.metrics import Metrics
from .generations import CacheGenerations
from .guard import Store, StoreUnavailable
from .localcache import LocalCache
from .rediskeys import RedisKeys
from .topology import describe, masters

SCAN_LIMIT = 1000
SAMPLE = 200


@dataclass(frozen=True)
class StoreRef:
    role: str  # "cache", or "state and cache" when the cache lives in the state store
    store: Store
    settings: RedisSettings


class StatsUnavailable(StoreUnavailable):
    """A store the report reads did not answer; the message names the store and why, for the operator."""


def _unavailable(role: str, exc: StoreUnavailable) -> StatsUnavailable:
    which = "the cache store (CACHE_REDIS_URL)" if role == "cache" else "the key and quota store (REDIS_URL)"
    return StatsUnavailable(f"{which} is unreachable: {describe(exc).rstrip('.')}")


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class _Entries:
    """Which keys are cache entries, and whose team they belong to under scope "team"."""

    def __init__(self, keys: RedisKeys) -> None:
        self.shared = keys.cache_namespace(None).encode()
        self.team = keys.cache_namespace("\0").partition("\0")[0].encode()  # what comes before a team's name

    def count(self, names: Sequence[bytes]) -> tuple[int, Counter[str]]:
        teams: Counter[str] = Counter()
        total = 0
        for name in names:
            if name.startswith(self.shared):
                total += 1
            elif name.startswith(self.team):
                total += 1
                teams[name[len(self.team):].partition(b":")[0].decode(errors="replace")] += 1
        return total, teams


async def _info(r: Any, section: str) -> dict[str, Any]:
    try:
        info: dict[str, Any] = await r.info(section)
        return info
    except ResponseError:  # INFO renamed or refused (the embedded store has none)
        return {}


async def _server(role: str, node: str, r: Any, entries: _Entries) -> tuple[dict[str, Any], Counter[str]]:
    size = int(await r.dbsize())
    memory, stats = await _info(r, "memory"), await _info(r, "stats")
    if size <= SCAN_LIMIT:
        names = [k async for k in r.scan_iter(count=SCAN_LIMIT)]
        found, teams = entries.count(names)
        estimated = False
    else:
        pipe = r.pipeline(transaction=False)
        for _ in range(SAMPLE):
            pipe.randomkey()
        names = [k for k in await pipe.execute() if k is not None]
        hits, sampled = entries.count(names)
        share = hits / len(names) if names else 0.0
        found = round(size * share)
        teams = Counter({t: round(size * n / len(names)) for t, n in sampled.items()})
        estimated = True
    row = {
        "store": role, "node": node, "keys": size, "entries": found, "estimated": estimated,
        "memory_bytes": memory.get("used_memory"), "maxmemory_bytes": memory.get("maxmemory") or None,
        "maxmemory_policy": memory.get("maxmemory_policy"), "evicted_keys": stats.get("evicted_keys"),
    }
    return row, teams


async def store_stats(ref: StoreRef, keys: RedisKeys) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One row per server of the store, and the entries per team across them. Raises StatsUnavailable."""
    entries = _Entries(keys)

    async def read(client: Any) -> tuple[list[dict[str, Any]], Counter[str]]:
        found: list[tuple[str, Any]] = []
        try:
            found = await masters(client, ref.settings, "CACHE_REDIS_URL" if ref.role == "cache" else "REDIS_URL")
            results = await asyncio.gather(*(_server(ref.role, node, r, entries) for node, r in found))
        finally:
            for _, r in found:
                if r is not client:
                    await r.aclose()
        teams: Counter[str] = Counter()
        for _, t in results:
            teams.update(t)
        return [row for row, _ in results], teams

    try:
        return await ref.store.operator_call("cache-stats", read)
    except StoreUnavailable as exc:
        raise _unavailable(ref.role, exc) from exc


class UsageByModel(Protocol):
    """The usage ledger's report, as the token hit ratio reads it (proxy/accounts/usage.py's UsageLedger): a store never
    imports the accounts above it."""

    async def report(self, team: None, since: dt.date, until: dt.date, by: Literal["model"],
                     prices: Mapping[str, float]) -> list[dict[str, Any]]: ...


async def cache_stats(
    stores: Sequence[StoreRef], keys: RedisKeys, generations: CacheGenerations, ledger: UsageByModel,
    prices: dict[str, float], day: dt.date,
) -> dict[str, Any]:
    """The report (without the answering process's own counters). Raises StatsUnavailable."""
    rows: list[dict[str, Any]] = []
    teams: Counter[str] = Counter()
    for ref in stores:
        found, per_team = await store_stats(ref, keys)
        rows.extend(found)
        teams.update(per_team)
    try:
        await generations.refresh()  # from either store: only both failing fails it
        gens = generations.generations()
        usage = await ledger.report(None, day, day, "model", prices)
    except StoreUnavailable as exc:
        raise _unavailable("state", exc) from exc
    tokens: dict[str, list[int]] = {}
    for u in usage:
        t = tokens.setdefault(u["model"], [0, 0])
        t[0] += u["cached_tokens"]
        t[1] += u["total_tokens"]
    models = []
    for model in generations.models:
        cached, total = tokens.get(model, [0, 0])
        row: dict[str, Any] = {"model": model, "generation": gens.get(f"m:{model}", 0)}
        if generations.team_scope:
            row["team_generations"] = {team: n for f, n in sorted(gens.items()) if f.startswith("t:")
                                       for team, _, m in [f[2:].partition(":")] if m == model}
        row.update(cached_tokens=cached, total_tokens=total, hit_ratio=_ratio(cached, total))
        models.append(row)
    cached_all = sum(t[0] for t in tokens.values())
    total_all = sum(t[1] for t in tokens.values())
    memory = [r["memory_bytes"] for r in rows if r["store"] != "state"]
    out: dict[str, Any] = {
        "object": "cache",
        "scope": "team" if generations.team_scope else "shared",
        "entries": sum(r["entries"] for r in rows),
        "estimated": any(r["estimated"] for r in rows),
        "memory_bytes": sum(memory) if None not in memory else None,
        "day": day.isoformat(),
        "hit_ratio": _ratio(cached_all, total_all),
        "stores": rows,
        "models": models,
    }
    if generations.team_scope:
        out["teams"] = [{"team": t, "entries": n} for t, n in sorted(teams.items())]
    return out


def process_stats(metrics: Metrics, local: LocalCache | None, generations: CacheGenerations) -> dict[str, Any]:
    """The answering process's own view: its cache lookups of unique inputs since it started (with several
    workers: every worker's on this machine, as /metrics), its in-process tier, the generations it uses."""
    lookups = metrics.cache_lookups_so_far()
    return {
        "pid": os.getpid(),
        "lookups": lookups,
        "hit_ratio": _ratio(lookups["hit"], sum(lookups.values())),
        "local_entries": len(local) if local is not None else 0,
        "local_bytes": local.bytes if local is not None else 0,
        "local_max_bytes": local.max_bytes if local is not None else 0,
        "generations_loaded": generations.loaded,
    }
