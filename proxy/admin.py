"""The admin API under /admin, behind `PROXY_ADMIN_KEY`: keys, teams and their quotas, usage reports.

    GET  /admin/keys[?team=T]             key records (ids, names, limits; never a key or its hash)
    POST /admin/keys                      {team, name?, models?, expires_in_s?, rpm?, tpm?, tokens_per_day?,
                                           tokens_per_month?} -> 201 with the new `key`, shown this once;
                                          name: at most 200 characters
    GET  /admin/keys/{id}                 one record
    PATCH /admin/keys/{id}                {rpm?, tpm?, tokens_per_day?, tokens_per_month?}: 0 or null clears
    POST /admin/keys/{id}/revoke          revoked at once on every instance
    POST /admin/keys/{id}/rotate          {grace_s?}: a new key; the old one lives on for grace_s (default 86400);
                                          409 for a revoked or expired key
    GET  /admin/teams                     every team with its limits and where they come from
    GET  /admin/teams/{team}              one team's limits in force
    PUT  /admin/teams/{team}              {rpm?, tpm?, ...}: change those limits (0 or null clears)
    DELETE /admin/teams/{team}            drop the limits set at run time: the config's apply again
    GET  /admin/usage?since=D&until=D[&team=T][&by=key|model|day][&format=json|csv]
    GET  /admin/upstreams                 each deployment's state in the process that answers (health, cooldown,
                                          last error, remaining requests and tokens by the upstream's headers)
    GET  /admin/cache                     entries and memory per cache server, hit ratios, purge generations
    POST /admin/cache/purge               {model, team?}: that model's cached vectors are never served again
                                          (for that team alone under cache scope "team"; no team: every team)

Without PROXY_ADMIN_KEY set, every admin route answers 403. A gateway key is not an admin key (403). The stores
behind these routes make operator calls (`redis.operator_timeout_s`, never marking Redis down for requests).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
from aiohttp import web

from .body import read_json_object
from .errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied, ServiceUnavailable
from .keys import KEY_PREFIX, MAX_LIFETIME_S, KeyStore, bearer_key, check_key_name, secret_bytes
from .limits import Limits, check_team
from .routing import expect_continue
from .stores.cachestats import StatsUnavailable, StoreRef, cache_stats
from .stores.generations import CacheGenerations, PurgeRefused
from .stores.guard import StoreUnavailable
from .stores.rediskeys import RedisKeys
from .teams import TeamStore
from .upstream import FleetClient
from .usage import REPORT_FLUSH_WAIT_S, GroupBy, UsageLedger, report_format

_LIMIT_NAMES = tuple(Limits().to_dict())
KEYSTORE = web.AppKey("admin_keystore", KeyStore)
TEAMS = web.AppKey("admin_teams", TeamStore)
LEDGER = web.AppKey("admin_ledger", UsageLedger)
ADMIN_KEY = web.AppKey("admin_key", str)
PRICES: web.AppKey[dict[str, float]] = web.AppKey("admin_prices")
MODELS: web.AppKey[frozenset[str]] = web.AppKey("admin_models")
FLEET = web.AppKey("admin_fleet", FleetClient)


@dataclass(frozen=True)
class CacheAdmin:
    stores: tuple[StoreRef, ...]  # where the entries live (every master of each)
    keys: RedisKeys
    generations: CacheGenerations
    ledger: UsageLedger
    process: Callable[[], dict[str, Any]]  # the answering process's own lookups and in-process tier


CACHE = web.AppKey("admin_cache", CacheAdmin)


def check_admin(request: web.Request) -> None:
    expected = request.app[ADMIN_KEY]
    given = bearer_key(request.headers)
    if not expected:
        raise PermissionDenied("The admin API is disabled: PROXY_ADMIN_KEY is not set.", code="admin_disabled")
    if not given:
        raise AuthenticationFailed("The admin API needs 'Authorization: Bearer <admin key>'.",
                                   code="missing_api_key")
    if hmac.compare_digest(secret_bytes(given), secret_bytes(expected)):
        return
    if given.startswith(KEY_PREFIX):
        raise PermissionDenied("A gateway key cannot use the admin API.", code="not_admin_key")
    raise AuthenticationFailed("Incorrect admin key provided.")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def limit_changes(body: dict[str, Any]) -> dict[str, int | None]:
    """The quota fields of a body: positive integers, or 0/null to clear (unlimited)."""
    out: dict[str, int | None] = {}
    for name in _LIMIT_NAMES:
        if name in body:
            v = body[name]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise InvalidRequest(f"'{name}' must be a non-negative integer or null.", param=name)
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


def _team_filter(request: web.Request) -> str | None:
    team = request.query.get("team")
    return _team(team) if team else None


async def list_keys(request: web.Request) -> web.Response:
    records = await request.app[KEYSTORE].list(_team_filter(request))
    return _json({"object": "list", "data": [r.public() for r in records]})


async def create_key(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _allowed(body, {"team", "name", "models", "expires_in_s", *_LIMIT_NAMES})
    team, name, models = body.get("team"), body.get("name", ""), body.get("models", [])
    if not isinstance(team, str):
        raise InvalidRequest("'team' is required.", param="team")
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
    try:
        key, record = await request.app[KEYSTORE].create(
            team, name=name, models=tuple(models), limits=limits,
            expires_at=time.time() + expires_in if expires_in else None,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="team") from None
    return _json({"key": key, **record.public()}, status=201)


def _found(record: Any, key_id: str) -> Any:
    if record is None:
        raise NotFound(f"No key with id '{key_id}'.", code="key_not_found")
    return record


async def show_key(request: web.Request) -> web.Response:
    key_id = request.match_info["id"]
    return _json(_found(await request.app[KEYSTORE].get(key_id), key_id).public())


async def update_key(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _allowed(body, set(_LIMIT_NAMES))
    key_id = request.match_info["id"]
    record = await request.app[KEYSTORE].set_limits(key_id, limit_changes(body))
    return _json(_found(record, key_id).public())


async def revoke_key(request: web.Request) -> web.Response:
    key_id = request.match_info["id"]
    return _json(_found(await request.app[KEYSTORE].revoke(key_id), key_id).public())


async def rotate_key(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _allowed(body, {"grace_s"})
    key_id = request.match_info["id"]
    grace = _seconds(body, "grace_s", 86400.0)
    rotated = _found(await request.app[KEYSTORE].rotate(key_id, grace or 0.0), key_id)
    key, new, old = rotated
    return _json({"key": key, **new.public(), "previous": old.public()}, status=201)


async def list_teams(request: web.Request) -> web.Response:
    teams = await request.app[TEAMS].all()
    data = [{"team": t, "limits": lim.to_dict(), "source": src} for t, (lim, src) in teams.items()]
    return _json({"object": "list", "data": data})


async def show_team(request: web.Request) -> web.Response:
    team = _team(request.match_info["team"])
    return _json({"team": team, "limits": (await request.app[TEAMS].in_force(team)).to_dict()})


async def set_team(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    _allowed(body, set(_LIMIT_NAMES))
    team = _team(request.match_info["team"])
    limits = await request.app[TEAMS].set(team, limit_changes(body))
    return _json({"team": team, "limits": limits.to_dict()})


async def reset_team(request: web.Request) -> web.Response:
    team = _team(request.match_info["team"])
    limits = await request.app[TEAMS].reset(team)
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
    since, until = parse_day(q.get("since"), "since"), parse_day(q.get("until"), "until")
    team, ledger = _team_filter(request), request.app[LEDGER]
    try:
        ledger.check_range(since, until)  # before the flush: a refused report costs nothing
    except ValueError as exc:
        raise InvalidRequest(f"{str(exc)[:1].upper()}{str(exc)[1:]}.", param="until" if until < since else "since"
                             ) from None
    with contextlib.suppress(StoreUnavailable):
        await ledger.flush(wait_s=REPORT_FLUSH_WAIT_S)  # this process's latest usage too
    prices: dict[str, float] = request.app[PRICES]
    rows = await ledger.report(team, since, until, cast(GroupBy | None, by), prices)
    if fmt == "csv":
        return web.Response(text=report_format(cast(GroupBy | None, by)).csv(rows), content_type="text/csv")
    return _json({"object": "list", "since": since.isoformat(), "until": until.isoformat(), "data": rows})


def add_routes(app: web.Application, keystore: KeyStore, teams: TeamStore, ledger: UsageLedger,
               admin_key: str, prices: dict[str, float]) -> None:
    app[KEYSTORE], app[TEAMS], app[LEDGER], app[ADMIN_KEY], app[PRICES] = keystore, teams, ledger, admin_key, prices
    app[MODELS] = frozenset(prices)
    r = app.router
    r.add_get("/admin/keys", list_keys, expect_handler=expect_continue)
    r.add_post("/admin/keys", create_key, expect_handler=expect_continue)
    r.add_get("/admin/keys/{id}", show_key, expect_handler=expect_continue)
    r.add_patch("/admin/keys/{id}", update_key, expect_handler=expect_continue)
    r.add_post("/admin/keys/{id}/revoke", revoke_key, expect_handler=expect_continue)
    r.add_post("/admin/keys/{id}/rotate", rotate_key, expect_handler=expect_continue)
    r.add_get("/admin/teams", list_teams, expect_handler=expect_continue)
    r.add_get("/admin/teams/{team}", show_team, expect_handler=expect_continue)
    r.add_put("/admin/teams/{team}", set_team, expect_handler=expect_continue)
    r.add_delete("/admin/teams/{team}", reset_team, expect_handler=expect_continue)
    r.add_get("/admin/usage", usage, expect_handler=expect_continue)


async def upstreams(request: web.Request) -> web.Response:
    return _json({"object": "list", "pid": os.getpid(), "data": request.app[FLEET].snapshot()})


def add_fleet_routes(app: web.Application, fleet: FleetClient) -> None:
    app[FLEET] = fleet
    app.router.add_get("/admin/upstreams", upstreams, expect_handler=expect_continue)


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
    return _json({"object": "cache.purge", "model": done.model, "team": done.team, "generation": done.generation,
                  "scope": "team" if generations.team_scope else "shared"})


def add_cache_routes(app: web.Application, admin: CacheAdmin) -> None:
    app[CACHE] = admin
    app.router.add_get("/admin/cache", cache, expect_handler=expect_continue)
    app.router.add_post("/admin/cache/purge", purge_cache, expect_handler=expect_continue)
