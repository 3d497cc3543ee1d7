"""Who may do what: principals, roles, and the rule a role's permissions follow (Kubernetes RBAC is the model).

A principal (who is asking) has a role; a role is a set of rules, each a set of verbs on a set of resources; what
an admin route or CLI command needs is a `Need` (one verb on one resource), declared in one table
(permissions.py). Roles:

    platform   every verb on every resource
    team       for the teams named: keys (list, get, create, update, rotate, revoke); teams, usage and the audit
               log (list, get: their own teams'); nothing else
    viewer     list and get on everything (with teams named: on those teams' keys, teams, usage and audit only)

A principal with teams (a team admin, a viewer of named teams) is confined to them: team-wide resources (cache,
upstreams, admins) are refused, lists show only their teams, and naming another team is refused (403).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..config.limits import Limits, check_team
from ..errors import PermissionDenied

Role = Literal["platform", "team", "viewer"]
ROLES: tuple[Role, ...] = ("platform", "team", "viewer")
# Who is asking and how they proved it: the bootstrap PROXY_ADMIN_KEY, a named admin credential, an SSO session.
Kind = Literal["root", "admin", "sso"]
READ = frozenset({"list", "get"})
# The resources that belong to a team: a principal confined to teams reaches these alone, and only its teams'.
TEAM_RESOURCES = frozenset({"keys", "teams", "usage", "audit"})
# Admin names: a label people recognise in the audit log (a login, an email's local part); never a credential.
ADMIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass(frozen=True, slots=True)
class Need:
    """One verb on one resource: what a route or command needs."""

    verb: str
    resource: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}"


@dataclass(frozen=True, slots=True)
class Rule:
    verbs: frozenset[str]  # "*": every verb
    resources: frozenset[str]  # "*": every resource

    def allows(self, need: Need) -> bool:
        return ("*" in self.verbs or need.verb in self.verbs) and (
            "*" in self.resources or need.resource in self.resources)


def _rule(verbs: Iterable[str], resources: Iterable[str]) -> Rule:
    return Rule(frozenset(verbs), frozenset(resources))


RULES: dict[Role, tuple[Rule, ...]] = {
    "platform": (_rule(["*"], ["*"]),),
    "team": (_rule(["list", "get", "create", "update", "rotate", "revoke"], ["keys"]),
             _rule(READ, ["teams", "usage", "audit"])),
    "viewer": (_rule(READ, ["*"]),),
}


def check_role(role: str, teams: Iterable[str]) -> tuple[Role, tuple[str, ...]]:
    """A role and its teams as given (CLI, admin API, SSO mapping), checked: ValueError says what is wrong."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    names = tuple(sorted({check_team(t) for t in teams}))
    if role == "team" and not names:
        raise ValueError("a team admin needs at least one team")
    if role == "platform" and names:
        raise ValueError("a platform admin has every team: name no team")
    return role, names


def check_admin_name(name: str) -> str:
    if not ADMIN_NAME_RE.fullmatch(name):
        raise ValueError("admin names are 1-64 characters of A-Z, a-z, 0-9, '_', '.', '@', '-', starting with a "
                         "letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking. `teams` empty: not confined (platform, or a viewer of everything)."""

    actor: str  # the admin's name, `root`, or the SSO subject
    kind: Kind
    role: Role
    teams: tuple[str, ...] = ()
    email: str = ""  # SSO only
    session: str = field(default="", repr=False)  # SSO only: the session's id (never logged)

    @property
    def confined(self) -> bool:
        return bool(self.teams)

    def may(self, need: Need) -> bool:
        """The role allows the verb on the resource, and a confined principal only reaches team resources."""
        if need.resource == "self":
            return True
        if self.confined and need.resource not in TEAM_RESOURCES:
            return False
        return any(rule.allows(need) for rule in RULES[self.role])

    def sees(self, team: str) -> bool:
        return not self.confined or team in self.teams

    def check(self, need: Need) -> None:
        if not self.may(need):
            raise PermissionDenied(f"{self.describe()} may not {need.verb} {need.resource}.",
                                   code="permission_denied")

    def check_team(self, team: str, need: Need) -> None:
        """Refuse (403) an operation on a team this principal is confined away from."""
        if not self.sees(team):
            raise PermissionDenied(f"{self.describe()} may not {need.verb} {need.resource} of team {team!r}.",
                                   code="permission_denied")

    def describe(self) -> str:
        scope = f" of {', '.join(self.teams)}" if self.teams else ""
        title = {"platform": "platform admin", "team": "team admin", "viewer": "viewer"}[self.role]
        return f"{self.actor} ({title}{scope})"

    def public(self) -> dict[str, object]:
        """Who, how signed in, and the role (`GET /admin/whoami` adds the permissions held: permissions.py)."""
        return {"actor": self.actor, "kind": self.kind, "role": self.role, "teams": list(self.teams),
                "email": self.email}


ROOT = Principal("root", "root", "platform")


def check_key_limits(principal: Principal, team: str, team_limits: Limits, limits: Limits) -> None:
    """A principal confined to teams (a team admin) sets a key's limits no higher than its team's own (403)."""
    if not principal.confined:
        return
    asked = limits.to_dict()
    for name, cap in team_limits.items():
        if (value := asked[name]) is not None and value > cap:
            raise PermissionDenied(f"'{name}' may not be above team {team}'s own limit ({cap}) for a team admin.",
                                   param=name, code="limit_above_team")
