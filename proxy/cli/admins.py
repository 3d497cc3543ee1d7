"""`embedding-proxy admins ...` (named admin credentials) and `embedding-proxy audit` (the audit log)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time

import orjson

from ..accounts.access import check_admin_name, check_role
from ..accounts.admins import AdminExists, AdminStore
from ..accounts.audit import MAX_LIMIT, AuditEntry, AuditQuery, to_csv
from ..config import Settings
from ..stores.guard import Store
from ..stores.rediskeys import RedisKeys
from .access import CliAccess
from .failures import CommandFailed
from .operate import with_store


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


async def _create(args: argparse.Namespace, admins: AdminStore, access: CliAccess) -> int:
    try:
        check_admin_name(args.name)
        check_role(args.role, args.team or [])
        credential, record = await admins.create(args.name, args.role, args.team or [], access.principal.actor)
    except ValueError as exc:
        raise CommandFailed(str(exc), 2) from None
    except AdminExists as exc:
        raise CommandFailed(exc.message) from None
    await access.record(admin=record.name, status=201, after=record.public())
    if args.json:
        print(orjson.dumps({"credential": credential, **record.public()}).decode())
    else:
        print(credential)
        print(f"admin {record.name} ({record.role}{' of ' + ', '.join(record.teams) if record.teams else ''}): "
              "store this credential now, it cannot be shown again", file=sys.stderr)
    return 0


def cmd_admins(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store, rkeys: RedisKeys, access: CliAccess) -> int:
        admins = AdminStore(store, rkeys)
        if args.admins_cmd == "create":
            return await _create(args, admins, access)
        if args.admins_cmd == "revoke":
            done = await admins.revoke(args.name)
            if done is None:
                raise CommandFailed(f"no admin named {args.name}")
            await access.record(admin=args.name, before={"revoked": done[0].revoked}, after={"revoked": True})
            print(orjson.dumps(done[1].public()).decode() if args.json else  # as the admin API answers
                  f"revoked admin {args.name}: refused on every instance from its next request")
            return 0
        records = await admins.list()
        if args.json:
            print(orjson.dumps([r.public() for r in records]).decode())
            return 0
        print(f"{'NAME':<24} {'ROLE':<9} {'STATUS':<8} {'CREATED':<21} {'BY':<16} TEAMS")
        for r in records:
            print(f"{r.name:<24} {r.role:<9} {'revoked' if r.revoked else 'active':<8} {_when(r.created_at):<21} "
                  f"{r.created_by:<16} {','.join(r.teams) or '-'}")
        return 0

    return asyncio.run(with_store(settings, run, f"admins {args.admins_cmd}"))


def _day(day: dt.date | None, *, end: bool) -> float | None:
    if day is None:
        return None
    day += dt.timedelta(days=1 if end else 0)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def _table(entries: list[AuditEntry]) -> str:
    lines = [f"{'TIME (UTC)':<21} {'ACTOR':<20} {'HOW':<7} {'ACTION':<16} {'OUTCOME':<8} {'TEAM':<16} "
             f"{'TARGET':<22} CLIENT"]
    for e in entries:
        target = e.key_id or e.model or e.admin or "-"
        lines.append(f"{_when(e.ts):<21} {e.actor or '-':<20} {e.how:<7} {e.action:<16} {e.outcome:<8} "
                     f"{e.team or '-':<16} {target:<22} {e.client or '-'}")
    return "\n".join(lines) + "\n"


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    if args.json and args.format not in ("table", "json"):
        raise CommandFailed(f"--json and --format {args.format} ask for two formats: give one", 2)
    fmt = "json" if args.json else args.format

    async def run(store: Store, rkeys: RedisKeys, access: CliAccess) -> int:
        if args.team:
            access.scope(args.team)
        if args.limit is not None and not 1 <= args.limit <= MAX_LIMIT:
            raise CommandFailed(f"--limit must be from 1 to {MAX_LIMIT}", 2)
        query = AuditQuery(since=_day(args.since, end=False), until=_day(args.until, end=True), actor=args.actor,
                           team=args.team, action=args.action, teams=access.principal.teams,
                           limit=args.limit or 1000)
        entries = await access.audit_log.query(query)
        if fmt == "json":
            sys.stdout.write(orjson.dumps([e.to_dict() for e in entries]).decode() + "\n")
        else:
            sys.stdout.write(to_csv(entries) if fmt == "csv" else _table(entries))
        return 0

    return asyncio.run(with_store(settings, run, "audit"))
