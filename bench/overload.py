"""Issue 21's scenarios for slow and idle clients and for long admin work, each as live traffic measured with and
without the disturbance in the same run (ratios), against one proxy worker of its own: `proxy-overload`, started as
`python -m proxy` from this checkout under `ulimit -n 1024` (systemd's default soft limit), with the in-process cache
tier off (every live hit is a Redis MGET, so a worker that bypassed Redis would show it).

`connections`: live cache hits at a fixed rate on keep-alive connections and /healthz probes on new ones; then 2,000
idle connections and 500 slowloris ones (a partial request line and headers, never finished) are opened and held,
and the same traffic runs again, on connections opened after the attack. Then the bench waits for the proxy to
close the slowloris connections (README: `connections.header_timeout_s`, 20 s) and reports when the last one went.

`report`: a usage ledger of `--report-keys` keys x `--report-models` models x REPORT_DAYS days (one team), written
by this tree's ledger as the product writes it (bench/rollups.py's `fill`: day hashes, flush marks and month
roll-ups), then live hits without and with usage reports by key over all those days running back to back,
alternating, twice each; then the roll-ups are deleted (usage written before them) and live hits run while the first
report reads every day and rebuilds them. The reports' times, the worker's Redis bypasses (metric and log) and its
event-loop lag are reported with the live p50/p99.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import resource
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from . import env as E
from . import rollups as R
from .loadgen import RunResult, Target
from .scenarios import MODEL, Ctx, _fmt, _ok, hit_text

NOFILE = 1024
IDLE, SLOWLORIS = 2000, 500
LIVE_RPS, STEP_S = 100.0, 5.0
REPORT_DAYS, REBUILD_CAP_S = 400, 240.0
ADMIN_KEY = "bench-admin-key-0123456789abcdef"
CONFIG = "[upstreams.default]\nmax_retries = 1\n[cache]\nlocal_max_mb = 0\n[usage]\nretention_days = 400\n"


def start(e: E.Env, penv: dict[str, str], workdir: Path) -> list[E.Proc]:
    """The proxy these scenarios measure (its name starts with "proxy": pinned with the proxies)."""
    config = workdir / "proxy-overload.toml"
    config.write_text(CONFIG)
    port = E.free_port()
    serve = [sys.executable, "-m", "proxy", "--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port",
             str(port), "--workers", "1"]
    argv = ["bash", "-c", f'ulimit -n {NOFILE} && exec "$@"', "bash", *serve]
    env = {**penv, "PROXY_CONFIG": str(config), "PROXY_ADMIN_KEY": ADMIN_KEY}
    return [e.start("proxy-overload", argv, port, env)]


def _live(ctx: Ctx, proc: E.Proc) -> bytes:
    body = {"model": MODEL, "input": [hit_text(k) for k in range(8)], "encoding_format": "base64"}
    return ctx.embed_request(body, proc=proc)


async def _warm(ctx: Ctx, proc: E.Proc) -> bytes:
    req = _live(ctx, proc)
    t = Target(proc.port, 1)
    status, _ = await t.request(req)
    t.close()
    if status != 200:
        raise RuntimeError(f"proxy-overload answered {status} to a live request")
    await asyncio.sleep(0.5)  # the cache writes land after the answer
    return req


async def _metrics(port: int) -> dict[str, float]:
    """The proxy's samples, by name and labels (a new connection each time)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def _pcts(r: RunResult) -> dict[str, Any]:
    return {"p50_ms": round(r.pct(50) * 1e3, 2), "p99_ms": round(r.pct(99) * 1e3, 2), "errors": r.errors}


# --- idle and slowloris connections ---------------------------------------------------------------------------


class _Held(asyncio.Protocol):
    """One attacking connection: what the proxy sent it, and when it was closed."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.opened = time.monotonic()
        self.closed_at: float | None = None
        self.got = b""
        self.transport: Any = None
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.first:
            transport.write(self.first)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.got += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_at = time.monotonic()
        self.lost.set()


async def _healthz(port: int, n: int) -> tuple[int, list[float]]:
    """`n` /healthz probes, each on a new connection: how many were answered 200, and their latencies."""
    ok, lat = 0, []
    for _ in range(n):
        started = time.perf_counter()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, \
                    s.get(f"http://127.0.0.1:{port}/healthz") as r:
                ok += r.status == 200
                lat.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)
    return ok, lat


async def _attack(port: int) -> list[_Held]:
    loop = asyncio.get_running_loop()
    held: list[_Held] = []
    partial = b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for n in range(IDLE + SLOWLORIS):
        proto = _Held(partial if n % 5 == 4 else b"")  # one in five a slowloris: 2,000 idle, 500 slow
        with contextlib.suppress(OSError):
            await loop.create_connection(lambda p=proto: p, "127.0.0.1", port)  # type: ignore[misc]
            held.append(proto)
    return held


async def connections_scenario(ctx: Ctx, proc: E.Proc) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):  # the bench itself needs 2,500 + descriptors
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    req = await _warm(ctx, proc)
    t = Target(proc.port, 16)
    base = await t.open_loop(lambda i: req, LIVE_RPS, STEP_S)
    t.close()
    base_ok, base_hz = await _healthz(proc.port, 20)
    before = await _metrics(proc.port)
    held = await _attack(proc.port)
    opened = time.monotonic()
    await asyncio.sleep(1.0)
    t = Target(proc.port, 16)  # a live client arriving after the attack
    failed = ""
    try:
        under = await t.open_loop(lambda i: req, LIVE_RPS, STEP_S)
    except (RuntimeError, OSError) as exc:  # its connections reset (the proxy out of descriptors)
        failed = f"{type(exc).__name__}: {exc}"[:200]
        under = RunResult(LIVE_RPS, 0, 0, int(LIVE_RPS * STEP_S), STEP_S, np.full(1, np.inf), np.zeros(1))
    t.close()
    under_ok, under_hz = await _healthz(proc.port, 20)
    slow = [h for h in held if h.first]
    await _closed(slow, opened + 45)
    after = await _metrics(proc.port)
    still_open = sum(h.closed_at is None for h in held)
    for h in held:
        if h.transport is not None:
            h.transport.close()
    slow_closed = [h.closed_at - h.opened for h in slow if h.closed_at is not None]
    got_408 = sum(h.got.startswith(b"HTTP/1.1 408") for h in slow)
    closed = {k.split("reason=")[1].rstrip("}"): after[k] - before.get(k, 0.0)
              for k in after if k.startswith("embedding_proxy_connections_closed_total{")}
    ctx.results["connections"] = {
        "nofile": NOFILE, "idle": IDLE, "slowloris": SLOWLORIS, "opened": len(held), "live_rps": LIVE_RPS,
        "live_without": base.summary(), "live_with": under.summary(), "live_with_failed": failed,
        "healthz_answered": {"without": f"{base_ok}/20", "with": f"{under_ok}/20"},
        "healthz_p99_ms": {"without": _ms99(base_hz), "with": _ms99(under_hz)},
        "slowloris_closed": len(slow_closed), "slowloris_408": got_408,
        "slowloris_last_closed_s": round(max(slow_closed), 1) if slow_closed else None,
        "attack_connections_still_open": still_open, "closed_by_proxy": closed,
        "connection_limit": after.get("embedding_proxy_connection_limit{}"),
    }
    ratio = under.pct(99) / base.pct(99) if np.isfinite(base.pct(99)) and base.pct(99) else None
    ctx.row(f"{IDLE} idle + {SLOWLORIS} slowloris conns (ulimit -n {NOFILE}): live hit p99 ms with / without",
            _fmt(under.pct(99) * 1e3, 1), _fmt(base.pct(99) * 1e3, 1), _fmt(ratio), "", "")
    ctx.row("  live errors with / without; /healthz answered with the attack", f"{under.errors} / {base.errors}",
            "", f"{under_ok}/20", "20/20, 0 errors", _ok(under.errors == 0 and under_ok == 20))
    last = max(slow_closed) if slow_closed else float("inf")
    ctx.row("  slowloris connections closed (408) / last closed after s", f"{len(slow_closed)} ({got_408}) / "
            f"{_fmt(last, 1)}", "", "", "all, <= 35 s", _ok(len(slow_closed) == len(slow) and last <= 35))


async def _closed(held: list[_Held], until: float) -> None:
    """Wait until the proxy has closed every one of `held`, or until `until` (monotonic)."""
    for h in held:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(h.lost.wait(), max(0.0, until - time.monotonic()))


def _ms99(lat: list[float]) -> float | None:
    return round(float(np.percentile(lat, 99)) * 1e3, 2) if lat else None


# --- a long usage report beside live traffic ------------------------------------------------------------------


async def _write_ledger(ctx: Ctx, team: str, keys: int, models: int) -> tuple[dt.date, float]:
    """The ledger of `keys` keys x `models` models x REPORT_DAYS days, written as the product writes it (its flushes:
    day hashes, flush marks and month roll-ups): the first day, and how long the writing took."""
    until = dt.datetime.now(dt.UTC).date()
    started = time.perf_counter()
    await R.fill(f"redis://127.0.0.1:{ctx.redis_proc.port}/0", REPORT_DAYS, keys, until, team, R.MODELS[:models])
    return until - dt.timedelta(days=REPORT_DAYS - 1), time.perf_counter() - started


def _lag(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The worker's event-loop lag between two /metrics reads: timer ticks, and how many were later than 25 / 50 ms."""
    def count(le: str) -> float:
        k = f"embedding_proxy_event_loop_lag_seconds_bucket{{le={le}}}"
        return after.get(k, 0.0) - before.get(k, 0.0)

    ticks = count("+Inf")
    slow = {le: ticks - count(le) for le in ("0.1", "0.25", "0.5", "1.0", "2.5")}
    return {"ticks": ticks, "over_25ms": ticks - count("0.025"), "over_50ms": ticks - count("0.05"),
            **{f"over_{float(le) * 1e3:g}ms": n for le, n in slow.items() if n}}


async def _reports(url: str, stop: asyncio.Event, took: list[float], once: bool = False) -> None:
    """Usage reports back to back until `stop` (or one, `once`), each one's time appended to `took`."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        while not stop.is_set():
            started = time.perf_counter()
            async with s.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
                body = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"the usage report answered {r.status}: {body[:200]!r}")
            took.append(time.perf_counter() - started)
            if once:
                return


async def _beside(t: Target, req: bytes, url: str, took: list[float], once: bool) -> list[RunResult]:
    """Live traffic while reports run: one step (`once`: steps until the one report is done, REBUILD_CAP_S at most)."""
    stop = asyncio.Event()
    task = asyncio.create_task(_reports(url, stop, took, once))
    await asyncio.sleep(0.2)  # the first report is reading
    runs = [await t.open_loop(lambda i: req, LIVE_RPS, STEP_S)]
    started = time.monotonic()
    while once and not task.done() and time.monotonic() - started < REBUILD_CAP_S:
        runs.append(await t.open_loop(lambda i: req, LIVE_RPS, STEP_S))
    stop.set()
    await task
    return runs


def _live_figures(runs: list[RunResult]) -> dict[str, Any]:
    lat = np.concatenate([r.latencies_s for r in runs])
    return {"p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2), "errors": sum(r.errors for r in runs),
            "requests": int(lat.size)}


async def report_scenario(ctx: Ctx, proc: E.Proc, log: Path, keys: int, models: int) -> None:
    team = f"bench-ledger-{ctx.run_id}"
    first, filled = await _write_ledger(ctx, team, keys, models)
    fields = sum(ctx.redis.hlen(k) for k in ctx.redis.scan_iter(match=f"ep:usage:{team}:*", count=1000))
    req = await _warm(ctx, proc)
    url = f"http://127.0.0.1:{proc.port}/admin/usage?since={first}&by=key&team={team}"
    took: list[float] = []
    rebuilt: list[float] = []
    runs: dict[str, list[RunResult]] = {"without": [], "with": [], "rebuild": []}
    snaps = [await _metrics(proc.port)]
    t = Target(proc.port, 16)
    try:
        for side in ("without", "with", "without", "with"):
            if side == "without":
                runs[side].append(await t.open_loop(lambda i: req, LIVE_RPS, STEP_S))
            else:
                runs[side] += await _beside(t, req, url, took, once=False)
            snaps.append(await _metrics(proc.port))
        # as for usage written before the roll-ups: the first report reads every day and writes them
        ctx.redis.delete(*ctx.redis.scan_iter(match=f"ep:usage-month*{team}*", count=1000))
        runs["rebuild"] = await _beside(t, req, url, rebuilt, once=True)
        snaps.append(await _metrics(proc.port))
    finally:
        t.close()
        ctx.redis.delete(*ctx.redis.scan_iter(match=f"ep:usage*{team}*", count=1000))
        ctx.redis.srem("ep:usage-teams", team)
    logged = "bypassing it" in await asyncio.to_thread(log.read_text, errors="replace")
    bypasses = [sum(v - a.get(k, 0.0) for k, v in b.items() if k.startswith("embedding_proxy_redis_bypasses"))
                for a, b in itertools.pairwise(snaps)]
    lag = {side: [_lag(snaps[i], snaps[i + 1]) for i in idx] for side, idx in
           (("without", (0, 2)), ("with", (1, 3)), ("rebuild", (4,)))}
    live = {side: _live_figures(rs) for side, rs in runs.items()}
    ctx.results["report"] = {
        "keys": keys, "models": models, "days": REPORT_DAYS, "ledger_fields": fields, "filled_s": round(filled, 1),
        "live_rps": LIVE_RPS, "live": live, "runs": {side: [r.summary() for r in rs] for side, rs in runs.items()},
        "report_s": [round(x, 2) for x in took], "rebuild_report_s": [round(x, 2) for x in rebuilt],
        "redis_bypasses": sum(bypasses), "redis_bypasses_by_step": bypasses, "bypass_logged": logged,
        "loop_lag": lag,
    }
    _report_rows(ctx, live, took, rebuilt, sum(bypasses), logged, f"{keys} keys x {models} models x {REPORT_DAYS} d")


def _report_rows(ctx: Ctx, live: dict[str, dict[str, Any]], took: list[float], rebuilt: list[float],
                 bypasses: float, logged: bool, size: str) -> None:
    name = f"report by key, {size}, beside live hits @{LIVE_RPS:.0f}/s"
    for q in ("p50", "p99"):
        with_, without = live["with"][f"{q}_ms"], live["without"][f"{q}_ms"]
        ctx.row(f"{name}: live {q} ms with / without", _fmt(with_, 1), _fmt(without, 1), _fmt(with_ / without),
                "< 50 ms" if q == "p99" else "", _ok(with_ < 50) if q == "p99" else "")
    ctx.row("  report s (each); Redis bypasses; live errors with / without",
            f"{', '.join(f'{x:.1f}' for x in took)}; {bypasses:g}{' (logged)' if logged else ''}; "
            f"{live['with']['errors']} / {live['without']['errors']}", "", "", "0 bypasses",
            _ok(bypasses == 0 and not logged))
    rb = live["rebuild"]
    ctx.row("  no roll-ups yet (they are rebuilt): report s; live p50 / p99 ms meanwhile",
            f"{', '.join(f'{x:.1f}' for x in rebuilt) or 'not done'}; {rb['p50_ms']:.1f} / {rb['p99_ms']:.1f}",
            "", _fmt(rb["p99_ms"] / live["without"]["p99_ms"]), "", "")
