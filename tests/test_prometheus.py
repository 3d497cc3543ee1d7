"""The real Prometheus, with the project's scrape config and alert rules, scraping a proxy under test traffic:
every dashboard panel's query returns data, every alert rule evaluates, and promtool accepts config, rules and the
/metrics exposition. Needs the Debian package `prometheus` (`.ci/run` installs it; under CI=true it must run)."""

from __future__ import annotations

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

from tests.conftest import RedisServer, free_port
from tests.promql import ALERTS, SCRAPE_CONFIG, alert_rules, panel_queries, substitute
from tests.stack import CONFIG, Server, base_env, create_keys, embed, http, start_mock, start_proxy, wait_http

pytestmark = pytest.mark.redis

REQUESTS = 10  # embeddings requests sent by `_drive`
QUOTA = "embedding_proxy_quota_"


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


def _drive(url: str, mock_url: str, keys: dict[str, tuple[str, str]], redis: RedisServer) -> None:
    search, ads, quota = keys["search"][0], keys["ads"][0], keys["quota-team"][0]
    assert embed(url, search, ["a", "b"])[0] == 200
    client = redis.client()
    deadline = time.monotonic() + 10
    while len(client.keys("ep:emb:*")) < 2:  # cache writes land after the answer
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.close()
    assert embed(url, search, ["a", "b"])[0] == 200  # hit
    assert embed(url, search, ["a", "c"])[0] == 200  # partial
    assert embed(url, ads, ["x"], model="text-embedding-3-large")[0] == 200
    assert embed(url, "sk-gateway-" + "x" * 43, ["a"])[0] == 401
    http("POST", mock_url + "/_mock/fail", {"mode": "status", "status": 500, "times": 1})
    assert embed(url, search, ["retried"])[0] == 200  # one retry, then fine
    http("POST", mock_url + "/_mock/fail", {"mode": "status", "status": 500, "times": 2})
    assert embed(url, search, ["failed"])[0] == 502
    for i in range(3):  # the third is over the team's rpm once quotas are in
        embed(url, quota, [f"q{i}"])


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
        proxy, url = start_proxy(workdir, mock_url, redis_server.url, CONFIG, workers=1, metrics_port=metrics_port)
        servers.append(proxy)

        config = workdir / "prometheus.yml"
        config.write_text(_scrape_config(metrics_port))
        shutil.copy(ALERTS, workdir / ALERTS.name)
        port = free_port()
        (workdir / "prom").mkdir()
        servers.append(Server([prometheus, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                              base_env(), workdir / "prom"))
        prom_url = f"http://127.0.0.1:{port}"
        wait_http(prom_url + "/-/ready", servers[-1].proc)
        s = Stack(prom_url, f"http://127.0.0.1:{metrics_port}/metrics", url, config)

        _drive(url, mock_url, create_keys(redis_server.url, ["search", "ads", "quota-team"]), redis_server)
        deadline = time.monotonic() + 30
        while True:  # until Prometheus has scraped the end of the traffic...
            result = s.query("sum(embedding_proxy_requests_total)")["result"]
            if result and float(result[0]["value"][1]) == REQUESTS:
                break
            assert time.monotonic() < deadline, f"Prometheus did not see the traffic: {result}"
            time.sleep(0.2)
        while True:  # ...and every series a few times, so rate() has two samples of each
            series = s.query('{__name__=~"embedding_proxy_.+"}[1m]')["result"]
            if min(len(x["values"]) for x in series) >= 3:
                break
            assert time.monotonic() < deadline, "Prometheus did not scrape often enough"
            time.sleep(0.2)
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
    status, text = http("GET", stack.metrics_url)
    assert status == 200
    _promtool("check", "metrics", stdin=text)


def test_alerts_fire_on_synthetic_series() -> None:
    # quota surge included: this one does not need the quota code, only the metric's name and labels
    _promtool("test", "rules", str(ALERTS.with_name("alerts_test.yml")))


def test_metrics_are_on_their_own_port(stack: Stack) -> None:
    assert http("GET", stack.api_url + "/metrics")[0] == 404
    _, body = http("GET", stack.prometheus + "/api/v1/targets")
    targets = body["data"]["activeTargets"]
    assert [t["labels"]["job"] for t in targets] == ["embedding-proxy"] and targets[0]["health"] == "up"


def test_every_panel_query_returns_data(stack: Stack) -> None:
    empty = []
    checked = 0
    for dashboard, title, expr in panel_queries():
        if QUOTA in expr:
            continue  # test_quota_panels_return_data
        if not stack.query(substitute(expr))["result"]:
            empty.append(f"{dashboard}: {title}: {expr}")
        checked += 1
    assert checked > 25
    assert not empty, "panels without data:\n" + "\n".join(empty)


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


# The quota panels read embedding_proxy_quota_{rejections_total,limit,remaining}: `[teams.quota-team] rpm = 2`
# makes the third quota-team request a rejection and sets the team's limit and remaining gauges.
def test_quota_panels_return_data(stack: Stack) -> None:
    empty = []
    for dashboard, title, expr in panel_queries():
        if QUOTA in expr and not stack.query(substitute(expr))["result"]:
            empty.append(f"{dashboard}: {title}: {expr}")
    assert not empty, "quota panels without data:\n" + "\n".join(empty)
