"""Readiness (`GET /readyz`): whether this process can serve, not whether a dependency every pod shares is up.

Kubernetes takes a pod that is not ready out of its Service. The state store (Redis) is shared by every pod, so a
probe that failed with it would empty the Service during a Redis outage, although each process goes on serving the
keys it verified within `keys.offline_grace_s` (quotas per process, or refused with 503 under
`quotas.on_redis_down = "closed"`; the cache bypassed). So:

- 200 `state_store: "ok"` (or `"embedded"`): Redis answers.
- 200 `state_store: "degraded"`: Redis does not answer, and some key this process verified against it is still
  within the offline grace; `offline_grace_left_s` says for how long.
- 503 `state_store: "unavailable"`: Redis does not answer and no key would be accepted: this process never
  verified one (it started during the outage, or had no traffic yet), or the grace is over.
- 503 also when no model has a deployment whose upstream can be called (its key variable unset). Only upstreams
  some model uses count: an upstream no model names is never called (the built-in `default` one included).

The cache store, when it is a store of its own, is reported but never decides: without it requests go upstream.
`check-config` reports the same upstream problems as warnings (`upstream_problems`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..accounts.keys import Authenticator
from ..config import Settings, deployments_of, public_url
from ..stores.guard import Store

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def upstreams_in_use(settings: Settings) -> dict[str, list[str]]:
    """Each upstream some model's deployments name, with those models, in the config's order."""
    used: dict[str, list[str]] = {}
    for model, spec in settings.models.items():
        for d in deployments_of(spec):
            used.setdefault(d.upstream, []).append(model)
    return used


def upstream_problems(settings: Settings) -> dict[str, str]:
    """Upstream name -> why it cannot be called, for the upstreams in use. A key variable that is unset is a
    problem unless the upstream is on this machine (a keyless local server; `api_key_env = ""` says so anywhere)."""
    problems = {}
    for name in upstreams_in_use(settings):
        up = settings.upstreams[name]
        host = urlsplit(up.base_url).hostname
        if up.api_key_env and not settings.upstream_api_keys.get(name) and host not in _LOOPBACK:
            problems[name] = (f"upstream {name}: ${up.api_key_env} is not set (set it, or api_key_env = \"\" for a "
                              "server without a key)")
    return problems


def servable_models(settings: Settings, problems: Mapping[str, str]) -> list[str]:
    """The models with at least one deployment whose upstream can be called."""
    return [model for model, spec in settings.models.items()
            if any(d.upstream not in problems for d in deployments_of(spec))]


def described_upstreams(settings: Settings) -> list[str]:
    """One line per upstream in use, for `check-config`: its URL without credentials, key variable and models."""
    lines = []
    for name, models in upstreams_in_use(settings).items():
        up = settings.upstreams[name]
        key = "no key" if not up.api_key_env else \
            f"key ${up.api_key_env} {'set' if settings.upstream_api_keys.get(name) else 'NOT SET'}"
        lines.append(f"upstream {name}: {up.kind} {public_url(up.base_url)} ({key}); models: {', '.join(models)}")
    return lines


async def readiness(settings: Settings, store: Store, cache_store: Store, auth: Authenticator
                    ) -> tuple[int, dict[str, Any]]:
    """The status and body of /readyz (see the module's docstring)."""
    reasons: list[str] = []
    reachable = await store.ping()
    body: dict[str, Any] = {"status": "ready"}
    if store.embedded:
        body["state_store"] = "embedded"
    elif reachable:
        body["state_store"] = "ok"
    elif (left := auth.offline_left_s()) > 0:
        body["state_store"] = "degraded"
        body["offline_grace_left_s"] = round(left, 1)
        body["quotas"] = "refused" if settings.quotas.on_redis_down == "closed" else "per process"
    else:
        body["state_store"] = "unavailable"
        reasons.append("the state store is unreachable and no key this process verified is within "
                       "keys.offline_grace_s (none verified since start, or the grace is over)")
    # the field earlier versions answered, kept for probes and dashboards that read it
    body["redis"] = "embedded" if store.embedded else ("ok" if reachable else "unreachable")
    problems = upstream_problems(settings)
    body["upstream"] = list(problems.values()) or "ok"
    if not servable_models(settings, problems):
        reasons.append("no model has an upstream that can be called")
    if cache_store is not store:  # informational: without its cache the proxy still answers (from the upstream)
        body["cache_redis"] = "ok" if await cache_store.ping() else "unreachable"
    if reasons:
        body["status"] = "not ready"
        body["reasons"] = reasons
    return (503 if reasons else 200), body
