"""Small helpers shared by the integration tests."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import numpy as np

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
