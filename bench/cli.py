"""`python -m bench`: start everything on 127.0.0.1, run the scenarios, print one table, write JSON."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from . import burst as B
from . import cluster as C
from . import env as E
from . import fleet as F
from . import fleetlimits as FL
from . import hang as H
from . import overload as O
from .loadgen import Target
from .scenarios import (
    MODEL,
    Ctx,
    Options,
    big_scenario,
    dedup_scenario,
    hit_scenarios,
    hit_text,
    memory_scenario,
    miss_scenarios,
    reject_scenarios,
    warm_hits,
)
from .soak import soak_scenario

GROUPS = ("hit", "miss", "big", "dedup", "reject", "memory", "soak", "cluster", "batching", "ratelimit", "fleetlimits",
          "connections", "report", "burst", "hang")
DEFAULT_GROUPS = GROUPS[:7]  # the fleet, cluster and overload scenarios run when named
# (inputs, encoding, tier): "local" is the proxy as configured by default (an entry read from Redis once is then
# answered in process); "redis" is a second proxy with the in-process tier off, so every hit is an MGET.
HIT_VARIANTS = [(1, "base64", "local"), (1, "float", "local"), (100, "base64", "local"), (100, "float", "local"),
                (1, "base64", "redis"), (100, "base64", "redis")]
RESULTS = Path(__file__).with_name("results")
QUOTA_TEAM = "benchquota"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--scenarios", default=",".join(DEFAULT_GROUPS),
                   help=f"comma-separated groups from {', '.join(GROUPS)} (default: {', '.join(DEFAULT_GROUPS)})")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per offered rate in a search (default 2)")
    p.add_argument("--quick", action="store_true", help="short steps and samples: a dev run of about four minutes")
    p.add_argument("--soak-minutes", type=float, default=None, help="soak length (default 0.5; 10 for the full run)")
    p.add_argument("--soak-rps", type=float, default=20.0,
                   help="soak requests per second (default 20; a request of the mix averages about 45 inputs)")
    p.add_argument("--tracemalloc", action="store_true",
                   help="run the proxy with PROXY_TRACEMALLOC and take allocation snapshots during the soak "
                        "(slows the proxy: for finding what grows, not for the RSS figures)")
    p.add_argument("--miss-rps", type=float, default=100.0, help="offered rate of the fixed-rate miss run")
    p.add_argument("--miss-requests", type=int, default=1000, help="concurrency-1 miss requests")
    p.add_argument("--upstream-latency-ms", type=float, default=1.0, help="the mock upstream's added latency")
    p.add_argument("--workers", type=int, default=1,
                   help="passed to `serve --workers` when the installed proxy has it (default 1: same core budget "
                        "as the single-process baseline)")
    p.add_argument("--burst-connections", type=int, default=48,
                   help="clients of the burst scenario (default 48; the issue's figure is 128)")
    p.add_argument("--fleetlimits-seconds", type=float, default=60.0,
                   help="length of each fleetlimits phase (default 60: one minute; shorter for a quick check)")
    p.add_argument("--report-keys", type=int, default=1000, help="keys of the report scenario's ledger (default "
                   "1000, the issue's figure)")
    p.add_argument("--report-models", type=int, default=3, choices=(1, 2, 3),
                   help="models per key in the report scenario's ledger (default 3)")
    p.add_argument("--burst-seconds", type=float, default=12.0, help="length of each burst (default 12)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--output", type=Path, default=None, help="JSON file (default bench/results/<UTC time>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (process logs)")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    o = Options(step_s=args.duration, miss_pairs=args.miss_requests, miss_rps=args.miss_rps,
                soak_rps=args.soak_rps, soak_minutes=0.5 if args.soak_minutes is None else args.soak_minutes)
    if args.quick:
        o.step_s = min(o.step_s, 1.0)
        o.refine = 2
        o.miss_pairs = min(o.miss_pairs, 300)
        o.big_iters = 10
        if args.soak_minutes is None:
            o.soak_minutes = 0.25
    return o


def table(rows: list[list[str]]) -> str:
    head = ["measure", "proxy", "baseline", "ratio / added", "target", "met"]
    rows = [head, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent  # "proxy" is the package beside bench/
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=root)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy"], capture_output=True, text=True,
                               timeout=10, cwd=root).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


async def quota_probe(ctx_port: int, penv: dict[str, str], enabled: bool, note: str) -> tuple[str | None, str]:
    """A key over its team's quota, or None and why the over-quota scenario is skipped."""
    if not enabled:
        return None, note
    key = E.create_key(penv, QUOTA_TEAM)
    t = Target(ctx_port, 1)
    import orjson as _o

    from .loadgen import build_request

    req = build_request(ctx_port, "/v1/embeddings", _o.dumps({"model": MODEL, "input": hit_text(0)}),
                        {"Authorization": f"Bearer {key}"})
    statuses = [(await t.request(req))[0] for _ in range(3)]
    t.close()
    if 429 in statuses:
        return key, f"team rpm = 1; probe statuses {statuses}"
    return None, "the proxy accepts `[teams.NAME] rpm` but does not enforce it yet (3 requests at rpm = 1: " \
                 f"{statuses})"


async def run(args: argparse.Namespace) -> int:
    groups = [g.strip() for g in args.scenarios.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        print(f"unknown scenario group(s): {', '.join(unknown)}; known: {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    opts = options(args)
    workdir = Path(tempfile.mkdtemp(prefix="ep-bench-"))
    e = E.Env(workdir)
    meta: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "commit": git_commit(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "options": vars(opts),
        "load_generator": "bench/loadgen.py: open loop on raw asyncio protocols (uvloop), latency from the "
                          "scheduled send time; no open-loop tool (wrk2, vegeta, k6, oha) is packaged in Debian, "
                          "PyPI or npm",
    }
    results: dict[str, Any] = {}
    rows: list[list[str]] = []
    notes: list[str] = []
    failures: list[str] = []
    try:
        redis_proc, rclient = E.start_redis(e)
        mock = E.start_mock(e, args.upstream_latency_ms)
        baseline = E.start_baseline(e)
        config = workdir / "proxy.toml"
        quota_section = f"\n[teams.{QUOTA_TEAM}]\nrpm = 1\n"
        config.write_text("[upstreams.default]\nmax_retries = 1\n" + quota_section)
        ok, msg = E.check_config(config)
        quota_enabled, quota_note = True, ""
        if not ok:
            config.write_text("[upstreams.default]\nmax_retries = 1\n")
            quota_enabled, quota_note = False, f"the proxy's config refuses `[teams.NAME] rpm` ({msg[-120:]})"
        has_workers = "--workers" in E.serve_help()
        workers = args.workers if has_workers else None
        meta["workers"] = workers if has_workers else "serve has no --workers: one process"
        penv = E.proxy_env(redis_proc.port, mock.port, config)
        if args.tracemalloc:
            opts.tracemalloc_dir = str(workdir / "tracemalloc")
        heap_env = {"PROXY_TRACEMALLOC": opts.tracemalloc_dir} if opts.tracemalloc_dir else {}
        proxy = E.start_proxy(e, {**penv, **heap_env}, workers)
        redis_config = workdir / "proxy-redis-tier.toml"
        redis_config.write_text(config.read_text() + "\n[cache]\nlocal_max_mb = 0\n")
        redis_tier = E.start_proxy(e, {**penv, "PROXY_CONFIG": str(redis_config)}, workers, name="proxy-redis-tier")
        await asyncio.sleep(0.5 if workers in (None, 1) else 2.0)
        key = E.create_key(penv, "bench")
        # the processes of the scenarios that need their own: proxies (pinned with the proxy), the rest (with Redis)
        extra: dict[str, list[E.Proc]] = {}
        cluster_env: dict[str, str] = {}
        if "cluster" in groups:
            extra["cluster"], cluster_env = C.start(e, penv, redis_config, workers)
        if "batching" in groups:
            extra["batching"] = F.start_batching(e, penv, config.read_text(), workdir, workers)
        if "ratelimit" in groups:
            extra["ratelimit"] = F.start_ratelimit(e, penv, config.read_text(), workdir, workers)
        if "connections" in groups or "report" in groups:
            extra["overload"] = O.start(e, penv, workdir)
        if "burst" in groups:
            extra["burst"] = B.start(e, penv, config.read_text(), workdir, workers)

        pins: list[str] = []
        server_cores, gen_cores = E.pin_plan(os.cpu_count() or 1)
        if args.no_pin or server_cores is None or gen_cores is None:
            pins.append("not pinned" + (" (--no-pin)" if args.no_pin else " (fewer than 2 usable cores)"))
        else:
            proxies = [p for p in [proxy, redis_tier, *(x for procs in extra.values() for x in procs)]
                       if p.name.startswith("proxy")]
            others = [p for procs in extra.values() for p in procs if not p.name.startswith("proxy")]
            if workers in (None, 1):
                pins += [p.pin(server_cores) for p in proxies]
            else:
                pins.append(f"proxies: {workers} workers each, not pinned (they need every core)")
            pins.append(baseline.pin(server_cores))
            pins += [redis_proc.pin(gen_cores), mock.pin(gen_cores), *(p.pin(gen_cores) for p in others),
                     E.pin_self(gen_cores)]
        meta["pinning"] = pins
        print("pinning: " + "; ".join(pins), flush=True)

        qkey, qnote = await quota_probe(proxy.port, penv, quota_enabled, quota_note)
        ctx = Ctx(opts, proxy, mock, baseline, redis_proc, rclient, key, qkey, qnote, redis_tier)
        meta["quota"] = qnote

        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("hit", lambda: hit_scenarios(ctx, HIT_VARIANTS)),
            ("miss", lambda: miss_scenarios(ctx)),
            ("big", lambda: big_scenario(ctx)),
            ("dedup", lambda: dedup_scenario(ctx)),
            ("reject", lambda: reject_scenarios(ctx)),
            ("memory", lambda: _memory(ctx, "hit" in groups)),
            ("soak", lambda: soak_scenario(ctx)),
            ("cluster", lambda: C.cluster_scenarios(ctx, extra["cluster"], cluster_env)),
            ("batching", lambda: F.batching_scenario(ctx, extra["batching"])),
            ("ratelimit", lambda: F.ratelimit_scenario(ctx, extra["ratelimit"])),
            ("connections", lambda: O.connections_scenario(ctx, extra["overload"][0])),
            ("report", lambda: O.report_scenario(ctx, extra["overload"][0], workdir / "proxy-overload.log",
                                                       args.report_keys, args.report_models)),
            ("fleetlimits", lambda: FL.scenario(ctx, e, penv, config.read_text(), workdir,
                                                args.fleetlimits_seconds)),
            ("burst", lambda: B.burst_scenario(ctx, extra["burst"], args.burst_connections, args.burst_seconds)),
            ("hang", lambda: H.scenario(ctx, e, penv, config.read_text(), workdir)),
        ]
        for name, step in steps:
            if name not in groups:
                continue
            started = time.monotonic()
            print(f"[{name}] ...", flush=True)
            try:
                await step()
            except Exception as exc:  # one broken scenario must not lose the others' results
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                if proxy.popen.poll() is not None:
                    print(e.log_tail("proxy"), file=sys.stderr)
                    break
            print(f"[{name}] {time.monotonic() - started:.0f}s", flush=True)
        results = ctx.results
        rows = ctx.rows
        notes = ctx.notes
        rclient.close()
    finally:
        e.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")
    meta["finished"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = table(rows)
    out = args.output or RESULTS / f"{meta['started'].replace(':', '').replace('-', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps({"meta": meta, "table": rows, "notes": notes, "results": results,
                                  "failures": failures},
                                 option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    print()
    print(f"embedding-proxy bench, commit {meta['commit']}, {meta['started']}; {'; '.join(meta['pinning'])}")
    print(text)
    for n in notes:
        print(f"note: {n}")
    for f in failures:
        print(f"FAILED {f}")
    print(f"\nresults: {out}")
    return 1 if failures else 0


async def _memory(ctx: Ctx, warmed: bool) -> None:
    if not warmed:
        await warm_hits(ctx)
    await memory_scenario(ctx)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvloop

    return uvloop.run(run(args))
