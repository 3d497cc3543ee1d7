"""OpenID Connect for the console: the authorization code flow with PKCE (S256) and a nonce, against the
provider `[admin.oidc]` names.

The provider's discovery document (`{issuer}/.well-known/openid-configuration`, whose `issuer` must be the one
configured) and its keys (`jwks_uri`) are kept for `metadata_cache_s`; an ID token signed with a key id this
process does not know reads the keys again once. The ID token is checked by joserfc, a well-kept JOSE library:
its signature against those keys (asymmetric algorithms only: never `none`, never a MAC keyed with something
public), `iss`, `aud` (and `azp` when there are several audiences), `exp`, `iat` and the nonce this sign-in sent.
The claim `roles_claim` (default `groups`) then maps to a role through `[admin.oidc.roles]`; no mapping: no role.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import aiohttp
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from ..config.oidc import OidcSettings, parse_role
from .access import Principal, Role, check_role

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_RANK: dict[Role, int] = {"viewer": 0, "team": 1, "platform": 2}


class OidcError(Exception):
    """The provider could not be asked, or answered something that cannot be trusted; the message says which."""


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, code_challenge) for PKCE with S256 (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def role_of(settings: OidcSettings, claims: dict[str, Any]) -> tuple[Role, tuple[str, ...]] | None:
    """The role the claims map to: the strongest of every mapped value (platform > team > viewer), with the teams
    of that role's mappings; a viewer of everything beats a viewer of named teams. None: no value maps."""
    values = claims.get(settings.roles_claim)
    values = [values] if isinstance(values, str) else values if isinstance(values, list) else []
    found = [check_role(*parse_role(settings.roles[v])) for v in values if isinstance(v, str) and v in settings.roles]
    if not found:
        return None
    role = max((r for r, _ in found), key=lambda r: _RANK[r])
    mapped = [teams for r, teams in found if r == role]
    if role == "platform" or (role == "viewer" and () in mapped):
        return role, ()
    return role, tuple(sorted({t for teams in mapped for t in teams}))


class OidcClient:
    def __init__(self, settings: OidcSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._meta: tuple[dict[str, Any], float] | None = None
        self._keys: tuple[KeySet, float] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _request(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))
        try:
            async with self._http.request(method, url, allow_redirects=False, **kw) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcError(f"the OpenID provider did not answer {method} {url}: {type(exc).__name__}") from None
        if status != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            raise OidcError(f"the OpenID provider answered {method} {url} with {status}"
                            + (f" ({str(error)[:100]})" if error else ""))
        return body

    async def metadata(self) -> dict[str, Any]:
        if self._meta is not None and self._clock() - self._meta[1] < self.settings.metadata_cache_s:
            return self._meta[0]
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        meta = await self._request("GET", url)
        if meta.get("issuer") != self.settings.issuer:
            raise OidcError(f"the discovery document names issuer {str(meta.get('issuer'))[:200]!r}, not "
                            f"{self.settings.issuer!r}")
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(meta.get(name), str):
                raise OidcError(f"the discovery document has no {name}")
        self._meta = (meta, self._clock())
        return meta

    async def _key_set(self, *, fresh: bool = False) -> KeySet:
        if not fresh and self._keys is not None and self._clock() - self._keys[1] < self.settings.metadata_cache_s:
            return self._keys[0]
        jwks = await self._request("GET", (await self.metadata())["jwks_uri"])
        try:
            keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise OidcError(f"the provider's keys cannot be read: {type(exc).__name__}") from None
        self._keys = (keys, self._clock())
        return keys

    async def authorize_url(self, state: str, nonce: str, challenge: str) -> str:
        query = {"response_type": "code", "client_id": self.settings.client_id,
                 "redirect_uri": self.settings.redirect_url, "scope": " ".join(self.settings.scopes),
                 "state": state, "nonce": nonce, "code_challenge": challenge, "code_challenge_method": "S256"}
        endpoint = str((await self.metadata())["authorization_endpoint"])
        return endpoint + ("&" if "?" in endpoint else "?") + urllib.parse.urlencode(query)

    async def exchange(self, code: str, verifier: str) -> str:
        """The ID token the provider gives for this code (client_secret_basic with a secret, else a public
        client's client_id), the PKCE verifier proving this process started the sign-in."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.settings.redirect_url,
                "code_verifier": verifier}
        headers = {}
        if self.settings.client_secret:  # RFC 6749 2.3.1: each form-urlencoded, then HTTP Basic
            quote = urllib.parse.quote
            pair = f"{quote(self.settings.client_id, safe='')}:{quote(self.settings.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = self.settings.client_id
        tokens = await self._request("POST", (await self.metadata())["token_endpoint"], data=form, headers=headers)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("the provider's token answer has no id_token")
        return id_token

    async def verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims once its signature, issuer, audience, expiry and nonce are checked."""
        try:
            try:
                token = jwt.decode(id_token, await self._key_set(), algorithms=ALGORITHMS)
            except InvalidKeyIdError:  # a key the provider rotated in since its keys were read: read them again
                token = jwt.decode(id_token, await self._key_set(fresh=True), algorithms=ALGORITHMS)
        except (JoseError, ValueError) as exc:
            raise OidcError(f"the ID token is refused: {type(exc).__name__}") from None
        claims: dict[str, Any] = dict(token.claims)
        registry = jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": self.settings.issuer},
            aud={"essential": True, "value": self.settings.client_id},
            sub={"essential": True}, exp={"essential": True}, iat={"essential": True},
            nonce={"essential": True, "value": nonce}, leeway=60)
        try:
            registry.validate(claims)
        except JoseError as exc:
            raise OidcError(f"the ID token is refused: {exc.error}: {exc.description or ''}".rstrip(": ")) from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.settings.client_id:
            raise OidcError("the ID token is refused: several audiences and azp is not this client")
        return claims

    def principal(self, claims: dict[str, Any]) -> Principal | None:
        found = role_of(self.settings, claims)
        if found is None:
            return None
        email = claims.get("email") if isinstance(claims.get("email"), str) else ""
        return Principal(str(claims["sub"])[:200], "sso", found[0], found[1], email=str(email)[:200])
