"""Operator commands against the Redis the proxies share: `keys ...`, `teams ...`, `usage`, `cache ...`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import orjson

from .config import Settings
from .errors import KeyNotActive
from .keys import MAX_LIFETIME_S, KeyRecord, KeyStore
from .limits import LIMIT_WINDOWS, Limits
from .stores.cachestats import StatsUnavailable, StoreRef, cache_stats
from .stores.generations import CacheGenerations, PurgeRefused
from .stores.guard import Store, StoreUnavailable, connect
from .stores.rediskeys import RedisKeys
from .stores.topology import TopologyError, describe
from .teams import TeamStore
from .usage import UsageLedger, report_format

_DURATION = re.compile(r"([0-9]+)([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `30d`, `2w` -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 3600, 15m, 12h, 30d)")
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds > MAX_LIFETIME_S:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than {MAX_LIFETIME_S // 86400} days")
    return seconds


async def _with_store(settings: Settings, fn: Callable[[Store, RedisKeys], Awaitable[int]]) -> int:
    """Run an operator command against the Redis the proxies share."""
    if not settings.redis.url:
        print("error: this command needs REDIS_URL (the embedded store lives inside one serve process)",
              file=sys.stderr)
        return 2
    # Every call here is operator work, as patient as the admin API's (operator_timeout_s).
    redis_settings = dataclasses.replace(settings.redis, socket_timeout_s=settings.redis.operator_timeout_s)
    try:
        client, _ = connect(redis_settings)
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    store = Store(client, redis_settings)
    try:
        return await fn(store, RedisKeys(settings.cache.key_prefix))
    except StoreUnavailable as exc:
        print(f"error: {exc} ({describe(exc)})", file=sys.stderr)
        return 1
    finally:
        await store.close()


def _print_records(records: Sequence[KeyRecord], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps([r.public() for r in records]).decode())
        return
    print(f"{'ID':<22} {'TEAM':<16} {'STATUS':<8} {'EXPIRES':<20} {'LIMITS':<30} NAME")
    now = time.time()
    for r in records:
        status = "revoked" if r.revoked else ("active" if r.active(now) else "expired")
        expires = _when(r.ends_at) if r.ends_at else "-"
        print(f"{r.id:<22} {r.team:<16} {status:<8} {expires:<20} {_limits_text(r.limits):<30} {r.name}")


def _when(ts: float) -> str:
    """A UTC time for a table; a record written before expiries were bounded may hold one no date can show."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"{ts:.6g} (epoch s)"


def _limits_text(limits: Limits) -> str:
    return " ".join(f"{name}={value}" for name, value in limits.items()) or "unlimited"


def _limit_flags(args: argparse.Namespace) -> dict[str, int | None]:
    return {name: getattr(args, name) for name in LIMIT_WINDOWS if getattr(args, name) is not None}


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    async def create(ks: KeyStore) -> int:
        expires_at = time.time() + args.expires_in if args.expires_in else None
        models = tuple(m for m in (args.models or "").split(",") if m)
        unknown = [m for m in models if m not in settings.models]
        if unknown:
            return _fail(f"unknown model {unknown[0]!r}")
        try:
            key, record = await ks.create(args.team, name=args.name, expires_at=expires_at, models=models,
                                          limits=Limits().merged(_limit_flags(args)))
        except ValueError as exc:
            return _fail(str(exc))
        if args.json:
            print(orjson.dumps({"key": key, **record.public()}).decode())
        else:
            print(key)
            print(f"id {record.id}, team {record.team}: store this key now, it cannot be shown again",
                  file=sys.stderr)
        return 0

    async def list_(ks: KeyStore) -> int:
        _print_records(await ks.list(args.team), args.json)
        return 0

    async def show(ks: KeyStore) -> int:
        record = await ks.get(args.key_id)
        if record is None:
            return _fail(f"no key with id {args.key_id}", 1)
        _print_records([record], args.json)
        return 0

    async def limits(ks: KeyStore) -> int:
        record = await ks.set_limits(args.key_id, _limit_flags(args))
        if record is None:
            return _fail(f"no key with id {args.key_id}", 1)
        print(f"{record.id} (team {record.team}): {_limits_text(record.limits)}")
        return 0

    async def revoke(ks: KeyStore) -> int:
        record = await ks.revoke(args.key_id)
        if record is None:
            return _fail(f"no key with id {args.key_id}", 1)
        print(f"revoked {record.id} (team {record.team})")
        return 0

    async def rotate(ks: KeyStore) -> int:
        try:
            rotated = await ks.rotate(args.key_id, args.grace)
        except KeyNotActive as exc:
            return _fail(exc.message, 1)
        if rotated is None:
            return _fail(f"no key with id {args.key_id}", 1)
        key, new, old = rotated
        if args.json:
            print(orjson.dumps({"key": key, **new.public(), "previous": old.public()}).decode())
        else:
            print(key)
            until = _when(old.ends_at or 0)
            print(f"new id {new.id}; the old key {old.id} keeps working until {until}", file=sys.stderr)
        return 0

    actions: dict[str, Callable[[KeyStore], Awaitable[int]]] = {
        "create": create, "list": list_, "show": show, "limits": limits, "revoke": revoke, "rotate": rotate,
    }
    action = actions[args.keys_cmd]
    return asyncio.run(_with_store(settings, lambda store, rkeys: action(KeyStore(store, rkeys))))


def cmd_teams(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store, rkeys: RedisKeys) -> int:
        teams = TeamStore(store, rkeys, settings.teams)
        if args.teams_cmd == "set":
            try:
                limits = await teams.set(args.name, _limit_flags(args))
            except ValueError as exc:
                return _fail(str(exc))
            print(f"{args.name}: {_limits_text(limits)}")
            return 0
        if args.teams_cmd == "reset":
            try:
                limits = await teams.reset(args.name)
            except ValueError as exc:
                return _fail(str(exc))
            print(f"{args.name}: {_limits_text(limits)} (from the config)")
            return 0
        listed = await teams.all()
        if args.json:
            print(orjson.dumps([{"team": t, "limits": lim.to_dict(), "source": src}
                                for t, (lim, src) in listed.items()]).decode())
            return 0
        print(f"{'TEAM':<20} {'SOURCE':<8} LIMITS")
        for t, (lim, src) in listed.items():
            print(f"{t:<20} {src:<8} {_limits_text(lim)}")
        return 0

    return asyncio.run(_with_store(settings, run))


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store, rkeys: RedisKeys) -> int:
        ledger = UsageLedger(store, rkeys, retention_days=settings.usage.retention_days)
        today = datetime.datetime.now(datetime.UTC).date()
        prices = {name: spec.price_per_million_tokens for name, spec in settings.models.items()}
        try:
            rows = await ledger.report(args.team, args.since or today, args.until or today, args.by, prices)
        except ValueError as exc:
            return _fail(str(exc))
        sys.stdout.write(report_format(args.by).render(rows, args.format))
        return 0

    return asyncio.run(_with_store(settings, run))


def cmd_cache(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store, rkeys: RedisKeys) -> int:
        if not settings.cache_redis.url:
            return await _cache(args, settings, store, None, rkeys)
        cache_settings = dataclasses.replace(settings.cache_redis,
                                             socket_timeout_s=settings.cache_redis.operator_timeout_s)
        try:
            cache_store = Store(connect(cache_settings, "CACHE_REDIS_URL")[0], cache_settings, name="cache redis")
        except TopologyError as exc:
            return _fail(str(exc), 1)
        try:
            return await _cache(args, settings, store, cache_store, rkeys)
        finally:
            await cache_store.close()

    return asyncio.run(_with_store(settings, run))


async def _cache(args: argparse.Namespace, settings: Settings, store: Store, cache_store: Store | None,
                 rkeys: RedisKeys) -> int:
    # the cache store too: a purge writes its generation there, and reads what it holds (proxy/stores/generations.py)
    generations = CacheGenerations(store, rkeys, settings.models, settings.cache.scope, cache_store=cache_store)
    if args.cache_cmd == "purge":
        try:
            done = await generations.purge(args.model, args.team)
        except PurgeRefused as exc:
            return _fail(exc.message)
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
        return _fail(str(exc), 1)
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


def parse_day(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


def parse_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a non-negative whole number: {text!r}")
    return int(text)


def add_limit_flags(p: argparse.ArgumentParser, clearing: bool) -> None:
    # 0 means unlimited everywhere (as in the admin API): say so, whether it clears a limit or sets none.
    hint = " (0: unlimited, clears it)" if clearing else " (0 or omitted: unlimited)"
    p.add_argument("--rpm", type=parse_count, help="requests per minute" + hint)
    p.add_argument("--tpm", type=parse_count, help="tokens per minute" + hint)
    p.add_argument("--tokens-per-day", type=parse_count, help="tokens per UTC day" + hint)
    p.add_argument("--tokens-per-month", type=parse_count, help="tokens per UTC month" + hint)
