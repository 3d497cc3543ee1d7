"""Where state and cache live: `[redis]` (the state store), `[cache_redis]` (the cache store, when apart) and
`[cache]` (how entries are keyed, kept and expired). Secrets are never read from a file (see loader.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .ranges import bounded

RedisType = Literal["single", "cluster", "sentinel"]


@dataclass(frozen=True)
class RedisSettings:
    # Empty: the embedded in-process store (one process, not durable). Overridden by REDIS_URL. Its form follows
    # `type`: single, a redis:// or rediss:// URL; cluster, comma-separated host:port seed nodes (or one node's
    # URL); sentinel, MASTER_NAME,host:port,host:port,... (the sentinels).
    url: str = ""
    # single | cluster | sentinel (overridden by REDIS_TYPE).
    type: RedisType = "single"
    # TLS to cluster nodes, or to the sentinels and the master (overridden by REDIS_TLS); single: use rediss://.
    tls: bool = False
    # `serve` refuses a state store whose maxmemory-policy is not noeviction (it could evict keys, limits and the
    # ledger); true accepts the risk ([redis] only).
    allow_evicting_state: bool = False
    # A Redis call slower than this counts as a failure: the request carries on without the cache.
    socket_timeout_s: float = bounded(0.25, 0, above=True)
    # Operator work (admin API, CLI, usage reports, ledger flushes) may take this long per Redis call; a slower
    # one fails that operation alone (admin 503, CLI error, flush retried later); the hot path is not affected.
    operator_timeout_s: float = bounded(5.0, 0, above=True)
    # After a failure, Redis is left alone for this long (requests bypass the cache), then tried again.
    retry_interval_s: float = bounded(1.0, 0)
    # Connections per Redis server; the key-change subscription holds one of them for good.
    max_connections: int = bounded(200, 2)
    # Secrets, from the environment only (REDIS_USERNAME, REDIS_PASSWORD, REDIS_SENTINEL_PASSWORD).
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    sentinel_password: str = field(default="", repr=False)


@dataclass(frozen=True)
class CacheSettings:
    # Entries expire this long after they were written (30 days); at most 100 years.
    ttl_s: int = bounded(30 * 24 * 3600, 1, 100 * 365 * 86400)
    # "shared": one cache for all teams (most hits); "team": one namespace per team (no cross-team probing).
    scope: Literal["shared", "team"] = "shared"
    # Prefix of every Redis key the proxy writes.
    key_prefix: str = "ep"
    # The in-process tier, per process: entries read from Redis are kept here too (least recently used evicted
    # beyond this size), so inputs asked for again are answered without a Redis round trip. 0 turns it off.
    local_max_mb: int = bounded(64, 0)
    # How long a local copy is used before Redis is asked again (bounds how long an entry deleted from Redis by
    # hand is still served; `cache purge` needs no wait: a purged model's keys change at once).
    local_ttl_s: float = bounded(600.0, 0, above=True)
    # Purges are announced over pub/sub; each process also re-reads the purge generations this often, which bounds
    # how long a lost announcement goes unnoticed (a purge then takes effect within this many seconds).
    generations_refresh_s: float = bounded(5.0, 0.1)
