"""Named admins: credentials with a role, kept in the state store as gateway keys are (the credential's SHA-256,
never the credential), created by `embedding-proxy admins create` or `POST /admin/admins`, shown once.

A credential is `sk-admin-` plus 43 url-safe random characters (32 bytes). Every admin request reads its record
from the state store (admin requests are few; no process keeps a copy), so a revocation is refused on every
instance from its next request. A revoked admin keeps its record and its name: the audit log names it, and the
name is never given to someone else.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import ProxyError
from ..stores.guard import Store
from ..stores.rediskeys import RedisKeys
from .access import Principal, Role, check_admin_name, check_role
from .keys import secret_bytes

ADMIN_PREFIX = "sk-admin-"
_ADMIN_RE = re.compile(r"sk-admin-[A-Za-z0-9_-]{32,}")  # fullmatch


class AdminExists(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "admin_exists"


def generate_credential() -> str:
    return ADMIN_PREFIX + secrets.token_urlsafe(32)


def hash_credential(credential: str) -> str:
    return hashlib.sha256(secret_bytes(credential)).hexdigest()


def looks_like_credential(text: str) -> bool:
    return bool(_ADMIN_RE.fullmatch(text))


@dataclass(frozen=True, slots=True)
class AdminRecord:
    name: str
    role: Role
    teams: tuple[str, ...] = ()
    created_at: float = 0.0
    created_by: str = ""
    revoked: bool = False
    revoked_at: float | None = None

    def to_redis(self) -> dict[str, str]:
        return {"name": self.name, "role": self.role, "teams": ",".join(self.teams),
                "created_at": repr(self.created_at), "created_by": self.created_by,
                "revoked": "1" if self.revoked else "0",
                "revoked_at": "" if self.revoked_at is None else repr(self.revoked_at)}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> AdminRecord:
        d = {k.decode(): v.decode() for k, v in raw.items()}
        role, teams = check_role(d["role"], [t for t in d.get("teams", "").split(",") if t])
        return cls(name=d["name"], role=role, teams=teams, created_at=float(d.get("created_at") or 0),
                   created_by=d.get("created_by", ""), revoked=d.get("revoked") == "1",
                   revoked_at=float(d["revoked_at"]) if d.get("revoked_at") else None)

    def public(self) -> dict[str, Any]:
        """What operators may see: never the credential or its hash."""
        return {"name": self.name, "role": self.role, "teams": list(self.teams), "created_at": self.created_at,
                "created_by": self.created_by, "revoked": self.revoked, "revoked_at": self.revoked_at}

    def principal(self) -> Principal:
        return Principal(self.name, "admin", self.role, self.teams)


class AdminStore:
    def __init__(self, store: Store, keys: RedisKeys, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock

    async def create(self, name: str, role: str, teams: Iterable[str], created_by: str) -> tuple[str, AdminRecord]:
        """A new admin and its credential (shown once). ValueError for a bad name, role or team; AdminExists
        when the name is taken (revoked admins keep theirs)."""
        check_admin_name(name)
        checked_role, checked_teams = check_role(role, teams)
        credential = generate_credential()
        digest = hash_credential(credential)
        record = AdminRecord(name, checked_role, checked_teams, self._clock(), created_by)

        async def write(r: Any) -> bool:
            if not await r.set(self._keys.admin_name(name), digest, nx=True):  # the name is claimed first
                return False
            pipe = r.pipeline(transaction=not self._store.cluster)  # a cluster: three slots
            pipe.hset(self._keys.admin_record(digest), mapping=record.to_redis())
            pipe.zadd(self._keys.admin_index(), {name: record.created_at})
            await pipe.execute()
            return True

        if not await self._store.operator_call("admin-set", write):
            raise AdminExists(f"An admin named {name!r} exists already (a revoked admin keeps its name).",
                              param="name")
        return credential, record

    async def lookup(self, credential: str) -> AdminRecord | None:
        """The record of this credential, read now; None when it is no admin credential."""
        if not looks_like_credential(credential):
            return None
        digest = hash_credential(credential)
        raw = await self._store.operator_call("admin-get", lambda r: r.hgetall(self._keys.admin_record(digest)))
        return AdminRecord.from_redis(raw) if raw else None

    async def get(self, name: str) -> AdminRecord | None:
        async def read(r: Any) -> AdminRecord | None:
            digest = await r.get(self._keys.admin_name(name))
            raw = await r.hgetall(self._keys.admin_record(digest.decode())) if digest else None
            return AdminRecord.from_redis(raw) if raw else None

        return await self._store.operator_call("admin-get", read)

    async def page(self, after: str | None, limit: int) -> tuple[list[AdminRecord], list[str], bool] | None:
        """Up to `limit` admins by creation time after the one named `after` (None: from the first): their records,
        the names listed (a name whose record is unreadable is listed, not shown) and whether more follow. None
        when no admin is named `after`."""
        async def read(r: Any) -> tuple[list[AdminRecord], list[str], bool] | None:
            start = 0
            if after is not None:
                rank = await r.zrank(self._keys.admin_index(), after)
                if rank is None:
                    return None
                start = rank + 1
            names = [n.decode() for n in await r.zrange(self._keys.admin_index(), start, start + limit)]
            return await self._records(r, names[:limit]), names[:limit], len(names) > limit

        return await self._store.operator_call("admin-list", read)

    async def _records(self, r: Any, names: list[str]) -> list[AdminRecord]:
        """The readable records of these admins, in their order: two round trips."""
        pipe = r.pipeline(transaction=False)
        for n in names:
            pipe.get(self._keys.admin_name(n))
        digests = await pipe.execute() if names else []
        pipe = r.pipeline(transaction=False)
        for d in digests:
            if d is not None:
                pipe.hgetall(self._keys.admin_record(d.decode()))
        return [AdminRecord.from_redis(raw) for raw in (await pipe.execute() if digests else []) if raw]

    async def list(self) -> list[AdminRecord]:
        async def read(r: Any) -> list[AdminRecord]:
            return await self._records(r, [n.decode() for n in await r.zrange(self._keys.admin_index(), 0, -1)])

        return await self._store.operator_call("admin-list", read)

    async def revoke(self, name: str) -> tuple[AdminRecord, AdminRecord] | None:
        """Revoke the admin named `name`: (before, after); None if there is none. Revoking twice changes nothing."""
        now = self._clock()

        async def write(r: Any) -> tuple[AdminRecord, AdminRecord] | None:
            digest = await r.get(self._keys.admin_name(name))
            if digest is None:
                return None
            record_key = self._keys.admin_record(digest.decode())
            raw = await r.hgetall(record_key)
            if not raw:
                return None
            before = AdminRecord.from_redis(raw)
            if before.revoked:
                return before, before
            await r.hset(record_key, mapping={"revoked": "1", "revoked_at": repr(now)})
            return before, AdminRecord.from_redis(await r.hgetall(record_key))

        return await self._store.operator_call("admin-set", write)
