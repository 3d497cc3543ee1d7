"""PROXY_TRACEMALLOC (proxy/telemetry/heapdump.py): the allocation snapshots that tell a bounded fill from a leak.
A real `serve --workers 2` against a private redis-server and the mock upstream; SIGUSR2 to each worker."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import RedisServer
from tests.stack import CONFIG, create_keys, embed, start_mock, start_proxy

pytestmark = pytest.mark.redis


def workers_of(pid: int) -> list[int]:
    """The worker processes of `serve --workers N` (not multiprocessing's resource tracker beside them)."""
    kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def wait_file(path: Path) -> str:
    deadline = time.monotonic() + 30
    while not path.exists() or not path.read_text().endswith("\n"):
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.1)
    return path.read_text()


def test_sigusr2_writes_each_workers_snapshot_and_its_growth(redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.flush()
    heap = tmp_path / "heap"
    mock, mock_url = start_mock(tmp_path)
    try:
        proxy, url = start_proxy(tmp_path, mock_url, redis_server.url, CONFIG, workers=2,
                                 env={"PROXY_TRACEMALLOC": str(heap)})
        try:
            key = create_keys(redis_server.url, ["search"])["search"][0]
            workers = workers_of(proxy.proc.pid)
            assert len(workers) == 2
            for pid in workers:
                os.kill(pid, signal.SIGUSR2)
            first = {pid: wait_file(heap / f"tracemalloc-{pid}-1.txt") for pid in workers}
            for n in range(20):  # fresh connections: SO_REUSEPORT spreads them over both workers
                assert embed(url, key, [f"heap dump {n}: a sentence"])[0] == 200
            for pid in workers:
                os.kill(pid, signal.SIGUSR2)
            second = {pid: wait_file(heap / f"tracemalloc-{pid}-2.txt") for pid in workers}
            assert proxy.proc.poll() is None and all(Path(f"/proc/{pid}").exists() for pid in workers)
        finally:
            assert proxy.stop() == 0
    finally:
        mock.stop()
    growth = []
    for pid in workers:
        assert first[pid].startswith(f"snapshot 1 of pid {pid}: traced ")
        assert "top growth since" not in first[pid]  # nothing to compare with yet
        assert "largest sites now" in first[pid]
        text = second[pid]
        assert text.startswith(f"snapshot 2 of pid {pid}: traced ")
        since = text.split("top growth since the previous snapshot (size delta, count delta, site):\n")[1]
        growth.append(since.split("\n\n")[0])
        assert "top growth since the first snapshot" in text
    assert any("/proxy/" in g for g in growth), growth  # the requests' allocations are traced, by site
