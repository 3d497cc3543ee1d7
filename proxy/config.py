"""Settings: loaded once from TOML plus the environment into frozen, typed objects.

Unknown keys are refused and every error names the file and the key. Defaults sit next to the fields. Secrets come
only from the environment: `UPSTREAM_API_KEY` (or the variable an upstream's `api_key_env` names),
`PROXY_ADMIN_KEY`, `PROXY_CACHE_SECRET`, `PROXY_METRICS_TOKEN`, `REDIS_PASSWORD` and the other Redis credentials
(see `_redis`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .limits import TEAM_RE, Limits
from .tokens import PUBLISHED_SHA256, TokenizerError, load_hf_tokenizer

DEFAULT_MODELS_TOML = """
[models."text-embedding-3-small"]
dimensions = 1536
supports_dimensions = true
price_per_million_tokens = 0.02

[models."text-embedding-3-large"]
dimensions = 3072
supports_dimensions = true
price_per_million_tokens = 0.13

[models."text-embedding-ada-002"]
dimensions = 1536
supports_dimensions = false
price_per_million_tokens = 0.10
"""


class ConfigError(ValueError):
    """A configuration file or variable is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Bodies larger than this are refused with 413 before they are parsed.
    max_body_bytes: int = 16 * 1024 * 1024
    # One JSON line per request on stdout (see README, "Access log"); false turns it off.
    access_log: bool = True


@dataclass(frozen=True)
class UpstreamSettings:
    # "openai": POST {base_url}/embeddings with `Authorization: Bearer`; "azure": POST
    # {base_url}/openai/deployments/{upstream_model}/embeddings?api-version={api_version} with an `api-key` header.
    kind: Literal["openai", "azure"] = "openai"
    base_url: str = "https://api.openai.com/v1"
    # Azure OpenAI's `api-version` (required with kind = "azure").
    api_version: str = ""
    # Name of the environment variable that holds this upstream's key (never put the key itself in a file).
    api_key_env: str = "UPSTREAM_API_KEY"
    # One client request may wait this long for the upstream in total, retries included; then 504.
    deadline_s: float = 30.0
    # One attempt is abandoned after this long and retried if the deadline allows.
    attempt_timeout_s: float = 10.0
    # Retries after the first attempt for connection errors, timeouts, 429 and 5xx.
    max_retries: int = 3
    # Exponential backoff base; each wait is uniform in [0, base * 2**attempt] (full jitter), capped at 5 s.
    backoff_base_s: float = 0.1
    # Upstream calls in flight per process; further calls wait (inside their deadline) for a free slot.
    max_concurrency: int = 64
    # Idle keep-alive connections kept per process.
    pool_size: int = 100
    # This many consecutive failed attempts on one deployment (5xx, timeout, connection error, malformed answer)
    # take it out of rotation for cooldown_s; its first call after that decides whether it is back. A model's only
    # deployment is never taken out: there is nowhere else to send its calls, so they retry as before.
    allowed_fails: int = 3
    cooldown_s: float = 30.0
    # A call the upstream's last x-ratelimit-* headers say will not fit may wait this long for the reset (inside
    # its deadline) when no other deployment has room; beyond that the proxy answers 429 itself.
    max_queue_wait_s: float = 10.0


@dataclass(frozen=True)
class DeploymentSettings:
    """One upstream serving a model: `deployments = [{ upstream = "NAME", ... }]` in the model's table."""

    upstream: str
    # The model name sent upstream (for Azure: the deployment name); empty: the model's `upstream_model`.
    upstream_model: str = ""
    # Share of the model's traffic among the healthy deployments of the same priority.
    weight: float = 1.0
    # 0 is preferred; a higher priority gets traffic only while no deployment of a lower one can take the call.
    priority: int = 0


@dataclass(frozen=True)
class ModelSettings:
    # Native vector size; answers of any other size are refused and never cached.
    dimensions: int
    # Whether clients may ask for `dimensions` (text-embedding-3 and later).
    supports_dimensions: bool = False
    # Which `[upstreams.NAME]` serves this model.
    upstream: str = "default"
    # The model name sent upstream (for example an Azure deployment name); defaults to the model's own name.
    upstream_model: str = ""
    # Tokenizer for local counts: "cl100k_base" (exact for OpenAI embedding models) or "hf:PATH" (a Hugging Face
    # tokenizer.json, for self-hosted models; special tokens counted, as TEI and Infinity report usage).
    tokenizer: str = "cl100k_base"
    # Ask the upstream for base64 so vectors stay float32-exact; false for upstreams that only speak float.
    upstream_base64: bool = True
    # What one upstream request may carry; misses are split into as few requests as these allow.
    max_batch_items: int = 2048
    max_batch_tokens: int = 300_000
    # Misses of concurrent requests share upstream calls (README "Micro-batching"); false: each request's misses go
    # in calls of their own, as before micro-batching.
    micro_batching: bool = True
    # Client limits, checked before anything goes upstream (400 when exceeded).
    max_input_tokens: int = 8192
    max_request_tokens: int = 300_000
    # What the upstream charges, in USD per million tokens: prices the usage ledger and the cache's savings.
    price_per_million_tokens: float = 0.0
    # Part of every cache key of this model: bump it when the model behind the name changes.
    cache_revision: str = ""
    # Where the model is served (see deployments_of); empty: `upstream` (with `upstream_model`) alone.
    deployments: tuple[DeploymentSettings, ...] = ()


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
    socket_timeout_s: float = 0.25
    # Operator work (admin API, CLI, usage reports, ledger flushes) may take this long per Redis call; a slower
    # one fails that operation alone (admin 503, CLI error, flush retried later); the hot path is not affected.
    operator_timeout_s: float = 5.0
    # After a failure, Redis is left alone for this long (requests bypass the cache), then tried again.
    retry_interval_s: float = 1.0
    max_connections: int = 200
    # Secrets, from the environment only (REDIS_USERNAME, REDIS_PASSWORD, REDIS_SENTINEL_PASSWORD).
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    sentinel_password: str = field(default="", repr=False)


@dataclass(frozen=True)
class CacheSettings:
    # Entries expire this long after they were written (30 days).
    ttl_s: int = 30 * 24 * 3600
    # "shared": one cache for all teams (most hits); "team": one namespace per team (no cross-team probing).
    scope: Literal["shared", "team"] = "shared"
    # Prefix of every Redis key the proxy writes.
    key_prefix: str = "ep"
    # The in-process tier, per process: entries read from Redis are kept here too (least recently used evicted
    # beyond this size), so inputs asked for again are answered without a Redis round trip. 0 turns it off.
    local_max_mb: int = 64
    # How long a local copy is used before Redis is asked again (bounds how long an entry deleted from Redis by
    # hand is still served; `cache purge` needs no wait: a purged model's keys change at once).
    local_ttl_s: float = 600.0
    # Purges are announced over pub/sub; each process also re-reads the purge generations this often, which bounds
    # how long a lost announcement goes unnoticed (a purge then takes effect within this many seconds).
    generations_refresh_s: float = 5.0


@dataclass(frozen=True)
class KeySettings:
    # While Redis is unreachable, keys verified within this many seconds are still accepted; others are refused.
    offline_grace_s: float = 120.0
    # A verified key is trusted this long without a Redis read. Changes (revoke, rotate, limits) are pushed to
    # every instance at once over pub/sub; this only bounds how long a lost message can go unnoticed.
    cache_s: float = 2.0


@dataclass(frozen=True)
class QuotaSettings:
    # "billable": quotas count the tokens sent upstream (cache hits are free); "all": every prompt token.
    count: Literal["billable", "all"] = "billable"
    # Redis unreachable: "open" admits requests against the same limits kept in this process alone, each counter
    # starting from the last value this process saw in Redis (a window that holds an outage may admit up to
    # (N + 1) times a limit with N processes, see README); "closed" refuses them with 503.
    on_redis_down: Literal["open", "closed"] = "open"
    # Team limits changed at run time (CLI, admin API) reach every instance within this many seconds.
    team_cache_s: float = 1.0


@dataclass(frozen=True)
class UsageSettings:
    # Usage is added up in each process and written to the Redis ledger this often (and at shutdown).
    flush_interval_s: float = 1.0
    # Ledger days are kept this long.
    retention_days: int = 400


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
    # Team quotas from `[teams.NAME]`; limits stored at run time (CLI, admin API) take precedence.
    teams: Mapping[str, Limits] = field(default_factory=dict)
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


def deployments_of(spec: ModelSettings) -> tuple[DeploymentSettings, ...]:
    """Where a model is served: its `deployments`, or the one its `upstream` names."""
    return spec.deployments or (DeploymentSettings(spec.upstream, spec.upstream_model),)


def _build(cls: type[Any], raw: Any, where: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(f"{source}: unknown key {where}.{sorted(unknown)[0]} (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        values[name] = _check(hints[name], value, f"{where}.{name}", source)
    for f in dataclasses.fields(cls):
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {where}.{f.name} is required")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{source}: [{where}] {exc}") from exc


def _check(hint: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is types.UnionType:  # `int | None`: TOML has no null, so a present value is the other type
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{source}: {key} must be one of {typing.get_args(hint)}, not {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{source}: {key} must be {getattr(hint, '__name__', hint)}, not {value!r}")
    if hint is float and not math.isfinite(value):  # TOML has nan and inf; no setting means either
        raise ConfigError(f"{source}: {key} must be a finite number, not {value!r}")
    if hint in (int, float) and value < 0:
        raise ConfigError(f"{source}: {key} must not be negative")
    return value


def _tables(raw: Any, key: str, cls: type[Any], source: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{key}] must be a table of tables")
    return {name: _build(cls, body, f"{key}.{name}", source) for name, body in raw.items()}


_REDIS_SECRETS = {"username": "USERNAME", "password": "PASSWORD", "sentinel_password": "SENTINEL_PASSWORD"}


def _redis(raw: Any, section: str, env_prefix: str, source: str, env: Mapping[str, str]) -> RedisSettings:
    """`[redis]` or `[cache_redis]`, then its environment variables (REDIS_URL, CACHE_REDIS_URL, ...)."""
    for name, var in _REDIS_SECRETS.items():
        if isinstance(raw, dict) and name in raw:
            raise ConfigError(f"{source}: {section}.{name} is a secret: set {env_prefix}{var} in the environment")
    settings: RedisSettings = _build(RedisSettings, raw, section, source)
    changes: dict[str, Any] = {name: env[env_prefix + var] for name, var in _REDIS_SECRETS.items()
                               if env.get(env_prefix + var)}
    if env_prefix + "URL" in env:
        changes["url"] = env[env_prefix + "URL"]
    if env.get(env_prefix + "TYPE"):
        changes["type"] = _check(RedisType, env[env_prefix + "TYPE"], env_prefix + "TYPE", "environment")
    if env.get(env_prefix + "TLS"):
        tls = env[env_prefix + "TLS"].strip().lower()
        if tls not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"environment: {env_prefix}TLS must be true or false, not {env[env_prefix + 'TLS']!r}")
        changes["tls"] = tls in ("true", "1", "yes")
    return dataclasses.replace(settings, **changes)


def _same_redis(a: RedisSettings, b: RedisSettings) -> bool:
    """Whether two settings name the same Redis (the URL written alike, up to order, a trailing slash and db 0)."""
    def form(s: RedisSettings) -> tuple[str, list[str]]:
        items = [re.sub(r"/(0)?$", "", i.strip()) for i in s.url.split(",") if i.strip()]
        return s.type, (items[:1] + sorted(items[1:]) if s.type == "sentinel" else sorted(items))
    return form(a) == form(b)


# Model names go into ledger fields (`key|model|metric`), key records (`a,b`) and metric labels.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,127}")


def _model(name: str, raw: Any, upstreams: Mapping[str, UpstreamSettings], source: str) -> ModelSettings:
    where = f"models.{name}"
    if not MODEL_NAME_RE.fullmatch(name):
        raise ConfigError(f"{source}: [{where}]: a model name is 1-128 characters of A-Z, a-z, 0-9 and . _ : / @ + = "
                          "-, starting with a letter or digit (no spaces, '|' or ',': the ledger and key records use "
                          "them)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{where}] must be a table")
    raw = dict(raw)
    deployments_raw = raw.pop("deployments", None)
    m: ModelSettings = _build(ModelSettings, raw, where, source)
    if m.dimensions < 1 or m.max_batch_items < 1 or m.max_input_tokens < 1:
        raise ConfigError(f"{source}: {where}: dimensions and limits must be positive")
    if deployments_raw is None:
        deployments = [DeploymentSettings(m.upstream, m.upstream_model)]
        key = f"{where}.upstream"
    else:
        if "upstream" in raw:
            raise ConfigError(f"{source}: {where}: give either upstream or deployments, not both")
        if not isinstance(deployments_raw, list) or not deployments_raw:
            raise ConfigError(f"{source}: {where}.deployments must be a non-empty array of tables")
        deployments = [_build(DeploymentSettings, d, f"{where}.deployments[{i}]", source)
                       for i, d in enumerate(deployments_raw)]
        key = f"{where}.deployments"
    seen = set()
    for i, d in enumerate(deployments):
        at = key if deployments_raw is None else f"{key}[{i}]"
        if d.upstream not in upstreams:
            raise ConfigError(f"{source}: {at}.upstream names unknown upstream {d.upstream!r}"
                              f" (known: {', '.join(sorted(upstreams))})")
        if d.weight <= 0:
            raise ConfigError(f"{source}: {at}.weight must be positive, not {d.weight:g}")
        if d.upstream in seen:
            raise ConfigError(f"{source}: {at}: upstream {d.upstream!r} is listed twice")
        seen.add(d.upstream)
        if upstreams[d.upstream].kind == "azure":
            _azure_deployment(d.upstream_model or m.upstream_model or name,
                              f"{at}.upstream_model" if d.upstream_model else f"{where}.upstream_model", source)
    tokenizer = _tokenizer(m.tokenizer, f"{where}.tokenizer", source)
    # Left empty for `upstream = "NAME"` (see deployments_of), so such a model reads as it always did.
    return dataclasses.replace(m, deployments=tuple(deployments) if deployments_raw is not None else (),
                               tokenizer=tokenizer)


# An Azure deployment name goes into the URL's path: nothing that could leave its segment ('/', '..', '?', '%').
AZURE_DEPLOYMENT_RE = re.compile(r"(?!\.+$)[A-Za-z0-9._-]+")


def _azure_deployment(value: str, key: str, source: str) -> None:
    if not AZURE_DEPLOYMENT_RE.fullmatch(value):
        raise ConfigError(f"{source}: {key}: the Azure deployment name {value!r} must be A-Z, a-z, 0-9, '.', '_' "
                          "and '-', not dots alone (it is part of the URL's path): set upstream_model to the "
                          "deployment's name")


def _tokenizer(value: str, key: str, source: str) -> str:
    """The tokenizer setting with an "hf:" path made absolute (relative paths start at the config file)."""
    if not value.startswith("hf:"):
        if value not in PUBLISHED_SHA256:
            raise ConfigError(f"{source}: {key} must be one of {sorted(PUBLISHED_SHA256)} or \"hf:PATH\", "
                              f"not {value!r}")
        return value
    path = Path(value[3:]).expanduser()
    if not path.is_absolute() and not source.startswith("<"):
        path = Path(source).parent / path
    try:
        load_hf_tokenizer(str(path))
    except TokenizerError as exc:
        raise ConfigError(f"{source}: {key}: {exc}") from exc
    return f"hf:{path}"


def parse(text: str, source: str, env: Mapping[str, str]) -> Settings:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    known = {"server", "upstreams", "models", "redis", "cache_redis", "cache", "keys", "quotas", "usage", "teams"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{source}: unknown section [{sorted(unknown)[0]}] (known: {', '.join(sorted(known))})")
    models_raw = raw.get("models") or tomllib.loads(DEFAULT_MODELS_TOML)["models"]
    upstreams = _tables(raw.get("upstreams", {"default": {}}), "upstreams", UpstreamSettings, source)
    upstreams.setdefault("default", UpstreamSettings())
    if env.get("UPSTREAM_BASE_URL"):
        upstreams["default"] = dataclasses.replace(upstreams["default"], base_url=env["UPSTREAM_BASE_URL"])
    for name, u in upstreams.items():
        if u.kind == "azure" and not u.api_version:
            raise ConfigError(f"{source}: upstreams.{name}.api_version is required with kind = \"azure\"")
        if u.allowed_fails < 1:
            raise ConfigError(f"{source}: upstreams.{name}.allowed_fails must be at least 1")
    if not isinstance(models_raw, dict):
        raise ConfigError(f"{source}: [models] must be a table of tables")
    models = {name: _model(name, body, upstreams, source) for name, body in models_raw.items()}
    redis = _redis(raw.get("redis", {}), "redis", "REDIS_", source, env)
    cache_redis = _redis(raw.get("cache_redis", {}), "cache_redis", "CACHE_REDIS_", source, env)
    if cache_redis.allow_evicting_state:
        raise ConfigError(f"{source}: cache_redis.allow_evicting_state: only [redis] holds state")
    if cache_redis.url and not redis.url:
        raise ConfigError(f"{source}: CACHE_REDIS_URL (cache_redis.url) needs REDIS_URL too: the keys, quotas and "
                          "ledger cannot live in the embedded in-process store while the cache is shared")
    if cache_redis.url and _same_redis(redis, cache_redis):
        cache_redis = dataclasses.replace(cache_redis, url="")  # one store, checked and used as the shared one
    teams = _tables(raw.get("teams", {}), "teams", Limits, source)
    for name, limits in teams.items():
        if not TEAM_RE.fullmatch(name):
            raise ConfigError(f"{source}: teams.{name}: team names are 1-63 characters of a-z, 0-9, '_', '.', '-'")
        for limit, value in limits.items():
            if value < 1:
                raise ConfigError(f"{source}: teams.{name}.{limit} must be a positive integer (omit it: unlimited)")
    cache = _build(CacheSettings, raw.get("cache", {}), "cache", source)
    if "{" in cache.key_prefix or "}" in cache.key_prefix:
        raise ConfigError(f"{source}: cache.key_prefix must not contain '{{' or '}}': on a Redis Cluster the keys' "
                          "hash tags keep each script's keys in one slot, and braces in the prefix would change them")
    if cache.generations_refresh_s < 0.1:
        raise ConfigError(f"{source}: cache.generations_refresh_s must be at least 0.1")
    return Settings(
        server=_build(ServerSettings, raw.get("server", {}), "server", source),
        upstreams=types.MappingProxyType(upstreams),
        models=types.MappingProxyType(models),
        redis=redis,
        cache_redis=cache_redis,
        cache=cache,
        keys=_build(KeySettings, raw.get("keys", {}), "keys", source),
        quotas=_build(QuotaSettings, raw.get("quotas", {}), "quotas", source),
        usage=_build(UsageSettings, raw.get("usage", {}), "usage", source),
        teams=types.MappingProxyType(teams),
        upstream_api_keys=types.MappingProxyType(
            {name: env.get(u.api_key_env, "") for name, u in upstreams.items()}
        ),
        admin_key=env.get("PROXY_ADMIN_KEY", ""),
        cache_secret=env.get("PROXY_CACHE_SECRET", ""),
        metrics_token=env.get("PROXY_METRICS_TOKEN", ""),
        source=source,
    )


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `path` (or $PROXY_CONFIG; none: built-in defaults) and the environment."""
    env = os.environ if env is None else env
    path = path or env.get("PROXY_CONFIG") or None
    if path is None:
        return parse("", "<defaults>", env)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse(text, path, env)
