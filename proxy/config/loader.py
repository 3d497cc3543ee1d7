"""The loader: a TOML file plus the environment into `Settings`, section by section, or one ConfigError.

Each section is built strictly (tables.py), then checked against the others (a model's deployments name known
upstreams; the cache store needs a state store). Secrets come only from the environment: `UPSTREAM_API_KEY` (or
the variable an upstream's `api_key_env` names), `PROXY_ADMIN_KEY`, `PROXY_CACHE_SECRET`, `PROXY_METRICS_TOKEN`,
`REDIS_PASSWORD` and the other Redis credentials (see `_redis`). The first error found is the one reported.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .admin import build_admin
from .admission import AdmissionSettings
from .connections import ConnectionSettings
from .errors import ConfigError
from .fleet import DeploymentSettings, ModelSettings, UpstreamSettings
from .limits import TEAM_RE, Limits
from .modelchecks import check_model_providers, provider_upstream
from .providers import DEFAULT_BASE_URLS
from .settings import KeySettings, QuotaSettings, ServerSettings, Settings, UsageSettings
from .stores import CacheSettings, RedisSettings, RedisType
from .tables import build_table, build_tables, check_value
from .validation import ENV_NAME_RE, MODEL_NAME_RE, check_azure_deployment, check_http_url, resolve_tokenizer

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
SECTIONS = frozenset({"server", "upstreams", "models", "redis", "cache_redis", "cache", "keys", "quotas", "usage",
                      "teams", "connections", "admission", "admin"})


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
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read: not UTF-8 (byte {exc.start}); TOML files are UTF-8") from exc
    return parse(text, path, env)


def parse(text: str, source: str, env: Mapping[str, str]) -> Settings:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    unknown = set(raw) - SECTIONS
    if unknown:
        raise ConfigError(f"{source}: unknown section [{sorted(unknown)[0]}] (known: {', '.join(sorted(SECTIONS))})")
    models_raw = raw.get("models") or tomllib.loads(DEFAULT_MODELS_TOML)["models"]
    upstreams = _upstreams(raw.get("upstreams", {"default": {}}), source, env)
    if not isinstance(models_raw, dict):
        raise ConfigError(f"{source}: [models] must be a table of tables")
    models = {name: _model(name, body, upstreams, source) for name, body in models_raw.items()}
    redis, cache_redis = _stores(raw, source, env)
    teams = build_tables(raw.get("teams", {}), "teams", Limits, source)  # a limit below 1: omit it (unlimited)
    for name in teams:
        if not TEAM_RE.fullmatch(name):
            raise ConfigError(f"{source}: teams.{name}: team names are 1-63 characters of a-z, 0-9, '_', '.', '-'")
    cache = build_table(CacheSettings, raw.get("cache", {}), "cache", source)
    if "{" in cache.key_prefix or "}" in cache.key_prefix:
        raise ConfigError(f"{source}: cache.key_prefix must not contain '{{' or '}}': on a Redis Cluster the keys' "
                          "hash tags keep each script's keys in one slot, and braces in the prefix would change them")
    return Settings(
        server=build_table(ServerSettings, raw.get("server", {}), "server", source),
        upstreams=types.MappingProxyType(upstreams),
        models=types.MappingProxyType(models),
        redis=redis,
        cache_redis=cache_redis,
        cache=cache,
        keys=build_table(KeySettings, raw.get("keys", {}), "keys", source),
        quotas=build_table(QuotaSettings, raw.get("quotas", {}), "quotas", source),
        usage=build_table(UsageSettings, raw.get("usage", {}), "usage", source),
        connections=build_table(ConnectionSettings, raw.get("connections", {}), "connections", source),
        admission=build_table(AdmissionSettings, raw.get("admission", {}), "admission", source),
        teams=types.MappingProxyType(teams),
        admin=build_admin(raw.get("admin", {}), source, env),
        upstream_api_keys=types.MappingProxyType(
            {name: env.get(u.api_key_env, "") for name, u in upstreams.items()}
        ),
        admin_key=env.get("PROXY_ADMIN_KEY", ""),
        cache_secret=env.get("PROXY_CACHE_SECRET", ""),
        metrics_token=env.get("PROXY_METRICS_TOKEN", ""),
        source=source,
    )


def _upstreams(raw: Any, source: str, env: Mapping[str, str]) -> dict[str, UpstreamSettings]:
    """`[upstreams.NAME]`, always with a "default" one (UPSTREAM_BASE_URL overrides its base_url)."""
    upstreams = build_tables(raw, "upstreams", UpstreamSettings, source)
    for name, u in upstreams.items():
        if u.kind in DEFAULT_BASE_URLS:
            upstreams[name] = provider_upstream(name, u, raw[name], source)
    upstreams.setdefault("default", UpstreamSettings())
    if env.get("UPSTREAM_BASE_URL"):
        upstreams["default"] = dataclasses.replace(upstreams["default"], base_url=env["UPSTREAM_BASE_URL"])
    for name, u in upstreams.items():
        from_env = name == "default" and bool(env.get("UPSTREAM_BASE_URL"))
        check_http_url(u.base_url,
                       "environment: UPSTREAM_BASE_URL" if from_env else f"{source}: upstreams.{name}.base_url")
        if u.api_key_env and not ENV_NAME_RE.fullmatch(u.api_key_env):
            raise ConfigError(f"{source}: upstreams.{name}.api_key_env must name an environment variable (A-Z, a-z, "
                              f"0-9, '_', not starting with a digit), or be \"\" for an upstream without a key, "
                              f"not {u.api_key_env!r}")
        if u.kind == "azure" and not u.api_version:
            raise ConfigError(f"{source}: upstreams.{name}.api_version is required with kind = \"azure\"")
    return upstreams


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
    m: ModelSettings = build_table(ModelSettings, raw, where, source)
    if deployments_raw is None:
        deployments = [DeploymentSettings(m.upstream, m.upstream_model)]
        key = f"{where}.upstream"
    else:
        if "upstream" in raw:
            raise ConfigError(f"{source}: {where}: give either upstream or deployments, not both")
        if not isinstance(deployments_raw, list) or not deployments_raw:
            raise ConfigError(f"{source}: {where}.deployments must be a non-empty array of tables")
        deployments = [build_table(DeploymentSettings, d, f"{where}.deployments[{i}]", source)
                       for i, d in enumerate(deployments_raw)]
        key = f"{where}.deployments"
    seen = set()
    for i, d in enumerate(deployments):
        at = key if deployments_raw is None else f"{key}[{i}]"
        if d.upstream not in upstreams:
            raise ConfigError(f"{source}: {at}.upstream names unknown upstream {d.upstream!r}"
                              f" (known: {', '.join(sorted(upstreams))})")
        if d.upstream in seen:
            raise ConfigError(f"{source}: {at}: upstream {d.upstream!r} is listed twice")
        seen.add(d.upstream)
        if upstreams[d.upstream].kind == "azure":
            check_azure_deployment(d.upstream_model or m.upstream_model or name,
                                   f"{at}.upstream_model" if d.upstream_model else f"{where}.upstream_model", source)
    tokenizer = resolve_tokenizer(m.tokenizer, f"{where}.tokenizer", source)
    if not m.count_special_tokens and not tokenizer.startswith("hf:"):
        raise ConfigError(f"{source}: {where}.count_special_tokens: only for an \"hf:\" tokenizer ({tokenizer} adds no "
                          "special tokens)")
    m = check_model_providers(m, raw, [(upstreams[d.upstream].kind, d.upstream_model or m.upstream_model or name)
                                       for d in deployments], where, source)
    # Left empty for `upstream = "NAME"` (see deployments_of), so such a model reads as it always did.
    return dataclasses.replace(m, deployments=tuple(deployments) if deployments_raw is not None else (),
                               tokenizer=tokenizer)


def _stores(raw: dict[str, Any], source: str, env: Mapping[str, str]) -> tuple[RedisSettings, RedisSettings]:
    """The state store (`[redis]`) and the cache store (`[cache_redis]`; its url empty when it is the state
    store)."""
    redis = _redis(raw.get("redis", {}), "redis", "REDIS_", source, env)
    cache_redis = _redis(raw.get("cache_redis", {}), "cache_redis", "CACHE_REDIS_", source, env)
    if cache_redis.allow_evicting_state:
        raise ConfigError(f"{source}: cache_redis.allow_evicting_state: only [redis] holds state")
    if cache_redis.url and not redis.url:
        raise ConfigError(f"{source}: CACHE_REDIS_URL (cache_redis.url) needs REDIS_URL too: the keys, quotas and "
                          "ledger cannot live in the embedded in-process store while the cache is shared")
    if cache_redis.url and _same_redis(redis, cache_redis):
        cache_redis = dataclasses.replace(cache_redis, url="")  # one store, checked and used as the shared one
    return redis, cache_redis


_REDIS_SECRETS = {"username": "USERNAME", "password": "PASSWORD", "sentinel_password": "SENTINEL_PASSWORD"}


def _redis(raw: Any, section: str, env_prefix: str, source: str, env: Mapping[str, str]) -> RedisSettings:
    """`[redis]` or `[cache_redis]`, then its environment variables (REDIS_URL, CACHE_REDIS_URL, ...)."""
    for name, var in _REDIS_SECRETS.items():
        if isinstance(raw, dict) and name in raw:
            raise ConfigError(f"{source}: {section}.{name} is a secret: set {env_prefix}{var} in the environment")
    settings: RedisSettings = build_table(RedisSettings, raw, section, source)
    changes: dict[str, Any] = {name: env[env_prefix + var] for name, var in _REDIS_SECRETS.items()
                               if env.get(env_prefix + var)}
    if env_prefix + "URL" in env:
        changes["url"] = env[env_prefix + "URL"]
    if env.get(env_prefix + "TYPE"):
        changes["type"] = check_value(RedisType, env[env_prefix + "TYPE"], env_prefix + "TYPE", "environment")
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
