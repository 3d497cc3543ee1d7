"""The scenarios. Each proxy run is paired with its baseline in the same run, one after the other (order
alternating), and reported as a ratio. Every load loop is bounded in count and time; all traffic is to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson
import redis
import redis.asyncio as aioredis

from .env import CACHE_SECRET, UPSTREAM_KEY, Proc, RedisStats, cpu_seconds
from .loadgen import RunResult, Search, Target, build_request, ms, search_rate

MODEL = "text-embedding-3-small"
DIMS = 1536
P99_BUDGET_S = 0.010
SyncRedis = redis.Redis  # (inside Ctx, `redis` is a field)


def hit_text(k: int) -> str:
    return f"bench hit {k}: the quick brown fox jumps over the lazy dog"


@dataclass
class Options:
    step_s: float = 2.0  # one offered rate in a search
    refine: int = 3  # bisections after the doubling phase
    miss_pairs: int = 1000  # concurrency-1 miss requests (each paired with a direct call)
    miss_rps: float = 100.0
    big_iters: int = 30
    soak_minutes: float = 0.5
    soak_rps: float = 20.0
    max_rps: float = 40000.0
    tracemalloc_dir: str | None = None  # --tracemalloc: the proxy runs with PROXY_TRACEMALLOC set to this


@dataclass
class Ctx:
    opts: Options
    proxy: Proc
    mock: Proc
    baseline: Proc
    redis_proc: Proc
    redis: redis.Redis
    key: str
    quota_key: str | None
    quota_note: str
    redis_tier: Proc  # the same proxy with the in-process cache tier off (`cache.local_max_mb = 0`)
    stats_servers: tuple[SyncRedis, ...] = ()  # whose INFO counts the proxies' Redis work (default: `redis`)
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: f"{time.time_ns():x}")

    # --- helpers ----------------------------------------------------------------------------------------------

    def embed_request(self, body: dict[str, Any], key: str | None = None, proc: Proc | None = None) -> bytes:
        return build_request((proc or self.proxy).port, "/v1/embeddings", orjson.dumps(body),
                             {"Authorization": f"Bearer {key or self.key}"})

    def direct_request(self, body: dict[str, Any]) -> bytes:
        return build_request(self.mock.port, "/v1/embeddings", orjson.dumps(body),
                             {"Authorization": f"Bearer {UPSTREAM_KEY}"})

    async def mock_stats(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.mock.port}/_mock/stats") as r:
            out: dict[str, int] = await r.json()
            return out

    async def measured(self, run: Callable[[], Any], proc: Proc | None = None) -> RunResult:
        """Run `run()` (a proxy run) with the proxy's CPU time and the Redis commands around it."""
        stats = RedisStats(*(self.stats_servers or (self.redis,)))
        pids = (proc or self.proxy).tree()
        before_r, before_c = stats.snapshot(), cpu_seconds(pids)
        r: RunResult = await run()
        cpu, delta = cpu_seconds(pids) - before_c, RedisStats.delta(before_r, stats.snapshot())
        n = max(1, r.completed + r.errors)
        reads = delta.pop("_reads", 0)
        r.extra.update({
            "proxy_cpu_us_per_request": round(cpu / n * 1e6, 1),
            "redis_commands_per_request": round(sum(delta.values()) / n, 3),
            "redis_reads_per_request": round(reads / n, 3),
            "redis_commands": delta,
        })
        return r

    def row(self, *cells: Any) -> None:
        self.rows.append(["" if c is None else str(c) for c in cells])


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _ok(cond: bool | None) -> str:
    return "" if cond is None else ("yes" if cond else "NO")


async def open_loop_over(ctx: Ctx, proxies: list[Proc], text: Callable[[int, int], str], rate: float,
                         seconds: float, expect: tuple[int, ...], rotate: bool = False) -> list[RunResult]:
    """`rate` requests a second over all `proxies` (open loop, an equal share each) for `seconds`: request k to
    proxy i embeds `text(i, k)` (`rotate`: see Target.open_loop). Its kept-alive connections are closed when it
    returns, before any proxy stops."""
    targets = [Target(p.port, 64) for p in proxies]
    try:
        runs = []
        for i, (p, t) in enumerate(zip(proxies, targets, strict=True)):
            def make(k: int, i: int = i, p: Proc = p) -> bytes:
                return ctx.embed_request({"model": MODEL, "input": text(i, k), "encoding_format": "base64"}, proc=p)
            runs.append(t.open_loop(make, rate / len(proxies), seconds, expect=expect, rotate=rotate))
        return list(await asyncio.gather(*runs))
    finally:
        for t in targets:
            t.close()
        await asyncio.sleep(0.1)


# --- cache hits vs the bare aiohttp server -------------------------------------------------------------------


async def warm_hits(ctx: Ctx) -> None:
    """Put the 100 hit inputs in the cache, and check that a repeat sends nothing upstream."""
    t = Target(ctx.proxy.port, 1)
    body = {"model": MODEL, "input": [hit_text(k) for k in range(100)], "encoding_format": "base64"}
    status, _ = await t.request(ctx.embed_request(body))
    if status != 200:
        raise RuntimeError(f"warm-up request failed with status {status}")
    await asyncio.sleep(0.5)  # cache writes happen after the answer
    before = await ctx.mock_stats()
    await t.request(ctx.embed_request(body))
    after = await ctx.mock_stats()
    t.close()
    if after["inputs"] != before["inputs"]:
        raise RuntimeError("hit inputs still go upstream after warm-up; is Redis reachable from the proxy?")


async def hit_scenarios(ctx: Ctx, variants: list[tuple[int, str, str]]) -> None:
    await warm_hits(ctx)
    base_port = ctx.baseline.port
    for n, (count, fmt, tier) in enumerate(variants):
        proc = ctx.redis_tier if tier == "redis" else ctx.proxy
        name = f"hit-{count}-{'b64' if fmt == 'base64' else 'float'}" + ("-redis" if tier == "redis" else "")
        inp: Any = hit_text(0) if count == 1 else [hit_text(k) for k in range(count)]
        body = {"model": MODEL, "input": inp, "encoding_format": fmt}
        proxy_req = ctx.embed_request(body, proc=proc)
        probe = Target(proc.port, 1)
        for _ in range(2):  # the first read admits the entries to the in-process tier (when it is on)
            status, answer = await probe.request(proxy_req)
        probe.close()
        if status != 200:
            raise RuntimeError(f"{name}: proxy answered {status}")
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{base_port}/_body/{name}",
                                                        data=answer) as r:
            r.raise_for_status()
        base_req = build_request(base_port, f"/b/{name}", orjson.dumps(body), {"Authorization": f"Bearer {ctx.key}"})
        proxy_t, base_t = Target(proc.port), Target(base_port)

        async def run_proxy(rate: float, t: Target = proxy_t, req: bytes = proxy_req, pr: Proc = proc) -> RunResult:
            return await ctx.measured(lambda: t.open_loop(lambda i: req, rate, ctx.opts.step_s), pr)

        async def run_base(rate: float, t: Target = base_t, req: bytes = base_req) -> RunResult:
            return await t.open_loop(lambda i: req, rate, ctx.opts.step_s)

        start = 1000.0 if count == 1 else 100.0
        order = [("proxy", run_proxy), ("baseline", run_base)]
        if n % 2:
            order.reverse()  # interleaved: which side runs first alternates
        found: dict[str, Search] = {}
        for side, fn in order:
            found[side] = await search_rate(fn, start_rps=start, p99_budget_s=P99_BUDGET_S,
                                            max_rps=ctx.opts.max_rps, refine=ctx.opts.refine)
        proxy_t.close()
        base_t.close()
        p, b = found["proxy"], found["baseline"]
        ratio = p.best_rps / b.best_rps if b.best_rps else None
        extra = p.best.extra if p.best is not None else {}
        cpu = extra.get("proxy_cpu_us_per_request")
        ctx.results[name] = {
            "tier": "in-process tier on (default)" if tier == "local" else "in-process tier off: every hit an MGET",
            "answer_bytes": len(answer),
            "proxy_rps_at_p99_10ms": round(p.best_rps, 1),
            "baseline_rps_at_p99_10ms": round(b.best_rps, 1),
            "ratio": None if ratio is None else round(ratio, 3),
            "generator_bound": {"proxy": p.generator_bound, "baseline": b.generator_bound},
            "proxy_at_best": p.best.summary() if p.best else None,
            "baseline_at_best": b.best.summary() if b.best else None,
            "proxy_steps": p.steps,
            "baseline_steps": b.steps,
            "proxy_cpu_us_per_embedding": None if cpu is None else round(cpu / count, 2),
        }
        target = 0.5 if name.startswith("hit-1-b64") else None
        ctx.row(f"{name} req/s at p99<=10ms ({len(answer)} B answer)", f"{p.best_rps:.0f}", f"{b.best_rps:.0f}",
                _fmt(ratio), ">= 0.50" if target else "", _ok(None if ratio is None or not target else ratio >= target))
        if cpu is not None:
            ctx.row(f"{name} proxy CPU us/request, us/embedding", f"{cpu:.0f} / {cpu / count:.1f}", "", "", "", "")
            ctx.row(f"{name} Redis commands / reads per request",
                    f"{extra['redis_commands_per_request']:.2f} / {extra['redis_reads_per_request']:.2f}",
                    "", "", "", "")


# --- the miss path vs calling the mock upstream directly -----------------------------------------------------


def _pcts(lat: np.ndarray) -> dict[str, float]:
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "p999": float(np.percentile(lat, 99.9))}


async def miss_scenarios(ctx: Ctx) -> None:
    def bodies(tag: str) -> tuple[Callable[[int], bytes], Callable[[int], bytes]]:
        def proxy(i: int) -> bytes:
            return ctx.embed_request({"model": MODEL, "input": f"bench miss {ctx.run_id} {tag} {i}: a new sentence",
                                      "encoding_format": "base64"})

        def direct(i: int) -> bytes:  # what the proxy itself sends upstream for that request
            return ctx.direct_request({"model": MODEL, "input": [f"bench direct {tag} {i}: a new sentence"],
                                       "encoding_format": "base64"})

        return proxy, direct

    # Concurrency 1: proxy and direct calls alternate request by request.
    proxy_req, direct_req = bodies("c1")
    pt, dt = Target(ctx.proxy.port, 1), Target(ctx.mock.port, 1)
    for i in range(20):  # warm both paths (connections, tokenizer, first allocations)
        await pt.timed(proxy_req(-1 - i))
        await dt.timed(direct_req(-1 - i))
    n = ctx.opts.miss_pairs
    plat, dlat = np.empty(n), np.empty(n)
    stats = RedisStats(ctx.redis)
    pids = ctx.proxy.tree()
    proxy_cpu = 0.0
    before_r = stats.snapshot()
    deadline = time.monotonic() + 300
    done = 0
    for i in range(n):
        if time.monotonic() > deadline:
            break
        if i % 2:
            dlat[i], _ = await dt.timed(direct_req(i))
        c0 = cpu_seconds(pids)
        plat[i], status = await pt.timed(proxy_req(i))
        proxy_cpu += cpu_seconds(pids) - c0
        if status != 200:
            raise RuntimeError(f"miss request failed with status {status}")
        if not i % 2:
            dlat[i], _ = await dt.timed(direct_req(i))
        done += 1
    await asyncio.sleep(0.3)  # let the last cache write land before reading Redis
    delta = RedisStats.delta(before_r, stats.snapshot())
    pt.close()
    dt.close()
    plat, dlat = plat[:done], dlat[:done]
    p, d = _pcts(plat), _pcts(dlat)
    reads = delta.pop("_reads", 0)
    ctx.results["miss-c1"] = {
        "requests": done,
        "proxy_ms": {k: ms(v) for k, v in p.items()},
        "direct_ms": {k: ms(v) for k, v in d.items()},
        "added_ms": {k: ms(p[k] - d[k]) for k in p},
        "proxy_cpu_us_per_request": round(proxy_cpu / max(1, done) * 1e6, 1),
        "redis_commands_per_request": round(sum(delta.values()) / max(1, done), 3),
        "redis_reads_per_request": round(reads / max(1, done), 3),
        "redis_commands": delta,
    }
    added = {k: (p[k] - d[k]) * 1e3 for k in p}
    ctx.row("miss c=1 p50 ms (proxy / direct mock)", _fmt(p["p50"] * 1e3, 3), _fmt(d["p50"] * 1e3, 3),
            f"+{added['p50']:.3f} ms", "<= +0.5 ms", _ok(added["p50"] <= 0.5))
    ctx.row("miss c=1 p99 ms", _fmt(p["p99"] * 1e3, 3), _fmt(d["p99"] * 1e3, 3), f"+{added['p99']:.3f} ms",
            "<= +2 ms", _ok(added["p99"] <= 2.0))
    ctx.row("miss c=1 p99.9 ms", _fmt(p["p999"] * 1e3, 3), _fmt(d["p999"] * 1e3, 3), f"+{added['p999']:.3f} ms",
            "", "")
    r = ctx.results["miss-c1"]
    ctx.row("miss proxy CPU us/request (incl. cache write)", f"{r['proxy_cpu_us_per_request']:.0f}", "", "", "", "")
    ctx.row("miss Redis commands / reads per request",
            f"{r['redis_commands_per_request']:.2f} / {r['redis_reads_per_request']:.2f}", "", "", "", "")

    # A fixed offered rate, open loop: one proxy run and one direct run, back to back.
    rate = ctx.opts.miss_rps
    proxy_req, direct_req = bodies("rate")
    pt, dt = Target(ctx.proxy.port), Target(ctx.mock.port)
    pr = await ctx.measured(lambda: pt.open_loop(proxy_req, rate, ctx.opts.step_s * 2))
    dr = await dt.open_loop(direct_req, rate, ctx.opts.step_s * 2)
    pt.close()
    dt.close()
    ctx.results["miss-rate"] = {"offered_rps": rate, "proxy": pr.summary(), "direct": dr.summary()}
    for q, label in ((50, "p50"), (99, "p99"), (99.9, "p99.9")):
        a, b = pr.pct(q) * 1e3, dr.pct(q) * 1e3
        ctx.row(f"miss @{rate:.0f} req/s {label} ms", _fmt(a, 3), _fmt(b, 3), f"+{a - b:.3f} ms", "", "")


# --- 2048 inputs, all cached, base64, vs a bare MGET of the same entries ----------------------------------------


def cache_keys(texts: list[str]) -> list[str]:
    from proxy.stores.rediskeys import DigestBuilder, RedisKeys, seed_from_secret

    b = DigestBuilder(seed_from_secret(CACHE_SECRET), MODEL, None, "s")
    ns = RedisKeys("ep").cache_namespace(None)
    return [ns + b.text(t) for t in texts]


async def big_scenario(ctx: Ctx) -> None:
    """2048 cached inputs: against the proxy with every hit an MGET (the floor comparison), then with the
    in-process tier on (no Redis read at all once the entries were read once)."""
    texts = [f"bench big {k}: a sentence of about a dozen tokens for the batch" for k in range(2048)]
    body = {"model": MODEL, "input": texts, "encoding_format": "base64"}
    t = Target(ctx.redis_tier.port, 1)
    status, _ = await t.request(ctx.embed_request(body, proc=ctx.redis_tier), 60)
    t.close()
    if status != 200:
        raise RuntimeError(f"2048-input warm-up failed with status {status}")
    keys = cache_keys(texts)
    client = aioredis.Redis(port=ctx.redis_proc.port)
    for _ in range(50):
        if None not in await client.mget(keys):
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the 2048 entries are not all in Redis under the expected keys")
    for name, proc in (("hit-2048-b64-redis", ctx.redis_tier), ("hit-2048-b64", ctx.proxy)):
        await against_read(ctx, name, proc, ctx.embed_request(body, proc=proc), lambda: client.mget(keys), 2048)
    await client.aclose()


async def against_read(ctx: Ctx, name: str, proc: Proc, req: bytes, read: Callable[[], Awaitable[Any]],
                       count: int, floor: str = "bare MGET", iters: int | None = None) -> None:
    """Proxy requests at concurrency 1 alternating with `read()` (a bare client's read of the same entries);
    the p50s' ratio."""
    t = Target(proc.port, 1)
    for _ in range(3):  # warm both (and admit the entries to the in-process tier, where it is on)
        await t.timed(req, 60)
        await read()
    n = iters or ctx.opts.big_iters
    plat, mlat = np.empty(n), np.empty(n)
    pids = proc.tree()
    proxy_cpu = 0.0
    for i in range(n):
        if i % 2:
            s = time.perf_counter()
            await read()
            mlat[i] = time.perf_counter() - s
        c0 = cpu_seconds(pids)
        plat[i], status = await t.timed(req, 60)
        proxy_cpu += cpu_seconds(pids) - c0
        if status != 200:
            raise RuntimeError(f"{name}: request failed with status {status}")
        if not i % 2:
            s = time.perf_counter()
            await read()
            mlat[i] = time.perf_counter() - s
    t.close()
    pm, mm = float(np.median(plat)), float(np.median(mlat))
    cpu_us = proxy_cpu / n * 1e6
    redis_tier = proc is ctx.redis_tier
    target = redis_tier and count == 2048
    ctx.results[name] = {
        "tier": "in-process tier off: every hit an MGET" if redis_tier else "in-process tier on (default)",
        "floor": floor,
        "requests": n,
        "proxy_ms": {"p50": ms(pm), "p90": ms(float(np.percentile(plat, 90))), "min": ms(float(plat.min()))},
        "mget_ms": {"p50": ms(mm), "p90": ms(float(np.percentile(mlat, 90))), "min": ms(float(mlat.min()))},
        "ratio_p50": round(pm / mm, 3),
        "proxy_cpu_us_per_request": round(cpu_us, 1),
        "proxy_cpu_us_per_embedding": round(cpu_us / count, 2),
    }
    ctx.row(f"{name} ms per request (proxy / {floor}), p50", _fmt(pm * 1e3), _fmt(mm * 1e3), _fmt(pm / mm),
            "<= 2.00" if target else "", _ok(pm / mm <= 2.0) if target else "")
    ctx.row(f"{name} proxy CPU us/request, us/embedding", f"{cpu_us:.0f} / {cpu_us / count:.1f}", "", "", "", "")


# --- duplicates: concurrent requests over a small pool of new inputs --------------------------------------------


async def dedup_scenario(ctx: Ctx) -> None:
    rng = random.Random(7)
    pool = [f"bench dup {ctx.run_id} {k}: shared sentence" for k in range(300)]
    batches = [[rng.choice(pool) for _ in range(60)] for _ in range(40)]
    distinct = len({x for b in batches for x in b})
    before = await ctx.mock_stats()
    headers = {"Authorization": f"Bearer {ctx.key}"}
    url = f"http://127.0.0.1:{ctx.proxy.port}/v1/embeddings"
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one(batch: list[str]) -> int:
            async with s.post(url, json={"model": MODEL, "input": batch, "encoding_format": "base64"},
                              headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.wait_for(asyncio.gather(*(one(b) for b in batches)), 120)
        after = await ctx.mock_stats()
        await asyncio.sleep(0.3)
        again = await asyncio.wait_for(asyncio.gather(*(one(b) for b in batches)), 120)
    final = await ctx.mock_stats()
    upstream = after["inputs"] - before["inputs"]
    ratio = upstream / distinct
    ctx.results["dedup"] = {
        "requests": len(batches), "inputs_sent": sum(map(len, batches)), "distinct": distinct,
        "upstream_inputs": upstream, "upstream_calls": after["requests"] - before["requests"],
        "ratio": round(ratio, 4), "statuses": sorted(set(statuses)),
        "repeat_upstream_inputs": final["inputs"] - after["inputs"], "repeat_statuses": sorted(set(again)),
    }
    ctx.row(f"dedup: upstream inputs / distinct ({len(batches)} concurrent x 60 of {distinct} distinct)",
            f"{upstream} / {distinct}", "", _fmt(ratio, 3), "== 1.0",
            _ok(ratio == 1.0 and set(statuses) == {200}))
    ctx.row("dedup: repeat of the same workload, upstream inputs", str(final["inputs"] - after["inputs"]), "", "",
            "== 0", _ok(final["inputs"] == after["inputs"]))


# --- rejections -------------------------------------------------------------------------------------------------


async def reject_scenarios(ctx: Ctx) -> None:
    body = {"model": MODEL, "input": hit_text(0), "encoding_format": "base64"}
    cases: list[tuple[str, str | None, int, str]] = [
        ("reject-bad-key", "sk-gateway-" + "x" * 43, 401, "well-formed, unknown key"),
        ("reject-over-quota", ctx.quota_key, 429, ctx.quota_note),
    ]
    for name, key, status, note in cases:
        if key is None:
            ctx.results[name] = {"skipped": note}
            ctx.row(f"{name}: skipped (see notes)", "", "", "", "", "")
            ctx.notes.append(f"{name} skipped: {note}")
            continue
        req = ctx.embed_request(body, key)
        t = Target(ctx.proxy.port)
        before = await ctx.mock_stats()

        async def run(rate: float, t: Target = t, req: bytes = req, status: int = status) -> RunResult:
            # over quota: the first request of a new minute window is admitted (200), which is correct
            expect = (status,) if status != 429 else (429, 200)
            return await ctx.measured(lambda: t.open_loop(lambda i: req, rate, ctx.opts.step_s, expect=expect))

        s = await search_rate(run, start_rps=1000, p99_budget_s=P99_BUDGET_S, max_rps=ctx.opts.max_rps,
                              refine=ctx.opts.refine)
        t.close()
        after = await ctx.mock_stats()
        calls = after["requests"] - before["requests"]
        cpu = s.best.extra.get("proxy_cpu_us_per_request") if s.best else None
        ctx.results[name] = {"note": note, "rps_at_p99_10ms": round(s.best_rps, 1), "upstream_calls": calls,
                             "best": s.best.summary() if s.best else None, "steps": s.steps}
        ctx.row(f"{name} ({status}) req/s at p99<=10ms; upstream calls", f"{s.best_rps:.0f}; {calls} calls", "", "",
                "0 calls", _ok(calls == 0))
        if cpu is not None:
            ctx.row(f"{name} proxy CPU us/request", f"{cpu:.0f}", "", "", "", "")


# --- Redis memory per entry -----------------------------------------------------------------------------------


async def memory_scenario(ctx: Ctx) -> None:
    """MEMORY USAGE of the 100 cached hit entries, and of the same vectors and counts stored in the previous
    layout (4-byte count + raw vector, as the proxy wrote them before packed entries) under scratch keys."""
    from proxy.stores.entrycodec import decode_entry

    keys = cache_keys([hit_text(k) for k in range(100)])
    sizes = [ctx.redis.memory_usage(k, samples=0) for k in keys]
    present = [int(s) for s in sizes if s]
    if not present:
        ctx.results["redis-bytes-per-vector"] = {"skipped": "no cache entries found"}
        return
    lengths = [int(ctx.redis.strlen(k)) for k in keys[:10]]
    avg = sum(present) / len(present)
    raw = DIMS * 4
    previous = []
    for k in keys:
        value = ctx.redis.get(k)
        entry = decode_entry(value, DIMS) if isinstance(value, bytes) else None
        if entry is None:
            continue
        old_key = k.replace(":v2:", ":")  # where the previous version kept this entry (same key length)
        ctx.redis.set(old_key, entry.tokens.to_bytes(4, "little") + bytes(entry.vector), ex=600)
        previous.append(int(ctx.redis.memory_usage(old_key, samples=0) or 0))
        ctx.redis.delete(old_key)
    before = sum(previous) / len(previous) if previous else float("nan")
    ctx.results["redis-bytes-per-vector"] = {"memory_usage_avg": round(avg, 1), "value_bytes": lengths[0],
                                             "vector_bytes": raw, "ratio": round(avg / raw, 4),
                                             "previous_layout_memory_usage_avg": round(before, 1),
                                             "previous_layout_value_bytes": raw + 4, "entries": len(present)}
    ctx.row(f"Redis bytes per cached 1536-d entry (MEMORY USAGE; value {lengths[0]} B)", f"{avg:.0f}", str(raw),
            _fmt(avg / raw, 3), "<= 1.10", _ok(avg / raw <= 1.1))
    ctx.row(f"same entries, previous layout (value {raw + 4} B) / now; bytes per entry <= 6,300",
            f"{avg:.0f}", f"{before:.0f}", _fmt(avg / before, 3), "<= 6300 B", _ok(avg <= 6300))
