"""Issue 21, point 6: a long usage report runs beside live traffic without stalling its worker or making it bypass
Redis, against a real `embedding-proxy serve` process and a ledger of 300 keys x 200 days written into Redis.

Before, the report was read in pipelines of up to 500 days and added up on the event loop: the worker stalled for
the whole of it, live requests waited behind it, and their Redis calls timed out as if Redis had failed, so the
worker bypassed Redis and sent cached inputs upstream, paid for. How long live requests wait is measured by the
bench (`python -m bench --scenarios report`), not here.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer
from tests.stack import CONFIG, MODEL, Server, create_keys, embed, http, scrape, start_mock, start_proxy, value

pytestmark = pytest.mark.redis
ADMIN_KEY = "admin-key-for-the-report-test-0123456789"
KEYS, DAYS = 300, 200
# Every hit an MGET (no in-process tier), so live requests keep calling Redis while the report runs.
LIVE = CONFIG + "[cache]\nlocal_max_mb = 0\n"


def write_ledger(redis: RedisServer, team: str, keys: int, days: int) -> dt.date:
    """`keys` keys x `days` days of one model's usage, written as the ledger script writes it; the first day."""
    client = redis.client()
    first = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=days - 1)
    pipe = client.pipeline(transaction=False)
    for n in range(days):
        day = (first + dt.timedelta(days=n)).isoformat()
        fields: dict[str, int] = {}
        for k in range(keys):
            base = f"key_{k:04d}|{MODEL}|"
            fields |= {base + "requests": 2, base + "upstream_tokens": 5, base + "cached_tokens": 7,
                       base + "failed_tokens": 1, base + "unconfirmed_tokens": 0}
        pipe.hset(f"ep:usage:{team}:{day}", mapping=fields)
    pipe.sadd("ep:usage-teams", team)
    pipe.execute()
    client.close()
    return first


@pytest.fixture
def proxy(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    redis_server.flush()
    mock, mock_url = start_mock(tmp_path)
    server, url = start_proxy(tmp_path, mock_url, redis_server.url, LIVE, workers=1,
                              env={"PROXY_ADMIN_KEY": ADMIN_KEY})
    yield server, url
    server.stop()
    mock.stop()


def test_a_long_report_beside_live_requests_completes_and_never_bypasses_redis(
        redis_server: RedisServer, proxy: tuple[Server, str]) -> None:
    server, url = proxy
    first = write_ledger(redis_server, "chargeback", KEYS, DAYS)
    key = create_keys(redis_server.url, ["live"])["live"][0]
    inputs = [f"live input {n}" for n in range(8)]
    assert embed(url, key, inputs)[0] == 200  # now cached: the live requests below are hits, each an MGET

    live: list[int] = []
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            live.append(embed(url, key, inputs)[0])

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        status, doc = http("GET", f"{url}/admin/usage?since={first}&by=key&team=chargeback",
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    finally:
        done.set()
        thread.join()
    assert status == 200, doc
    rows = doc["data"]
    assert len(rows) == KEYS and all(r["requests"] == 2 * DAYS and r["total_tokens"] == 11 * DAYS for r in rows)
    assert live and set(live) == {200}
    time.sleep(1.3)  # the counters are written every second
    after = scrape(url + "/metrics")[1]
    assert value(after, "embedding_proxy_redis_bypasses_total") == 0
    assert "bypassing it" not in server.stderr()
    # and the worker's event loop never stalled for anything like it did (for seconds: the whole report); the
    # bound is generous, the bench measures the live requests' latency
    ticks = value(after, "embedding_proxy_event_loop_lag_seconds_count")
    assert ticks > 0 and value(after, "embedding_proxy_event_loop_lag_seconds_bucket", le="0.5") == ticks
