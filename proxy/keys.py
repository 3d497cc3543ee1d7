"""Gateway keys: generation, the Redis key store, and request authentication.

A key is `sk-gateway-` plus 43 url-safe random characters (32 bytes). Redis holds only its SHA-256 (a key has
256 bits of entropy, so a fast hash is enough: nobody can guess one from its hash). Revocation is a field on the
record, checked on every request while Redis is reachable, so it takes effect at once on every instance.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from .errors import AuthenticationFailed, KeyChanged, KeyNotActive, PermissionDenied, ServiceUnavailable
from .limits import UNLIMITED, Limits, check_team
from .stores.guard import Store, StoreUnavailable
from .stores.rediskeys import RedisKeys

log = logging.getLogger("proxy.keys")
KEY_PREFIX = "sk-gateway-"
_KEY_RE = re.compile(r"sk-gateway-[A-Za-z0-9_-]{32,}")  # fullmatch: `$` would also match before a final newline
# The longest a key may live, or stay usable after a rotation: beyond this an expiry is a typo, and times far
# enough in the future are not dates at all (a record expiring in 1e300 s cannot be printed).
MAX_LIFETIME_S = 10 * 365 * 86400
# A key's name is a label for people (lists, the console, usage exports): longer is a paste gone wrong, and every
# listing of keys would carry it.
MAX_NAME_CHARS = 200


def check_key_name(name: str) -> str:
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"key names are at most {MAX_NAME_CHARS} characters (this one has {len(name)})")
    return name


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def secret_bytes(text: str) -> bytes:
    """A key or secret as bytes, whatever the str holds. Header bytes and environment variables that are not UTF-8
    arrive as lone surrogates (aiohttp and os.environ decode with surrogateescape), which `str.encode()` refuses;
    'surrogatepass' encodes every str, and distinct strs to distinct bytes."""
    return text.encode("utf-8", "surrogatepass")


def hash_key(key: str) -> str:
    return hashlib.sha256(secret_bytes(key)).hexdigest()


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


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


def _readable(raw: dict[bytes, bytes]) -> KeyRecord | None:
    """A stored record, or None (and a warning) if it cannot be read: one bad record must not hide the others."""
    try:
        return KeyRecord.from_redis(raw)
    except (KeyError, ValueError) as exc:  # a partial hash, a field that is not a number, bytes that are not UTF-8
        log.warning("key record %r skipped: unreadable (%s)", raw.get(b"id", b"?")[:64], type(exc).__name__)
        return None


class KeyStore:
    def __init__(self, store: Store, keys: RedisKeys, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        lua = resources.files("proxy") / "lua"
        self._set_fields = store.client.register_script((lua / "keyset.lua").read_text())
        self._claim = store.client.register_script((lua / "keyrotate.lua").read_text())

    async def create(
        self,
        team: str,
        *,
        name: str = "",
        expires_at: float | None = None,
        models: tuple[str, ...] = (),
        limits: Limits = UNLIMITED,
        lineage: str = "",
    ) -> tuple[str, KeyRecord]:
        check_team(team)
        check_key_name(name)
        key = generate_key()
        key_id = new_key_id()
        record = KeyRecord(key_id, team, name, self._clock(), expires_at, False, models, limits,
                           lineage=lineage or key_id)

        async def write(r: Any) -> None:
            # On a cluster the three keys sit in different slots: no MULTI; the record goes first all the same.
            pipe = r.pipeline(transaction=not self._store.cluster)
            self._queue_create(pipe, key, record)
            await pipe.execute()

        await self._store.operator_call("key-create", write)
        return key, record

    def _queue_create(self, pipe: Any, key: str, record: KeyRecord) -> None:
        digest = hash_key(key)
        pipe.hset(self._keys.key_record(digest), mapping=record.to_redis())
        pipe.set(self._keys.key_id(record.id), digest)
        pipe.zadd(self._keys.key_index(), {record.id: record.created_at})

    async def lookup(self, digest: str) -> KeyRecord | None:
        """The record of the key whose SHA-256 is `digest`."""
        raw = await self._store.call("key-get", lambda r: r.hgetall(self._keys.key_record(digest)))
        return KeyRecord.from_redis(raw) if raw else None

    async def list(self, team: str | None = None) -> list[KeyRecord]:
        async def read(r: Any) -> list[KeyRecord]:
            ids = await r.zrange(self._keys.key_index(), 0, -1)
            pipe = r.pipeline(transaction=False)  # GETs, not one MGET: on a cluster the ids span slots
            for i in ids:
                pipe.get(self._keys.key_id(i.decode()))
            digests = await pipe.execute() if ids else []
            pipe = r.pipeline(transaction=False)
            for d in digests:
                if d is not None:
                    pipe.hgetall(self._keys.key_record(d.decode()))
            return [rec for raw in await pipe.execute() if raw and (rec := _readable(raw)) is not None]

        records = await self._store.operator_call("key-list", read)
        return [rec for rec in records if team is None or rec.team == team]

    async def get(self, key_id: str) -> KeyRecord | None:
        return await self._update(key_id, {})

    async def revoke(self, key_id: str) -> KeyRecord | None:
        return await self._update(key_id, {"revoked": "1"})

    async def set_limits(self, key_id: str, changes: dict[str, int | None]) -> KeyRecord | None:
        record = await self.get(key_id)
        if record is None:
            return None
        return await self._update(key_id, record.limits.merged(changes).to_redis())

    async def rotate(self, key_id: str, grace_s: float) -> tuple[str, KeyRecord, KeyRecord] | None:
        """A new key with the old one's team, name, models, limits, own expiry and quota counters (`lineage`);
        the old key's grace period ends after `grace_s` (or earlier, if it already would). Returns (new key, new
        record, old record); None if there is no such key. A revoked or expired key cannot be rotated.

        Atomic on the old record alone (one key, so a Redis Cluster too): the rotation claims it with
        `lua/keyrotate.lua`, which sets the grace end only if the record is as it was read (its revision, moved on
        by every change: `lua/keyset.lua`), and only then writes the new key. Of two concurrent rotations (or a
        rotation and a revocation or limit change) one wins; the loser issues no key and raises KeyChanged (409).
        Should the new key's write fail after the claim, the old key still works until its grace end and can be
        rotated again. A key rotated again later, while its grace period runs, gets a second replacement."""
        key = generate_key()

        async def run(r: Any) -> tuple[str, KeyRecord, KeyRecord] | None:
            digest = await r.get(self._keys.key_id(key_id))
            if digest is None:
                return None
            record_key = self._keys.key_record(digest.decode())
            raw = await r.hgetall(record_key)
            if not raw:
                return None
            old = KeyRecord.from_redis(raw)
            now = self._clock()
            if not old.active(now):
                raise KeyNotActive(
                    f"Key {key_id} is {'revoked' if old.revoked else 'expired'}: it cannot be rotated. Create a "
                    "new key instead.", code="key_revoked" if old.revoked else "key_expired")
            new = KeyRecord(new_key_id(), old.team, old.name, now, old.expires_at, False, old.models, old.limits,
                            lineage=old.quota_id)
            grace = now + grace_s if old.grace_until is None else min(now + grace_s, old.grace_until)
            revision = raw.get(b"rev", b"").decode()
            if not await self._claim(keys=[record_key], args=[revision, repr(grace)], client=r):
                raise KeyChanged(f"Key {key_id} was rotated, revoked or changed while this rotation ran: no key was "
                                 "issued. Read the key again before rotating it.")
            pipe = r.pipeline(transaction=not self._store.cluster)
            self._queue_create(pipe, key, new)
            await pipe.execute()
            await r.publish(self._keys.key_changes(), digest)  # every instance drops its cached copy of the old key
            return key, new, replace(old, grace_until=grace)

        return await self._store.operator_call("key-update", run)  # a rotation updates a key

    async def _update(self, key_id: str, fields: dict[str, str]) -> KeyRecord | None:
        """Set `fields` on the key's record and return it; None if there is no such key (its id, or its record,
        is gone: a record is never created here)."""
        async def write(r: Any) -> KeyRecord | None:
            digest = await r.get(self._keys.key_id(key_id))
            if digest is None:
                return None
            record_key = self._keys.key_record(digest.decode())
            if not fields:
                raw = await r.hgetall(record_key)
                return KeyRecord.from_redis(raw) if raw else None
            args = [x for pair in fields.items() for x in pair]
            flat = await self._set_fields(keys=[record_key], args=args, client=r)
            if not flat:
                return None
            await r.publish(self._keys.key_changes(), digest)  # every instance drops its cached copy
            return KeyRecord.from_redis(dict(zip(flat[::2], flat[1::2], strict=True)))

        return await self._store.operator_call("key-update", write)


def bearer_key(headers: Any) -> str | None:
    """The key from `Authorization: Bearer ...` (OpenAI clients) or `api-key` (Azure-style clients)."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None
    return headers.get("api-key") or None


class Authenticator:
    """Checks keys, keeping verified records in process for `cache_s` so most requests need no Redis read.

    Every change to a key record (revoke, rotate, limits) is published on `{prefix}:keys:changed`; `key_changed`
    drops the changed key from this process's copy as soon as the message arrives (announcements.py), and `forget`
    drops everything whenever the subscription is made or lost, so `cache_s` only bounds a lost message. While
    Redis is unreachable, keys verified within `offline_grace_s` still work and any other key is refused with 503.
    """

    def __init__(
        self,
        keystore: KeyStore,
        offline_grace_s: float,
        cache_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._keystore = keystore
        self._grace = offline_grace_s
        self._cache_s = cache_s
        self._clock = clock
        self._wall_clock = wall_clock
        # sha256 of the key -> (record, when it was read from Redis, until when it is trusted without a read)
        self._verified: dict[str, tuple[KeyRecord, float, float]] = {}

    async def authenticate(self, key: str | None) -> KeyRecord:
        if not key:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer sk-gateway-...'.",
                code="missing_api_key",
            )
        if not _KEY_RE.fullmatch(key):
            raise AuthenticationFailed("Incorrect API key provided.")
        digest = hash_key(key)
        now = self._clock()
        hit = self._verified.get(digest)
        if hit is not None and now < hit[2]:
            record = hit[0]
        else:
            try:
                found = await self._keystore.lookup(digest)
            except StoreUnavailable:
                if hit is None or now - hit[1] > self._grace:
                    raise ServiceUnavailable(
                        "The key store is unreachable and this key has not been verified recently."
                    ) from None
                record = hit[0]
            else:
                if found is None:
                    self._verified.pop(digest, None)
                    raise AuthenticationFailed("Incorrect API key provided.")
                record = found
                self._remember(digest, record, now)
        if record.revoked:
            raise AuthenticationFailed("This API key has been revoked.", code="api_key_revoked")
        if record.ends_at is not None and self._wall_clock() >= record.ends_at:
            raise AuthenticationFailed("This API key has expired.", code="api_key_expired")
        return record

    def _remember(self, digest: str, record: KeyRecord, now: float) -> None:
        if len(self._verified) > 10_000:  # bounded: drop the oldest verifications
            for stale in sorted(self._verified, key=lambda k: self._verified[k][1])[:1000]:
                del self._verified[stale]
        self._verified[digest] = (record, now, now + self._cache_s)

    def forget(self, digest: str | None = None) -> None:
        """Read one key (None: every key) from Redis again on its next use. The records stay for outages."""
        for k in [digest] if digest is not None else list(self._verified):
            if k in self._verified:
                record, verified_at, _ = self._verified[k]
                self._verified[k] = (record, verified_at, -math.inf)

    def key_changed(self, data: bytes) -> None:
        """A key change published by any process (the sha256 of the changed key): read it again on its next use."""
        self.forget(data.decode(errors="replace"))


def check_model(record: KeyRecord, model: str) -> None:
    if not record.allows(model):
        raise PermissionDenied(f"This key may not use model '{model}'.", param="model")
