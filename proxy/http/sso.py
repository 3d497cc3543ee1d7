"""Single sign-on for the console, under /admin/oidc (proxy/accounts/oidc.py speaks to the provider):

    GET  /admin/oidc            {"enabled": bool}: whether the console offers "Sign in with SSO"
    GET  /admin/oidc/login      302 to the provider's sign-in (authorization code flow, PKCE S256, a nonce, a state);
                                the state, nonce and PKCE verifier wait in this browser's cookie `ep_admin_sign_in`
                                (HttpOnly, SameSite=Lax: sent back on the provider's redirect, ten minutes), so a
                                sign-in nobody finishes writes nothing to the state store
    GET  /admin/oidc/callback   the provider sends the browser back here with `code` and `state`: the code is
                                exchanged, the ID token checked, the groups mapped to a role, a session created
                                (cookie `ep_admin_session`: HttpOnly, SameSite=Strict, Secure except on loopback
                                http), and the browser goes to the console; no role: the console says so
    POST /admin/oidc/signout    ends the session on every instance (with the session's CSRF token)

Sign-ins, refused sign-ins (an account the provider vouched for whose groups map to no role) and sign-outs are
audited. A callback that fails before the provider vouched for anyone (a stale or replayed state, the provider's
own error) is logged, not audited: anyone can send one. Nothing here writes to the state store before the provider
vouched for someone.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time

from aiohttp import web

from ..accounts.oidc import OidcClient, OidcError, pkce_pair
from ..accounts.sessions import PENDING_S
from ..config.oidc import CALLBACK_PATH, OidcSettings
from ..errors import InvalidRequest, NotFound
from .adminauth import PRINCIPAL, SESSION, SESSION_COOKIE, SESSIONS, audit
from .answers import json_response
from .routing import expect_continue

log = logging.getLogger("proxy.sso")
OIDC = web.AppKey("oidc_client", OidcClient)
_NO_STORE = {"Cache-Control": "no-store"}
SIGN_IN_COOKIE = "ep_admin_sign_in"
_SIGN_IN_PATH = "/admin/oidc/"


def _pending(request: web.Request, state: str) -> tuple[str, str] | None:
    """(nonce, PKCE verifier) of the sign-in this browser started with `state`, if it is that one and recent."""
    parts = request.cookies.get(SIGN_IN_COOKIE, "").split(".")
    if len(parts) != 4 or not parts[3].isdigit() or time.time() - int(parts[3]) > PENDING_S:
        return None
    if not hmac.compare_digest(parts[0].encode(), state.encode("utf-8", "surrogatepass")):
        return None
    return parts[1], parts[2]


def _client(request: web.Request) -> OidcClient:
    if OIDC not in request.app:
        raise NotFound("Single sign-on is not configured ([admin.oidc]).", code="sso_not_configured")
    return request.app[OIDC]


def _console(settings: OidcSettings, fragment: str) -> web.HTTPFound:
    """Back to the console (beside the callback: works behind a path prefix too), `#fragment` saying how it went;
    the sign-in's cookie is used up whatever happened."""
    base = settings.redirect_url[: -len(CALLBACK_PATH)]
    answer = web.HTTPFound(f"{base}/admin/ui/#{fragment}", headers=_NO_STORE)
    answer.del_cookie(SIGN_IN_COOKIE, path=_SIGN_IN_PATH)
    return answer


async def sso_info(request: web.Request) -> web.Response:
    return json_response({"enabled": OIDC in request.app})


async def login(request: web.Request) -> web.StreamResponse:
    client = _client(request)
    state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    verifier, challenge = pkce_pair()
    try:
        url = await client.authorize_url(state, nonce, challenge)
    except OidcError as exc:
        log.warning("single sign-on not started: %s", exc)
        raise _console(client.settings, "sso-error=provider") from None
    answer = web.HTTPFound(url, headers=_NO_STORE)
    answer.set_cookie(SIGN_IN_COOKIE, f"{state}.{nonce}.{verifier}.{int(time.time())}", path=_SIGN_IN_PATH,
                      httponly=True, samesite="Lax", secure=client.settings.secure_cookie, max_age=PENDING_S)
    raise answer


async def callback(request: web.Request) -> web.StreamResponse:
    client, q = _client(request), request.query
    if "error" in q:
        log.info("single sign-on refused by the provider: %s", q["error"][:100])
        raise _console(client.settings, "sso-error=denied")
    code, state = q.get("code", ""), q.get("state", "")
    if not code or not state:
        raise InvalidRequest("The callback needs 'code' and 'state' from the OpenID provider.", param="code")
    pending = _pending(request, state)
    if pending is None:
        raise _console(client.settings, "sso-error=expired")
    nonce, verifier = pending
    try:
        claims = await client.verify(await client.exchange(code, verifier), nonce)
    except OidcError as exc:
        log.warning("single sign-on failed: %s", exc)
        raise _console(client.settings, "sso-error=provider") from None
    principal = client.principal(claims)
    if principal is None:
        subject, email = str(claims["sub"])[:200], str(claims.get("email", ""))[:200]
        await audit(request, "session.signin", outcome="refused", status=403, actor=subject, actor_kind="sso",
                    email=email, reason=f"no_role: no value of the {client.settings.roles_claim!r} claim maps to "
                                        "a role")
        raise _console(client.settings, "sso-error=no-role")
    request[PRINCIPAL] = principal
    session_id, session = await request.app[SESSIONS].create(principal, client.settings.session_lifetime_s)
    await audit(request, "session.signin", team=",".join(principal.teams),
                after={"role": principal.role, "teams": list(principal.teams), "expires_at": session.expires_at})
    answer = _console(client.settings, "sso")
    answer.set_cookie(SESSION_COOKIE, session_id, path="/admin/", httponly=True, samesite="Strict",
                      secure=client.settings.secure_cookie, max_age=int(client.settings.session_lifetime_s))
    raise answer


async def signout(request: web.Request) -> web.Response:
    session = request.get(SESSION)
    if session is None:
        raise InvalidRequest("Only a console session signs out; an admin key has nothing to end.", code="no_session")
    await request.app[SESSIONS].end(request.cookies[SESSION_COOKIE])
    await audit(request, "session.signout", before={"expires_at": session.expires_at})
    answer = json_response({"signed_out": True})
    answer.del_cookie(SESSION_COOKIE, path="/admin/")
    return answer


def add_sso_routes(app: web.Application, settings: OidcSettings | None) -> None:
    """The routes always (a proxy without `[admin.oidc]` answers 404 on the sign-in steps), the client when set."""
    if settings is not None:
        client = app[OIDC] = OidcClient(settings)

        async def close(app: web.Application) -> None:
            await client.close()

        app.on_cleanup.append(close)
    r = app.router
    r.add_get("/admin/oidc", sso_info, expect_handler=expect_continue)
    r.add_get("/admin/oidc/login", login, expect_handler=expect_continue)
    r.add_get("/admin/oidc/callback", callback, expect_handler=expect_continue)
    r.add_post("/admin/oidc/signout", signout, expect_handler=expect_continue)

