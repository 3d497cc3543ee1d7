"""The one table of who may do what: the permission (a verb on a resource) each admin route and each command of the
command line needs. The admin API looks a request's route up here before its handler runs (a route that is not
here is refused: deny by default); the command line looks its command up the same way. tests/test_access.py walks
every route the app registers, and every command the parser has, with every role, so a new route or command
without an entry here fails the tests.

`None`: no admin principal is needed (the sign-in steps, and commands that are not admin work).
"""

from __future__ import annotations

from collections.abc import Mapping

from .access import Need, Principal

PERMISSIONS: Mapping[str, Need | None] = {
    # the admin API: "METHOD /route/template" (a GET route answers HEAD with the same permission)
    "GET /admin/whoami": Need("get", "self"),
    "GET /admin/keys": Need("list", "keys"),
    "POST /admin/keys": Need("create", "keys"),
    "GET /admin/keys/{id}": Need("get", "keys"),
    "PATCH /admin/keys/{id}": Need("update", "keys"),
    "POST /admin/keys/{id}/revoke": Need("revoke", "keys"),
    "POST /admin/keys/{id}/rotate": Need("rotate", "keys"),
    "GET /admin/teams": Need("list", "teams"),
    "GET /admin/teams/{team}": Need("get", "teams"),
    "PUT /admin/teams/{team}": Need("update", "teams"),
    "DELETE /admin/teams/{team}": Need("delete", "teams"),
    "GET /admin/usage": Need("list", "usage"),
    "GET /admin/upstreams": Need("list", "upstreams"),
    "GET /admin/cache": Need("get", "cache"),
    "POST /admin/cache/purge": Need("purge", "cache"),
    "GET /admin/admins": Need("list", "admins"),
    "POST /admin/admins": Need("create", "admins"),
    "POST /admin/admins/{name}/revoke": Need("revoke", "admins"),
    "GET /admin/audit": Need("list", "audit"),
    # single sign-on for the console (http/sso.py): the sign-in steps need no admin yet; signing out, a session
    "GET /admin/oidc": None,
    "GET /admin/oidc/login": None,
    "GET /admin/oidc/callback": None,
    "POST /admin/oidc/signout": Need("signout", "self"),
    # the command line: "cli COMMAND [SUBCOMMAND]"
    "cli keys create": Need("create", "keys"),
    "cli keys list": Need("list", "keys"),
    "cli keys show": Need("get", "keys"),
    "cli keys limits": Need("update", "keys"),
    "cli keys revoke": Need("revoke", "keys"),
    "cli keys rotate": Need("rotate", "keys"),
    "cli teams set": Need("update", "teams"),
    "cli teams reset": Need("delete", "teams"),
    "cli teams list": Need("list", "teams"),
    "cli usage": Need("list", "usage"),
    "cli cache stats": Need("get", "cache"),
    "cli cache purge": Need("purge", "cache"),
    "cli admins create": Need("create", "admins"),
    "cli admins list": Need("list", "admins"),
    "cli admins revoke": Need("revoke", "admins"),
    "cli audit": Need("list", "audit"),
    "cli upstreams": Need("list", "upstreams"),  # asks a running proxy: its admin API checks the same
    "cli serve": None,
    "cli mock-upstream": None,
    "cli check-config": None,
}

def _verbs_by_resource() -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for need in PERMISSIONS.values():
        if need is not None and need.verb not in out.setdefault(need.resource, []):
            out[need.resource].append(need.verb)
    return {resource: tuple(verbs) for resource, verbs in out.items()}


# Every verb the table names, by resource (for `GET /admin/whoami`'s permissions and the tests).
VERBS_BY_RESOURCE = _verbs_by_resource()


class Unlisted(LookupError):
    """A route or command with no entry in the table: refused, never allowed by default."""


def route_need(method: str, template: str) -> Need | None:
    """What the admin route needs; Unlisted if the table has no entry for it."""
    key = f"{'GET' if method == 'HEAD' else method} {template}"
    if key not in PERMISSIONS:
        raise Unlisted(key)
    return PERMISSIONS[key]


def command_need(command: str) -> Need | None:
    """What the command (`keys create`, `usage`) needs; Unlisted if the table has no entry for it."""
    key = f"cli {command}"
    if key not in PERMISSIONS:
        raise Unlisted(key)
    return PERMISSIONS[key]


def held(principal: Principal) -> list[str]:
    """Every permission the principal holds, as "verb resource" (`GET /admin/whoami`; the console hides the rest)."""
    return [str(need) for resource, verbs in VERBS_BY_RESOURCE.items() for verb in verbs
            if principal.may(need := Need(verb, resource))]
