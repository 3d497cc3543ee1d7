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

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from .. import __version__
from ..errors import ProxyError, UpstreamBadGateway
from .declare import PREFIX as _PREFIX
from .declare import build_all, counter, gauge, histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Waits for an upstream slot: 0 (the common case) falls in the first bucket; the last ones reach the default
# deadline_s (30 s) and beyond.
_SLOT_WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Waits for room in the admission budget: bounded by admission.wait_s (1 s by default, at most 60).
_ADMISSION_WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Why an upstream call was not sent after all: its deadline passed while it waited for a slot, or every request it
# was for gave up (cancelled).
DROP_REASONS = ("deadline", "abandoned")
# Fixed enums, exported at 0 from the start so rates, ratios and alerts have a series before the first event.
CACHE_RESULTS = ("hit", "miss", "error")
# Every `op` passed to Store.call (tests/test_redis_errors.py checks the list against the source).
REDIS_OPS = ("mget", "set", "ping", "cache-secret", "quota", "key-create", "key-get", "key-list", "key-update",
             "team-get", "team-set", "team-list", "usage-flush", "usage-report", "cache-gen", "cache-purge",
             "cache-stats", "admin-get", "admin-list", "admin-set", "audit-write", "audit-read",
             "session-get", "session-set", "usage-rollup", "key-index-lock")
# Why the proxy closed a client connection (README "Connections").
CONNECTION_CLOSE_REASONS = ("header_timeout", "keepalive_timeout", "body_timeout", "evicted", "refused")
# What a client connection is doing: waiting for a request, receiving one's headers, or being served.
CONNECTION_STATES = ("idle", "headers", "busy")
# Which store a Redis guard event is about: the state store, or the cache's own (CACHE_REDIS_URL).
STORES = ("state", "cache")
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Why an attempt may have been billed without a usage the proxy read (it is then in the ledger's unconfirmed_tokens).
UNCONFIRMED_REASONS = ("timeout", "cut", "unread")
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


# Label sets several metrics share.
_TEAM_MODEL = ("team", "model")
_DEPLOYMENT = ("model", "upstream")
_QUOTA = ("team", "key_id", "limit")  # key_id is empty for a team's own limits


class Metrics:
    """Every metric the proxy exports, as a table: one row per metric (see declare.py), built into this instance's
    registry under the row's attribute name. Rows are listed in the order /metrics shows them."""

    requests = counter("requests", "Embedding requests by outcome.",
                       ("team", "key_id", "model", "status_class", "cache"))
    # status_class lets latency panels leave out fast refusals (4xx: auth, validation, quota)
    request_latency = histogram("request_duration_seconds",
                                "Time to answer an embeddings request, by cache outcome and status class.",
                                ("model", "cache", "status_class"), buckets=_LATENCY_BUCKETS)
    in_flight = gauge("requests_in_flight", "Embeddings requests being handled now.", combine="livesum")
    batch_size = histogram("batch_size", "Inputs per client request.", ("model",), buckets=_BATCH_BUCKETS)
    inputs = counter("inputs", "Input items served, by where their vector came from.", ("team", "model", "source"))
    tokens = counter("tokens", "Prompt tokens served, by key and by where their vector came from.",
                     ("team", "key_id", "model", "source"))
    saved_tokens = counter("cache_saved_tokens",
                           "Tokens served without an upstream call (cache, repeats, coalescing).", _TEAM_MODEL)
    saved_usd = counter("cache_saved_usd", "What the saved tokens would have cost upstream, in US dollars.",
                        _TEAM_MODEL)
    upstream_cost_usd = counter("upstream_cost_usd",
                                "What the tokens sent upstream cost, in US dollars (model price table).", _TEAM_MODEL)
    cache_lookups = counter("cache_lookups", "Cache lookups of unique inputs by result (hit, miss, error).",
                            ("result",))
    upstream_requests = counter(
        "upstream_requests", "Upstream embeddings calls by outcome (ok, error): one per call however many attempts it "
        "took (retried attempts are counted in embedding_proxy_upstream_retries_total).", ("model", "outcome"))
    upstream_errors = counter("upstream_errors", "Upstream calls that failed after their retries, by kind.",
                              ("model", "kind"))
    upstream_retries = counter("upstream_retries", "Upstream attempts retried, by the failure that caused it.",
                               ("model", "reason"))
    upstream_latency = histogram("upstream_latency_seconds", "Time for one upstream call, retries included.",
                                 ("model",), buckets=_LATENCY_BUCKETS)
    upstream_batch_size = histogram("upstream_batch_size", "Inputs per upstream call.", ("model",),
                                    buckets=_BATCH_BUCKETS)
    redis_errors = counter(
        "redis_errors", "Redis calls that failed, timed out, got an error reply, or were refused at once while Redis "
        "was marked down (failed from the caller's view), by operation.", ("op",))
    redis_bypasses = counter(
        "redis_bypasses", "Times the request path began bypassing a Redis store after a failed call (cache skipped, "
        "key records and quotas served from this process for retry_interval_s), by store.", ("store",))
    redis_stalled_timeouts = counter(
        "redis_stalled_timeouts", "Redis calls that ran out of time while this process's event loop was blocked: "
        "they failed alone and did not make the process bypass Redis, by store.", ("store",))
    event_loop_lag = histogram("event_loop_lag_seconds", "How late the event loop ran a timer due every 20 ms: "
                               "the time it was blocked.", (), buckets=_LAG_BUCKETS)
    connections = gauge("connections", "Client connections open now, by state: idle (between requests), headers "
                        "(a request's headers arriving), busy (a request being read, handled or answered).",
                        ("state",), combine="livesum")
    connection_limit = gauge("connection_limit", "Client connections a process keeps open at most (summed over "
                             "workers).", combine="livesum")
    connections_closed = counter(
        "connections_closed", "Client connections the proxy closed, by reason: header_timeout, keepalive_timeout, "
        "body_timeout, evicted (to make room for a new one at the cap), refused (a new one at the cap, none idle).",
        ("reason",))
    open_fds = gauge("open_fds", "File descriptors open in the process (several workers: the most of any).",
                     combine="max")
    max_fds = gauge("max_fds", "The process's file-descriptor limit (soft RLIMIT_NOFILE, raised to the hard one at "
                    "start; several workers: the most of any).", combine="max")
    local_hits = counter("cache_local_hits", "Unique inputs answered by the in-process cache tier (no Redis read); "
                         "also counted in cache_lookups_total as hits.")
    cache_write_errors = counter("cache_write_errors", "Cache writes that could not be made.")
    quota_rejections = counter("quota_rejections",
                               "Requests refused for quota, by team, scope (team or key) and limit.",
                               ("team", "scope", "limit"))
    # Last value seen (by any worker) of each set limit and what is left of it in its current window.
    quota_limit = gauge("quota_limit", "A quota limit in force (requests or tokens per window).", _QUOTA,
                        combine="mostrecent")
    quota_remaining = gauge("quota_remaining", "What is left of a quota limit in its current window.", _QUOTA,
                            combine="mostrecent")
    # When each limit's current window ends (Unix time): past it the window's counter is gone, so the limit is
    # fully available whatever quota_remaining last said (the usage board's headroom panel reads it so).
    quota_window_end = gauge("quota_window_end_timestamp_seconds", "When the current window of a quota limit ends.",
                             _QUOTA, combine="mostrecent")
    # The fleet: one series per deployment (model, upstream); `upstream` is the [upstreams.NAME] it calls.
    deployment_calls = counter("deployment_calls", "Upstream attempts per deployment, by outcome: ok or the error "
                               "kind (the kinds of upstream_errors_total).", ("model", "upstream", "outcome"))
    deployment_latency = histogram("deployment_latency_seconds", "Time for one upstream attempt, per deployment.",
                                   _DEPLOYMENT, buckets=_LATENCY_BUCKETS)
    upstream_cooldown = gauge("deployment_cooling_down",
                              "1 while a deployment is out of rotation after failed calls.", _DEPLOYMENT,
                              combine="max")
    upstream_silent = gauge("deployment_silent", "1 while a deployment is silent: a call to it unanswered for its "
                            "silent_after_s and no answer since (its calls go to other deployments).", _DEPLOYMENT,
                            combine="max")
    upstream_remaining = gauge("deployment_remaining", "What the upstream's last x-ratelimit-remaining-* headers "
                               "left, minus calls sent since (limit: requests or tokens).",
                               ("model", "upstream", "limit"), combine="mostrecent")
    fleet_used = gauge("deployment_fleet_used", "Requests or tokens the whole fleet reserved for a deployment in the "
                       "last minute, as its last reservation said.", ("model", "upstream", "limit"),
                       combine="mostrecent")
    fleet_left = gauge("deployment_fleet_left", "What is left of a deployment's configured rpm or tpm in that "
                       "minute, fleet-wide.", ("model", "upstream", "limit"), combine="mostrecent")
    fleet_in_flight = gauge("deployment_fleet_in_flight", "A deployment's calls in flight fleet-wide, as its last "
                            "reservation said.", _DEPLOYMENT, combine="mostrecent")
    upstream_failovers = counter("upstream_failovers", "Calls sent to another deployment after an attempt failed, "
                                 "by the deployment that failed.", _DEPLOYMENT)
    upstream_silent_steered = counter("upstream_silent_steered", "Calls sent to another deployment because this one "
                                      "was silent.", _DEPLOYMENT)
    upstream_unconfirmed_attempts = counter(
        "upstream_unconfirmed_attempts", "Upstream attempts that may have been billed without a usage the proxy "
        "read, by reason: sent and timed out (timeout; every retry with reason upstream_timeout is one of these), "
        "connection dropped after sending (cut), a 200 answer too large to read, broken off, or with a usage it "
        "could not trust (unread).", ("model", "upstream", "reason"))
    unconfirmed_tokens = counter(
        "upstream_unconfirmed_tokens", "Tokens (local count) carried by attempts that may have been billed without "
        "a usage the proxy read; the ledger's unconfirmed_tokens.", ("team", "key_id", "model"))
    upstream_queue_wait = histogram("upstream_queue_wait_seconds", "Waits for a deployment to come back or for its "
                                    "rate limit to reset.", ("model",), buckets=_LATENCY_BUCKETS)
    upstream_slot_waiters = gauge("upstream_slot_waiters", "Upstream calls waiting for one of their upstream's "
                                  "max_concurrency slots, per deployment.", _DEPLOYMENT, combine="livesum")
    upstream_slot_wait = histogram("upstream_slot_wait_seconds", "Time an upstream attempt waited for one of its "
                                   "upstream's max_concurrency slots (0 when one was free), per deployment.",
                                   _DEPLOYMENT, buckets=_SLOT_WAIT_BUCKETS)
    upstream_calls_dropped = counter(
        "upstream_calls_dropped", "Upstream calls not sent: the deadline passed while they waited for a slot "
        "(deadline), or every request they were for gave up (abandoned).", ("model", "upstream", "reason"))
    upstream_call_requests = histogram("upstream_call_requests", "Calls merged into one upstream call "
                                       "(micro-batching).", ("model",), buckets=_BATCH_BUCKETS)
    upstream_call_inputs = histogram("upstream_call_inputs", "Inputs per upstream call, after micro-batching.",
                                     ("model",), buckets=_BATCH_BUCKETS)
    usage_mismatch_tokens = counter(
        "usage_mismatch_tokens", "Tokens by which a merged upstream call's usage differed from its inputs' local "
        "counts (direction over: the upstream counted more, under: fewer), told to no client. Not 0: the model's "
        "tokenizer or count_special_tokens does not match its server.", ("model", "direction"))
    # Incremented from the trace export thread (telemetry/otel.py), so directly, not through `add`.
    trace_spans_dropped = counter(
        "trace_spans_dropped", "Trace spans never exported, by reason: the export queue was full (queue_full), the "
        "collector refused them or could not be reached (export_failed), or they were still queued at shutdown "
        "(shutdown). Exported only while tracing is on.", ("reason",))
    # The admission budget (README "Overload and memory"), per process; with several workers the gauges add up.
    admission_budget = gauge("admission_budget_bytes", "The admission budget: bytes of request bodies and answers "
                             "a process holds at once (0: no budget).", combine="livesum")
    admission_in_use = gauge("admission_in_use_bytes", "Bytes of request bodies and answers held now under the "
                             "admission budget.", combine="livesum")
    admission_waiting = gauge("admission_waiting", "Requests waiting now for room in the admission budget.",
                              combine="livesum")
    admission_wait = histogram("admission_wait_seconds", "How long each request that found no room in the admission "
                               "budget waited (admitted or refused).", (), buckets=_ADMISSION_WAIT_BUCKETS)
    admission_refusals = counter("admission_refusals", "Requests refused with 503 overloaded: no room in the "
                                 "admission budget within admission.wait_s.")
    admission_alone = counter("admission_alone", "Requests larger than the whole admission budget, served alone.")
    memory_trims = counter("memory_trims", "Times the process gave freed memory back to the system after a burst.")
    memory_returned = counter("memory_returned_bytes", "Resident memory given back after bursts: the RSS before "
                              "each trim minus after.")
    build_info = gauge("build_info", "Build information (always 1).", ("version", "python"), combine="max")

    def __init__(self, registry: CollectorRegistry | None = None, *, models: Iterable[str] = ()) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # labels() validates and locks on every call (~2.5 us); the hot path asks for the same children each time
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._pending: dict[tuple[Any, tuple[str, ...]], float] = {}  # counts not yet written (see `add`)
        self.in_flight_now = 0  # embeddings requests being handled; written to the gauge by `flush`
        self._in_flight_written = 0
        self._flush_hooks: list[Callable[[], None]] = []
        build_all(self, self.registry)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self._export_enums(models)

    def _export_enums(self, models: Iterable[str]) -> None:
        """The fixed enums' series at 0 from the start, so rates, ratios and alerts have one before the first event."""
        for result in CACHE_RESULTS:
            self.cache_lookups.labels(result)
        for op in REDIS_OPS:
            self.redis_errors.labels(op)
        for store in STORES:
            self.redis_bypasses.labels(store)
            self.redis_stalled_timeouts.labels(store)
        for reason in CONNECTION_CLOSE_REASONS:
            self.connections_closed.labels(reason)
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
            self.child(self.upstream_silent, model, upstream).set(0)
            self.child(self.upstream_failovers, model, upstream)
            self.child(self.upstream_silent_steered, model, upstream)
            for reason in UNCONFIRMED_REASONS:
                self.child(self.upstream_unconfirmed_attempts, model, upstream, reason)
            self.child(self.upstream_queue_wait, model)
            self.child(self.upstream_slot_waiters, model, upstream).set(0)
            self.child(self.upstream_slot_wait, model, upstream)
            for reason in DROP_REASONS:
                self.child(self.upstream_calls_dropped, model, upstream, reason)
        self._flush_hooks.append(refresh)

    def on_flush(self, hook: Callable[[], None]) -> None:
        """`hook` runs at every flush (every second and before each /metrics answer): for gauges and counts a
        part keeps itself."""
        self._flush_hooks.append(hook)

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
