"""Named admins and the caller itself, under /admin:

    GET  /admin/whoami                   who is asking: actor, kind (root, admin, sso), role, teams, email, how it
                                         signed in, and every permission it holds ("verb resource"); a console
                                         session also gets its CSRF token and its end
    GET  /admin/admins                   named admins (name, role, teams, created, revoked), a page at a time
                                         (adminlists.py); never a credential
    POST /admin/admins                   {name, role: platform|team|viewer, teams?: [...]} -> 201 with the new
                                         `credential` (`sk-admin-...`), shown this once; 409 for a name in use
    POST /admin/admins/{name}/revoke     refused on every instance from its next request

Who may call each is the table in proxy/accounts/permissions.py; creations and revocations are audited.
"""

from __future__ import annotations

from aiohttp import web

from ..accounts.access import check_admin_name, check_role
from ..accounts.permissions import held
from ..errors import InvalidRequest, NotFound
from .adminauth import ADMINS, SESSION, audit, how, principal_of
from .answers import json_response
from .body import read_json_object
from .routing import expect_continue


async def whoami(request: web.Request) -> web.Response:
    principal, session = principal_of(request), request.get(SESSION)
    extra = {"csrf_token": session.csrf, "expires_at": session.expires_at} if session is not None else {}
    return json_response({**principal.public(), "how": how(request), "permissions": held(principal), **extra})


async def create_admin(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    unknown = set(body) - {"name", "role", "teams"}
    if unknown:
        raise InvalidRequest(f"Unknown field '{sorted(unknown)[0]}'.", param=sorted(unknown)[0])
    name, role, teams = body.get("name"), body.get("role"), body.get("teams", [])
    if not isinstance(name, str):
        raise InvalidRequest("'name' is required.", param="name")
    if not isinstance(role, str):
        raise InvalidRequest("'role' is required: platform, team or viewer.", param="role")
    if not isinstance(teams, list) or not all(isinstance(t, str) for t in teams):
        raise InvalidRequest("'teams' must be a list of team names.", param="teams")
    for param, check in (("name", lambda: check_admin_name(name)), ("teams", lambda: check_role(role, teams))):
        try:
            check()
        except ValueError as exc:
            raise InvalidRequest(f"{str(exc)[:1].upper()}{str(exc)[1:]}.",
                                 param="role" if str(exc).startswith("role") else param) from None
    credential, record = await request.app[ADMINS].create(name, role, teams, principal_of(request).actor)
    await audit(request, "admins.create", admin=record.name, status=201, after=record.public())
    return json_response({"credential": credential, **record.public()}, status=201)


async def revoke_admin(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    done = await request.app[ADMINS].revoke(name)
    if done is None:
        raise NotFound(f"No admin named '{name[:64]}'.", code="admin_not_found")
    before, after = done
    await audit(request, "admins.revoke", admin=name, before={"revoked": before.revoked},
                after={"revoked": after.revoked})
    return json_response(after.public())


def add_admin_user_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/whoami", whoami, expect_handler=expect_continue)
    r.add_post("/admin/admins", create_admin, expect_handler=expect_continue)
    r.add_post("/admin/admins/{name}/revoke", revoke_admin, expect_handler=expect_continue)
