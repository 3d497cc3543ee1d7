"""Who is asking the admin API, whether they may, and the audit entry of what they did or were refused.

Every /admin route but the console's files goes through `admin_request` (the auth middleware): the route's
permission is looked up in the one table (proxy/accounts/permissions.py; a route missing from it is refused), the
principal is read from the request (the bootstrap `PROXY_ADMIN_KEY`: actor `root`; a named admin's `sk-admin-`
credential, or a console session of single sign-on (its cookie), each read from the state store on every request,
so a revocation or a sign-out holds on every instance from the next request), a session's change is checked for its
CSRF token, and the role is checked. A 403 from here or from a handler (another team named, a key limit above the
team's) is recorded in the audit log before it is answered. A request that names no admin at all (no credential,
a wrong one, a gateway key, the admin API off) is refused like any failed authentication and is in the access log
only: the audit log lives in the state store, and anyone can send such requests.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from aiohttp import web

from ..accounts.access import ROOT, Need, Principal
from ..accounts.admins import ADMIN_PREFIX, AdminStore
from ..accounts.audit import AuditEntry, AuditLog
from ..accounts.keys import KEY_PREFIX, bearer_key, secret_bytes
from ..accounts.permissions import Unlisted, route_need
from ..accounts.sessions import Session, SessionStore
from ..config.admin import AdminSettings
from ..errors import AuthenticationFailed, PermissionDenied
from .appkeys import REQUEST_ID
from .routing import route_template

ADMINS = web.AppKey("admin_principals", AdminStore)
AUDIT = web.AppKey("audit_log", AuditLog)
ROOT_KEY = web.AppKey("admin_root_key", str)
ADMIN_SETTINGS = web.AppKey("admin_settings", AdminSettings)
SESSIONS = web.AppKey("admin_sessions", SessionStore)
PRINCIPAL = web.RequestKey("admin_principal", Principal)
SESSION = web.RequestKey("admin_session", Session)  # a console session of single sign-on (sso.py)
SESSION_COOKIE = "ep_admin_session"
CSRF_HEADER = "X-CSRF-Token"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
NEED: web.RequestKey[Need] = web.RequestKey("admin_need")
# What the request is about, set by a handler before it checks the team (a refusal's audit entry names it).
TARGET: web.RequestKey[dict[str, str]] = web.RequestKey("admin_target")
CLIENT_HEADER = "X-Admin-Client"  # `console` from the web console, `cli` from the command line: the audit's `how`


async def authenticate(request: web.Request) -> Principal:
    """The principal behind the request's credential; 401 or 403 when there is none."""
    root_key, given = request.app[ROOT_KEY], bearer_key(request.headers)
    if not given and (cookie := request.cookies.get(SESSION_COOKIE)):
        session = await request.app[SESSIONS].get(cookie)
        if session is None:
            raise AuthenticationFailed("The console session has ended (signed out or expired): sign in again.",
                                       code="session_expired")
        request[SESSION] = session
        return session.principal
    if not given:
        raise AuthenticationFailed("The admin API needs 'Authorization: Bearer <admin key>'.",
                                   code="missing_api_key")
    if root_key and hmac.compare_digest(secret_bytes(given), secret_bytes(root_key)):
        return ROOT
    if given.startswith(ADMIN_PREFIX):
        record = await request.app[ADMINS].lookup(given)
        if record is None:
            raise AuthenticationFailed("Incorrect admin credential provided.")
        if record.revoked:
            raise AuthenticationFailed("This admin credential has been revoked.", code="admin_credential_revoked")
        return record.principal()
    if given.startswith(KEY_PREFIX):
        raise PermissionDenied("A gateway key cannot use the admin API.", code="not_admin_key")
    if not root_key:
        raise PermissionDenied("The admin API takes named admin credentials only: PROXY_ADMIN_KEY is not set.",
                               code="admin_disabled")
    raise AuthenticationFailed("Incorrect admin key provided.")


def _need(request: web.Request) -> Need | None:
    """The route's permission; None for the sign-in steps. A route the table does not know is refused."""
    template = route_template(request)
    if template is None:  # no route matched: any admin may learn that (404, 405)
        return Need("get", "self")
    try:
        return route_need(request.method, template)
    except Unlisted:
        raise PermissionDenied("This admin route has no permission in the table: refused.",
                               code="permission_denied") from None


async def admin_request(request: web.Request, handler: Any) -> web.StreamResponse:
    """Authenticate, authorize and run an admin route; every 403 for a principal is audited before it is sent."""
    need = _need(request)
    if need is None:
        return await handler(request)  # type: ignore[no-any-return]
    principal = await authenticate(request)
    request[PRINCIPAL], request[NEED] = principal, need
    try:
        _check_csrf(request)
        principal.check(need)
        return await handler(request)  # type: ignore[no-any-return]
    except PermissionDenied as err:
        await audit(request, f"{need.resource}.{need.verb}", outcome="refused", status=err.status,
                    reason=f"{err.code}: {err.message}", **request.get(TARGET, {}))
        raise


def _check_csrf(request: web.Request) -> None:
    """A session's state-changing call carries the session's CSRF token (a page of another site cannot read it):
    the cookie alone, which a browser sends by itself, never changes anything."""
    session = request.get(SESSION)
    if session is None or request.method in _SAFE:
        return
    given = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(secret_bytes(given), secret_bytes(session.csrf)):
        raise PermissionDenied(f"A console session's changes need its {CSRF_HEADER} header.", code="csrf_failed")


def scope(request: web.Request, team: str, **target: str) -> None:
    """The request acts on `team` (and `target`: key_id, model, admin): refused (403) if its principal may not."""
    request[TARGET] = {"team": team, **target}
    request[PRINCIPAL].check_team(team, request[NEED])


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def how(request: web.Request) -> str:
    """`console` for the web console's calls (an SSO session, or the header its script sends), `cli` for the
    command line's, else `api`. The header is the client's word: it says how, never who."""
    principal = request.get(PRINCIPAL)
    if principal is not None and principal.kind == "sso":
        return "console"
    said = request.headers.get(CLIENT_HEADER, "").lower()
    return said if said in ("console", "cli") else "api"


def client_address(request: web.Request) -> str:
    """The connection's address; through a trusted proxy, the nearest X-Forwarded-For address it does not trust.

    A hop that is no IP address (garbage, bytes that are not UTF-8) was written by the client, never by a trusted
    proxy: the walk stops there and the hop nearest to it that a trusted proxy wrote is the client's address."""
    settings, peer = request.app[ADMIN_SETTINGS], request.remote or ""
    if not settings.trusts(peer):
        return peer
    chain = [a.strip() for h in request.headers.getall("X-Forwarded-For", []) for a in h.split(",") if a.strip()]
    nearest = peer
    for address in reversed(chain):
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return nearest
        if not settings.trusts(address):
            return address
        nearest = address
    return nearest


async def audit(request: web.Request, action: str, *, outcome: str = "ok", status: int = 200, **fields: Any) -> None:
    """Record what this request did (or was refused), before its answer is sent."""
    principal = request.get(PRINCIPAL)
    who = {"actor": principal.actor, "actor_kind": principal.kind, "email": principal.email} if principal else {}
    entry = AuditEntry(action=action, outcome=outcome, status=status, **{
        "how": how(request), "client": client_address(request), "request_id": request.get(REQUEST_ID, ""),
        "actor": "", **who, **fields})
    await request.app[AUDIT].record(entry)


def install_access(app: web.Application, admins: AdminStore, audit_log: AuditLog, sessions: SessionStore,
                   settings: AdminSettings) -> None:
    """The named admins, the audit log and the console sessions on the app (the admin routes' handlers and
    `admin_request` read them)."""
    app[ADMINS], app[AUDIT], app[SESSIONS], app[ADMIN_SETTINGS] = admins, audit_log, sessions, settings
