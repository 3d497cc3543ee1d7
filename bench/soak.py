"""The soak: resident memory of the proxy under a steady mixed load for minutes (README "Overload and memory").

The mix is the one of issue 15's report, deterministic (request i is built from a generator seeded with i):
- batch sizes 1-256, log-uniform (as many 1-2 input requests as 128-256 ones; median about 16), a lone input sent
  as a bare string half the time;
- each input a repeat (one of a fixed pool, cached once seen) or a new one, half and half;
- `encoding_format` float or base64, half and half;
- `dimensions` absent (1536), 1024, 512 or 256, a quarter each (text-embedding-3-small takes them);
- one request in five sends its inputs as token-id arrays instead of strings (a pool of its own for the repeats).
The repeat pool is sized so its entries (every `dimensions` value) exceed the in-process tier's 64 MiB default,
so the tier fills to its cap and then evicts. RSS is sampled every second; the slope is fitted over the samples
after warm-up (the first 20 % of the run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .env import rss_bytes
from .loadgen import Target
from .scenarios import MODEL, Ctx, _fmt, _ok

SEED = 15
POOL = 2000  # repeat inputs, text and token-id each: 16,000 keys over the four `dimensions`, about 128 MB in the tier
DIMENSIONS = (None, 1024, 512, 256)
TOKEN_SHARE = 0.2
REPEAT_SHARE = 0.5
MAX_BATCH = 256
WARMUP_SHARE = 0.2


def pool_text(k: int) -> str:
    return f"soak pool {k}: the quick brown fox jumps over the lazy dog {k * 7919 % 10007}"


def pool_tokens(k: int) -> list[int]:
    return [(k * 7919 + t * 104729) % 50000 for t in range(4 + k % 29)]


class Mix:
    """Request bodies for the soak, and counts of what was sent (for the report)."""

    def __init__(self, run_id: str, seed: int = SEED) -> None:
        self.run_id = run_id
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self.batch_sizes: list[int] = []

    def describe(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "model": MODEL, "batch_sizes": f"1-{MAX_BATCH}, log-uniform",
            "repeat_share": REPEAT_SHARE, "repeat_pool": POOL, "encoding_format": {"float": 0.5, "base64": 0.5},
            "dimensions": [d or "absent (1536)" for d in DIMENSIONS], "token_id_request_share": TOKEN_SHARE,
        }

    def sent(self) -> dict[str, Any]:
        sizes = np.array(self.batch_sizes or [0])
        return {**dict(sorted(self.counts.items())),
                "batch_size_p50": float(np.percentile(sizes, 50)), "batch_size_p90": float(np.percentile(sizes, 90)),
                "batch_size_mean": round(float(sizes.mean()), 1), "batch_size_max": int(sizes.max())}

    def body(self, i: int) -> dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + i)
        size = min(MAX_BATCH, int(2 ** rng.uniform(0, 8.0001)))
        tokens = rng.random() < TOKEN_SHARE
        dims = rng.choice(DIMENSIONS)
        fmt = rng.choice(("float", "base64"))
        items: list[Any] = []
        for j in range(size):
            if rng.random() < REPEAT_SHARE:
                k = rng.randrange(POOL)
                items.append(pool_tokens(k) if tokens else pool_text(k))
                self.counts["inputs_repeat"] += 1
            else:
                items.append([60000 + i % 30000, 90000 + i // 30000, 1000 + j, 17, 42] if tokens
                             else f"soak new {self.run_id} {i} {j}: a sentence nobody sent before")
                self.counts["inputs_new"] += 1
        body: dict[str, Any] = {"model": MODEL, "encoding_format": fmt,
                                "input": items[0] if size == 1 and not tokens and rng.random() < 0.5 else items}
        if dims is not None:
            body["dimensions"] = dims
        self.counts["requests"] += 1
        self.counts[f"requests_{fmt}"] += 1
        self.counts[f"requests_dimensions_{dims or 'absent'}"] += 1
        self.counts["requests_token_ids" if tokens else "requests_strings"] += 1
        self.batch_sizes.append(size)
        return body


def server_pids(tree: list[int]) -> list[int]:
    """The server processes: `serve` itself, or the workers of `serve --workers N` (its parent and multiprocessing's
    resource tracker have no SIGUSR2 handler: the signal would stop them)."""
    workers = [p for p in tree[1:] if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return workers or tree[:1]


async def heap_snapshots(ctx: Ctx, seconds: float, stop: asyncio.Event) -> list[dict[str, Any]]:
    """With `--tracemalloc`: SIGUSR2 to the proxy's server processes at the start, at the end of warm-up, then every
    further fifth of the run and at its end; each snapshot's report (growth since the previous one) as read back."""
    directory = ctx.opts.tracemalloc_dir
    if directory is None:
        return []
    servers = server_pids(ctx.proxy.tree())
    marks = [0.0, *(seconds * WARMUP_SHARE * k for k in range(1, 6))]
    t0 = time.monotonic()
    out: list[dict[str, Any]] = []
    for n, mark in enumerate(marks, 1):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, mark - (time.monotonic() - t0)))
        for pid in servers:
            os.kill(pid, signal.SIGUSR2)
        for pid in servers:
            path = Path(directory) / f"tracemalloc-{pid}-{n}.txt"
            for _ in range(600):  # a snapshot and its comparisons take seconds of CPU, minutes on a loaded machine
                if path.exists() and path.read_text().endswith("\n"):
                    break
                await asyncio.sleep(0.5)
            out.append({"pid": pid, "at_s": round(time.monotonic() - t0, 1), "file": str(path),
                        "report": path.read_text() if path.exists() else "not written"})
        if stop.is_set():
            break
    return out


async def soak_scenario(ctx: Ctx) -> None:
    minutes = ctx.opts.soak_minutes
    rate = ctx.opts.soak_rps
    mix = Mix(ctx.run_id)

    def make(i: int) -> bytes:
        return ctx.embed_request(mix.body(i))

    pids = ctx.proxy.tree()
    before = rss_bytes(pids)
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - t0, rss_bytes(pids)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    t = Target(ctx.proxy.port)
    sampler = asyncio.create_task(sample())
    heaps = asyncio.create_task(heap_snapshots(ctx, minutes * 60, stop))
    r = await ctx.measured(lambda: t.open_loop(make, rate, minutes * 60, grace_s=30))
    stop.set()
    await sampler
    snapshots = await heaps
    t.close()
    await asyncio.sleep(3)
    after = rss_bytes(pids)
    arr = np.array(samples, dtype=float)
    warmup_s = float(arr[-1, 0]) * WARMUP_SHARE if len(arr) else 0.0
    warm = arr[arr[:, 0] >= warmup_s] if len(arr) > 4 else arr
    slope = float(np.polyfit(warm[:, 0] / 60, warm[:, 1] / 2**20, 1)[0]) if len(warm) > 2 else float("nan")
    mib = 2**20
    ctx.results["soak"] = {
        "minutes": minutes, "offered_rps": rate, "run": r.summary(), "mix": mix.describe(), "sent": mix.sent(),
        "rss_mib": {"before": round(before / mib, 2), "during_max": round(float(arr[:, 1].max()) / mib, 2),
                    "at_warmup": round(float(warm[0, 1]) / mib, 2), "warmup_s": round(warmup_s, 1),
                    "end": round(float(arr[-1, 1]) / mib, 2), "after": round(after / mib, 2)},
        "growth_mib_per_min_after_warmup": round(slope, 3),
        "samples": [(round(a, 1), int(b)) for a, b in samples],
    }
    if snapshots:
        ctx.results["soak"]["tracemalloc"] = snapshots
    ctx.row(f"soak {minutes:g} min @{rate:.0f} req/s: RSS MiB before / at warm-up / max during / after",
            f"{before / mib:.1f} / {warm[0, 1] / mib:.1f} / {arr[:, 1].max() / mib:.1f} / {after / mib:.1f}",
            "", "", "", "")
    ctx.row("soak RSS growth after warm-up (MiB/min); p99 ms; errors", f"{slope:.2f}; {_fmt(r.pct(99) * 1e3)}; "
            f"{r.errors}", "", "", "< 1.0", _ok(slope < 1.0 and r.errors == 0))
