"""Every Redis key the proxy uses, built in one place. Pure functions; the README documents the formats.

    {prefix}:emb:v2:s:{digest}         cache entry, shared scope (value: entrycodec.py)
    {prefix}:emb:v2:t:{team}:{digest}  cache entry, per-team scope
    {prefix}:key:{sha256(key)}         hash: one gateway key's record (the key itself is never stored)
    {prefix}:keyid:{key_id}            string: sha256 of the key with that id
    {prefix}:keys                      sorted set: key ids by creation time
    {prefix}:keys:changed              pub/sub channel: sha256 of a key whose record changed
    {prefix}:teamkeys:{{team}}         sorted set: that team's key ids by creation time (its page of `keys list`)
    {prefix}:teamlive:{{team}}         sorted set: that team's unrevoked key ids by when they stop working (+inf:
                                       never); ZCOUNT from now counts the keys that work
    {prefix}:keyteams                  set: teams that have keys
    {prefix}:meta:teamkeys-built       string: set once the two team indexes hold every key (proxy/accounts/
                                       keyindex.py builds them from `{prefix}:keys` when it is missing)
    {prefix}:meta:teamkeys-lock        string, with an expiry: the token of the one process building them
                                       (proxy/accounts/keyindexbuild.py)
    {prefix}:lineage:{lineage}         set: ids of the keys that replaced the first key of a rotation chain
                                       (its quota counters seed from their usage: proxy/accounts/quotaseed.py)
    {prefix}:cache-gen                 hash: purge generations, `m:{model}` and `t:{team}:{model}` -> generation
                                       (in the state store, and a copy in the cache store when it has its own)
    {prefix}:cache-gen:changed         pub/sub channel: `{generation} {field}` after a purge
    {prefix}:meta:cache-secret         string: the deployment's cache secret when PROXY_CACHE_SECRET is unset
    {prefix}:team:{team}               hash: a team's quota limits set at run time (CLI, admin API)
    {prefix}:teams                     set: names of teams with a stored record
    {prefix}:q:{{team}}:{scope}:{metric}:{window}
                                       string: a quota counter; scope `t` (the team's) or `k.{key_id}`,
                                       metric req|tok, window m{minutes since epoch}|d{YYYYMMDD}|mo{YYYYMM} (UTC);
                                       `{team}` is a Cluster hash tag: one request's counters share a slot
    {prefix}:usage:{team}:{YYYY-MM-DD} hash: the usage ledger; field {key_id}|{model}|{metric}
    {prefix}:usage-flushes:{{prefix}:usage:{team}:{YYYY-MM-DD}}
                                       hash: that ledger hash's flush marks, writer id -> last batch applied;
                                       the hash tag is the ledger key itself, so both share a Cluster slot
    {prefix}:usage-month:{team}:{YYYY-MM}
                                       hash: the month's roll-up, the sum of its ledger days; field as a day's
    {prefix}:usage-month-days:{{prefix}:usage-month:{team}:{YYYY-MM}}
                                       hash: the same month per day and model, field {YYYY-MM-DD}|{model}|{metric};
                                       `#{YYYY-MM-DD}|{writer}` -> that day's last batch rolled up, `#v` -> version
                                       (proxy/accounts/rollups.py); the hash tag puts both in one Cluster slot
    {prefix}:usage-teams               set: teams with ledger entries
    {prefix}:admin:{sha256(credential)} hash: one named admin's record (name, role, teams, created_at, revoked;
                                       the credential itself is never stored)
    {prefix}:adminname:{name}          string: sha256 of that admin's credential
    {prefix}:admins                    sorted set: admin names by creation time
    {prefix}:audit                     stream: the audit log, one entry per admin change or refusal
                                       (proxy/accounts/audit.py); trimmed by age alone
    {prefix}:session:{sha256(id)}      string: a console session of single sign-on (JSON: the principal, its CSRF
                                       token, its end); expires with it (proxy/accounts/sessions.py)
    {prefix}:dep:{{model}|{upstream}}  hash: one deployment's shared health (fails, cool, paused, probe_at,
                                       probe_until: Redis TIME seconds; proxy/stores/fleethealth.py), the hash tag
                                       the deployment itself
    {prefix}:lim:{{model}|{upstream}}  hash: one deployment's fleet-wide budget (requests and tokens reserved per
                                       second of the last minute, the announced budget, the instances that reserved;
                                       proxy/stores/fleetlimits.py), the hash tag the deployment's health hash's
    {prefix}:lim:{{model}|{upstream}}:f
                                       sorted set: its calls in flight fleet-wide (`lease|tokens|instance`, scored
                                       by when the lease expires)
    {prefix}:fleet:health              pub/sub channel: a deployment's health after each change (JSON)

`v2` is the entry layout's version: a version that cannot read a layout never reads its keys. The first layout
(4-byte count + raw vector) lived under `{prefix}:emb:s:` and `{prefix}:emb:t:`; those are never read any more.

`digest` is the 32-hex-digit xxh3-128 of `model NUL dimensions NUL kind NUL payload`, seeded with a 64-bit value
derived from the deployment's cache secret; `dimensions` is 0 when the client sent none, `kind` is `s` (payload:
the UTF-8 text) or `t` (payload: the token ids as little-endian uint32), followed by `:{input_type}` when the inputs
are embedded as a portable input type (`s:query`, `s:document`: a query and a document vector of one text are two
entries; without one the key is as it always was). A model with a `cache_revision` hashes
`model NUL revision` where `model` stands: bumping it leaves every old entry of the model unread. Once a model has
been purged, its generation follows: `model NUL revision NUL g{generation}` (proxy/stores/generations.py).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash


def seed_from_secret(secret: str) -> int:
    return int.from_bytes(hashlib.blake2b(secret.encode(), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=256)
def _prefix_state(seed: int, model: str, dimensions: int | None, kind: str, revision: str = "",
                  generation: str = "", input_type: str | None = None) -> Any:
    # The hasher after the (model, dimensions, kind) prefix, shared by requests alike: callers only copy it.
    # A model's cache_revision, then its purge generation, go after the model's name; without either the prefix
    # is as it always was (a model never purged keeps its keys).
    name = f"{model}\0{revision}" if revision else model
    if generation:
        name = f"{model}\0{revision}\0g{generation}"
    if input_type:  # the kind field is NUL-terminated: `s:query` can be no other key's prefix
        kind = f"{kind}:{input_type}"
    return xxhash.xxh3_128(f"{name}\0{dimensions or 0}\0{kind}\0".encode(), seed=seed)


class DigestBuilder:
    """Content hashes of one request's inputs: the (model, dimensions, kind, input type) prefix is hashed once."""

    def __init__(self, seed: int, model: str, dimensions: int | None, kind: str, revision: str = "",
                 generation: str = "", input_type: str | None = None) -> None:
        self._base = _prefix_state(seed, model, dimensions, kind, revision, generation, input_type)

    def text(self, value: str) -> str:
        h = self._base.copy()
        h.update(value.encode("utf-8"))
        return h.hexdigest()  # type: ignore[no-any-return,unused-ignore]

    def tokens(self, ids: Sequence[int]) -> str:
        h = self._base.copy()
        h.update(np.asarray(ids, dtype="<u4").tobytes())
        return h.hexdigest()  # type: ignore[no-any-return,unused-ignore]


class RedisKeys:
    def __init__(self, prefix: str = "ep") -> None:
        self.prefix = prefix

    def cache_namespace(self, team: str | None) -> str:
        """Prefix of cache keys: `team` None means the shared scope."""
        return f"{self.prefix}:emb:v2:s:" if team is None else f"{self.prefix}:emb:v2:t:{team}:"

    def key_record(self, key_hash: str) -> str:
        return f"{self.prefix}:key:{key_hash}"

    def key_id(self, key_id: str) -> str:
        return f"{self.prefix}:keyid:{key_id}"

    def key_index(self) -> str:
        return f"{self.prefix}:keys"

    def team_keys(self, team: str) -> str:
        return f"{self.prefix}:teamkeys:{{{team}}}"

    def team_live_keys(self, team: str) -> str:
        return f"{self.prefix}:teamlive:{{{team}}}"

    def key_teams(self) -> str:
        return f"{self.prefix}:keyteams"

    def team_keys_built(self) -> str:
        return f"{self.prefix}:meta:teamkeys-built"

    def team_keys_lock(self) -> str:
        return f"{self.prefix}:meta:teamkeys-lock"

    def lineage(self, lineage: str) -> str:
        return f"{self.prefix}:lineage:{lineage}"

    def key_changes(self) -> str:
        return f"{self.prefix}:keys:changed"

    def cache_generations(self) -> str:
        return f"{self.prefix}:cache-gen"

    def cache_generation_changes(self) -> str:
        return f"{self.prefix}:cache-gen:changed"

    def cache_secret(self) -> str:
        return f"{self.prefix}:meta:cache-secret"

    def team(self, team: str) -> str:
        return f"{self.prefix}:team:{team}"

    def teams(self) -> str:
        return f"{self.prefix}:teams"

    def quota_counter(self, team: str, key_id: str | None, metric: str, window: str) -> str:
        scope = "t" if key_id is None else f"k.{key_id}"
        return f"{self.prefix}:q:{{{team}}}:{scope}:{metric}:{window}"

    def usage(self, team: str, day: str) -> str:
        return f"{self.prefix}:usage:{team}:{day}"

    def usage_flushes(self, team: str, day: str) -> str:
        return f"{self.prefix}:usage-flushes:{{{self.usage(team, day)}}}"

    def usage_month(self, team: str, month: str) -> str:
        return f"{self.prefix}:usage-month:{team}:{month}"

    def usage_month_days(self, team: str, month: str) -> str:
        return f"{self.prefix}:usage-month-days:{{{self.usage_month(team, month)}}}"

    def usage_teams(self) -> str:
        return f"{self.prefix}:usage-teams"

    def admin_record(self, digest: str) -> str:
        return f"{self.prefix}:admin:{digest}"

    def admin_name(self, name: str) -> str:
        return f"{self.prefix}:adminname:{name}"

    def admin_index(self) -> str:
        return f"{self.prefix}:admins"

    def audit_log(self) -> str:
        return f"{self.prefix}:audit"

    def session(self, digest: str) -> str:
        return f"{self.prefix}:session:{digest}"

    def deployment_health(self, model: str, upstream: str) -> str:
        return f"{self.prefix}:dep:{{{model}|{upstream}}}"

    def deployment_limits(self, model: str, upstream: str) -> str:
        return f"{self.prefix}:lim:{{{model}|{upstream}}}"

    def deployment_health_changes(self) -> str:
        return f"{self.prefix}:fleet:health"
