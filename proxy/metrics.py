"""Prometheus metrics, all in one place. Labels are bounded: team, key id, model, fixed enums; never keys,
inputs or user strings.

One process (`serve --workers 1`, tests): each app gets its own registry, so several apps never share counters.
Several workers: `serve` sets PROMETHEUS_MULTIPROC_DIR before the workers start; prometheus-client then keeps
every value in a per-process file there, and `render()` sums the files of all workers, so any worker's /metrics
answers for the whole machine. Gauges say how to combine workers (`multiprocess_mode`).
"""

from __future__ import annotations

import asyncio
import os
import platform
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from . import __version__
from .errors import ProxyError, UpstreamBadGateway

_PREFIX = "embedding_proxy"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Fixed enums, exported at 0 from the start so rates, ratios and alerts have a series before the first event.
CACHE_RESULTS = ("hit", "miss", "error")
# Every `op` passed to Store.call (tests/test_redis_errors.py checks the list against the source).
REDIS_OPS = ("mget", "set", "ping", "cache-secret", "quota", "key-create", "key-get", "key-list", "key-update",
             "team-get", "team-set", "team-list", "usage-flush", "usage-report", "cache-gen", "cache-purge",
             "cache-stats")
# invalid_request is the client's own input refused by the upstream: not an upstream failure (alerts leave it out).
UPSTREAM_ERROR_KINDS = ("timeout", "unavailable", "rate_limited", "bad_gateway", "auth", "connect",
                        "invalid_request", "other")
_KIND_BY_CODE = {
    "upstream_timeout": "timeout",
    "service_unavailable": "unavailable",
    "rate_limit_exceeded": "rate_limited",
    "upstream_error": "bad_gateway",
    "invalid_request": "invalid_request",
}


def upstream_error_kind(exc: ProxyError | None) -> str:
    """The `kind` label of a failed upstream call, from the proxy error it became (None: not a ProxyError)."""
    if exc is None:
        return "other"
    if isinstance(exc, UpstreamBadGateway):
        return exc.kind  # bad_gateway, auth or connect: clients see code `upstream_error` for all three
    if exc.code is None and exc.status == 400:
        return "invalid_request"
    return _KIND_BY_CODE.get(exc.code or "", "other")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, models: Iterable[str] = ()) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # labels() validates and locks on every call (~2.5 us); the hot path asks for the same children each time
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._pending: dict[tuple[Any, tuple[str, ...]], float] = {}  # counts not yet written (see `add`)
        self.in_flight_now = 0  # embeddings requests being handled; written to the gauge by `flush`
        self._in_flight_written = 0
        r = self.registry
        self.requests = Counter(
            f"{_PREFIX}_requests", "Embedding requests by outcome.",
            ["team", "key_id", "model", "status_class", "cache"], registry=r,
        )
        # status_class lets latency panels leave out fast refusals (4xx: auth, validation, quota)
        self.request_latency = Histogram(
            f"{_PREFIX}_request_duration_seconds",
            "Time to answer an embeddings request, by cache outcome and status class.",
            ["model", "cache", "status_class"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            f"{_PREFIX}_requests_in_flight", "Embeddings requests being handled now.",
            registry=r, multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            f"{_PREFIX}_batch_size", "Inputs per client request.", ["model"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.inputs = Counter(
            f"{_PREFIX}_inputs", "Input items served, by where their vector came from.",
            ["team", "model", "source"], registry=r,
        )
        self.tokens = Counter(
            f"{_PREFIX}_tokens", "Prompt tokens served, by key and by where their vector came from.",
            ["team", "key_id", "model", "source"], registry=r,
        )
        self.saved_tokens = Counter(
            f"{_PREFIX}_cache_saved_tokens", "Tokens served without an upstream call (cache, repeats, coalescing).",
            ["team", "model"], registry=r,
        )
        self.saved_usd = Counter(
            f"{_PREFIX}_cache_saved_usd", "What the saved tokens would have cost upstream, in US dollars.",
            ["team", "model"], registry=r,
        )
        self.upstream_cost_usd = Counter(
            f"{_PREFIX}_upstream_cost_usd", "What the tokens sent upstream cost, in US dollars (model price table).",
            ["team", "model"], registry=r,
        )
        self.cache_lookups = Counter(
            f"{_PREFIX}_cache_lookups", "Cache lookups of unique inputs by result (hit, miss, error).",
            ["result"], registry=r,
        )
        self.upstream_requests = Counter(
            f"{_PREFIX}_upstream_requests",
            "Upstream embeddings calls by outcome (ok, error): one per call however many attempts it took "
            "(retried attempts are counted in embedding_proxy_upstream_retries_total).",
            ["model", "outcome"], registry=r,
        )
        self.upstream_errors = Counter(
            f"{_PREFIX}_upstream_errors", "Upstream calls that failed after their retries, by kind.",
            ["model", "kind"], registry=r,
        )
        self.upstream_retries = Counter(
            f"{_PREFIX}_upstream_retries", "Upstream attempts retried, by the failure that caused it.",
            ["model", "reason"], registry=r,
        )
        self.upstream_latency = Histogram(
            f"{_PREFIX}_upstream_latency_seconds", "Time for one upstream call, retries included.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_batch_size = Histogram(
            f"{_PREFIX}_upstream_batch_size", "Inputs per upstream call.", ["model"], buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.redis_errors = Counter(
            f"{_PREFIX}_redis_errors",
            "Redis calls that failed, timed out, got an error reply, or were refused at once while Redis was "
            "marked down (failed from the caller's view), by operation.", ["op"], registry=r,
        )
        self.local_hits = Counter(
            f"{_PREFIX}_cache_local_hits", "Unique inputs answered by the in-process cache tier (no Redis read); "
            "also counted in cache_lookups_total as hits.", registry=r,
        )
        self.cache_write_errors = Counter(
            f"{_PREFIX}_cache_write_errors", "Cache writes that could not be made.", registry=r,
        )
        self.quota_rejections = Counter(
            f"{_PREFIX}_quota_rejections", "Requests refused for quota, by team, scope (team or key) and limit.",
            ["team", "scope", "limit"], registry=r,
        )
        # Last value seen (by any worker) of each set limit and what is left of it in its current window;
        # key_id is empty for a team's own limits.
        self.quota_limit = Gauge(
            f"{_PREFIX}_quota_limit", "A quota limit in force (requests or tokens per window).",
            ["team", "key_id", "limit"], registry=r, multiprocess_mode="mostrecent",
        )
        self.quota_remaining = Gauge(
            f"{_PREFIX}_quota_remaining", "What is left of a quota limit in its current window.",
            ["team", "key_id", "limit"], registry=r, multiprocess_mode="mostrecent",
        )
        # When each limit's current window ends (Unix time): past it the window's counter is gone, so the limit is
        # fully available whatever quota_remaining last said (the usage board's headroom panel reads it so).
        self.quota_window_end = Gauge(
            f"{_PREFIX}_quota_window_end_timestamp_seconds", "When the current window of a quota limit ends.",
            ["team", "key_id", "limit"], registry=r, multiprocess_mode="mostrecent",
        )
        # The fleet: one series per deployment (model, upstream); `upstream` is the [upstreams.NAME] it calls.
        self.deployment_calls = Counter(
            f"{_PREFIX}_deployment_calls", "Upstream attempts per deployment, by outcome: ok or the error kind "
            "(the kinds of upstream_errors_total).", ["model", "upstream", "outcome"], registry=r,
        )
        self.deployment_latency = Histogram(
            f"{_PREFIX}_deployment_latency_seconds", "Time for one upstream attempt, per deployment.",
            ["model", "upstream"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_cooldown = Gauge(
            f"{_PREFIX}_deployment_cooling_down", "1 while a deployment is out of rotation after failed calls.",
            ["model", "upstream"], registry=r, multiprocess_mode="max",
        )
        self.upstream_remaining = Gauge(
            f"{_PREFIX}_deployment_remaining", "What the upstream's last x-ratelimit-remaining-* headers left, "
            "minus calls sent since (limit: requests or tokens).", ["model", "upstream", "limit"], registry=r,
            multiprocess_mode="mostrecent",
        )
        self.upstream_failovers = Counter(
            f"{_PREFIX}_upstream_failovers", "Calls sent to another deployment after an attempt failed, by the "
            "deployment that failed.", ["model", "upstream"], registry=r,
        )
        self.upstream_queue_wait = Histogram(
            f"{_PREFIX}_upstream_queue_wait_seconds", "Waits for a deployment to come back or for its rate limit "
            "to reset.", ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_call_requests = Histogram(
            f"{_PREFIX}_upstream_call_requests", "Calls merged into one upstream call (micro-batching).",
            ["model"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.upstream_call_inputs = Histogram(
            f"{_PREFIX}_upstream_call_inputs", "Inputs per upstream call, after micro-batching.",
            ["model"], buckets=_BATCH_BUCKETS, registry=r,
        )
        # Incremented from the trace export thread (proxy/otel.py), so directly, not through `add`.
        self.trace_spans_dropped = Counter(
            f"{_PREFIX}_trace_spans_dropped", "Trace spans never exported, by reason: the export queue was full "
            "(queue_full), the collector refused them or could not be reached (export_failed), or they were still "
            "queued at shutdown (shutdown). Exported only while tracing is on.", ["reason"], registry=r,
        )
        self._flush_hooks: list[Callable[[], None]] = []
        self.build_info = Gauge(
            f"{_PREFIX}_build_info", "Build information (always 1).", ["version", "python"], registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        for result in CACHE_RESULTS:
            self.cache_lookups.labels(result)
        for op in REDIS_OPS:
            self.redis_errors.labels(op)
        for model in models:
            self.upstream_requests.labels(model, "ok")
            self.upstream_requests.labels(model, "error")
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(model, kind)

    def add(self, metric: Any, *labels: str, amount: float = 1.0) -> None:
        """Count `amount` on a counter child: kept in a plain dict and written to the counter by `flush` (about
        0.2 us instead of 0.8 us for a locked, checked increment; a hit does eight of them)."""
        key = (metric, labels)
        pending = self._pending
        pending[key] = pending.get(key, 0.0) + amount

    def flush(self) -> None:
        """Write what `add` and the in-flight count kept: before every /metrics answer, every second (`run`), and
        at shutdown. With several workers each writes its own share; a scrape sees at most one second's lag."""
        for hook in self._flush_hooks:
            hook()
        pending, self._pending = self._pending, {}
        for (metric, labels), amount in pending.items():
            self.child(metric, *labels).inc(amount)
        if self.in_flight_now != self._in_flight_written:
            self.in_flight.set(self.in_flight_now)
            self._in_flight_written = self.in_flight_now

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.flush()

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered (label values are bounded, so this stays small)."""
        try:
            return self._children[(metric, labels)]
        except KeyError:
            made = self._children[(metric, labels)] = metric.labels(*labels) if labels else metric
            return made

    def observe_request(self, team: str, key_id: str, model: str, status: int, cache: str, seconds: float) -> None:
        """One answered /v1/embeddings request (any status); team and key are empty before authentication."""
        status_class = f"{status // 100}xx"
        self.add(self.requests, team, key_id, model, status_class, cache)
        self.child(self.request_latency, model, cache, status_class).observe(seconds)

    def observe_embedding(
        self, team: str, key_id: str, model: str, *, inputs: int, upstream_inputs: int, prompt_tokens: int,
        billed_tokens: int, price_per_million_tokens: float,
    ) -> None:
        """What one successful request served, and what the cache saved it."""
        cached_tokens = prompt_tokens - billed_tokens
        add = self.add
        self.child(self.batch_size, model).observe(inputs)
        if inputs > upstream_inputs:
            add(self.inputs, team, model, "cache", amount=inputs - upstream_inputs)
        if upstream_inputs:
            add(self.inputs, team, model, "upstream", amount=upstream_inputs)
        if cached_tokens:
            add(self.tokens, team, key_id, model, "cache", amount=cached_tokens)
            add(self.saved_tokens, team, model, amount=cached_tokens)
            add(self.saved_usd, team, model, amount=cached_tokens * price_per_million_tokens / 1e6)
        if billed_tokens:
            add(self.tokens, team, key_id, model, "upstream", amount=billed_tokens)
            add(self.upstream_cost_usd, team, model, amount=billed_tokens * price_per_million_tokens / 1e6)

    def observe_unanswered(self, team: str, model: str, billed_tokens: int, price_per_million_tokens: float) -> None:
        """What the upstream billed for a request that was not answered 200 (served nothing, cost money)."""
        self.add(self.upstream_cost_usd, team, model, amount=billed_tokens * price_per_million_tokens / 1e6)

    def observe_upstream_error(self, model: str, exc: ProxyError | None) -> None:
        self.upstream_requests.labels(model, "error").inc()
        self.upstream_errors.labels(model, upstream_error_kind(exc)).inc()

    def register_fleet(self, deployments: Iterable[tuple[str, str]], refresh: Callable[[], None]) -> None:
        """Export each (model, upstream) deployment from the start; `refresh` sets the gauges at every flush."""
        for model, upstream in deployments:
            self.child(self.deployment_calls, model, upstream, "ok")
            self.child(self.upstream_cooldown, model, upstream).set(0)
            self.child(self.upstream_failovers, model, upstream)
            self.child(self.upstream_queue_wait, model)
        self._flush_hooks.append(refresh)

    def observe_deployment(self, model: str, upstream: str, outcome: str, seconds: float) -> None:
        self.add(self.deployment_calls, model, upstream, outcome)
        self.child(self.deployment_latency, model, upstream).observe(seconds)

    def observe_merged_call(self, model: str, callers: int, inputs: int) -> None:
        self.child(self.upstream_call_requests, model).observe(callers)
        self.child(self.upstream_call_inputs, model).observe(inputs)

    def cache_lookups_so_far(self) -> dict[str, int]:
        """Cache lookups by result since start: this process's, or with several workers (as /metrics) the sum of
        every worker's on this machine."""
        self.flush()
        if self.multiprocess:
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            families = [f for f in merged.collect() if f.name == f"{_PREFIX}_cache_lookups"]
        else:
            families = list(self.cache_lookups.collect())
        out = dict.fromkeys(CACHE_RESULTS, 0)
        for family in families:
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("result") in out:
                    out[sample.labels["result"]] += int(sample.value)
        return out

    def render(self) -> bytes:
        self.flush()
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
