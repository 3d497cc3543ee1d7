"""Operator commands against the Redis the proxies share: `keys ...`, `teams ...`, `usage`, `cache ...`.

Each acts as a principal (access.py: `root`, or the named admin of PROXY_ADMIN_CREDENTIAL) with the permission the
one table gives its command; changes and refusals go to the audit log before the command answers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import orjson

from ..accounts.access import check_key_limits
from ..accounts.keynames import name_keys
from ..accounts.keys import KeyRecord, KeyStore
from ..accounts.teams import TeamStore
from ..accounts.usage import UsageLedger, report_format
from ..config import Settings
from ..config.limits import LIMIT_WINDOWS, Limits, check_team
from ..errors import KeyNotActive, PermissionDenied
from ..stores.guard import Store, StoreUnavailable, connect
from ..stores.rediskeys import RedisKeys
from ..stores.topology import TopologyError, describe
from .access import CliAccess, cli_access
from .failures import CommandFailed


async def with_store(settings: Settings, fn: Callable[[Store, RedisKeys, CliAccess], Awaitable[int]],
                      command: str) -> int:
    """Run an operator command against the Redis the proxies share, as the principal the command line acts as
    (a refusal is audited, then printed: exit 1)."""
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
    rkeys = RedisKeys(settings.cache.key_prefix)
    try:
        access = await cli_access(command, settings, store, rkeys)
        try:
            return await fn(store, rkeys, access)
        except PermissionDenied as err:
            raise await access.refused(err) from None
    except StoreUnavailable as exc:
        print(f"error: {exc} ({describe(exc)})", file=sys.stderr)
        return 1
    finally:
        await store.close()


CLI_PAGE = 1000  # keys per page of `keys list`


def _print_records(records: Sequence[KeyRecord], as_json: bool, *, header: bool = True) -> None:
    if as_json:
        print(orjson.dumps([r.public() for r in records]).decode())
        return
    if header:
        print(f"{'ID':<22} {'TEAM':<16} {'STATUS':<8} {'EXPIRES':<20} {'LIMITS':<30} NAME")
    now = time.time()
    for r in records:
        # the console's words: a key in its rotation grace is "rotated" (it works until EXPIRES), not "active"
        status = "revoked" if r.revoked else ("expired" if not r.active(now) else
                                              "rotated" if r.grace_until is not None else "active")
        expires = _when(r.ends_at) if r.ends_at else "-"
        print(f"{r.id:<22} {r.team:<16} {status:<8} {expires:<20} {_limits_text(r.limits):<30} {r.name}")


async def _key_list(args: argparse.Namespace, ks: KeyStore, access: CliAccess) -> int:
    """Every key (or the first --limit), oldest first, read and printed a page at a time: a team's keys through its
    index (--team, or the teams an admin of role team is confined to). --json: one array, written as it comes."""
    if args.team:
        access.scope(args.team)
    teams = [args.team] if args.team else list(access.principal.teams) or None
    left, after, first = args.limit, None, True
    if args.json:
        sys.stdout.write("[")
    while left is None or left > 0:
        page = await ks.index.page(teams=teams, after=after, limit=min(CLI_PAGE, left or CLI_PAGE))
        records = page.records
        if args.json:
            sys.stdout.write(("" if first or not records else ",")
                             + ",".join(orjson.dumps(r.public()).decode() for r in records))
        else:
            _print_records(records, False, header=first)
        first = first and not records
        left = None if left is None else left - len(records)
        if page.next_cursor is None:
            break
        after = page.next_cursor
    if args.json:
        print("]")
    elif first:
        _print_records([], False)  # no key: the header alone, as ever
    return 0


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


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


async def _key(ks: KeyStore, key_id: str, access: CliAccess) -> KeyRecord:
    """The key with this id, once its team is known to be the principal's."""
    record = await ks.get(key_id)
    if record is None:
        raise CommandFailed(f"no key with id {key_id}")
    access.scope(record.team, key_id=record.id)
    return record


async def _within_team(access: CliAccess, teams: TeamStore, team: str, limits: Limits) -> None:
    if access.principal.confined:
        check_key_limits(access.principal, team, await teams.in_force(team), limits)


async def _key_create(args: argparse.Namespace, settings: Settings, ks: KeyStore, teams: TeamStore,
                      access: CliAccess) -> int:
    expires_at = time.time() + args.expires_in if args.expires_in else None
    models = tuple(m for m in (args.models or "").split(",") if m)
    unknown = [m for m in models if m not in settings.models]
    if unknown:
        return fail(f"unknown model {unknown[0]!r}")
    try:
        check_team(args.team)
    except ValueError as exc:
        return fail(str(exc))
    access.scope(args.team)
    limits = Limits().merged(_limit_flags(args))
    await _within_team(access, teams, args.team, limits)
    try:
        key, record = await ks.create(args.team, name=args.name, expires_at=expires_at, models=models,
                                      limits=limits)
    except ValueError as exc:
        return fail(str(exc))
    await access.record(team=record.team, key_id=record.id, status=201, after=record.public())
    if args.json:
        print(orjson.dumps({"key": key, **record.public()}).decode())
    else:
        print(key)
        print(f"id {record.id}, team {record.team}: store this key now, it cannot be shown again", file=sys.stderr)
    return 0


async def _key_change(args: argparse.Namespace, ks: KeyStore, teams: TeamStore, access: CliAccess) -> int:
    """`keys limits` and `keys revoke`."""
    before = await _key(ks, args.key_id, access)
    if args.keys_cmd == "revoke":
        record = await ks.revoke(before.id)
        if record is None:
            return fail(f"no key with id {args.key_id}", 1)
        await access.record(team=record.team, key_id=record.id, before={"revoked": before.revoked},
                            after={"revoked": record.revoked})
        print(orjson.dumps(record.public()).decode() if args.json else f"revoked {record.id} (team {record.team})")
        return 0
    changes = _limit_flags(args)
    await _within_team(access, teams, before.team, before.limits.merged(changes))
    record = await ks.set_limits(before.id, changes)
    if record is None:
        return fail(f"no key with id {args.key_id}", 1)
    await access.record(team=record.team, key_id=record.id, before={"limits": before.limits.to_dict()},
                        after={"limits": record.limits.to_dict()})
    print(orjson.dumps(record.public()).decode() if args.json else
          f"{record.id} (team {record.team}): {_limits_text(record.limits)}")
    return 0


async def _key_rotate(args: argparse.Namespace, ks: KeyStore, access: CliAccess) -> int:
    before = await _key(ks, args.key_id, access)
    try:
        rotated = await ks.rotate(before.id, args.grace)
    except KeyNotActive as exc:
        return fail(exc.message, 1)
    if rotated is None:
        return fail(f"no key with id {args.key_id}", 1)
    key, new, old = rotated
    await access.record(team=old.team, key_id=old.id, status=201, before={"grace_until": before.grace_until},
                        after={"grace_until": old.grace_until, "replaced_by": new.public()})
    if args.json:
        print(orjson.dumps({"key": key, **new.public(), "previous": old.public()}).decode())
    else:
        print(key)
        until = _when(old.ends_at or 0)
        print(f"new id {new.id}; the old key {old.id} keeps working until {until}", file=sys.stderr)
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store, rkeys: RedisKeys, access: CliAccess) -> int:
        ks, teams = KeyStore(store, rkeys), TeamStore(store, rkeys, settings.teams)
        if args.keys_cmd == "create":
            return await _key_create(args, settings, ks, teams, access)
        if args.keys_cmd == "list":
            return await _key_list(args, ks, access)
        if args.keys_cmd == "show":
            _print_records([await _key(ks, args.key_id, access)], args.json)
            return 0
        if args.keys_cmd == "rotate":
            return await _key_rotate(args, ks, access)
        return await _key_change(args, ks, teams, access)

    return asyncio.run(with_store(settings, run, f"keys {args.keys_cmd}"))


def cmd_teams(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store, rkeys: RedisKeys, access: CliAccess) -> int:
        teams = TeamStore(store, rkeys, settings.teams)
        if args.teams_cmd in ("set", "reset"):
            try:
                check_team(args.name)
            except ValueError as exc:
                return fail(str(exc))
            access.scope(args.name)
            before = await teams.in_force(args.name)
            limits = await (teams.set(args.name, _limit_flags(args)) if args.teams_cmd == "set"
                            else teams.reset(args.name))
            await access.record(team=args.name, before={"limits": before.to_dict()}, after={"limits": limits.to_dict()})
            whence = " (from the config)" if args.teams_cmd == "reset" else ""
            print(_team_json(args.name, limits) if args.json else f"{args.name}: {_limits_text(limits)}{whence}")
            return 0
        listed = {t: v for t, v in (await teams.all()).items() if access.principal.sees(t)}
        if args.json:
            print(orjson.dumps([{"team": t, "limits": lim.to_dict(), "source": src}
                                for t, (lim, src) in listed.items()]).decode())
            return 0
        print(f"{'TEAM':<20} {'SOURCE':<8} LIMITS")
        for t, (lim, src) in listed.items():
            print(f"{t:<20} {src:<8} {_limits_text(lim)}")
        return 0

    return asyncio.run(with_store(settings, run, f"teams {args.teams_cmd}"))


def _team_json(team: str, limits: Limits) -> str:
    return orjson.dumps({"team": team, "limits": limits.to_dict()}).decode()  # as the admin API answers


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    if args.json and args.format not in ("table", "json"):
        return fail(f"--json and --format {args.format} ask for two formats: give one")
    fmt = "json" if args.json else args.format

    async def run(store: Store, rkeys: RedisKeys, access: CliAccess) -> int:
        if args.team:
            access.scope(args.team)
        ledger = UsageLedger(store, rkeys, retention_days=settings.usage.retention_days)
        today = datetime.datetime.now(datetime.UTC).date()
        prices = {name: spec.price_per_million_tokens for name, spec in settings.models.items()}
        try:
            rows = await ledger.report(args.team, args.since or today, args.until or today, args.by, prices)
        except ValueError as exc:
            return fail(str(exc))
        rows = [r for r in rows if access.principal.sees(r["team"])]
        if args.by == "key":  # each key's name beside its id (the ledger holds ids only)
            rows = await name_keys(KeyStore(store, rkeys), rows)
        sys.stdout.write(report_format(args.by).render(rows, fmt))
        return 0

    return asyncio.run(with_store(settings, run, "usage"))
