"""`embedding-proxy cache stats` and `cache purge`: against the state store, and the cache store when it has its
own (a purge writes its generation there too)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime

import orjson

from ..accounts.usage import UsageLedger
from ..config import Settings
from ..stores.cachestats import StatsUnavailable, StoreRef, cache_stats
from ..stores.generations import CacheGenerations, PurgeRefused
from ..stores.guard import Store, connect
from ..stores.rediskeys import RedisKeys
from ..stores.topology import TopologyError
from .access import CliAccess
from .operate import fail, with_store


def cmd_cache(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store, rkeys: RedisKeys, access: CliAccess) -> int:
        if not settings.cache_redis.url:
            return await _cache(args, settings, store, None, rkeys, access)
        cache_settings = dataclasses.replace(settings.cache_redis,
                                             socket_timeout_s=settings.cache_redis.operator_timeout_s)
        try:
            cache_store = Store(connect(cache_settings, "CACHE_REDIS_URL")[0], cache_settings, name="cache redis")
        except TopologyError as exc:
            return fail(str(exc), 1)
        try:
            return await _cache(args, settings, store, cache_store, rkeys, access)
        finally:
            await cache_store.close()

    return asyncio.run(with_store(settings, run, f"cache {args.cache_cmd}"))


async def _cache(args: argparse.Namespace, settings: Settings, store: Store, cache_store: Store | None,
                 rkeys: RedisKeys, access: CliAccess) -> int:
    # the cache store too: a purge writes its generation there, and reads what it holds (proxy/stores/generations.py)
    generations = CacheGenerations(store, rkeys, settings.models, settings.cache.scope, cache_store=cache_store)
    if args.cache_cmd == "purge":
        try:
            done = await generations.purge(args.model, args.team)
        except PurgeRefused as exc:
            return fail(exc.message)
        await access.record(model=done.model, team=done.team or "", after={"generation": done.generation})
        if args.json:  # as the admin API answers
            print(orjson.dumps({"object": "cache.purge", "model": done.model, "team": done.team,
                                "generation": done.generation,
                                "scope": "team" if generations.team_scope else "shared"}).decode())
            return 0
        whose = f" for team {done.team}" if done.team else ""
        print(f"purged {done.model}{whose}: generation {done.generation}; every proxy stops serving its old "
              f"entries within seconds (they leave Redis by TTL or eviction)")
        return 0
    refs = ((StoreRef("state and cache", store, settings.redis),) if cache_store is None else
            (StoreRef("cache", cache_store, settings.cache_redis), StoreRef("state", store, settings.redis)))
    return await _stats(args, settings, refs, store, rkeys, generations)


async def _stats(args: argparse.Namespace, settings: Settings, refs: tuple[StoreRef, ...], state: Store,
                 rkeys: RedisKeys, generations: CacheGenerations) -> int:
    ledger = UsageLedger(state, rkeys, retention_days=settings.usage.retention_days)
    prices = {name: spec.price_per_million_tokens for name, spec in settings.models.items()}
    try:
        stats = await cache_stats(refs, rkeys, generations, ledger, prices,
                                  datetime.datetime.now(datetime.UTC).date())
    except StatsUnavailable as exc:  # one line that names the store and why
        return fail(str(exc), 1)
    if args.json:
        print(orjson.dumps(stats).decode())
        return 0
    print(f"{'STORE':<16} {'NODE':<22} {'KEYS':>12} {'ENTRIES':>13} {'MEMORY':>10} {'MAXMEMORY':>10} "
          f"{'POLICY':<16} {'EVICTED':>10}")
    for r in stats["stores"]:
        entries = ("~" if r["estimated"] else "") + f"{r['entries']:,}"
        print(f"{r['store']:<16} {r['node'] or '-':<22} {r['keys']:>12,} {entries:>13} {_bytes(r['memory_bytes']):>10} "
              f"{_bytes(r['maxmemory_bytes']):>10} {r['maxmemory_policy'] or '-':<16} "
              f"{'-' if r['evicted_keys'] is None else r['evicted_keys']:>10}")
    print(f"cache entries: {'~' if stats['estimated'] else ''}{stats['entries']:,}; hit ratio today "
          f"({stats['day']}, tokens, every instance): {_percent(stats['hit_ratio'])}")
    print(f"{'MODEL':<32} {'GENERATION':>10} {'CACHED TOKENS':>14} {'TOTAL TOKENS':>14} {'HIT RATIO':>9}")
    for m in stats["models"]:
        gen = str(m["generation"]) + "".join(f" {t}:{n}" for t, n in m.get("team_generations", {}).items())
        print(f"{m['model']:<32} {gen:>10} {m['cached_tokens']:>14,} {m['total_tokens']:>14,} "
              f"{_percent(m['hit_ratio']):>9}")
    return 0


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f}%"
