"""A gateway key's record: what Redis holds of a key (never the key itself, only its SHA-256 names the hash), and
what operators may see of it. The key store is keys.py; the indexes that list records, keyindex.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..config.limits import UNLIMITED, Limits

log = logging.getLogger("proxy.keys")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    team: str
    name: str = ""
    created_at: float = 0.0
    expires_at: float | None = None  # the key's own expiry; a replacement key inherits it
    revoked: bool = False
    models: tuple[str, ...] = field(default=())  # empty: every configured model
    limits: Limits = field(default=UNLIMITED)  # the key's own quotas, on top of its team's
    grace_until: float | None = None  # set when the key was rotated: the end of its grace period
    lineage: str = ""  # id of the first key of a rotation chain; empty: this key's own id

    @property
    def quota_id(self) -> str:
        """Whose per-key quota counters this key spends: rotated keys share their predecessor's."""
        return self.lineage or self.id

    @property
    def ends_at(self) -> float | None:
        """When the key stops working: the earlier of its own expiry and its grace end."""
        ends = [t for t in (self.expires_at, self.grace_until) if t is not None]
        return min(ends) if ends else None

    def active(self, now: float) -> bool:
        return not self.revoked and (self.ends_at is None or now < self.ends_at)

    def to_redis(self) -> dict[str, str]:
        return {
            **self.limits.to_redis(),
            "id": self.id,
            "team": self.team,
            "name": self.name,
            "created_at": repr(self.created_at),
            "expires_at": "" if self.expires_at is None else repr(self.expires_at),
            "revoked": "1" if self.revoked else "0",
            "models": ",".join(self.models),
            "grace_until": "" if self.grace_until is None else repr(self.grace_until),
            "lineage": self.lineage,
        }

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> KeyRecord:
        d = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=d["id"],
            team=d["team"],
            name=d.get("name", ""),
            created_at=float(d.get("created_at") or 0),
            expires_at=float(d["expires_at"]) if d.get("expires_at") else None,
            revoked=d.get("revoked") == "1",
            models=tuple(m for m in d.get("models", "").split(",") if m),
            limits=Limits.from_redis(d),
            grace_until=float(d["grace_until"]) if d.get("grace_until") else None,
            lineage=d.get("lineage", ""),  # records written before rotation chains: `quota_id` is their own id
        )

    def public(self) -> dict[str, Any]:
        """What operators may see: never the key or its hash."""
        return {
            "id": self.id,
            "team": self.team,
            "name": self.name,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "grace_until": self.grace_until,
            "revoked": self.revoked,
            "models": list(self.models),
            "limits": self.limits.to_dict(),
            "lineage": self.quota_id,
        }

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


def readable(raw: dict[bytes, bytes]) -> KeyRecord | None:
    """A stored record, or None (and a warning) if it cannot be read: one bad record must not hide the others."""
    try:
        return KeyRecord.from_redis(raw)
    except (KeyError, ValueError) as exc:  # a partial hash, a field that is not a number, bytes that are not UTF-8
        log.warning("key record %r skipped: unreadable (%s)", raw.get(b"id", b"?")[:64], type(exc).__name__)
        return None
