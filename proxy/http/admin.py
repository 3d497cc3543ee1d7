"""The admin API under /admin, behind an admin credential (adminauth.py): keys, teams and their quotas, usage reports.

    GET  /admin/keys[?limit&after&order&team&q]  a page of key records (ids, names, limits; never a key or its
                                          hash): adminlists.py, as GET /admin/teams
    POST /admin/keys                      {team, name?, models?, expires_in_s?, rpm?, tpm?, tokens_per_day?,
                                           tokens_per_month?} -> 201 with the new `key`, shown this once;
                                          name: at most 200 characters
    GET  /admin/keys/{id}                 one record
    PATCH /admin/keys/{id}                {rpm?, tpm?, tokens_per_day?, tokens_per_month?}: 0 or null clears
    POST /admin/keys/{id}/revoke          revoked at once on every instance
    POST /admin/keys/{id}/rotate          {grace_s?}: a new key; the old one lives on for grace_s (default 86400);
                                          409 for a revoked or expired key
    GET  /admin/teams[?limit&after]       teams with limits or keys: their limits, where they come from, and
                                          how many of their keys work
    GET  /admin/teams/{team}              one team's limits in force
    PUT  /admin/teams/{team}              {rpm?, tpm?, ...}: change those limits (0 or null clears)
    DELETE /admin/teams/{team}            drop the limits set at run time: the config's apply again
    GET  /admin/usage?since=D&until=D[&team=T][&by=key|model|day][&format=json|csv][&daily=1]
    GET  /admin/upstreams                 each deployment's state in the process that answers (health, cooldown,
                                          last error, remaining requests and tokens by the upstream's headers)
    GET  /admin/cache                     entries and memory per cache server, hit ratios, purge generations
    POST /admin/cache/purge               {model, team?}: that model's cached vectors are never served again
                                          (for that team alone under cache scope "team"; no team: every team)

Who may call which route is the table in proxy/accounts/permissions.py, checked before a handler runs
(adminauth.py); a principal confined to teams sees only its teams' keys, limits and usage here, and naming another
team is refused (403). Every change is in the audit log (its action: the route's `<resource>.<verb>`) before it is
answered. The stores behind these routes make operator calls (`redis.operator_timeout_s`, never marking Redis
down for requests).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
from aiohttp import web

from ..accounts.access import check_key_limits
from ..accounts.keynames import name_keys
from ..accounts.keys import MAX_LIFETIME_S, KeyRecord, KeyStore, check_key_name
from ..accounts.teams import TeamStore
from ..accounts.usage import REPORT_FLUSH_WAIT_S, GroupBy, UsageLedger, report_format
from ..config.limits import MAX_LIMIT, Limits, check_team
from ..errors import InvalidRequest, NotFound, ServiceUnavailable
from ..stores.cachestats import StatsUnavailable, StoreRef, cache_stats
from ..stores.generations import CacheGenerations, PurgeRefused
from ..stores.guard import StoreUnavailable
from ..stores.rediskeys import RedisKeys
from .adminauth import NEED, ROOT_KEY, audit, principal_of, scope
from .adminfleet import FLEET as FLEET  # re-exported: tests take it here
from .body import read_json_object
from .routing import expect_continue

_LIMIT_NAMES = tuple(Limits().to_dict())
KEYSTORE = web.AppKey("admin_keystore", KeyStore)
TEAMS = web.AppKey("admin_teams", TeamStore)
LEDGER = web.AppKey("admin_ledger", UsageLedger)
PRICES: web.AppKey[dict[str, float]] = web.AppKey("admin_prices")
MODELS: web.AppKey[frozenset[str]] = web.AppKey("admin_models")


@dataclass(frozen=True)
class CacheAdmin:
    stores: tuple[StoreRef, ...]  # where the entries live (every master of each)
    keys: RedisKeys
    generations: CacheGenerations
    ledger: UsageLedger
    process: Callable[[], dict[str, Any]]  # the answering process's own lookups and in-process tier


CACHE = web.AppKey("admin_cache", CacheAdmin)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def limit_changes(body: dict[str, Any]) -> dict[str, int | None]:
    """The quota fields of a body: positive integers, or 0/null to clear (unlimited)."""
    out: dict[str, int | None] = {}
    for name in _LIMIT_NAMES:
        if name in body:
            v = body[name]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_LIMIT):
                raise InvalidRequest(f"'{name}' must be an integer from 0 to {MAX_LIMIT}, or null.", param=name)
            out[name] = v or None
    return out


def _allowed(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise InvalidRequest(f"Unknown field '{sorted(unknown)[0]}'.", param=sorted(unknown)[0])


def _seconds(body: dict[str, Any], name: str, default: float | None) -> float | None:
    """A positive number of seconds, at most MAX_LIFETIME_S (JSON has no infinity, but 1e300 is a number)."""
    v = body.get(name, default)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v <= MAX_LIFETIME_S:
        raise InvalidRequest(f"'{name}' must be a positive number of seconds, at most {MAX_LIFETIME_S} "
                             f"({MAX_LIFETIME_S // 86400} days).", param=name)
    return float(v)


def _team(team: str) -> str:
    """A team name from the path or the query, checked before it reaches a Redis key."""
    try:
        return check_team(team)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid team name: {exc}.", param="team") from None


def team_filter(request: web.Request) -> str | None:
    team = request.query.get("team")
    return _team(team) if team else None


async def _audit(request: web.Request, **fields: Any) -> None:
    """This change's audit entry; its action is the route's permission (`keys.create`, `teams.update`, ...)."""
    need = request[NEED]
    await audit(request, f"{need.resource}.{need.verb}", **fields)


async def _within_team(request: web.Request, team: str, limits: Limits) -> None:
    principal = principal_of(request)
    if principal.confined:
        check_key_limits(principal, team, await request.app[TEAMS].in_force(team), limits)


async def create_key(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _allowed(body, {"team", "name", "models", "expires_in_s", *_LIMIT_NAMES})
    team, name, models = body.get("team"), body.get("name", ""), body.get("models", [])
    if not isinstance(team, str):
        raise InvalidRequest("'team' is required.", param="team")
    scope(request, _team(team))
    if not isinstance(name, str):
        raise InvalidRequest("'name' must be a string.", param="name")
    try:
        check_key_name(name)
    except ValueError as exc:
        raise InvalidRequest(f"{str(exc)[:1].upper()}{str(exc)[1:]}.", param="name") from None
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise InvalidRequest("'models' must be a list of model names.", param="models")
    unknown = [m for m in models if m not in request.app[MODELS]]
    if unknown:
        raise InvalidRequest(f"Unknown model '{unknown[0]}'.", param="models")
    expires_in = _seconds(body, "expires_in_s", None)
    limits = Limits().merged(limit_changes(body))
    await _within_team(request, team, limits)
    try:
        key, record = await request.app[KEYSTORE].create(
            team, name=name, models=tuple(models), limits=limits,
            expires_at=time.time() + expires_in if expires_in else None,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="team") from None
    await _audit(request, team=team, key_id=record.id, status=201, after=record.public())
    return _json({"key": key, **record.public()}, status=201)


async def _key(request: web.Request) -> KeyRecord:
    """The key the path names, once its team is known to be the principal's (404, 403)."""
    key_id = request.match_info["id"]
    record = await request.app[KEYSTORE].get(key_id)
    if record is None:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
    scope(request, record.team, key_id=record.id)
    return record


def _found(record: Any, key_id: str) -> Any:
    if record is None:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
    return record


async def show_key(request: web.Request) -> web.Response:
    return _json((await _key(request)).public())


async def update_key(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _allowed(body, set(_LIMIT_NAMES))
    before = await _key(request)
    changes = limit_changes(body)
    await _within_team(request, before.team, before.limits.merged(changes))
    record = _found(await request.app[KEYSTORE].set_limits(before.id, changes), before.id)
    await _audit(request, team=record.team, key_id=record.id, before={"limits": before.limits.to_dict()},
                 after={"limits": record.limits.to_dict()})
    return _json(record.public())


async def revoke_key(request: web.Request) -> web.Response:
    before = await _key(request)
    record = _found(await request.app[KEYSTORE].revoke(before.id), before.id)
    await _audit(request, team=record.team, key_id=record.id, before={"revoked": before.revoked},
                 after={"revoked": record.revoked})
    return _json(record.public())


async def rotate_key(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _allowed(body, {"grace_s"})
    grace = _seconds(body, "grace_s", 86400.0)
    before = await _key(request)
    key, new, old = _found(await request.app[KEYSTORE].rotate(before.id, grace or 0.0), before.id)
    await _audit(request, team=old.team, key_id=old.id, status=201, before={"grace_until": before.grace_until},
                 after={"grace_until": old.grace_until, "replaced_by": new.public()})
    return _json({"key": key, **new.public(), "previous": old.public()}, status=201)


async def show_team(request: web.Request) -> web.Response:
    team = _team(request.match_info["team"])
    scope(request, team)
    return _json({"team": team, "limits": (await request.app[TEAMS].in_force(team)).to_dict()})


async def set_team(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _allowed(body, set(_LIMIT_NAMES))
    team = _team(request.match_info["team"])
    scope(request, team)
    before = await request.app[TEAMS].in_force(team)
    limits = await request.app[TEAMS].set(team, limit_changes(body))
    await _audit(request, team=team, before={"limits": before.to_dict()}, after={"limits": limits.to_dict()})
    return _json({"team": team, "limits": limits.to_dict()})


async def reset_team(request: web.Request) -> web.Response:
    team = _team(request.match_info["team"])
    scope(request, team)
    before = await request.app[TEAMS].in_force(team)
    limits = await request.app[TEAMS].reset(team)
    await _audit(request, team=team, before={"limits": before.to_dict()}, after={"limits": limits.to_dict()})
    return _json({"team": team, "limits": limits.to_dict()})


def parse_day(text: str | None, name: str) -> dt.date:
    if not text:
        return dt.datetime.now(dt.UTC).date()
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a date, YYYY-MM-DD.", param=name) from None


async def usage(request: web.Request) -> web.Response:
    q = request.query
    by, fmt = q.get("by") or None, q.get("format", "json")
    if by not in (None, "team", "key", "model", "day"):
        raise InvalidRequest("'by' must be one of team, key, model, day.", param="by")
    if fmt not in ("json", "csv"):
        raise InvalidRequest("'format' must be json or csv.", param="format")
    if (daily := q.get("daily", "0")) not in ("0", "1") or (daily == "1" and fmt == "csv"):
        raise InvalidRequest("'daily' must be 0 or 1 (1: the rows by day too, in JSON).", param="daily")
    since, until = parse_day(q.get("since"), "since"), parse_day(q.get("until"), "until")
    team, ledger, principal = team_filter(request), request.app[LEDGER], principal_of(request)
    if team is not None:
        scope(request, team)
    try:
        ledger.check_range(since, until)  # before the flush: a refused report costs nothing
    except ValueError as exc:
        raise InvalidRequest(f"{str(exc)[:1].upper()}{str(exc)[1:]}.", param="until" if until < since else "since"
                             ) from None
    with contextlib.suppress(StoreUnavailable):
        await ledger.flush(wait_s=REPORT_FLUSH_WAIT_S)  # this process's latest usage too
    prices: dict[str, float] = request.app[PRICES]
    # read in slices; with daily=1 the rows by day too (a chart's), from the same reads (the console asks once)
    rows, days = await ledger.report_daily(team, since, until, cast(GroupBy | None, by), prices, daily=daily == "1")
    if principal.confined:  # a confined principal: its teams' rows only
        rows = [r for r in rows if principal.sees(r["team"])]
        days = days and [r for r in days if principal.sees(r["team"])]
    if by == "key":  # each key's name beside its id (the ledger holds ids only)
        rows = await name_keys(request.app[KEYSTORE], rows)
    if fmt == "csv":  # many rows (by key, by day): written in slices too; orjson needs no slicing (~1 us a row)
        return web.Response(text=await report_format(cast(GroupBy | None, by)).csv_sliced(rows),
                            content_type="text/csv")
    return _json({"object": "list", "since": since.isoformat(), "until": until.isoformat(), "data": rows,
                  **({"daily": days} if days is not None else {})})


def add_routes(app: web.Application, keystore: KeyStore, teams: TeamStore, ledger: UsageLedger,
               admin_key: str, prices: dict[str, float]) -> None:
    app[KEYSTORE], app[TEAMS], app[LEDGER], app[ROOT_KEY], app[PRICES] = keystore, teams, ledger, admin_key, prices
    app[MODELS] = frozenset(prices)
    r = app.router
    r.add_post("/admin/keys", create_key, expect_handler=expect_continue)
    r.add_get("/admin/keys/{id}", show_key, expect_handler=expect_continue)
    r.add_patch("/admin/keys/{id}", update_key, expect_handler=expect_continue)
    r.add_post("/admin/keys/{id}/revoke", revoke_key, expect_handler=expect_continue)
    r.add_post("/admin/keys/{id}/rotate", rotate_key, expect_handler=expect_continue)
    r.add_get("/admin/teams/{team}", show_team, expect_handler=expect_continue)
    r.add_put("/admin/teams/{team}", set_team, expect_handler=expect_continue)
    r.add_delete("/admin/teams/{team}", reset_team, expect_handler=expect_continue)
    r.add_get("/admin/usage", usage, expect_handler=expect_continue)


async def cache(request: web.Request) -> web.Response:
    c = request.app[CACHE]
    with contextlib.suppress(StoreUnavailable):
        await c.ledger.flush(wait_s=REPORT_FLUSH_WAIT_S)  # this process's latest hits too
    try:
        body = await cache_stats(c.stores, c.keys, c.generations, c.ledger, request.app[PRICES],
                                 parse_day(None, "day"))
    except StatsUnavailable as exc:  # names the store that failed, and why (a 503 like any store failure)
        raise ServiceUnavailable(f"{str(exc)[:1].upper()}{str(exc)[1:]}. Please retry.") from None
    body["process"] = c.process()
    return _json(body)


async def purge_cache(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _allowed(body, {"model", "team"})
    model, team = body.get("model"), body.get("team")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required: the model whose cached vectors to purge.", param="model")
    if team is not None and not isinstance(team, str):
        raise InvalidRequest("'team' must be a team name, or null for every team.", param="team")
    generations = request.app[CACHE].generations
    try:  # only an absent (or null) team means every team: "" is a bad team name, never "all"
        done = await generations.purge(model, team)
    except PurgeRefused as exc:
        raise InvalidRequest(exc.message, param=exc.param,
                             code="model_not_found" if exc.param == "model" else None) from None
    await _audit(request, model=done.model, team=done.team or "", after={"generation": done.generation})
    return _json({"object": "cache.purge", "model": done.model, "team": done.team, "generation": done.generation,
                  "scope": "team" if generations.team_scope else "shared"})


def add_cache_routes(app: web.Application, admin: CacheAdmin) -> None:
    app[CACHE] = admin
    app.router.add_get("/admin/cache", cache, expect_handler=expect_continue)
    app.router.add_post("/admin/cache/purge", purge_cache, expect_handler=expect_continue)
