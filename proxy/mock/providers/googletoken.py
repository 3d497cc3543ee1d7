"""A Google OAuth token endpoint for tests: what google-auth's service-account credentials call at their key file's
`token_uri`. It checks the signed JWT assertion with google-auth's own verifier against the service account's public
key (signature, issuer, audience: Google's token endpoint, which google-auth names in every assertion wherever its
`token_uri` sends it; expiry) and issues opaque access tokens, which the Vertex mock
accepts while they are unexpired (`Issued`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from aiohttp import web

from .common import json_answer

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass
class Issued:
    """The service account the endpoint trusts, and the tokens it issued: token -> expiry (time.time())."""

    client_email: str
    public_key_pem: bytes
    audience: str = "https://oauth2.googleapis.com/token"  # what assertions must name
    lifetime_s: int = 3600  # `expires_in` of the tokens it issues
    tokens: dict[str, float] = field(default_factory=dict)
    assertions: list[dict[str, object]] = field(default_factory=list)  # the verified claims, in order
    requests: int = 0  # token requests received, answered or not
    # Set: the endpoint stalls, answering nothing until the event is set (then answers as usual).
    stall: asyncio.Event | None = None

    def valid(self, token: str) -> bool:
        expiry = self.tokens.get(token)
        return expiry is not None and time.time() < expiry


ISSUED = web.AppKey("issued", Issued)


def _refuse(description: str) -> web.Response:
    return json_answer({"error": "invalid_grant", "error_description": description}, status=400)


async def _token(request: web.Request) -> web.Response:
    from google.auth import exceptions, jwt

    issued = request.app[ISSUED]
    issued.requests += 1
    if issued.stall is not None:
        await issued.stall.wait()
    form = {k: v[0] for k, v in parse_qs((await request.read()).decode()).items()}
    if form.get("grant_type") != JWT_BEARER or "assertion" not in form:
        return _refuse("grant_type must be the JWT bearer grant, with an assertion")
    try:
        claims = jwt.decode(form["assertion"], certs=issued.public_key_pem, audience=issued.audience)
    except (ValueError, exceptions.GoogleAuthError) as exc:
        return _refuse(f"Invalid JWT Signature or claims: {exc}")
    if claims.get("iss") != issued.client_email or "scope" not in claims:
        return _refuse("Invalid issuer or no scope")
    issued.assertions.append(claims)
    token = "ya29.test-" + secrets.token_urlsafe(24)
    issued.tokens[token] = time.time() + issued.lifetime_s
    return json_answer({"access_token": token, "expires_in": issued.lifetime_s, "token_type": "Bearer"})


def create_app(issued: Issued) -> web.Application:
    app = web.Application()
    app[ISSUED] = issued
    app.router.add_post("/token", _token)
    return app
