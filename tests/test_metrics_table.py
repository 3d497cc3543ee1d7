"""The metrics table (proxy/telemetry/declare.py, the rows in `Metrics`) builds exactly the metrics the proxy
exported before the table existed: same attribute, name, type, labels, buckets, multiprocess mode, help and order.

EXPECTED was generated from the hand-written `Metrics.__init__` before it became a table (issue 16); dashboards,
alert rules, the README's metrics table and every scrape depend on these, so a change here is a product change.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.telemetry.declare import declarations
from proxy.telemetry.metrics import Metrics

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0)
_LAG = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOT_WAIT = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# (attribute, name, type, label names, histogram buckets without +Inf | gauge multiprocess mode | None), in order
EXPECTED: list[tuple[str, str, str, tuple[str, ...], Any]] = [
    ("requests", "embedding_proxy_requests", "counter", ("team", "key_id", "model", "status_class", "cache"), None),
    ("request_latency", "embedding_proxy_request_duration_seconds",
     "histogram", ("model", "cache", "status_class"), _LATENCY),
    ("in_flight", "embedding_proxy_requests_in_flight", "gauge", (), "livesum"),
    ("batch_size", "embedding_proxy_batch_size", "histogram", ("model",), _BATCH),
    ("inputs", "embedding_proxy_inputs", "counter", ("team", "model", "source"), None),
    ("tokens", "embedding_proxy_tokens", "counter", ("team", "key_id", "model", "source"), None),
    ("saved_tokens", "embedding_proxy_cache_saved_tokens", "counter", ("team", "model"), None),
    ("saved_usd", "embedding_proxy_cache_saved_usd", "counter", ("team", "model"), None),
    ("upstream_cost_usd", "embedding_proxy_upstream_cost_usd", "counter", ("team", "model"), None),
    ("cache_lookups", "embedding_proxy_cache_lookups", "counter", ("result",), None),
    ("upstream_requests", "embedding_proxy_upstream_requests", "counter", ("model", "outcome"), None),
    ("upstream_errors", "embedding_proxy_upstream_errors", "counter", ("model", "kind"), None),
    ("upstream_retries", "embedding_proxy_upstream_retries", "counter", ("model", "reason"), None),
    ("upstream_latency", "embedding_proxy_upstream_latency_seconds", "histogram", ("model",), _LATENCY),
    ("upstream_batch_size", "embedding_proxy_upstream_batch_size", "histogram", ("model",), _BATCH),
    ("redis_errors", "embedding_proxy_redis_errors", "counter", ("op",), None),
    # issue 21: the bypass and what is not one, the event loop, client connections and file descriptors
    ("redis_bypasses", "embedding_proxy_redis_bypasses", "counter", ("store",), None),
    ("redis_stalled_timeouts", "embedding_proxy_redis_stalled_timeouts", "counter", ("store",), None),
    ("event_loop_lag", "embedding_proxy_event_loop_lag_seconds", "histogram", (), _LAG),
    ("connections", "embedding_proxy_connections", "gauge", ("state",), "livesum"),
    ("connection_limit", "embedding_proxy_connection_limit", "gauge", (), "livesum"),
    ("connections_closed", "embedding_proxy_connections_closed", "counter", ("reason",), None),
    ("open_fds", "embedding_proxy_open_fds", "gauge", (), "max"),
    ("max_fds", "embedding_proxy_max_fds", "gauge", (), "max"),
    ("local_hits", "embedding_proxy_cache_local_hits", "counter", (), None),
    ("cache_write_errors", "embedding_proxy_cache_write_errors", "counter", (), None),
    ("quota_rejections", "embedding_proxy_quota_rejections", "counter", ("team", "scope", "limit"), None),
    ("quota_limit", "embedding_proxy_quota_limit", "gauge", ("team", "key_id", "limit"), "mostrecent"),
    ("quota_remaining", "embedding_proxy_quota_remaining", "gauge", ("team", "key_id", "limit"), "mostrecent"),
    ("quota_window_end", "embedding_proxy_quota_window_end_timestamp_seconds",
     "gauge", ("team", "key_id", "limit"), "mostrecent"),
    ("deployment_calls", "embedding_proxy_deployment_calls", "counter", ("model", "upstream", "outcome"), None),
    ("deployment_latency", "embedding_proxy_deployment_latency_seconds", "histogram", ("model", "upstream"), _LATENCY),
    ("upstream_cooldown", "embedding_proxy_deployment_cooling_down", "gauge", ("model", "upstream"), "max"),
    ("upstream_silent", "embedding_proxy_deployment_silent", "gauge", ("model", "upstream"), "max"),  # issue 19
    ("upstream_remaining", "embedding_proxy_deployment_remaining",
     "gauge", ("model", "upstream", "limit"), "mostrecent"),
    # issue 19: the fleet's shared reservations per deployment
    ("fleet_used", "embedding_proxy_deployment_fleet_used", "gauge", ("model", "upstream", "limit"), "mostrecent"),
    ("fleet_left", "embedding_proxy_deployment_fleet_left", "gauge", ("model", "upstream", "limit"), "mostrecent"),
    ("fleet_in_flight", "embedding_proxy_deployment_fleet_in_flight", "gauge", ("model", "upstream"), "mostrecent"),
    ("upstream_failovers", "embedding_proxy_upstream_failovers", "counter", ("model", "upstream"), None),
    ("upstream_silent_steered", "embedding_proxy_upstream_silent_steered", "counter", ("model", "upstream"), None),
    ("upstream_unconfirmed_attempts", "embedding_proxy_upstream_unconfirmed_attempts",
     "counter", ("model", "upstream", "reason"), None),
    ("unconfirmed_tokens", "embedding_proxy_upstream_unconfirmed_tokens", "counter", ("team", "key_id", "model"), None),
    ("upstream_queue_wait", "embedding_proxy_upstream_queue_wait_seconds", "histogram", ("model",), _LATENCY),
    ("upstream_slot_waiters", "embedding_proxy_upstream_slot_waiters", "gauge", ("model", "upstream"), "livesum"),
    ("upstream_slot_wait", "embedding_proxy_upstream_slot_wait_seconds",
     "histogram", ("model", "upstream"), _SLOT_WAIT),
    ("upstream_calls_dropped", "embedding_proxy_upstream_calls_dropped",
     "counter", ("model", "upstream", "reason"), None),
    ("upstream_call_requests", "embedding_proxy_upstream_call_requests", "histogram", ("model",), _BATCH),
    ("upstream_call_inputs", "embedding_proxy_upstream_call_inputs", "histogram", ("model",), _BATCH),
    ("usage_mismatch_tokens", "embedding_proxy_usage_mismatch_tokens", "counter", ("model", "direction"), None),
    ("trace_spans_dropped", "embedding_proxy_trace_spans_dropped", "counter", ("reason",), None),
    # issue 21: the admission budget and the memory given back after bursts
    ("admission_budget", "embedding_proxy_admission_budget_bytes", "gauge", (), "livesum"),
    ("admission_in_use", "embedding_proxy_admission_in_use_bytes", "gauge", (), "livesum"),
    ("admission_waiting", "embedding_proxy_admission_waiting", "gauge", (), "livesum"),
    ("admission_wait", "embedding_proxy_admission_wait_seconds", "histogram", (), _SLOT_WAIT),
    ("admission_refusals", "embedding_proxy_admission_refusals", "counter", (), None),
    ("admission_alone", "embedding_proxy_admission_alone", "counter", (), None),
    ("memory_trims", "embedding_proxy_memory_trims", "counter", (), None),
    ("memory_returned", "embedding_proxy_memory_returned_bytes", "counter", (), None),
    ("build_info", "embedding_proxy_build_info", "gauge", ("version", "python"), "max"),
]
# sha256 of "name\thelp\n" for every metric in EXPECTED's order: the help texts, unchanged to the byte
HELP_SHA256 = "d7db9ed8f436c864328747126d76c290dbb3100785ba995db28ed4f129d4834e"  # issue 19: fleet, silence rows


def _built(m: Metrics) -> list[tuple[str, Any]]:
    return [(attr, value) for attr, value in vars(m).items() if isinstance(value, Counter | Gauge | Histogram)]


def _describe(attr: str, metric: Any) -> tuple[str, str, str, tuple[str, ...], Any]:
    extra = None
    if isinstance(metric, Histogram):
        extra = tuple(metric._upper_bounds[:-1])  # the last bound is +Inf, added by prometheus-client
    elif isinstance(metric, Gauge):
        extra = metric._multiprocess_mode
    return (attr, metric._name, metric._type, tuple(metric._labelnames), extra)


def test_the_table_builds_the_same_metrics_as_before() -> None:
    built = _built(Metrics(CollectorRegistry(), models=("m",)))
    assert [_describe(attr, metric) for attr, metric in built] == EXPECTED
    helps = "".join(f"{metric._name}\t{metric._documentation}\n" for _, metric in built)
    assert hashlib.sha256(helps.encode()).hexdigest() == HELP_SHA256


def test_metrics_register_in_table_order() -> None:
    """/metrics lists the families in the order they were registered: the table's order."""
    m = Metrics(CollectorRegistry())
    assert [family.name for family in m.registry.collect()] == [name for _, name, *_ in EXPECTED]
    assert [row.attr for row in declarations(Metrics)] == [attr for attr, *_ in EXPECTED]


def test_each_instance_builds_its_own_objects() -> None:
    """Rows are declarations, shared by the class; the counters are each app's own (one registry per app)."""
    one, two = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    for row in declarations(Metrics):
        assert getattr(one, row.attr) is not getattr(two, row.attr)
        assert isinstance(getattr(one, row.attr), row.kind)
    one.requests.labels("t", "k", "m", "2xx", "hit").inc()
    assert two.registry.get_sample_value(
        "embedding_proxy_requests_total", {"team": "t", "key_id": "k", "model": "m", "status_class": "2xx",
                                           "cache": "hit"}) is None
