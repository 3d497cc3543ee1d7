"""`[admin]`: who may use the admin API and how it is recorded (named admins, roles, the audit log).

The credentials themselves are never here: `PROXY_ADMIN_KEY` (the bootstrap credential, actor `root`) comes from
the environment, and named admin credentials live hashed in the state store (proxy/accounts/admins.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ConfigError
from .oidc import OidcSettings, build_oidc
from .ranges import bounded
from .tables import build_table

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AdminSettings:
    # Audit entries older than this many days are dropped when the next one is written (the only way one leaves
    # the log: no API removes an entry). At most about 100 years, as the ledger.
    audit_retention_days: int = bounded(400, 1, 100 * 366)
    # Addresses or networks of the reverse proxies in front of the proxy ("10.0.0.0/8", "127.0.0.1"): only a
    # request from one of them has its X-Forwarded-For read for the audit log's client address. Empty: the
    # connection's own address, always (a client could write anything in the header).
    trusted_proxies: tuple[Network, ...] = field(default=())
    # `[admin.oidc]`: single sign-on for the console (oidc.py); None: the console takes admin keys only.
    oidc: OidcSettings | None = None

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)


def build_admin(raw: Any, source: str, env: Mapping[str, str]) -> AdminSettings:
    """`[admin]` of `source`: the table's plain fields, `trusted_proxies` as a list of networks, `[admin.oidc]`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [admin] must be a table")
    rest = {k: v for k, v in raw.items() if k not in ("trusted_proxies", "oidc")}
    settings: AdminSettings = build_table(AdminSettings, rest, "admin", source)
    if "oidc" in raw:
        settings = replace(settings, oidc=build_oidc(raw["oidc"], source, env))
    if "trusted_proxies" not in raw:
        return settings
    given = raw["trusted_proxies"]
    if not isinstance(given, list) or not all(isinstance(x, str) for x in given):
        raise ConfigError(f"{source}: admin.trusted_proxies must be a list of addresses or networks "
                          '(["10.0.0.0/8", "127.0.0.1"])')
    nets = []
    for text in given:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{source}: admin.trusted_proxies: {text!r} is not an IP address or network") from None
    return replace(settings, trusted_proxies=tuple(nets))
