"""The real Prometheus, with the project's scrape config and alert rules, scraping a proxy under test traffic:
every dashboard panel's query returns a finite number (and the traffic panels more than 0), for all teams and for
one team picked, every alert rule evaluates, and promtool accepts config, rules and the /metrics exposition.
Needs the Debian package `prometheus` (`.ci/run` installs it; under CI=true it must run).

Traffic comes in two rounds of the same kinds, with scrapes in between: a series' first sample is where rate()
and increase() start, so traffic that all lands before the first scrape would leave every rate at 0 and every
ratio and percentile NaN."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import RedisServer, free_port
from tests.promql import ALERTS, SCRAPE_CONFIG, alert_rules, panel_queries, substitute
from tests.stack import CONFIG, Server, base_env, create_keys, embed, http, start_mock, start_proxy, wait_http

pytestmark = pytest.mark.redis

QUOTA = "embedding_proxy_quota_"
LARGE = "text-embedding-3-large"
# Panels that must show traffic (a value > 0), not merely a finite number, after the test's two rounds.
BUSY_PANELS = {
    "Requests per second", "Cache hit ratio (share of tokens)", "Requests by status class", "Requests by cache outcome",
    "Request latency (4xx refusals left out; all teams)",
    "Request latency p95 by cache outcome (4xx refusals left out; all teams)",
    "Upstream calls by outcome (all teams)", "Upstream latency (retries included; all teams)", "Inputs by source",
    "Cache lookups by result (unique inputs; all teams)",
    "Upstream cost in range (USD)", "Saved by the cache in range (USD)", "Tokens saved by the cache in range",
    "Quota rejections in range", "Tokens per second by team and source", "Requests per second by team",
    "Tokens per team and key in range", "Cache share of tokens by team", "Tokens saved by the cache per team",
}
# Prometheus sends it from the scrape config's credentials_file, as deployed.
METRICS_TOKEN = "prometheus-test-metrics-token"
# The concrete team picked in the `team` variable for the second run of the per-team panels.
TEAM, QUOTA_TEAM = "search", "quota-team"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; under CI the Prometheus tests must run")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


@dataclass
class Stack:
    prometheus: str  # base URL of its HTTP API
    metrics_url: str
    api_url: str
    config: Path  # the templated scrape config

    def query(self, expr: str) -> dict[str, Any]:
        status, body = http("GET", f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert status == 200 and body["status"] == "success", (expr, body)
        data: dict[str, Any] = body["data"]
        return data


def _scrape_config(metrics_port: int) -> str:
    text = SCRAPE_CONFIG.read_text()
    for old, new in (("proxy:9464", f"127.0.0.1:{metrics_port}"), ("scrape_interval: 15s", "scrape_interval: 1s"),
                     ("evaluation_interval: 15s", "evaluation_interval: 1s")):
        assert old in text, f"{SCRAPE_CONFIG} no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def _drive(url: str, mock_url: str, keys: dict[str, tuple[str, str]], redis: RedisServer, tag: str) -> int:
    """One round of traffic: misses, a hit, a partial hit, another team and model, a 401, a retried call, an
    upstream failure and a quota rejection. Rounds differ only in their inputs, so every round feeds the same
    series. Returns how many embeddings requests it sent."""
    search, ads, quota = keys["search"][0], keys["ads"][0], keys[QUOTA_TEAM][0]
    client = redis.client()
    cached = len(client.keys("ep:emb:*"))
    assert embed(url, search, [f"{tag}a", f"{tag}b"])[0] == 200
    deadline = time.monotonic() + 10
    while len(client.keys("ep:emb:*")) < cached + 2:  # cache writes land after the answer
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.close()
    assert embed(url, search, [f"{tag}a", f"{tag}b"])[0] == 200  # hit
    assert embed(url, search, [f"{tag}a", f"{tag}c"])[0] == 200  # partial
    assert embed(url, ads, [f"{tag}x"], model=LARGE)[0] == 200
    assert embed(url, "sk-gateway-" + "x" * 43, ["a"])[0] == 401
    http("POST", mock_url + "/_mock/fail", {"mode": "status", "status": 500, "times": 1})
    assert embed(url, search, [f"{tag}retried"])[0] == 200  # one retry, then fine
    http("POST", mock_url + "/_mock/fail", {"mode": "status", "status": 500, "times": 2})
    assert embed(url, search, [f"{tag}failed"])[0] == 502
    sent = 7
    for i in range(5):  # rpm = 2: a rejection within 3 requests, or 5 when a minute ends in between
        sent += 1
        if embed(url, quota, [f"{tag}q{i}"])[0] == 429:
            return sent
    raise AssertionError("no quota rejection")


def _wait(s: Stack, requests: int, scrapes: int = 2) -> None:
    """Until Prometheus has scraped `requests` embeddings requests in all, and then `scrapes` more times."""
    deadline = time.monotonic() + 30
    while True:
        result = s.query("sum(embedding_proxy_requests_total)")["result"]
        if result and float(result[0]["value"][1]) == requests:
            break
        assert time.monotonic() < deadline, f"Prometheus did not see the traffic: {result}"
        time.sleep(0.1)
    seen: set[str] = set()
    while len(seen) <= scrapes:  # the scrape that saw the traffic, then `scrapes` more
        seen.add(s.query('timestamp(up{job="embedding-proxy"})')["result"][0]["value"][1])
        assert time.monotonic() < deadline, "Prometheus did not scrape often enough"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = _binary("prometheus")
    _binary("promtool")
    workdir = tmp_path_factory.mktemp("prometheus")
    redis_server.flush()
    servers: list[Server] = []
    try:
        mock, mock_url = start_mock(workdir)
        servers.append(mock)
        metrics_port = free_port()
        proxy, url = start_proxy(workdir, mock_url, redis_server.url, CONFIG, workers=1, metrics_port=metrics_port,
                                 env={"PROXY_METRICS_TOKEN": METRICS_TOKEN})
        servers.append(proxy)

        config = workdir / "prometheus.yml"
        config.write_text(_scrape_config(metrics_port))
        (workdir / "metrics-token").write_text(METRICS_TOKEN + "\n")  # beside the config, as in deploy/prometheus
        shutil.copy(ALERTS, workdir / ALERTS.name)
        port = free_port()
        (workdir / "prom").mkdir()
        servers.append(Server([prometheus, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                              base_env(), workdir / "prom"))
        prom_url = f"http://127.0.0.1:{port}"
        wait_http(prom_url + "/-/ready", servers[-1].proc)
        s = Stack(prom_url, f"http://127.0.0.1:{metrics_port}/metrics", url, config)

        # Round 1 makes every series exist; Prometheus's first sample of a series is its starting point, so rate()
        # and increase() only see what changes after it. Round 2 sends the same kinds of traffic again.
        keys = create_keys(redis_server.url, ["search", "ads", QUOTA_TEAM])
        sent = _drive(url, mock_url, keys, redis_server, "r1-")
        _wait(s, sent)
        sent += _drive(url, mock_url, keys, redis_server, "r2-")
        _wait(s, sent)
        yield s
    finally:
        for server in reversed(servers):
            server.stop()


def _promtool(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run([_binary("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_config_rules_and_metrics(stack: Stack) -> None:
    _promtool("check", "config", str(SCRAPE_CONFIG))
    _promtool("check", "config", str(stack.config))
    _promtool("check", "rules", str(ALERTS))
    status, text = http("GET", stack.metrics_url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert status == 200
    _promtool("check", "metrics", stdin=text)


def test_alerts_fire_on_synthetic_series() -> None:
    # quota surge included: this one does not need the quota code, only the metric's name and labels
    _promtool("test", "rules", str(ALERTS.with_name("alerts_test.yml")))


def test_metrics_are_on_their_own_port(stack: Stack) -> None:
    assert http("GET", stack.api_url + "/metrics")[0] == 404
    assert http("GET", stack.metrics_url)[0] == 401  # Prometheus (up, below) sent the token
    _, body = http("GET", stack.prometheus + "/api/v1/targets")
    targets = body["data"]["activeTargets"]
    assert [t["labels"]["job"] for t in targets] == ["embedding-proxy"] and targets[0]["health"] == "up"


def _values(data: dict[str, Any]) -> list[float]:
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    return [float(x["value"][1]) for x in data["result"]]


def test_every_panel_query_returns_a_number(stack: Stack) -> None:
    # NaN (a ratio or a percentile of nothing) and +-Inf are what a broken panel shows: "data", but no number
    problems = []
    for dashboard, title, expr in panel_queries():
        values = _values(stack.query(substitute(expr)))
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            problems.append(f"{dashboard}: {title}: no finite value in {values}: {expr}")
        elif title in BUSY_PANELS and max(finite) <= 0:
            problems.append(f"{dashboard}: {title}: no traffic in {values}: {expr}")
    assert len(panel_queries()) > 30
    assert {t for _, t, _ in panel_queries()} >= BUSY_PANELS
    assert not problems, "panels without a number:\n" + "\n".join(problems)


def test_per_team_panels_show_the_team_picked(stack: Stack) -> None:
    problems = []
    checked = 0
    for dashboard, title, expr in panel_queries():
        if "$team" not in expr:
            continue
        team = QUOTA_TEAM if QUOTA in expr else TEAM  # only quota-team has limits
        result = stack.query(substitute(expr, team))
        values = _values(result)
        if not [v for v in values if math.isfinite(v)]:
            problems.append(f"{dashboard}: {title}: no finite value for team {team} in {values}")
        other = {x["metric"]["team"] for x in result["result"] if "team" in x.get("metric", {})} - {team}
        if other:
            problems.append(f"{dashboard}: {title}: shows teams {other} when {team} is picked")
        checked += 1
    assert checked > 15
    assert not problems, "\n".join(problems)


def test_quota_window_end_is_exported(stack: Stack) -> None:
    result = stack.query(f'embedding_proxy_quota_window_end_timestamp_seconds{{team="{QUOTA_TEAM}"}}')["result"]
    assert [x["metric"]["limit"] for x in result] == ["rpm"]
    end = float(result[0]["value"][1])
    assert end % 60 == 0 and time.time() - 120 < end <= time.time() + 60  # a UTC minute's end


def test_quota_headroom_is_full_once_the_window_has_ended(tmp_path: Path) -> None:
    """The usage board's headroom query on synthetic series (promtool): what the gauges say while the window lasts,
    all of the limit once it has ended, although nothing was admitted (so nothing updated the gauges) since."""
    [expr] = [e for d, t, e in panel_queries() if t.startswith("Quota headroom")]
    series = {  # team limit rpm = 100 (10 left, window ends at 120 s); key limit tpm = 1000 (250 left, ends 600 s)
        'embedding_proxy_quota_limit{team="t", limit="rpm"}': 100,
        'embedding_proxy_quota_remaining{team="t", limit="rpm"}': 10,
        'embedding_proxy_quota_window_end_timestamp_seconds{team="t", limit="rpm"}': 120,
        'embedding_proxy_quota_limit{team="t", key_id="key_1", limit="tpm"}': 1000,
        'embedding_proxy_quota_remaining{team="t", key_id="key_1", limit="tpm"}': 250,
        'embedding_proxy_quota_window_end_timestamp_seconds{team="t", key_id="key_1", limit="tpm"}': 600,
    }
    team, key = '{team="t", limit="rpm"}', '{team="t", key_id="key_1", limit="tpm"}'
    expected = {"1m": {team: 0.1, key: 0.25}, "3m": {team: 1, key: 0.25}, "11m": {team: 1, key: 1}}
    doc = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": name, "values": f"{value}x15"} for name, value in series.items()],
        "promql_expr_test": [
            {"expr": substitute(expr), "eval_time": at,
             "exp_samples": [{"labels": labels, "value": v} for labels, v in want.items()]}
            for at, want in expected.items()
        ],
    }]}
    path = tmp_path / "headroom_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    _promtool("test", "rules", str(path))


def test_team_variable_lists_the_teams(stack: Stack) -> None:
    query = urllib.parse.urlencode({"match[]": "embedding_proxy_requests_total"})
    status, body = http("GET", f"{stack.prometheus}/api/v1/label/team/values?{query}")
    assert status == 200 and {"search", "ads"} <= set(body["data"])


def test_every_alert_rule_evaluates(stack: Stack) -> None:
    for _, expr in alert_rules():
        stack.query(expr)  # parses and evaluates (may be empty: the condition is false)
    deadline = time.monotonic() + 10
    while True:
        _, body = http("GET", stack.prometheus + "/api/v1/rules")
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        if {r["name"] for r in rules} == {n for n, _ in alert_rules()} and all(
                r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.2)
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    firing = {r["name"] for r in rules if r["state"] != "inactive"}
    assert "EmbeddingProxyDown" not in firing
