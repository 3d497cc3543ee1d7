"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp import web

from tests.conftest import UPSTREAM_KEY


def vectors(body: dict[str, Any]) -> list[np.ndarray]:
    """The float32 vectors of an embeddings answer, in index order, whatever the encoding."""
    out = []
    for item in sorted(body["data"], key=lambda d: d["index"]):
        emb = item["embedding"]
        if isinstance(emb, str):
            out.append(np.frombuffer(base64.b64decode(emb), dtype="<f4"))
        else:
            out.append(np.asarray(emb, dtype=np.float64).astype(np.float32))
    return out


async def direct(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The mock upstream's own answer to `body`."""
    async with aiohttp.ClientSession() as s, s.post(
        base_url + "/embeddings", json=body, headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


def assert_same_vectors(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == np.float32 and y.dtype == np.float32
        assert x.shape == y.shape
        assert np.array_equal(x, y)


class Clock:
    """An injected clock that tests move by hand (no sleeps)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def count_store_calls(store: Any) -> list[str]:
    """Replace `store.call` by a wrapper that records each call's op, in order; returns the (live) record."""
    calls: list[str] = []
    real = store.call

    async def counted(op: str, fn: Any, **kw: Any) -> Any:
        calls.append(op)
        return await real(op, fn, **kw)

    store.call = counted
    return calls


@dataclass(frozen=True)
class RawAnswer:
    status: int  # 0: the connection stayed open 5 s without an answer
    headers: dict[bytes, bytes]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def raw_http(port: int, data: bytes, *, half_close: bool = False) -> RawAnswer | None:
    """Send `data` as it is on a new connection (`half_close`: then shut our side, mid-body); the answer, or None
    when the proxy closed without one. For bytes no HTTP client sends (header values that are not UTF-8)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:  # the proxy answered and closed before reading everything
        raw = b""
    except TimeoutError:
        return RawAnswer(0, {}, b"")
    finally:
        writer.close()
    if raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):  # the interim answer to `Expect: 100-continue`
        raw = raw[25:]
    if not raw:
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    return RawAnswer(int(status_line.split(b" ")[1]), headers, body)


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[int]:
    """`app` on a free port of 127.0.0.1 as `embedding-proxy serve` runs it (TestServer differs: it cancels a handler
    whose client went away); yields the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition` (polled; a failure after 10 s), for what has no event to await."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached within 10 s"
        await asyncio.sleep(0.005)


async def raw_get(port: int, target: str, header_lines: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """A GET sent byte for byte (clients normalize paths like `/a/../b` and refuse bytes that are not UTF-8)."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + target.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                 + header_lines + b"\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body
