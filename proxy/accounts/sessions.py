"""Console sessions of single sign-on, kept server-side in the state store: the browser holds only the session id,
in an HttpOnly, SameSite=Strict cookie; the store holds the id's SHA-256 (a dump of Redis opens no session), the
principal, a CSRF token (the console sends it back on every state-changing call) and the end of the session.

Every admin request reads its session from the store (no process keeps a copy), so signing out, which deletes it,
ends the session on every instance at once; the key expires with the session's lifetime.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from ..stores.guard import Store
from ..stores.rediskeys import RedisKeys
from .access import Principal, check_role

PENDING_S = 600  # a sign-in started at the provider must come back within this long (http/sso.py)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str
    expires_at: float


class SessionStore:
    def __init__(self, store: Store, keys: RedisKeys, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock

    async def create(self, principal: Principal, lifetime_s: float) -> tuple[str, Session]:
        """A new session for `principal`: (the id for the cookie, the session)."""
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        session = Session(principal, csrf, self._clock() + lifetime_s)
        doc = {"actor": principal.actor, "email": principal.email, "role": principal.role,
               "teams": list(principal.teams), "csrf": csrf, "expires_at": session.expires_at}
        key = self._keys.session(_digest(session_id))
        await self._store.operator_call(
            "session-set", lambda r: r.set(key, orjson.dumps(doc), px=max(1, int(lifetime_s * 1000))))
        return session_id, session

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id, read now; None when it ended (signed out, expired) or never was."""
        if not session_id or len(session_id) > 128:
            return None
        raw = await self._store.operator_call("session-get", lambda r: r.get(self._keys.session(_digest(session_id))))
        if raw is None:
            return None
        doc = orjson.loads(raw)
        if doc["expires_at"] <= self._clock():
            return None
        role, teams = check_role(doc["role"], doc["teams"])
        principal = Principal(doc["actor"], "sso", role, teams, email=doc["email"])
        return Session(principal, doc["csrf"], doc["expires_at"])

    async def end(self, session_id: str) -> bool:
        """Sign out: the session is gone for every instance. Whether there was one."""
        key = self._keys.session(_digest(session_id))
        return bool(await self._store.operator_call("session-set", lambda r: r.delete(key)))
