"""`embedding-proxy serve --workers 2` against a private redis-server: known traffic, exact counter deltas summed
over both workers, JSON access lines from both, and a graceful stop that removes the metric files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.stack import (
    CONFIG,
    MODEL,
    Samples,
    base_env,
    create_keys,
    delta,
    embed,
    http,
    scrape,
    start_mock,
    start_proxy,
    value,
)

pytestmark = pytest.mark.redis



class Stack:
    def __init__(self, workdir: Path, redis: RedisServer) -> None:
        redis.flush()
        self.redis = redis
        self.mock, self.mock_url = start_mock(workdir)
        try:
            self.proxy, self.url = start_proxy(workdir, self.mock_url, redis.url, CONFIG, workers=2)
        except BaseException:
            self.mock.stop()
            raise
        self.keys = create_keys(redis.url, ["search", "quota-team"])
        self.workdir = workdir

    def metrics(self) -> Samples:
        """The summed metrics once every worker has written its counts (each does so every second)."""
        time.sleep(1.3)
        return scrape(self.url + "/metrics")[1]

    def wait_cached(self, entries: int) -> None:
        """Cache writes land after the answer: wait for them so the next request's outcome is known."""
        client = self.redis.client()
        deadline = time.monotonic() + 10
        while len(client.keys("ep:emb:*")) < entries:
            assert time.monotonic() < deadline, "cache writes did not land"
            time.sleep(0.02)
        client.close()


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("workers"), redis_server)
    yield s
    s.proxy.stop()
    s.mock.stop()


def access_lines(stack: Stack, pids: int = 2) -> list[dict[str, Any]]:
    """The access lines so far; each worker writes its buffered lines every 0.25 s."""
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in stack.proxy.stdout().splitlines() if line.startswith("{")]
        if len({line["pid"] for line in lines}) >= pids or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_counters_are_exact_across_two_workers(stack: Stack) -> None:
    key, key_id = stack.keys["search"]
    team = {"team": "search", "key_id": key_id, "model": MODEL}
    before = stack.metrics()

    status, body = embed(stack.url, key, ["a", "b", "c"])
    assert status == 200 and body["usage"]["prompt_tokens"] == 3, body
    stack.wait_cached(3)
    assert embed(stack.url, key, ["a", "b"])[0] == 200  # hit
    status, body = embed(stack.url, key, ["a", "d"])  # partial
    assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 1, body
    stack.wait_cached(4)
    # the upstream fails twice: one retry (max_retries = 1), then 502
    assert http("POST", stack.mock_url + "/_mock/fail", {"mode": "status", "status": 500, "times": 2})[0] == 200
    status, body = embed(stack.url, key, ["e"])
    assert status == 502 and body["error"]["code"] == "upstream_error", body
    # unknown keys, each on its own connection, so both workers answer some
    for _ in range(20):
        assert embed(stack.url, "sk-gateway-" + "x" * 43, ["a"])[0] == 401

    after = stack.metrics()
    d = lambda name, **labels: delta(before, after, name, **labels)  # noqa: E731
    assert d("embedding_proxy_requests_total", **team, status_class="2xx", cache="miss") == 1
    assert d("embedding_proxy_requests_total", **team, status_class="2xx", cache="hit") == 1
    assert d("embedding_proxy_requests_total", **team, status_class="2xx", cache="partial") == 1
    assert d("embedding_proxy_requests_total", **team, status_class="5xx", cache="none") == 1
    assert d("embedding_proxy_requests_total", team="", key_id="", status_class="4xx", cache="none") == 20
    assert d("embedding_proxy_requests_total") == 24
    assert d("embedding_proxy_request_duration_seconds_count") == 24
    assert d("embedding_proxy_inputs_total", team="search", model=MODEL, source="cache") == 3
    assert d("embedding_proxy_inputs_total", team="search", model=MODEL, source="upstream") == 4
    assert d("embedding_proxy_tokens_total", **team, source="cache") == 3  # "a", "b", "c", "d": one token each
    assert d("embedding_proxy_tokens_total", **team, source="upstream") == 4
    assert d("embedding_proxy_cache_saved_tokens_total", team="search", model=MODEL) == 3
    assert d("embedding_proxy_cache_saved_usd_total", team="search", model=MODEL) == pytest.approx(3 * 0.02 / 1e6)
    assert d("embedding_proxy_upstream_cost_usd_total", team="search", model=MODEL) == pytest.approx(4 * 0.02 / 1e6)
    assert d("embedding_proxy_cache_lookups_total", result="hit") == 3
    assert d("embedding_proxy_cache_lookups_total", result="miss") == 5
    assert d("embedding_proxy_cache_lookups_total", result="error") == 0
    assert d("embedding_proxy_upstream_requests_total", model=MODEL, outcome="ok") == 2
    assert d("embedding_proxy_upstream_requests_total", model=MODEL, outcome="error") == 1
    assert d("embedding_proxy_upstream_errors_total", model=MODEL, kind="bad_gateway") == 1
    assert d("embedding_proxy_upstream_errors_total", model=MODEL) == 1
    assert d("embedding_proxy_upstream_retries_total", model=MODEL, reason="upstream_error") == 1
    assert d("embedding_proxy_upstream_latency_seconds_count", model=MODEL) == 3
    assert d("embedding_proxy_upstream_batch_size_sum", model=MODEL) == 5  # the failed call too
    assert d("embedding_proxy_batch_size_count", model=MODEL) == 3
    assert d("embedding_proxy_batch_size_sum", model=MODEL) == 7
    assert d("embedding_proxy_redis_errors_total") == 0
    assert after[("embedding_proxy_requests_in_flight", frozenset())] == 0
    assert sum(v for (n, _), v in after.items() if n == "embedding_proxy_build_info") == 1  # max, not a sum

    # both workers answered, and each line is JSON without keys or inputs
    lines = access_lines(stack)
    assert len({line["pid"] for line in lines}) == 2
    served = [line for line in lines if line["status"] == 200]  # each worker writes its lines in batches
    assert any(s["key_id"] == key_id and s["team"] == "search" and s["inputs"] == 3 for s in served), served
    assert "sk-gateway-" not in stack.proxy.stdout() + stack.proxy.stderr()


def test_multiprocess_exposition_passes_promtool(stack: Stack) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed; under CI the Prometheus tests must run")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    text, _ = scrape(stack.url + "/metrics")
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# A team with `[teams.NAME] rpm = N` gets 429 rate_limit_exceeded on its (N+1)th request in a minute, and the
# rejection is counted once in embedding_proxy_quota_rejections_total{team, scope="team", limit="rpm"}.
def test_quota_rejection_is_counted_once_across_workers(stack: Stack) -> None:
    key, _ = stack.keys["quota-team"]
    before = stack.metrics()
    statuses = [embed(stack.url, key, [f"q{i}"]) for i in range(3)]
    assert [s for s, _ in statuses[:2]] == [200, 200], statuses
    status, body = statuses[2]
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded", body
    after = stack.metrics()
    rejected = delta(before, after, "embedding_proxy_quota_rejections_total", team="quota-team", scope="team",
                     limit="rpm")
    assert rejected == 1
    assert delta(before, after, "embedding_proxy_requests_total", team="quota-team", status_class="4xx") == 1
    assert delta(before, after, "embedding_proxy_requests_total", team="quota-team", status_class="2xx") == 2
    # the quota gauges are one value per limit (the most recent of any worker), window end included
    labels = {"team": "quota-team", "limit": "rpm"}
    assert value(after, "embedding_proxy_quota_limit", **labels) == 2
    assert value(after, "embedding_proxy_quota_remaining", **labels) == 0
    ends = value(after, "embedding_proxy_quota_window_end_timestamp_seconds", **labels)
    assert ends % 60 == 0 and time.time() < ends + 60  # the end of a UTC minute, this one or the last


def test_sigterm_stops_every_worker_and_removes_metric_files(redis_server: RedisServer, tmp_path: Path) -> None:
    mock, mock_url = start_mock(tmp_path)
    try:
        proxy, _ = start_proxy(tmp_path, mock_url, redis_server.url, CONFIG, workers=2)
        # the workers, not multiprocessing's resource tracker (it leaves on its own once the parent has gone)
        children = [pid for pid in _children(proxy.proc.pid) if "resource_tracker" not in _cmdline(pid)]
        assert len(children) == 2
        metric_dirs = list(tmp_path.glob("proxy-*/embedding-proxy-metrics-*"))
        assert len(metric_dirs) == 1 and any(metric_dirs[0].iterdir())
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(20) == 0, proxy.stderr()
        assert not any(_alive(pid) for pid in children)
        assert not metric_dirs[0].exists()
    finally:
        mock.stop()


def test_a_dead_worker_stops_the_set(redis_server: RedisServer, tmp_path: Path) -> None:
    mock, mock_url = start_mock(tmp_path)
    try:
        proxy, _ = start_proxy(tmp_path, mock_url, redis_server.url, CONFIG, workers=2)
        workers = [pid for pid in _children(proxy.proc.pid) if "spawn_main" in _cmdline(pid)]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        assert proxy.proc.wait(20) == 1  # the orchestrator restarts the whole set
        assert not _alive(workers[1])
        assert "exited with -9" in proxy.stderr()
    finally:
        mock.stop()


def test_workers_need_redis(tmp_path: Path) -> None:
    env = base_env()
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--port", "0", "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "REDIS_URL" in done.stderr and "--workers" in done.stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
