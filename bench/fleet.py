"""Upstream fleet scenarios. `batching`: concurrent single-input misses against a slow upstream, micro-batching on
(the default) against off (`micro_batching = false`, one upstream call per request, as before it), interleaved in
one run. `ratelimit`: a rate-limited upstream (the mock's --rpm per --rate-window-s) at several client
concurrencies, through the proxy and called directly with the same load; the mock counts its 429s.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from . import env as E
from .env import cpu_seconds
from .loadgen import RunResult, Target
from .scenarios import MODEL, Ctx, _fmt, _ok

BATCHING_MODEL = f'[models."{MODEL}"]\ndimensions = 1536\nsupports_dimensions = true\n'
BATCH_LATENCY_MS = 30.0
BATCH_CONCURRENCY = 64
BATCH_REQUESTS = 1280  # per run: 20 per client
BATCH_ROUNDS = 2  # on/off pairs, the order alternating
SPREAD_S = 0.1  # 64 misses arriving over ~100 ms (issue 19 point 4)
LONE_REQUESTS = 200  # at concurrency 1: a lone miss's added latency
RL_RPM, RL_WINDOW_S, RL_QUEUE_S = 60, 3.0, 0.5  # the upstream allows 60 calls per 3 s window
RL_CONCURRENCY = (1, 8, 64)
RL_STEP_S = 6.0  # two windows per step
RL_MAX_REQUESTS = 60000


def start_batching(e: E.Env, penv: dict[str, str], base_config: str, workdir: Path,
                   workers: int | None) -> list[E.Proc]:
    """A mock upstream taking 30 ms a call, and two proxies on it: micro-batching on (default), and off."""
    mock = E.start_mock(e, BATCH_LATENCY_MS, name="mock-30ms")
    procs = [mock]
    for name, on in (("proxy-batching", True), ("proxy-no-batching", False)):
        config = workdir / f"{name}.toml"
        config.write_text(base_config + BATCHING_MODEL + f"micro_batching = {'true' if on else 'false'}\n")
        env = {**penv, "UPSTREAM_BASE_URL": f"http://127.0.0.1:{mock.port}/v1", "PROXY_CONFIG": str(config)}
        procs.append(E.start_proxy(e, env, workers, name=name))
    return procs


def start_ratelimit(e: E.Env, penv: dict[str, str], base_config: str, workdir: Path,
                    workers: int | None) -> list[E.Proc]:
    """Two mocks with the same limit (one behind the proxy, one called directly) and the proxy."""
    limit = ["--rpm", str(RL_RPM), "--rate-window-s", str(RL_WINDOW_S)]
    behind = E.start_mock(e, 1.0, name="mock-limited", extra=limit)
    direct = E.start_mock(e, 1.0, name="mock-limited-direct", extra=limit)
    config = workdir / "proxy-ratelimit.toml"
    config.write_text(base_config.replace("[upstreams.default]\n",
                                          f"[upstreams.default]\nmax_queue_wait_s = {RL_QUEUE_S}\n", 1))
    env = {**penv, "UPSTREAM_BASE_URL": f"http://127.0.0.1:{behind.port}/v1", "PROXY_CONFIG": str(config)}
    return [behind, direct, E.start_proxy(e, env, workers, name="proxy-ratelimit")]


async def _stats(port: int) -> dict[str, int]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/_mock/stats") as r:
        out: dict[str, int] = await r.json()
        return out


def _req(ctx: Ctx, proc: E.Proc, text: str) -> bytes:
    return ctx.embed_request({"model": MODEL, "input": text, "encoding_format": "base64"}, proc=proc)


# --- micro-batching --------------------------------------------------------------------------------------------


async def batching_scenario(ctx: Ctx, procs: list[E.Proc]) -> None:
    mock, on, off = procs
    sides = {"on": on, "off": off}
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    bursts: dict[str, list[int]] = {"on": [], "off": []}
    spread: dict[str, list[int]] = {"on": [], "off": []}
    lone: dict[str, list[float]] = {"on": [], "off": []}
    for rnd in range(BATCH_ROUNDS):
        for side in (["on", "off"] if rnd % 2 == 0 else ["off", "on"]):
            tag = f"{ctx.run_id} {side} {rnd}"
            burst, run = await _batching_runs(ctx, mock, sides[side], tag)
            bursts[side].append(burst)
            runs[side].append(run)
            calls, p50 = await _spread_and_lone(ctx, mock, sides[side], tag)
            spread[side].append(calls)
            lone[side].append(p50)

    def med(side: str, k: str) -> float:
        return float(np.median([x[k] for x in runs[side]]))

    ctx.results["batching"] = {"upstream_latency_ms": BATCH_LATENCY_MS, "concurrency": BATCH_CONCURRENCY,
                               "requests_per_run": BATCH_REQUESTS, "runs": runs, "burst_upstream_calls": bursts}
    con = BATCH_CONCURRENCY
    ctx.row(f"batching: {con} concurrent new inputs at once, upstream calls (on / off)",
            "/".join(map(str, bursts["on"])), "/".join(map(str, bursts["off"])),
            _fmt(float(np.median(bursts["on"])) / float(np.median(bursts["off"])), 3), "<= 16",
            _ok(max(bursts["on"]) <= 16))
    ctx.results["batching"].update(spread_upstream_calls=spread, lone_miss_p50_ms=lone)
    ctx.row(f"batching: {con} new inputs over {SPREAD_S * 1000:.0f} ms, upstream calls (on / off)",
            "/".join(map(str, spread["on"])), "/".join(map(str, spread["off"])),
            _fmt(float(np.median(spread["on"])) / float(np.median(spread["off"])), 3), "<= 16",
            _ok(max(spread["on"]) <= 16))
    l_on, l_off = float(np.median(lone["on"])), float(np.median(lone["off"]))
    ctx.row("batching c=1 lone miss: p50 ms (on / off)", f"{l_on:.2f}", f"{l_off:.2f}", _fmt(l_on / l_off, 3),
            "+<= 0.5 ms", _ok(l_on - l_off <= 0.5))
    cpr_on, cpr_off = med("on", "upstream_calls_per_request"), med("off", "upstream_calls_per_request")
    ctx.row(f"batching c={con} sustained: upstream calls per request (on / off)", _fmt(cpr_on, 3),
            _fmt(cpr_off, 3), _fmt(cpr_on / cpr_off, 3), "", "")
    rps_on, rps_off = med("on", "achieved_rps"), med("off", "achieved_rps")
    ctx.row(f"batching c={con} sustained: req/s (on / off)", f"{rps_on:.0f}", f"{rps_off:.0f}",
            _fmt(rps_on / rps_off), "", "")
    for k, label in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("proxy_cpu_us_per_request", "proxy CPU us/request"),
                     ("mock_cpu_us_per_request", "mock CPU us/request")):
        a, b = med("on", k), med("off", k)
        ctx.row(f"batching c={con} sustained: {label} (on / off)", f"{a:.1f}", f"{b:.1f}", _fmt(a / b), "", "")


async def _batching_runs(ctx: Ctx, mock: E.Proc, proc: E.Proc, tag: str) -> tuple[int, dict[str, Any]]:
    """The upstream calls of 64 new single inputs sent at once (the issue's case), and a sustained run: 64 clients,
    each sending its next new input when its last one is answered."""
    t = Target(proc.port, BATCH_CONCURRENCY)
    before = await _stats(mock.port)
    r = await t.closed_loop(lambda i: _req(ctx, proc, f"bench burst {tag} {i}: a new sentence"),
                            BATCH_CONCURRENCY, BATCH_CONCURRENCY, 30)
    after = await _stats(mock.port)
    if r.errors:
        raise RuntimeError(f"batching burst ({proc.name}): {r.statuses}")
    burst = after["requests"] - before["requests"]
    before = await _stats(mock.port)
    pids, mpids = proc.tree(), mock.tree()
    c0, m0 = cpu_seconds(pids), cpu_seconds(mpids)
    r = await t.closed_loop(lambda i: _req(ctx, proc, f"bench batch {tag} {i}: a new sentence"),
                            BATCH_CONCURRENCY, BATCH_REQUESTS, 60)
    cpu, mcpu = cpu_seconds(pids) - c0, cpu_seconds(mpids) - m0
    after = await _stats(mock.port)
    t.close()
    if r.errors:
        raise RuntimeError(f"batching run ({proc.name}): {r.statuses}")
    await asyncio.sleep(0.5)  # the cache writes of the last answers
    n = max(1, r.completed)
    calls = after["requests"] - before["requests"]
    return burst, {**r.summary(), "upstream_calls": calls, "upstream_inputs": after["inputs"] - before["inputs"],
                   "upstream_calls_per_request": round(calls / n, 4),
                   "proxy_cpu_us_per_request": round(cpu / n * 1e6, 1),
                   "mock_cpu_us_per_request": round(mcpu / n * 1e6, 1)}


async def _spread_and_lone(ctx: Ctx, mock: E.Proc, proc: E.Proc, tag: str) -> tuple[int, float]:
    """The upstream calls of 64 new single inputs sent over SPREAD_S (open loop, kept-alive connections), and the
    p50 ms of LONE_REQUESTS new inputs sent one at a time (nothing else in flight)."""
    t = Target(proc.port, BATCH_CONCURRENCY)
    before = await _stats(mock.port)
    r = await t.open_loop(lambda i: _req(ctx, proc, f"bench spread {tag} {i}: a new sentence"),
                          BATCH_CONCURRENCY / SPREAD_S, SPREAD_S)
    after = await _stats(mock.port)
    if r.errors:
        raise RuntimeError(f"batching spread ({proc.name}): {r.statuses}")
    r1 = await t.closed_loop(lambda i: _req(ctx, proc, f"bench lone {tag} {i}: a new sentence"), 1,
                             LONE_REQUESTS, 60)
    t.close()
    if r1.errors:
        raise RuntimeError(f"batching lone ({proc.name}): {r1.statuses}")
    return after["requests"] - before["requests"], float(r1.summary()["p50_ms"])


# --- a rate-limited upstream -----------------------------------------------------------------------------------


async def ratelimit_scenario(ctx: Ctx, procs: list[E.Proc]) -> None:
    behind, direct, proxy = procs
    steps = []
    for c in RL_CONCURRENCY:
        step: dict[str, Any] = {"concurrency": c}
        for side in ("proxy", "direct"):
            mock = behind if side == "proxy" else direct
            port = proxy.port if side == "proxy" else direct.port
            tag = f"{ctx.run_id} {c}"
            if side == "proxy":
                def make(i: int, tag: str = tag) -> bytes:
                    return _req(ctx, proxy, f"bench limited {tag} {i}: a new sentence")
            else:
                def make(i: int, tag: str = tag) -> bytes:
                    return ctx.direct_request({"model": MODEL, "input": [f"bench limited direct {tag} {i}"],
                                               "encoding_format": "base64"})
            before = await _stats(mock.port)
            t = Target(port, c)
            r: RunResult = await t.closed_loop(make, c, RL_MAX_REQUESTS, RL_STEP_S, expect=(200, 429))
            t.close()
            after = await _stats(mock.port)
            step[side] = {**r.summary(), "upstream_calls": after["requests"] - before["requests"],
                          "upstream_429": after["rate_limited"] - before["rate_limited"],
                          "upstream_inputs_served": after["inputs"] - before["inputs"]}
        steps.append(step)
    ctx.results["ratelimit"] = {"upstream_rpm": RL_RPM, "window_s": RL_WINDOW_S, "max_queue_wait_s": RL_QUEUE_S,
                                "step_s": RL_STEP_S, "steps": steps}
    for s in steps:
        p, d = s["proxy"], s["direct"]
        ctx.row(f"ratelimit c={s['concurrency']}: client 200 / 429 (proxy; direct)",
                f"{p['statuses'].get('200', 0)} / {p['statuses'].get('429', 0)}",
                f"{d['statuses'].get('200', 0)} / {d['statuses'].get('429', 0)}", "", "", "")
        ctx.row(f"ratelimit c={s['concurrency']}: upstream calls; upstream 429s (proxy; direct)",
                f"{p['upstream_calls']}; {p['upstream_429']}", f"{d['upstream_calls']}; {d['upstream_429']}",
                _fmt(p["upstream_429"] / d["upstream_429"], 3) if d["upstream_429"] else "", "~0",
                _ok(p["upstream_429"] <= 1))

