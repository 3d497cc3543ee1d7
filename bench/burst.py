"""`burst`: the overload case of issue 21 at a scale that fits a shared 2-core machine.

Two proxies, one worker each, on the same Redis and mock upstream: the shipped defaults (the admission budget and
memory return on) and the same with `[admission] budget_mb = 0, return_memory = false` (every request admitted at
once, memory kept: the behaviour before the budget). Against each in turn: BURST_CONNECTIONS clients, closed loop,
each sending 2048-input float batches (90% inputs cached, 10% new) for BURST_S seconds; the worker's RSS sampled
every 0.25 s from before the burst to AFTER_S seconds after it. Reported: RSS before / peak / AFTER_S after, the
statuses (200, 503 with Retry-After, anything else, connections lost), admitted requests per second and their p50,
and the budget's figures as ratios to the unbudgeted ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import env as E
from .loadgen import RunResult, Target
from .scenarios import MODEL, Ctx, _fmt, _ok

BURST_CONNECTIONS = 48
BURST_S = 12.0
AFTER_S = 30.0
INPUTS = 2048
CACHED = 1843  # 90% of each batch from the warmed pool, the rest new
POOL = 2048
MIB = 2**20


def start(e: E.Env, penv: dict[str, str], base_config: str, workdir: Path, workers: int | None) -> list[E.Proc]:
    """The proxy with the shipped admission defaults, and the same without a budget or memory return."""
    procs = []
    for name, extra in (("proxy-budget", ""),
                        ("proxy-no-budget", "\n[admission]\nbudget_mb = 0\nreturn_memory = false\n")):
        config = workdir / f"{name}.toml"
        config.write_text(base_config + extra)
        procs.append(E.start_proxy(e, {**penv, "PROXY_CONFIG": str(config)}, workers, name=name))
    return procs


def _pool() -> list[str]:
    return [f"bench burst pool {k}: a sentence of about a dozen tokens for the batch" for k in range(POOL)]


async def _warm(ctx: Ctx, procs: list[E.Proc]) -> None:
    """The pool into Redis, then read through each proxy twice as float: its in-process tier then holds the
    entries and their float text, so the RSS before the burst is the warm process's."""
    pool = _pool()
    for n, proc in enumerate(procs):
        t = Target(proc.port, 1)
        for fmt in ("base64", "float", "float") if n == 0 else ("float", "float"):
            body = {"model": MODEL, "input": pool, "encoding_format": fmt}
            status, _ = await t.request(ctx.embed_request(body, proc=proc), 120, keep_body=False)
            if status != 200:
                raise RuntimeError(f"burst warm-up on {proc.name} failed with status {status}")
            await asyncio.sleep(1.0)  # cache writes land after the answers
        t.close()


def _maker(ctx: Ctx, proc: E.Proc, tag: str) -> Any:
    pool = _pool()
    rng = random.Random(21)

    def make(i: int) -> bytes:
        inputs = rng.sample(pool, CACHED) + [f"bench burst {ctx.run_id} {tag} {i} {k}: new" for k in
                                             range(INPUTS - CACHED)]
        rng.shuffle(inputs)
        return ctx.embed_request({"model": MODEL, "input": inputs, "encoding_format": "float"}, proc=proc)

    return make


async def _sample(pid_of: E.Proc, samples: list[tuple[float, int]], stop: asyncio.Event, t0: float) -> None:
    pids = pid_of.tree()
    while not stop.is_set():
        samples.append((time.monotonic() - t0, E.rss_bytes(pids)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def _one(ctx: Ctx, proc: E.Proc, tag: str, connections: int = BURST_CONNECTIONS,
               seconds: float = BURST_S) -> dict[str, Any]:
    pids = proc.tree()
    await asyncio.sleep(2.0)
    before = E.rss_bytes(pids)
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    sampler = asyncio.create_task(_sample(proc, samples, stop, t0))
    t = Target(proc.port, connections)
    cpu0 = E.cpu_seconds(pids)
    r: RunResult = await t.closed_loop(_maker(ctx, proc, tag), connections, 100_000, seconds, expect=(200,),
                                       grace_s=60)
    t.close()
    cpu = E.cpu_seconds(pids) - cpu0
    burst_end = time.monotonic() - t0
    await asyncio.sleep(AFTER_S)
    stop.set()
    await sampler
    after = E.rss_bytes(pids)
    during = [b for a, b in samples if a <= burst_end]
    lat = r.latencies_s[np.isfinite(r.latencies_s)]
    statuses = {str(k): v for k, v in sorted(r.statuses.items())}
    return {
        "connections": connections, "seconds": seconds, "wall_s": round(r.wall_s, 2),
        "statuses": statuses, "connections_lost": r.statuses.get(-1, 0),
        "admitted_per_s": round(r.completed / r.wall_s, 3) if r.wall_s else 0.0,
        "admitted_p50_ms": round(float(np.median(lat)) * 1e3, 1) if len(lat) else None,
        "proxy_cpu_s": round(cpu, 2),
        "proxy_cpu_ms_per_admitted": round(cpu / r.completed * 1e3, 1) if r.completed else None,
        "admitted_p90_ms": round(float(np.percentile(lat, 90)) * 1e3, 1) if len(lat) else None,
        "rss_mib": {"before": round(before / MIB, 1), "peak_during": round(max(during, default=0) / MIB, 1),
                    "after_30s": round(after / MIB, 1)},
        "rss_samples": [(round(a, 2), b) for a, b in samples],
    }


async def burst_scenario(ctx: Ctx, procs: list[E.Proc], connections: int = BURST_CONNECTIONS,
                         seconds: float = BURST_S) -> None:
    await _warm(ctx, procs)
    runs = {name: await _one(ctx, proc, name, connections, seconds)
            for name, proc in (("budget", procs[0]), ("no_budget", procs[1]))}
    ctx.results["burst"] = runs
    on, off = runs["budget"], runs["no_budget"]
    others = {k: v for k, v in on["statuses"].items() if k not in ("200", "503")}
    ctx.row(f"burst {connections} conns x {INPUTS}-input float (90% cached), {seconds:g} s: statuses",
            " ".join(f"{k}:{v}" for k, v in on["statuses"].items()),
            " ".join(f"{k}:{v}" for k, v in off["statuses"].items()), "", "only 200/503", _ok(not others))
    for label, key in (("RSS MiB before", "before"), ("RSS MiB peak during", "peak_during"),
                       (f"RSS MiB {AFTER_S:.0f} s after", "after_30s")):
        a, b = on["rss_mib"][key], off["rss_mib"][key]
        target, met = "", ""
        if key == "after_30s":
            target, met = "<= 1.25 x before", _ok(a <= 1.25 * on["rss_mib"]["before"])
        elif key == "peak_during":
            target, met = "<= 512", _ok(a <= 512)
        ctx.row(f"burst {label} (budget / none)", f"{a:.0f}", f"{b:.0f}", _fmt(a / b if b else None), target, met)
    ctx.row("burst admitted req/s (budget / none)", f"{on['admitted_per_s']:.2f}", f"{off['admitted_per_s']:.2f}",
            _fmt(on["admitted_per_s"] / off["admitted_per_s"] if off["admitted_per_s"] else None), ">= 1.00",
            _ok(on["admitted_per_s"] >= off["admitted_per_s"]))
    a_cpu, b_cpu = on["proxy_cpu_ms_per_admitted"], off["proxy_cpu_ms_per_admitted"]
    ctx.row("burst proxy CPU ms per admitted request, refusals included (budget / none)", _fmt(a_cpu, 0),
            _fmt(b_cpu, 0), _fmt(a_cpu / b_cpu if a_cpu and b_cpu else None), "", "")
    a50, b50 = on["admitted_p50_ms"], off["admitted_p50_ms"]
    ctx.row("burst admitted p50 ms (budget / none)", _fmt(a50, 0), _fmt(b50, 0),
            _fmt(a50 / b50 if a50 and b50 else None), "<= 1.00", _ok(bool(a50 and b50 and a50 <= b50)))
