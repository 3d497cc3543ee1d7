"""Quotas are exact across processes: two `embedding-proxy serve` processes share one Redis and one team budget."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.accounts.keys import KeyStore
from proxy.config import RedisSettings
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import UPSTREAM_KEY, Upstream, free_port

pytestmark = pytest.mark.redis
TPM = 1000
USED = re.compile(r"on tokens per minute: limit 1000, used (\d+), requested (\d+)\.")


def start_proxy(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # stderr goes to a file: a pipe nobody reads fills up under a burst of warnings and freezes the proxy.
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", "--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port",
             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=err,
        )


@pytest.fixture
def two_proxies(tmp_path: Path, redis_url: str, upstream: Upstream) -> Iterator[list[str]]:
    config = tmp_path / "proxy.toml"
    # What is tested needs Redis answering: on a loaded machine a 0.25 s call limit would switch the processes to
    # their in-process fallback limits (each then admits the whole budget alone, as documented).
    config.write_text(f"[redis]\nsocket_timeout_s = 5.0\n[teams.burst]\ntpm = {TPM}\n")
    env = {**os.environ, "PROXY_CONFIG": str(config), "REDIS_URL": redis_url,
           "UPSTREAM_BASE_URL": upstream.base_url, "UPSTREAM_API_KEY": UPSTREAM_KEY}
    ports = [free_port(), free_port()]
    procs = [start_proxy(port, env, tmp_path / f"proxy-{port}.log") for port in ports]
    yield [f"http://127.0.0.1:{port}" for port in ports]
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(10)


async def wait_ready(session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 60  # a Python process's start-up takes seconds on a loaded 2-core machine
    while True:
        try:
            async with session.get(base + "/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"proxy at {base} did not become ready")
        await asyncio.sleep(0.05)


async def test_team_tokens_per_minute_exact_under_concurrency_across_two_processes(
    two_proxies: list[str], redis_url: str, upstream: Upstream
) -> None:
    store = Store(connect(RedisSettings(url=redis_url))[0], RedisSettings(url=redis_url, socket_timeout_s=5))
    key, _ = await KeyStore(store, RedisKeys("ep")).create("burst")
    await store.close()
    # The budget is per UTC minute: start the burst early in a minute so it cannot straddle two windows.
    if time.time() % 60 > 40:
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    sizes = [7 if i % 3 else 13 for i in range(300)]  # 300 requests of 7 or 13 tokens: ~2,900 asked of 1,000
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for base in two_proxies:
            await wait_ready(session, base)
        upstream.state.reset()

        async def one(i: int) -> tuple[int, int, int, str]:
            ids = [1000 + i * 20 + j for j in range(sizes[i])]  # distinct inputs: every admitted one is a miss
            async with session.post(
                two_proxies[i % 2] + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": ids},
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                body: Any = await resp.json()
                if resp.status == 200:
                    return resp.status, sizes[i], body["usage"]["prompt_tokens"], ""
                return resp.status, sizes[i], 0, body["error"]["message"]

        results = await asyncio.gather(*(one(i) for i in range(len(sizes))))
    statuses = {s for s, _, _, _ in results}
    assert statuses <= {200, 429}, statuses
    admitted = sum(tokens for status, _, tokens, _ in results if status == 200)
    refused = [(size, message) for status, size, _, message in results if status == 429]
    assert admitted <= TPM
    assert refused, "the burst asked for more than the budget, so some requests must be refused"
    # Refused requests consume nothing and the counter only grows: every refused request must have been too big
    # for what is left now, or it was refused while it fit.
    assert all(size > TPM - admitted for size, _ in refused), (admitted, sorted({s for s, _ in refused}))
    # And when it was refused, it did not fit what was used at that moment, as the message says.
    for size, message in refused:
        m = USED.search(message)
        assert m is not None, message
        used, asked = int(m.group(1)), int(m.group(2))
        assert asked == size and used + asked > TPM and used <= admitted, message
    assert upstream.state.inputs == sum(1 for status, _, _, _ in results if status == 200)
