"""The OpenID Connect client on its own (issue 17), against a small provider served on loopback by the test: the ID
token's signature, issuer, audience, expiry and nonce are checked (a forged or stale token signs no one in), the
keys are read again for an unknown key id, the code exchange sends the PKCE verifier and the client's secret, and
the groups map to roles as `[admin.oidc.roles]` says. `[admin.oidc]` itself is checked when the config loads."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from proxy.accounts.oidc import OidcClient, OidcError, pkce_pair, role_of
from proxy.config import ConfigError, parse
from proxy.config.oidc import OidcSettings

CLIENT = "embedding-proxy"
SECRET = "client-secret-for-oidc-unit-tests"


class Provider:
    def __init__(self) -> None:
        self.keys = [RSAKey.generate_key(2048, parameters={"kid": "k1"})]
        self.jwks_reads = 0
        self.id_token = ""
        self.token_requests: list[dict[str, Any]] = []
        self.issuer = ""
        self.claimed_issuer: str | None = None

    def mint(self, key: Any = None, alg: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.issuer, "aud": CLIENT, "sub": "u-1", "iat": now, "exp": now + 300, "nonce": "n-1",
                "email": "bob@example.com", "groups": ["ads-leads"], **claims}
        key = key or self.keys[0]
        return jwt.encode({"alg": alg, "kid": key.kid}, {k: v for k, v in body.items() if v is not None}, key)

    def app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.Response:
            return web.json_response({"issuer": self.claimed_issuer or self.issuer,
                                      "authorization_endpoint": self.issuer + "/auth",
                                      "token_endpoint": self.issuer + "/token", "jwks_uri": self.issuer + "/jwks"})

        async def jwks(request: web.Request) -> web.Response:
            self.jwks_reads += 1
            return web.json_response(KeySet(self.keys).as_dict(private=False))

        async def token(request: web.Request) -> web.Response:
            self.token_requests.append({"form": dict(await request.post()),
                                        "auth": request.headers.get("Authorization", "")})
            return web.json_response({"access_token": "at", "token_type": "Bearer", "id_token": self.id_token})

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        app.router.add_post("/token", token)
        return app


ROLES = {"platform-admins": "platform", "ads-leads": "team:ads", "search-leads": "team:search",
         "finance": "viewer", "ads-watchers": "viewer:ads"}


@pytest.fixture
async def idp() -> AsyncIterator[tuple[Provider, OidcClient]]:
    provider = Provider()
    server = TestServer(provider.app(), host="127.0.0.1")
    await server.start_server()
    provider.issuer = str(server.make_url("")).rstrip("/")
    settings = OidcSettings(issuer=provider.issuer, client_id=CLIENT, client_secret=SECRET,
                            redirect_url="http://127.0.0.1:9/admin/oidc/callback", roles=ROLES)
    client = OidcClient(settings)
    yield provider, client
    await client.close()
    await server.close()


async def test_a_good_token_signs_in_and_the_exchange_proves_the_sign_in(idp: Any) -> None:
    provider, client = idp
    provider.id_token = provider.mint()
    verifier, challenge = pkce_pair()
    assert base64.urlsafe_b64decode(challenge + "=") != verifier.encode() and len(verifier) >= 43
    url = await client.authorize_url("state-1", "n-1", challenge)
    assert "code_challenge_method=S256" in url and f"code_challenge={challenge}" in url and "nonce=n-1" in url
    claims = await client.verify(await client.exchange("code-1", verifier), "n-1")
    [sent] = provider.token_requests
    assert sent["form"] == {"grant_type": "authorization_code", "code": "code-1", "code_verifier": verifier,
                            "redirect_uri": "http://127.0.0.1:9/admin/oidc/callback"}
    assert sent["auth"] == "Basic " + base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()
    principal = client.principal(claims)
    assert (principal.actor, principal.kind, principal.role, principal.teams, principal.email) == (
        "u-1", "sso", "team", ("ads",), "bob@example.com")


@pytest.mark.parametrize("forged", ["other key", "issuer", "audience", "expired", "nonce", "no nonce", "no sub",
                                    "alg none", "hmac with the client secret"])
async def test_a_forged_or_stale_token_is_refused(idp: Any, forged: str) -> None:
    provider, client = idp
    impostor = RSAKey.generate_key(2048, parameters={"kid": "k1"})  # the provider's key id, not its key
    token = {
        "other key": lambda: provider.mint(key=impostor),
        "issuer": lambda: provider.mint(iss="http://127.0.0.1:1"),
        "audience": lambda: provider.mint(aud="someone-else"),
        "expired": lambda: provider.mint(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        "nonce": lambda: provider.mint(nonce="replayed"),
        "no nonce": lambda: provider.mint(nonce=None),
        "no sub": lambda: provider.mint(sub=None),
        "alg none": lambda: ".".join(base64.urlsafe_b64encode(orjson.dumps(part)).rstrip(b"=").decode() for part in (
            {"alg": "none", "kid": "k1"}, {"iss": provider.issuer, "aud": CLIENT, "sub": "u-1", "nonce": "n-1",
                                           "iat": int(time.time()), "exp": int(time.time()) + 300})) + ".",
        "hmac with the client secret": lambda: provider.mint(key=OctKey.import_key(SECRET.encode(),
                                                                                    parameters={"kid": "k1"}),
                                                             alg="HS256"),
    }[forged]()
    with pytest.raises(OidcError, match="the ID token is refused"):
        await client.verify(token, "n-1")


async def test_an_unknown_key_id_reads_the_keys_again(idp: Any) -> None:
    provider, client = idp
    await client.verify(provider.mint(), "n-1")
    assert provider.jwks_reads == 1
    await client.verify(provider.mint(), "n-1")
    assert provider.jwks_reads == 1  # kept
    rotated = RSAKey.generate_key(2048, parameters={"kid": "k2"})
    provider.keys.append(rotated)
    assert (await client.verify(provider.mint(key=rotated), "n-1"))["sub"] == "u-1"
    assert provider.jwks_reads == 2
    with pytest.raises(OidcError):  # a key id nobody publishes: read once more, then refused
        await client.verify(provider.mint(key=RSAKey.generate_key(2048, parameters={"kid": "k9"})), "n-1")


async def test_a_discovery_document_naming_another_issuer_is_refused(idp: Any) -> None:
    provider, client = idp
    provider.claimed_issuer = "https://evil.example"
    with pytest.raises(OidcError, match="names issuer"):
        await client.authorize_url("s", "n", "c")


def test_groups_map_to_the_strongest_role() -> None:
    s = OidcSettings(issuer="https://i", client_id="c", redirect_url="https://p/admin/oidc/callback", roles=ROLES)
    assert role_of(s, {"groups": ["ads-leads", "platform-admins"]}) == ("platform", ())
    assert role_of(s, {"groups": ["ads-leads", "search-leads", "finance"]}) == ("team", ("ads", "search"))
    assert role_of(s, {"groups": ["finance", "ads-watchers"]}) == ("viewer", ())
    assert role_of(s, {"groups": ["ads-watchers"]}) == ("viewer", ("ads",))
    assert role_of(s, {"groups": "finance"}) == ("viewer", ())  # one value as a string
    assert role_of(s, {"groups": ["interns"]}) is None and role_of(s, {}) is None
    assert role_of(s, {"groups": [{"not": "a string"}, 7]}) is None


def _oidc(body: str, **env: str) -> Any:
    return parse(body, "proxy.toml", env).admin.oidc


GOOD = """
[admin.oidc]
issuer = "https://login.example.com"
client_id = "embedding-proxy"
redirect_url = "https://proxy.example.com/admin/oidc/callback"
[admin.oidc.roles]
"ads-leads" = "team:ads"
"""


def test_the_oidc_settings_are_checked_when_the_config_loads() -> None:
    s = _oidc(GOOD, PROXY_OIDC_CLIENT_SECRET="from-env")
    assert s.client_secret == "from-env" and s.secure_cookie and s.scopes == ("openid", "email", "groups")
    assert dict(s.roles) == {"ads-leads": "team:ads"} and "from-env" not in repr(s)
    assert parse("", "x", {}).admin.oidc is None
    loopback = GOOD.replace("https://proxy.example.com", "http://127.0.0.1:8080")
    assert not _oidc(loopback).secure_cookie
    for change, message in [
        (("/admin/oidc/callback", "/callback"), "must end in /admin/oidc/callback"),
        (("https://login.example.com", "http://login.example.com"), "must use https"),
        (('"team:ads"', '"king"'), "is not a role"),
        (('"team:ads"', '"team"'), "is not a role"),
        (('"team:ads"', '"team:Ads"'), "team names"),
        (('client_id = "embedding-proxy"', 'client_id = "x"\nscopes = ["email"]'), 'includes "openid"'),
        (('client_id = "embedding-proxy"', 'client_id = "x"\nsession_lifetime_s = 5'), "must be from 60"),
        (('client_id = "embedding-proxy"', 'client_id = "x"\nclient_secret = "inline"'), "is a secret"),
        (('client_id = "embedding-proxy"\n', ""), "client_id is required"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _oidc(GOOD.replace(*change))
