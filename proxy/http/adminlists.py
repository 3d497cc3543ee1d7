"""The admin API's lists that grow, a page at a time (OpenAI's list style):

    GET /admin/keys[?limit=N][&after=ID][&order=asc|desc][&team=T][&q=TEXT]
    GET /admin/teams[?limit=N][&after=TEAM]
    GET /admin/admins[?limit=N][&after=NAME]

answer `{"object": "list", "data": [...], "first_id", "last_id", "has_more", "next_cursor"}`. `limit`: 1 to
MAX_PAGE (default DEFAULT_PAGE). `after` (or `cursor`, the same): the `next_cursor` of the page before, i.e. the id
of its last key (the name of its last team, of its last admin); `next_cursor` is null on the last page. Keys come
by creation time, oldest first (`order=desc`: newest first); `team=T` reads that team's index alone; `q` keeps the
keys whose name contains it (case-insensitive) or whose id starts with it, and reads at most 2000 keys per page
(keyindex.py): a search page may be short, or empty, with `has_more` true. Teams come by name, each with `keys`:
how many of its keys work now (from the team's index, no key read), null while the team indexes are built in the
background (`keys_building` true; keyindexbuild.py). Admins come by creation time (never a credential). A bad
`limit`, `after`, `order` or `q` is a 400, and so is a cursor these lists never give: not a key id, team name or
admin name (`%FF`, not UTF-8, arrives as U+FFFD: none of them), or a key or admin that does not exist.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from ..accounts.access import ADMIN_NAME_RE
from ..accounts.keyindex import BadCursor, KeyIndex
from ..accounts.keyrecord import KeyRecord
from ..accounts.keys import MAX_NAME_CHARS
from ..config.limits import TEAM_RE, Limits
from ..errors import InvalidRequest
from .admin import KEYSTORE, TEAMS, team_filter
from .adminauth import ADMINS, principal_of, scope
from .answers import json_response
from .routing import expect_continue

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def page_limit(request: web.Request) -> int:
    text = request.query.get("limit")
    if text is None or text == "":
        return DEFAULT_PAGE
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not 1 <= int(text) <= MAX_PAGE:
        raise InvalidRequest(f"'limit' must be a whole number from 1 to {MAX_PAGE}.", param="limit")
    return int(text)


def page_after(request: web.Request, check: Callable[[str], object] | None = None) -> str | None:
    """`after`, or `cursor` (the same thing by the name of the `next_cursor` it comes from); `check` raises
    ValueError for a cursor this list never gives (the wrong syntax, or not UTF-8: `%FF` arrives as U+FFFD)."""
    after, cursor = request.query.get("after") or None, request.query.get("cursor") or None
    if after is not None and cursor is not None and after != cursor:
        raise InvalidRequest("Give 'after' or 'cursor' (they are the same), not two different ones.", param="cursor")
    given = after or cursor
    if given is not None and check is not None:
        try:
            check(given)
        except ValueError as exc:
            raise bad_cursor(request, str(exc)) from None
    return given


def bad_cursor(request: web.Request, why: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid cursor: {why}. Pass the 'next_cursor' of the page before, or nothing for the "
                          "first page.", param="after" if request.query.get("after") else "cursor")


def listed(data: list[dict[str, Any]], ids: Sequence[str], has_more: bool, next_cursor: str | None,
           **extra: Any) -> web.Response:
    return json_response({"object": "list", "data": data, "first_id": ids[0] if ids else None,
                          "last_id": ids[-1] if ids else None, "has_more": has_more, "next_cursor": next_cursor,
                          **extra})


def _search(q: str | None) -> Callable[[KeyRecord], bool] | None:
    if q is None:
        return None
    if len(q) > MAX_NAME_CHARS:
        raise InvalidRequest(f"'q' is at most {MAX_NAME_CHARS} characters.", param="q")
    folded = q.casefold()
    return lambda rec: folded in rec.name.casefold() or rec.id.startswith(q)


async def list_keys(request: web.Request) -> web.Response:
    q, principal = request.query, principal_of(request)
    limit, after, team = page_limit(request), page_after(request), team_filter(request)
    order = q.get("order") or "asc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be asc or desc.", param="order")
    match = _search(q.get("q") or None)
    if team is not None:
        scope(request, team)
    teams = [team] if team is not None else list(principal.teams) if principal.confined else None
    index: KeyIndex = request.app[KEYSTORE].index
    try:
        page = await index.page(teams=teams, after=after, limit=limit, desc=order == "desc", match=match)
    except BadCursor as exc:
        raise bad_cursor(request, str(exc)) from None
    return listed([r.public() for r in page.records], [r.id for r in page.records], page.has_more,
                  page.next_cursor)


async def list_teams(request: web.Request) -> web.Response:
    """Teams with limits (from the config or set at run time) or keys, by name, each with its working keys."""
    limit, after, principal = page_limit(request), page_after(request, _team_cursor), principal_of(request)
    index: KeyIndex = request.app[KEYSTORE].index
    with_limits = await request.app[TEAMS].all()
    names = sorted({*with_limits, *await index.teams()})
    names = [t for t in names if principal.sees(t) and (after is None or t > after)]
    shown = names[:limit]
    counts = await index.working(shown, time.time())
    data = []
    for t in shown:
        limits, source = with_limits.get(t, (Limits(), None))
        data.append({"team": t, "limits": limits.to_dict(), "source": source,
                     "keys": None if counts is None else counts[t]})
    more = len(names) > limit
    return listed(data, shown, more, shown[-1] if more else None, keys_building=counts is None)


def _team_cursor(after: str) -> None:
    """A team name: the list goes on after it in name order, even if that team is gone since (its limits reset,
    no keys), so a page whose last team disappears is still followed."""
    if not TEAM_RE.fullmatch(after):
        raise ValueError("not a team name")


async def list_admins(request: web.Request) -> web.Response:
    """Named admins by creation time, a page at a time; the cursor is the name of the last one (names are never
    reused nor removed: a revoked admin keeps its name, so a cursor always names one)."""
    limit, after = page_limit(request), page_after(request, _admin_cursor)
    page = await request.app[ADMINS].page(after, limit)
    if page is None:
        raise bad_cursor(request, f"no admin is named {after!r}")
    records, names, more = page
    return listed([r.public() for r in records], [r.name for r in records], more, names[-1] if more else None)


def _admin_cursor(after: str) -> None:
    if not ADMIN_NAME_RE.fullmatch(after):
        raise ValueError("not an admin name")


def add_list_routes(app: web.Application) -> None:
    app.router.add_get("/admin/keys", list_keys, expect_handler=expect_continue)
    app.router.add_get("/admin/teams", list_teams, expect_handler=expect_continue)
    app.router.add_get("/admin/admins", list_admins, expect_handler=expect_continue)
