"""`[admin.oidc]`: single sign-on for the console through the company's OpenID Connect provider, and
`[admin.oidc.roles]`: which claim values (groups) give which role.

    [admin.oidc]
    issuer = "https://login.example.com"           # discovery: {issuer}/.well-known/openid-configuration
    client_id = "embedding-proxy"
    client_secret_env = "PROXY_OIDC_CLIENT_SECRET"  # the variable holding the client's secret ("": a public client)
    redirect_url = "https://proxy.example.com/admin/oidc/callback"
    scopes = ["openid", "email", "groups"]
    roles_claim = "groups"
    [admin.oidc.roles]
    "platform-admins" = "platform"
    "ads-leads" = "team:ads"
    "finance" = "viewer"                            # or "viewer:ads": a viewer of named teams
"""

from __future__ import annotations

import dataclasses
import types
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .limits import check_team
from .ranges import bounded
from .tables import build_table
from .validation import ENV_NAME_RE

CALLBACK_PATH = "/admin/oidc/callback"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    redirect_url: str  # the proxy's own callback, as the provider sends the browser back to it
    client_secret_env: str = "PROXY_OIDC_CLIENT_SECRET"
    scopes: tuple[str, ...] = ("openid", "email", "groups")
    roles_claim: str = "groups"  # the ID token claim whose values (a list, or one string) map to roles
    # A console session lasts this long from sign-in (then the console asks to sign in again); sign-out ends it at
    # once on every instance.
    session_lifetime_s: float = bounded(8 * 3600.0, 60, 30 * 86400)
    # How long the provider's discovery document and keys are kept (a token signed with an unknown `kid` reads the
    # keys again at once).
    metadata_cache_s: float = bounded(3600.0, 0)
    # The provider's answers (discovery, keys, the code's exchange) may take this long.
    timeout_s: float = bounded(10.0, 0, above=True)
    roles: Mapping[str, str] = field(default_factory=dict)  # claim value -> platform | team:T | viewer | viewer:T
    client_secret: str = field(default="", repr=False)  # from the environment only

    @property
    def secure_cookie(self) -> bool:
        """`Secure` on the session cookie, except for plain http on loopback (a developer's machine, the tests)."""
        url = urllib.parse.urlsplit(self.redirect_url)
        return not (url.scheme == "http" and url.hostname in _LOOPBACK)


def parse_role(text: str) -> tuple[str, tuple[str, ...]]:
    """`platform`, `viewer`, `team:T` or `viewer:T` as (role, teams); ValueError says what is wrong."""
    role, _, team = text.partition(":")
    if role not in ("platform", "team", "viewer") or (role == "platform" and team) or (role == "team" and not team):
        raise ValueError(f'{text!r} is not a role: use "platform", "team:TEAM", "viewer" or "viewer:TEAM"')
    return role, (check_team(team),) if team else ()


def _url(value: str, key: str, source: str) -> None:
    url = urllib.parse.urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{source}: {key} must be an http(s) URL, not {value!r}")
    if url.scheme == "http" and url.hostname not in _LOOPBACK:
        raise ConfigError(f"{source}: {key} must use https (plain http only on loopback), not {value!r}")


def build_oidc(raw: Any, source: str, env: Mapping[str, str]) -> OidcSettings:
    where = "admin.oidc"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    if "client_secret" in raw:
        raise ConfigError(f"{source}: {where}.client_secret is a secret: set the variable client_secret_env names")
    plain = {k: v for k, v in raw.items() if k not in ("scopes", "roles")}
    settings: OidcSettings = build_table(OidcSettings, plain, where, source)
    _url(settings.issuer, f"{where}.issuer", source)
    _url(settings.redirect_url, f"{where}.redirect_url", source)
    if urllib.parse.urlsplit(settings.redirect_url).path != CALLBACK_PATH:
        raise ConfigError(f"{source}: {where}.redirect_url must end in {CALLBACK_PATH} (the proxy's callback)")
    scopes = raw.get("scopes", list(settings.scopes))
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s and " " not in s for s in scopes) \
            or "openid" not in scopes:
        raise ConfigError(f"{source}: {where}.scopes must be a list of scope names that includes \"openid\"")
    roles = raw.get("roles", {})
    if not isinstance(roles, dict) or not all(isinstance(v, str) for v in roles.values()):
        raise ConfigError(f"{source}: [{where}.roles] must map claim values to roles")
    for value, role in roles.items():
        try:
            parse_role(role)
        except ValueError as exc:
            raise ConfigError(f"{source}: {where}.roles.{value}: {exc}") from None
    if settings.client_secret_env and not ENV_NAME_RE.fullmatch(settings.client_secret_env):
        raise ConfigError(f"{source}: {where}.client_secret_env must name an environment variable, or be \"\"")
    return dataclasses.replace(settings, scopes=tuple(scopes), roles=types.MappingProxyType(dict(roles)),
                               client_secret=env.get(settings.client_secret_env, "")
                               if settings.client_secret_env else "")
