"""Gateway keys: generation, the Redis key store, and request authentication.

A key is `sk-gateway-` plus 43 url-safe random characters (32 bytes). Redis holds only its SHA-256 (a key has
256 bits of entropy, so a fast hash is enough: nobody can guess one from its hash). Revocation is a field on the
record, checked on every request while Redis is reachable, so it takes effect at once on every instance.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from importlib import resources
from typing import Any

from ..config.limits import UNLIMITED, Limits, check_team
from ..errors import AuthenticationFailed, KeyChanged, KeyNotActive, PermissionDenied, ServiceUnavailable
from ..singleflight import SingleFlight
from ..stores.guard import Store, StoreUnavailable
from ..stores.rediskeys import RedisKeys
from .keyindex import KeyIndex, ends_score, queue_indexed, read_records
from .keyrecord import KeyRecord as KeyRecord  # where every caller has always found it
from .quotaseed import forget_counters, newly_limited

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


class KeyStore:
    def __init__(self, store: Store, keys: RedisKeys, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        lua = resources.files("proxy") / "lua"
        self._set_fields = store.client.register_script((lua / "keyset.lua").read_text())
        self._claim = store.client.register_script((lua / "keyrotate.lua").read_text())
        self.index = KeyIndex(store, keys)  # pages of keys, per team too, and each team's working keys

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
        queue_indexed(pipe, self._keys, record)
        if record.lineage != record.id:  # a replacement: its usage counts in the chain's quota counters
            pipe.sadd(self._keys.lineage(record.lineage), record.id)

    async def lookup(self, digest: str) -> KeyRecord | None:
        """The record of the key whose SHA-256 is `digest`."""
        raw = await self._store.call("key-get", lambda r: r.hgetall(self._keys.key_record(digest)))
        return KeyRecord.from_redis(raw) if raw else None

    async def list(self, team: str | None = None) -> list[KeyRecord]:
        """Every readable record (of `team`: read through its index), oldest first, in pages (keyindex.py)."""
        return await self.index.all(team)

    async def records(self, ids: Collection[str]) -> dict[str, KeyRecord]:
        """The records of these key ids, by id (a usage report's names): a missing or unreadable one is left out.
        Two round trips, whatever the number of ids, and only these keys are read (never the whole index)."""
        records = await self._store.operator_call("key-list", functools.partial(read_records, keys=self._keys,
                                                                                ids=list(ids)))
        return {rec.id: rec for rec in records}

    async def get(self, key_id: str) -> KeyRecord | None:
        return await self._update(key_id, {})

    async def revoke(self, key_id: str) -> KeyRecord | None:
        return await self._update(key_id, {"revoked": "1"})

    async def set_limits(self, key_id: str, changes: dict[str, int | None]) -> KeyRecord | None:
        record = await self.get(key_id)
        if record is None:
            return None
        limits = record.limits.merged(changes)
        if names := newly_limited(record.limits, limits):  # its counter starts again from the ledger (quotaseed.py)
            await forget_counters(self._store, self._keys, record.team, record.quota_id, names, self._clock(),
                                  "key-update")
        return await self._update(key_id, limits.to_redis())

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
            # the old key now stops at its grace end; XX: a revocation that came first is not undone
            pipe.zadd(self._keys.team_live_keys(old.team), {old.id: ends_score(replace(old, grace_until=grace))},
                      xx=True)
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
            record = KeyRecord.from_redis(dict(zip(flat[::2], flat[1::2], strict=True)))
            if record.revoked:  # no longer among its team's working keys
                await r.zrem(self._keys.team_live_keys(record.team), record.id)
            return record

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
        # sha256 of the key -> the Redis read in flight for it: concurrent requests with a key not yet verified (a
        # client's burst, every worker's first requests) share one read and one pooled connection, not one each.
        self._reads: SingleFlight[str, KeyRecord | None] = SingleFlight()
        # Key changes heard so far, and when (in that count) each key, or every key, last changed: a read of a key
        # is not remembered when that key changed while it ran (another key's change leaves it alone).
        self._heard = 0
        self._all_changed = 0
        self._changed: dict[str, int] = {}

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
            heard = self._heard
            try:
                found = await self._read(digest)
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
                if max(self._all_changed, self._changed.get(digest, 0)) <= heard:  # unchanged since the read began
                    self._remember(digest, record, now)
        if record.revoked:
            raise AuthenticationFailed("This API key has been revoked.", code="api_key_revoked")
        if record.ends_at is not None and self._wall_clock() >= record.ends_at:
            raise AuthenticationFailed("This API key has expired.", code="api_key_expired")
        return record

    async def _read(self, digest: str) -> KeyRecord | None:
        """The key's record read from Redis, by one read shared with every request waiting for the same key (a
        request that gives up does not cancel it for the others)."""
        return await self._reads.run(digest, functools.partial(self._keystore.lookup, digest))

    def _remember(self, digest: str, record: KeyRecord, now: float) -> None:
        if len(self._verified) > 10_000:  # bounded: drop the oldest verifications
            for stale in sorted(self._verified, key=lambda k: self._verified[k][1])[:1000]:
                del self._verified[stale]
        self._verified[digest] = (record, now, now + self._cache_s)

    def offline_left_s(self) -> float:
        """How much longer this process can serve without Redis: until the last key it verified against Redis (and
        not revoked) leaves `offline_grace_s`. 0 when it never verified one, or the grace is over (readiness.py)."""
        last = max((at for record, at, _ in self._verified.values() if not record.revoked), default=-math.inf)
        return max(0.0, last + self._grace - self._clock())

    def forget(self, digest: str | None = None) -> None:
        """Read one key (None: every key) from Redis again on its next use. The records stay for outages. A read
        in flight may have been answered before the change: later requests start their own."""
        self._heard += 1
        if digest is None or len(self._changed) >= 10_000:  # bounded: as if every key changed
            self._changed.clear()
            self._all_changed = self._heard
        if digest is not None:
            self._changed[digest] = self._heard
        self._reads.forget(digest)
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
