"""Who the command line acts as, what it may do, and its audit entries.

The operator commands talk to the state store directly, so whoever holds its credentials is the platform: without
`PROXY_ADMIN_CREDENTIAL` the command line acts as `root`. With it (an `sk-admin-` credential) it acts as that named
admin: each command needs the permission the one table gives it (proxy/accounts/permissions.py), a team admin's
commands reach only its teams, and a revoked credential is refused. Every change and every refusal is written to
the audit log (`how`: cli) before the command answers; the JSON line goes to stderr (stdout carries the command's
output: a new key, a report).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..accounts.access import ROOT, Need, Principal
from ..accounts.admins import AdminStore
from ..accounts.audit import AuditEntry, AuditLog
from ..accounts.permissions import command_need
from ..config import Settings
from ..errors import PermissionDenied
from ..stores.guard import Store
from ..stores.rediskeys import RedisKeys
from .failures import CommandFailed

CREDENTIAL_ENV = "PROXY_ADMIN_CREDENTIAL"


@dataclass
class CliAccess:
    principal: Principal
    need: Need
    audit_log: AuditLog
    request_id: str
    target: dict[str, str] = field(default_factory=dict)

    @property
    def action(self) -> str:
        return f"{self.need.resource}.{self.need.verb}"

    def scope(self, team: str, **target: str) -> None:
        """This command acts on `team` (and `target`): PermissionDenied if the principal may not."""
        self.target = {"team": team, **target}
        self.principal.check_team(team, self.need)

    async def record(self, action: str | None = None, **fields: Any) -> None:
        p = self.principal
        await self.audit_log.record(AuditEntry(
            action=action or self.action, outcome=fields.pop("outcome", "ok"), actor=p.actor, actor_kind=p.kind,
            email=p.email, how="cli", request_id=self.request_id, **fields))

    async def refused(self, err: PermissionDenied) -> CommandFailed:
        """Audit the refusal; the failure to print (exit 1)."""
        await self.record(outcome="refused", status=err.status, reason=f"{err.code}: {err.message}", **self.target)
        return CommandFailed(f"permission denied: {err.message}")


async def cli_access(command: str, settings: Settings, store: Store, rkeys: RedisKeys) -> CliAccess:
    """The principal this command acts as, once its permission is checked (a refusal is audited, then raised)."""
    need = command_need(command)
    assert need is not None, command  # only admin commands come here
    principal = ROOT
    credential = os.environ.get(CREDENTIAL_ENV, "")
    if credential:
        record = await AdminStore(store, rkeys).lookup(credential)
        if record is None:
            raise CommandFailed(f"{CREDENTIAL_ENV} is not a known admin credential")
        if record.revoked:
            raise CommandFailed(f"{CREDENTIAL_ENV} holds the credential of admin {record.name}, which is revoked")
        principal = record.principal()
    lines = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    access = CliAccess(principal, need, AuditLog(store, rkeys, settings.admin.audit_retention_days, lines),
                       os.urandom(16).hex())
    try:
        principal.check(need)
    except PermissionDenied as err:
        raise await access.refused(err) from None
    return access
