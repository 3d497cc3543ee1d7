"""The whole configuration: `Settings`, made of each concern's section, and the sections with no part of their own
(`[server]`, `[keys]`, `[quotas]`, `[usage]`). Frozen: loaded once (loader.py) and never changed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .admin import AdminSettings
from .admission import AdmissionSettings
from .connections import ConnectionSettings
from .fleet import DeploymentSettings, ModelSettings, UpstreamSettings, deployments_of
from .limits import Limits
from .ranges import bounded
from .stores import CacheSettings, RedisSettings


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = bounded(8080, 0, 65535)  # 0: any free port (the kernel chooses)
    # Bodies larger than this are refused with 413 before they are parsed (below 1 KiB, ordinary requests would be).
    max_body_bytes: int = bounded(16 * 1024 * 1024, 1024)
    # One JSON line per request on stdout (see README, "Access log"); false turns it off.
    access_log: bool = True


@dataclass(frozen=True)
class KeySettings:
    # While Redis is unreachable, keys verified within this many seconds are still accepted; others are refused.
    offline_grace_s: float = bounded(120.0, 0)
    # A verified key is trusted this long without a Redis read. Changes (revoke, rotate, limits) are pushed to
    # every instance at once over pub/sub; this only bounds how long a lost message can go unnoticed.
    cache_s: float = bounded(2.0, 0)


@dataclass(frozen=True)
class QuotaSettings:
    # "billable": quotas count the tokens sent upstream (cache hits are free); "all": every prompt token.
    count: Literal["billable", "all"] = "billable"
    # Redis unreachable: "open" admits requests against the same limits kept in this process alone, each counter
    # starting from the last value this process saw in Redis (a window that holds an outage may admit up to
    # (N + 1) times a limit with N processes, see README); "closed" refuses them with 503.
    on_redis_down: Literal["open", "closed"] = "open"
    # Team limits changed at run time (CLI, admin API) reach every instance within this many seconds.
    team_cache_s: float = bounded(1.0, 0)


@dataclass(frozen=True)
class UsageSettings:
    # Usage is added up in each process and written to the Redis ledger this often (and at shutdown).
    flush_interval_s: float = bounded(1.0, 0.1)
    # Ledger days are kept this long (at most about 100 years: a far longer EXPIRE is a Redis error, and the ledger
    # script fails after writing).
    retention_days: int = bounded(400, 1, 100 * 366)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstreams: Mapping[str, UpstreamSettings] = field(default_factory=lambda: {"default": UpstreamSettings()})
    models: Mapping[str, ModelSettings] = field(default_factory=dict)
    redis: RedisSettings = field(default_factory=RedisSettings)
    # The cache store (`[cache_redis]`, CACHE_REDIS_URL): url empty means the cache lives in the state store.
    cache_redis: RedisSettings = field(default_factory=RedisSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    keys: KeySettings = field(default_factory=KeySettings)
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    usage: UsageSettings = field(default_factory=UsageSettings)
    # Client connections: header and body deadlines, keep-alive, the cap per process (connections.py).
    connections: ConnectionSettings = field(default_factory=ConnectionSettings)
    # The admission budget: bytes of requests and answers in flight per process (admission.py).
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    # Team quotas from `[teams.NAME]`; limits stored at run time (CLI, admin API) take precedence.
    teams: Mapping[str, Limits] = field(default_factory=dict)
    admin: AdminSettings = field(default_factory=AdminSettings)  # named admins, the audit log (admin.py)
    # Secrets, from the environment only.
    upstream_api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    admin_key: str = field(default="", repr=False)
    cache_secret: str = field(default="", repr=False)
    # /metrics answers only `Authorization: Bearer <this>` when set; unset, anyone who reaches the port reads it.
    metrics_token: str = field(default="", repr=False)
    source: str = "<defaults>"

    def upstream_for(self, model: str) -> UpstreamSettings:
        """The upstream of the model's first deployment (the only one in a single-upstream config)."""
        return self.upstreams[deployments_of(self.models[model])[0].upstream]

    def upstream_model(self, model: str, deployment: DeploymentSettings | None = None) -> str:
        if deployment is not None and deployment.upstream_model:
            return deployment.upstream_model
        return self.models[model].upstream_model or model
