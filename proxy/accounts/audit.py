"""The audit log: one entry per admin change and per refusal, kept in the state store and written as one JSON line.

HashiCorp Vault's audit devices are the model: the entry is written before the answer is sent (a change whose
entry cannot be stored is answered 503: it happened, and the JSON line says so), and no secret is ever in it
(entries hold key ids, team and model names, limits and records' public fields: never a key, an admin credential,
a session, or any input text).

The log is a Redis stream (`{prefix}:audit`): append-only (no API or command removes an entry); each write then
trims the entries older than `admin.audit_retention_days`, by their stream ids (the state store's clock, so a
writer's wrong clock never trims what it should not). Reads go newest first, filtered by time, actor, team and
action.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import IO, Any

import orjson

from ..stores.guard import Store
from ..stores.rediskeys import RedisKeys
from .csvcells import neutral

log = logging.getLogger("proxy.audit")
_SCAN_BATCH = 500
_SKEW_MS = 86_400_000  # stream ids are the store's clock, `ts` the writer's: read a day around the range asked
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class AuditEntry:
    action: str  # "<resource>.<verb>": keys.create, teams.update, admins.revoke, session.signin, ...
    outcome: str  # ok | refused | failed
    actor: str  # the admin's name, `root`, the SSO subject; "" when no admin was named (a refused sign-in)
    actor_kind: str = ""  # root | admin | sso
    email: str = ""  # SSO only
    how: str = "api"  # api | cli | console
    team: str = ""
    key_id: str = ""
    model: str = ""
    admin: str = ""  # the admin acted on (admins.create, admins.revoke)
    before: Any = None  # the values before and after the change (limits, a record's public fields)
    after: Any = None
    status: int = 200  # the answer's status (the CLI's: as the admin API would answer)
    reason: str = ""  # a refusal's code and message
    client: str = ""  # the client's address (X-Forwarded-For only through a trusted proxy); "" from the CLI
    request_id: str = ""
    ts: float = field(default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(AuditEntry))
CSV_COLUMNS = ("time", *(c for c in COLUMNS if c != "ts"))


@dataclass(frozen=True)
class AuditQuery:
    since: float | None = None  # Unix time, inclusive
    until: float | None = None  # Unix time, exclusive
    actor: str | None = None
    team: str | None = None
    action: str | None = None  # exact, or a resource (`keys` matches keys.create, keys.revoke, ...)
    teams: tuple[str, ...] = ()  # the reader's teams: a confined reader sees only these teams' entries
    limit: int = 1000

    def matches(self, e: AuditEntry) -> bool:
        return ((self.since is None or e.ts >= self.since) and (self.until is None or e.ts < self.until)
                and (self.actor is None or e.actor == self.actor) and (self.team is None or e.team == self.team)
                and (self.action is None or e.action == self.action or e.action.startswith(self.action + "."))
                and (not self.teams or e.team in self.teams))


def audit_line(entry: AuditEntry) -> bytes:
    """The JSON log line of an entry, for shipping to a SIEM: `"event": "audit"` and every field."""
    return orjson.dumps({"event": "audit", **entry.to_dict()})


class AuditLog:
    """The audit log in the state store, and its JSON lines on `lines` (None: no lines)."""

    def __init__(self, store: Store, keys: RedisKeys, retention_days: int, lines: IO[bytes] | None,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._key = keys.audit_log()
        self._retention_ms = retention_days * 86_400_000
        self._lines = lines
        self._clock = clock

    async def record(self, entry: AuditEntry) -> AuditEntry:
        """Write the line, then the stored entry (StoreUnavailable if it cannot be stored)."""
        if entry.ts == 0.0:
            entry = AuditEntry(**{**entry.to_dict(), "ts": round(self._clock(), 3)})
        self._write_line(entry)
        data = orjson.dumps(entry.to_dict())

        async def write(r: Any) -> None:
            stream_id = await r.xadd(self._key, {"e": data})
            # the entries older than the retention by the store's own clock (the new entry's id): never this one
            oldest = max(0, int(stream_id.split(b"-")[0]) - self._retention_ms)
            await r.xtrim(self._key, minid=oldest, approximate=False)

        await self._store.operator_call("audit-write", write)
        return entry

    def _write_line(self, entry: AuditEntry) -> None:
        if self._lines is None:
            return
        try:
            self._lines.write(audit_line(entry) + b"\n")
            self._lines.flush()
        except (OSError, ValueError) as exc:  # a closed or broken stream: the stored entry still counts
            log.warning("audit log line not written: %s", type(exc).__name__)

    async def query(self, q: AuditQuery) -> list[AuditEntry]:
        """Entries matching `q`, newest first, at most `q.limit`."""
        high = "+" if q.until is None else str(int(q.until * 1000) + _SKEW_MS)
        low = "-" if q.since is None else str(max(0, int(q.since * 1000) - _SKEW_MS))

        async def read(r: Any) -> list[AuditEntry]:
            found: list[AuditEntry] = []
            top = high
            while len(found) < q.limit:
                batch = await r.xrevrange(self._key, max=top, min=low, count=_SCAN_BATCH)
                for stream_id, body in batch:
                    entry = _entry(stream_id, body)
                    if entry is not None and q.matches(entry):
                        found.append(entry)
                if len(batch) < _SCAN_BATCH:
                    break
                top = "(" + batch[-1][0].decode()  # exclusive: the next page starts below the last id read
            return found[:q.limit]

        return await self._store.operator_call("audit-read", read)


def _entry(stream_id: bytes, body: dict[bytes, bytes]) -> AuditEntry | None:
    """A stored entry, or None (and a warning) when it cannot be read: one bad entry must not hide the others."""
    try:
        doc = orjson.loads(body[b"e"])
        return AuditEntry(**{k: v for k, v in doc.items() if k in COLUMNS})
    except (KeyError, TypeError, orjson.JSONDecodeError):
        log.warning("audit entry %s skipped: unreadable", stream_id.decode(errors="replace"))
        return None


def to_csv(entries: list[AuditEntry]) -> str:
    """One row per entry: the time in UTC (ISO 8601), then every field; before and after as JSON."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for e in entries:
        d = e.to_dict()
        d["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(e.ts)) + f".{int(e.ts * 1000) % 1000:03d}Z"
        for name in ("before", "after"):
            d[name] = "" if d[name] is None else orjson.dumps(d[name]).decode()
        w.writerow([neutral(d[c]) for c in CSV_COLUMNS])
    return out.getvalue()
