"""Writes the Grafana dashboards in deploy/grafana/dashboards/ from the compact description below.

Edit this file, then run `python deploy/grafana/build_dashboards.py`; tests/test_dashboards.py checks that the
committed JSON is what this script writes, that Grafana can load it, and that every query uses exported metrics.
Queries filter by the `team` variable with `=~"$team"` (multi-value, "All" is `.*`) and every panel reads from the
datasource chosen in the `datasource` variable (provisioned with the fixed uid `prometheus`). A panel whose metrics
have no team label (latency, upstreams, the cache's lookups, Redis, processes) cannot follow the variable: its title
ends with "(all teams)" and its description says why. Panels are grouped in rows, each row's title saying whether
its panels follow the variable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
T = 'team=~"$team"'
RI = "$__rate_interval"


# Latency of requests that were served or failed for the proxy's or the upstream's reasons: fast refusals (4xx:
# auth, validation, quota) would pull every percentile down.
ANSWERED = 'status_class!="4xx"'
# The headroom of each limit, by (team, key_id, limit): what the gauges last said while the limit's window lasts;
# once the window has ended (no admitted request since), the limit is all available again.
BY_LIMIT = "max by (team, key_id, limit)"
HEADROOM = (
    f"({BY_LIMIT} (embedding_proxy_quota_remaining{{{T}}}) "
    f"and on (team, key_id, limit) ({BY_LIMIT} (embedding_proxy_quota_window_end_timestamp_seconds{{{T}}}) > time()) "
    f"or {BY_LIMIT} (embedding_proxy_quota_limit{{{T}}})) "
    f"/ {BY_LIMIT} (embedding_proxy_quota_limit{{{T}}})"
)
Spec = list[tuple[str, str, str, list[dict[str, str]]] | tuple[str, str, str, list[dict[str, str]], dict[str, Any]]]


def _q(expr: str, legend: str = "") -> dict[str, str]:
    return {"expr": expr, "legend": legend}


def _quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99),
               selector: str = "") -> list[dict[str, str]]:
    group = f"{by}, le" if by else "le"
    prefix = "{{" + by + "}} " if by else ""
    match = f"{{{selector}}}" if selector else ""
    return [_q(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{match}[{RI}])))",
               f"{prefix}p{int(q * 100)}") for q in qs]


PER_TEAM = " (per team: follow the team variable)"
ALL_TEAMS = " (all teams: no team label)"

OVERVIEW: Spec = [
    # ("row", title), then (panel type, title, unit, queries[, field defaults such as min and max])
    ("row", "Traffic and errors" + PER_TEAM, "", []),
    ("stat", "Requests per second", "reqps", [_q(f"sum(rate(embedding_proxy_requests_total{{{T}}}[{RI}]))")]),
    ("stat", "Server error ratio (5xx)", "percentunit", [_q(
        f'sum(rate(embedding_proxy_requests_total{{{T},status_class="5xx"}}[{RI}])) '
        f"/ sum(rate(embedding_proxy_requests_total{{{T}}}[{RI}]))")]),
    ("stat", "Cache hit ratio (share of tokens)", "percentunit", [_q(
        f'sum(rate(embedding_proxy_tokens_total{{{T},source="cache"}}[{RI}])) '
        f"/ sum(rate(embedding_proxy_tokens_total{{{T}}}[{RI}]))")]),
    ("timeseries", "Requests by status class", "reqps", [_q(
        f"sum by (status_class) (rate(embedding_proxy_requests_total{{{T}}}[{RI}]))", "{{status_class}}")]),
    ("timeseries", "Requests by cache outcome", "reqps", [_q(
        f"sum by (cache) (rate(embedding_proxy_requests_total{{{T}}}[{RI}]))", "{{cache}}")]),
    ("timeseries", "Error ratio by status class", "percentunit", [_q(
        f'sum by (status_class) (rate(embedding_proxy_requests_total{{{T},status_class=~"4xx|5xx"}}[{RI}])) '
        f"/ ignoring(status_class) group_left sum(rate(embedding_proxy_requests_total{{{T}}}[{RI}]))",
        "{{status_class}}")]),
    ("timeseries", "Inputs by source", "ops", [_q(
        f"sum by (source) (rate(embedding_proxy_inputs_total{{{T}}}[{RI}]))", "{{source}}")]),
    ("row", "Latency and load" + ALL_TEAMS, "", []),
    ("timeseries", "Request latency (4xx refusals left out)", "s",
     _quantiles("embedding_proxy_request_duration_seconds", selector=ANSWERED)),
    ("timeseries", "Request latency p95 by cache outcome (4xx refusals left out)", "s",
     _quantiles("embedding_proxy_request_duration_seconds", "cache", (0.95,), ANSWERED)),
    ("timeseries", "In-flight requests", "short", [_q("sum(embedding_proxy_requests_in_flight)", "in flight")]),
    ("timeseries", "Batch size (inputs per request and per upstream call)", "short", [
        *_quantiles("embedding_proxy_batch_size", qs=(0.5, 0.95)),
        *[{**q, "legend": "upstream " + q["legend"]}
          for q in _quantiles("embedding_proxy_upstream_batch_size", qs=(0.5, 0.95))],
    ]),
    ("row", "Upstreams and deployments" + ALL_TEAMS, "", []),
    ("timeseries", "Upstream calls by outcome", "reqps", [_q(
        f"sum by (model, outcome) (rate(embedding_proxy_upstream_requests_total[{RI}]))", "{{model}} {{outcome}}")]),
    # as the alert: upstream 400s (the client's own input) are not the upstream failing
    ("timeseries", "Upstream error ratio (client input refusals left out)", "percentunit", [_q(
        f'sum by (model) (rate(embedding_proxy_upstream_errors_total{{kind!="invalid_request"}}[{RI}])) '
        f"/ sum by (model) (rate(embedding_proxy_upstream_requests_total[{RI}]))", "{{model}}")]),
    ("timeseries", "Upstream errors by kind", "reqps", [_q(
        f"sum by (kind) (rate(embedding_proxy_upstream_errors_total[{RI}]))", "{{kind}}")]),
    ("timeseries", "Upstream retries by reason", "reqps", [_q(
        f"sum by (reason) (rate(embedding_proxy_upstream_retries_total[{RI}]))", "{{reason}}")]),
    ("timeseries", "Upstream latency (retries included)", "s",
     _quantiles("embedding_proxy_upstream_latency_seconds", "model", (0.5, 0.99))),
    # the fleet: one series per deployment (model, upstream)
    ("timeseries", "Deployments cooling down (1: out of rotation)", "short", [_q(
        "max by (model, upstream) (embedding_proxy_deployment_cooling_down)", "{{model}} {{upstream}}")],
     {"min": 0, "max": 1}),
    ("timeseries", "Deployments silent (1: a call unanswered past silent_after_s)", "short", [_q(
        "max by (model, upstream) (embedding_proxy_deployment_silent)", "{{model}} {{upstream}}")],
     {"min": 0, "max": 1}),
    ("timeseries", "Calls steered away from a silent deployment", "reqps", [_q(
        f"sum by (model, upstream) (rate(embedding_proxy_upstream_silent_steered_total[{RI}]))",
        "{{model}} {{upstream}}")]),
    ("timeseries", "Upstream attempts per deployment by outcome", "reqps", [_q(
        f"sum by (upstream, outcome) (rate(embedding_proxy_deployment_calls_total[{RI}]))",
        "{{upstream}} {{outcome}}")]),
    ("timeseries", "Deployment latency (one attempt)", "s",
     _quantiles("embedding_proxy_deployment_latency_seconds", "upstream", (0.5, 0.99))),
    ("timeseries", "Failovers by the deployment that failed", "reqps", [_q(
        f"sum by (model, upstream) (rate(embedding_proxy_upstream_failovers_total[{RI}]))",
        "{{model}} {{upstream}}")]),
    ("timeseries", "Remaining upstream capacity (x-ratelimit headers)", "short", [_q(
        "min by (model, upstream, limit) (embedding_proxy_deployment_remaining)", "{{upstream}} {{limit}}")]),
    # how often requests wait for a deployment (a rate limit's reset or a cooldown), and how long: two units, two
    # panels (the average is 0, not NaN, while nothing waits)
    ("timeseries", "Waits for a deployment (rate limit reset or cooldown)", "reqps", [_q(
        f"sum by (model) (rate(embedding_proxy_upstream_queue_wait_seconds_count[{RI}]))", "{{model}}")]),
    ("timeseries", "Average wait for a deployment", "s", [_q(
        f"sum by (model) (rate(embedding_proxy_upstream_queue_wait_seconds_sum[{RI}])) "
        f"/ clamp_min(sum by (model) (rate(embedding_proxy_upstream_queue_wait_seconds_count[{RI}])), 1e-9)",
        "{{model}}")]),
    ("timeseries", "Micro-batching: requests and inputs per upstream call", "short", [
        *[{**q, "legend": "requests " + q["legend"]}
          for q in _quantiles("embedding_proxy_upstream_call_requests", qs=(0.5, 0.95))],
        *[{**q, "legend": "inputs " + q["legend"]}
          for q in _quantiles("embedding_proxy_upstream_call_inputs", qs=(0.5, 0.95))],
    ]),
    ("row", "Cache, Redis and processes" + ALL_TEAMS, "", []),
    ("stat", "Proxy instances up (scrape targets)", "short", [_q('sum(up{job="embedding-proxy"})')]),
    ("timeseries", "Cache lookups by result (unique inputs)", "ops", [_q(
        f"sum by (result) (rate(embedding_proxy_cache_lookups_total[{RI}]))", "{{result}}")]),
    ("timeseries", "Redis errors by operation", "ops", [
        _q(f"sum by (op) (rate(embedding_proxy_redis_errors_total[{RI}]))", "{{op}}"),
        _q(f"sum(rate(embedding_proxy_cache_write_errors_total[{RI}]))", "cache writes lost"),
    ]),
    ("table", "Versions running", "short", [_q("count by (version) (embedding_proxy_build_info)", "{{version}}")]),
]

USAGE: Spec = [
    ("row", "Cost and savings" + PER_TEAM, "", []),
    ("stat", "Upstream cost in range (USD)", "currencyUSD", [_q(
        f"sum(increase(embedding_proxy_upstream_cost_usd_total{{{T}}}[$__range]))")]),
    ("stat", "Saved by the cache in range (USD)", "currencyUSD", [_q(
        f"sum(increase(embedding_proxy_cache_saved_usd_total{{{T}}}[$__range]))")]),
    ("stat", "Tokens saved by the cache in range", "short", [_q(
        f"sum(increase(embedding_proxy_cache_saved_tokens_total{{{T}}}[$__range]))")]),
    ("bargauge", "Upstream cost per team in range (USD)", "currencyUSD", [_q(
        f"sum by (team) (increase(embedding_proxy_upstream_cost_usd_total{{{T}}}[$__range]))", "{{team}}")]),
    ("bargauge", "Cache savings per team in range (USD)", "currencyUSD", [_q(
        f"sum by (team) (increase(embedding_proxy_cache_saved_usd_total{{{T}}}[$__range]))", "{{team}}")]),
    ("table", "Upstream cost and cache savings per model in range (USD)", "currencyUSD", [
        _q(f"sum by (model) (increase(embedding_proxy_upstream_cost_usd_total{{{T}}}[$__range]))", "{{model}} cost"),
        _q(f"sum by (model) (increase(embedding_proxy_cache_saved_usd_total{{{T}}}[$__range]))", "{{model}} saved"),
    ]),
    ("row", "Tokens and requests" + PER_TEAM, "", []),
    ("timeseries", "Tokens per second by team and source", "short", [_q(
        f"sum by (team, source) (rate(embedding_proxy_tokens_total{{{T}}}[{RI}]))", "{{team}} {{source}}")]),
    ("timeseries", "Requests per second by team", "reqps", [_q(
        f"sum by (team) (rate(embedding_proxy_requests_total{{{T}}}[{RI}]))", "{{team}}")]),
    ("table", "Tokens per team and key in range", "short", [_q(
        f"sum by (team, key_id, source) (increase(embedding_proxy_tokens_total{{{T}}}[$__range]))",
        "{{team}} {{key_id}} {{source}}")]),
    ("table", "Requests per team and key in range", "short", [_q(
        f"sum by (team, key_id, status_class) (increase(embedding_proxy_requests_total{{{T}}}[$__range]))",
        "{{team}} {{key_id}} {{status_class}}")]),
    ("timeseries", "Cache share of tokens by team", "percentunit", [_q(
        f'sum by (team) (rate(embedding_proxy_tokens_total{{{T},source="cache"}}[{RI}])) '
        f"/ sum by (team) (rate(embedding_proxy_tokens_total{{{T}}}[{RI}]))", "{{team}}")]),
    ("timeseries", "Tokens saved by the cache per team", "short", [_q(
        f"sum by (team) (rate(embedding_proxy_cache_saved_tokens_total{{{T}}}[{RI}]))", "{{team}}")]),
    ("row", "Quotas" + PER_TEAM, "", []),
    ("stat", "Quota rejections in range", "short", [_q(
        f"sum(increase(embedding_proxy_quota_rejections_total{{{T}}}[$__range])) or vector(0)")]),
    ("bargauge", "Quota headroom (remaining / limit in the current window)", "percentunit",
     [_q(HEADROOM, "{{team}} {{key_id}} {{limit}}")], {"min": 0, "max": 1}),
    ("table", "Quota limits in force", "short", [_q(
        f"max by (team, key_id, limit) (embedding_proxy_quota_limit{{{T}}})", "{{team}} {{key_id}} {{limit}}")]),
    ("timeseries", "Quota rejections by team and limit", "reqps", [_q(
        f"sum by (team, scope, limit) (rate(embedding_proxy_quota_rejections_total{{{T}}}[{RI}]))",
        "{{team}} {{scope}} {{limit}}")]),
]


GLOBAL = ("All teams: its metrics have no team label (they are counted per model, deployment or process), so the "
          "team variable does not filter this panel.")
PER_TEAM_NOTE = "Follows the team variable."


def _all_teams(title: str) -> str:
    """ "Upstream latency (retries included)" -> "Upstream latency (retries included; all teams)"."""
    return f"{title[:-1]}; all teams)" if title.endswith(")") else f"{title} (all teams)"


def _panel(pid: int, kind: str, title: str, unit: str, queries: list[dict[str, str]], defaults: dict[str, Any],
           x: int, y: int, w: int, h: int) -> dict[str, Any]:
    targets = []
    for i, q in enumerate(queries):
        target: dict[str, Any] = {"refId": chr(ord("A") + i), "datasource": DS, "expr": q["expr"],
                                  "legendFormat": q["legend"] or "__auto", "range": kind == "timeseries",
                                  "instant": kind != "timeseries"}
        if kind == "table":
            target["format"] = "table"
        targets.append(target)
    per_team = any(T in q["expr"] for q in queries)
    panel: dict[str, Any] = {
        "id": pid, "type": kind, "title": title if per_team else _all_teams(title),
        "description": PER_TEAM_NOTE if per_team else GLOBAL, "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, **defaults}, "overrides": []},
        "options": {}, "targets": targets,
    }
    if kind == "stat":
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    if kind == "table":
        panel["transformations"] = [{"id": "merge", "options": {}}]
    return panel


def _row(pid: int, title: str, y: int) -> dict[str, Any]:
    return {"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}


def _layout(spec: Spec) -> list[dict[str, Any]]:
    """Rows across the whole width; in each, its stats side by side sharing the width (4 h), then the other panels
    two by two (12 x 8)."""
    panels: list[dict[str, Any]] = []
    x, y, line = 0, 0, 0  # line: the height of the panels on the current line
    for pid, (kind, title, unit, queries, *more) in enumerate(spec, start=1):
        if kind == "row":
            x, y, line = 0, y + line, 0
            panels.append(_row(pid, title, y))
            y += 1
            stats = 0
            for entry in spec[pid:]:
                if entry[0] != "stat":
                    break
                stats += 1
            continue
        w, h = (max(6, 24 // stats), 4) if kind == "stat" else (12, 8)
        if x + w > 24:
            x, y, line = 0, y + line, 0
        panels.append(_panel(pid, kind, title, unit, queries, more[0] if more else {}, x, y, w, h))
        x, line = x + w, max(line, h)
    return panels


def _templating() -> dict[str, Any]:
    return {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0, "refresh": 1},
        {"name": "team", "label": "Team", "type": "query", "datasource": DS,
         "query": {"query": "label_values(embedding_proxy_requests_total, team)", "refId": "team"},
         "definition": "label_values(embedding_proxy_requests_total, team)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
         "current": {"text": ["All"], "value": ["$__all"]}, "hide": 0},
    ]}


def dashboard(uid: str, title: str, spec: Spec) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "tags": ["embedding-proxy"], "timezone": "utc", "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "graphTooltip": 1, "templating": _templating(), "annotations": {"list": []}, "links": [],
        "panels": _layout(spec),
    }


DASHBOARDS = {
    "overview.json": dashboard("embedding-proxy-overview", "Embedding proxy: operator overview", OVERVIEW),
    "usage.json": dashboard("embedding-proxy-usage", "Embedding proxy: usage and chargeback", USAGE),
}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


if __name__ == "__main__":
    for name, doc in DASHBOARDS.items():
        (OUT / name).write_text(render(doc))
        print(f"wrote {OUT / name}", file=sys.stderr)
