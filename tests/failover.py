"""Shared by the failover tests: steady load on a proxy while a Redis master dies, and waiting for it to recover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.http.app import KEYSTORE
from tests.conftest import Proxy, settle

MODEL = "text-embedding-3-small"


class Load:
    """`workers` loops sending requests (a cached input and a new one each) until stopped; every status is kept."""

    def __init__(self, proxy: Proxy, key: str, workers: int = 4) -> None:
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(proxy, key, n)) for n in range(workers)]

    async def _run(self, proxy: Proxy, key: str, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            resp = await proxy.embed(key, {"model": MODEL, "input": ["warm", f"load {n} {i}"]})
            self.statuses.append(resp.status)
            if resp.status != 200:
                self.errors.append(await resp.text())
            i += 1
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> float:
    """Seconds until `check()` held (polled every 0.1 s); fails after `within_s`."""
    started = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except Exception:  # the store is still switching over: try again
            pass
        if time.monotonic() - started > within_s:
            raise AssertionError(f"not within {within_s}s: {what}")
        await asyncio.sleep(0.1)


async def cache_works_again(proxy: Proxy, key: str, tag: str) -> bool:
    """A new batch is a miss, is written, and is then a hit (its inputs spread over every cluster master)."""
    body: dict[str, Any] = {"model": MODEL, "input": [f"after {tag} {time.monotonic()} {i}" for i in range(20)]}
    first = await proxy.embed(key, body)
    if first.status != 200 or first.headers["x-cache"] != "miss":
        return False
    await settle(proxy)
    second = await proxy.embed(key, body)
    return second.status == 200 and second.headers["x-cache"] == "hit"


async def keys_can_be_created(proxy: Proxy) -> bool:
    await proxy.app[KEYSTORE].create("after-failover")
    return True
