"""The audit log under /admin:

    GET /admin/audit[?since=T][&until=T][&actor=A][&team=T][&action=A][&limit=N][&format=json|csv]

newest first. `since` and `until` are UTC days (YYYY-MM-DD: `until` counts its whole day) or ISO 8601 times
(2026-12-07T10:00:00Z); `action` is one action (`keys.revoke`) or a resource (`keys`: every keys.* action);
`limit` 1 to 10000 (default 1000). A principal confined to teams sees its teams' entries only.
"""

from __future__ import annotations

import datetime as dt

from aiohttp import web

from ..accounts.audit import MAX_LIMIT, AuditQuery, to_csv
from ..config.limits import check_team
from ..errors import InvalidRequest
from .adminauth import AUDIT, principal_of, scope
from .answers import json_response
from .routing import expect_continue


def parse_time(text: str | None, name: str, *, end: bool) -> float | None:
    """Unix time from a day or an ISO 8601 time (no zone: UTC); a day as `until` means its end."""
    if not text:
        return None
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text) + dt.timedelta(days=1 if end else 0)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a day (YYYY-MM-DD) or an ISO 8601 time.", param=name) from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _team(text: str) -> str:
    """The team filter, checked like every team name of the admin API (400): never written raw into an entry."""
    try:
        return check_team(text)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid team name: {exc}.", param="team") from None


def _limit(text: str | None) -> int:
    if text is None:
        return 1000
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidRequest(f"'limit' must be a whole number from 1 to {MAX_LIMIT}.", param="limit")
    return int(text)


async def audit_log(request: web.Request) -> web.Response:
    q, principal = request.query, principal_of(request)
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest("'format' must be json or csv.", param="format")
    since, until = parse_time(q.get("since"), "since", end=False), parse_time(q.get("until"), "until", end=True)
    if since is not None and until is not None and until <= since:
        raise InvalidRequest("'until' is not after 'since'.", param="until")
    team = _team(q["team"]) if q.get("team") else None
    if team is not None:
        scope(request, team)
    query = AuditQuery(since=since, until=until, actor=q.get("actor") or None, team=team,
                       action=q.get("action") or None, teams=principal.teams, limit=_limit(q.get("limit")))
    entries = await request.app[AUDIT].query(query)
    if fmt == "csv":
        return web.Response(text=to_csv(entries), content_type="text/csv")
    return json_response({"object": "list", "data": [e.to_dict() for e in entries]})


def add_audit_routes(app: web.Application) -> None:
    app.router.add_get("/admin/audit", audit_log, expect_handler=expect_continue)
