"""Prometheus metrics, all in one place. Labels are bounded: team, key id, model, fixed enums; never keys,
inputs or user strings. Each app gets its own registry so several apps (tests) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import __version__

_PREFIX = "embedding_proxy"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{_PREFIX}_requests", "Embedding requests by outcome.",
            ["team", "key_id", "model", "status_class", "cache"], registry=r,
        )
        self.inputs = Counter(
            f"{_PREFIX}_inputs", "Input items served, by where their vector came from.",
            ["team", "model", "source"], registry=r,
        )
        self.tokens = Counter(
            f"{_PREFIX}_tokens", "Prompt tokens served, by where their vector came from.",
            ["team", "model", "source"], registry=r,
        )
        self.cache_lookups = Counter(
            f"{_PREFIX}_cache_lookups", "Cache lookups of unique inputs by result (hit, miss, error).",
            ["result"], registry=r,
        )
        self.upstream_requests = Counter(
            f"{_PREFIX}_upstream_requests", "Upstream embeddings calls by outcome.",
            ["model", "outcome"], registry=r,
        )
        self.upstream_retries = Counter(
            f"{_PREFIX}_upstream_retries", "Upstream attempts retried, by the failure that caused it.",
            ["model", "reason"], registry=r,
        )
        self.upstream_latency = Histogram(
            f"{_PREFIX}_upstream_latency_seconds", "Time for one upstream call, retries included.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.redis_errors = Counter(
            f"{_PREFIX}_redis_errors", "Redis calls that failed or timed out, by operation.", ["op"], registry=r,
        )
        self.cache_write_errors = Counter(
            f"{_PREFIX}_cache_write_errors", "Cache writes that could not be made.", registry=r,
        )
        self.quota_rejections = Counter(
            f"{_PREFIX}_quota_rejections", "Requests refused for quota, by team, scope (team or key) and limit.",
            ["team", "scope", "limit"], registry=r,
        )
        # Last value seen by this process of each set limit and what is left of it in its current window;
        # key_id is empty for a team's own limits.
        self.quota_limit = Gauge(
            f"{_PREFIX}_quota_limit", "A quota limit in force (requests or tokens per window).",
            ["team", "key_id", "limit"], registry=r,
        )
        self.quota_remaining = Gauge(
            f"{_PREFIX}_quota_remaining", "What is left of a quota limit in its current window.",
            ["team", "key_id", "limit"], registry=r,
        )
        self.build_info = Gauge(f"{_PREFIX}_build_info", "Build information.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
