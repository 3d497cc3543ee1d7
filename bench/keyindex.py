"""`python -m bench.keyindex [--keys 50000]`: live cached embeddings on one proxy worker while it builds the team
key indexes in the background (issue 18 point 13's review), against the same traffic once the build is done.

A private redis-server gets KEYS gateway keys written as the key store writes them, their team indexes then
deleted with the mark `ep:meta:teamkeys-built` (a store from before the indexes). One worker starts: the build
starts with it (proxy/accounts/keyindexbuild.py). Live hits run at `--rps` on keep-alive connections in steps of
STEP_S until the mark appears ("with"), then for as many steps after it ("without"). Printed as JSON: p50/p99 of
each side and their ratio, the build's time, and a team listing's time during the build.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from . import env as E
from .loadgen import Target, build_request
from .scenarios import MODEL, hit_text

STEP_S = 2.0
ADMIN_KEY = "bench-admin-key-0123456789abcdef"
TEAMS = ("ads", "search", "ranking", "ops", "billing")


async def _old_keys(url: str, n: int) -> None:
    from proxy.accounts.keyrecord import KeyRecord
    from proxy.accounts.keys import KeyStore, generate_key, new_key_id
    from proxy.config import RedisSettings
    from proxy.stores.guard import Store, connect
    from proxy.stores.rediskeys import RedisKeys

    settings = RedisSettings(url=url, operator_timeout_s=60)
    store, rkeys = Store(connect(settings)[0], settings), RedisKeys("ep")
    ks, now = KeyStore(store, rkeys), time.time()
    for start in range(0, n, 1000):
        async def write(r: Any, start: int = start) -> None:
            pipe = r.pipeline(transaction=False)
            for i in range(start, min(n, start + 1000)):
                record = KeyRecord(new_key_id(), TEAMS[i % len(TEAMS)], f"svc {i}", now + i * 1e-4)
                ks._queue_create(pipe, generate_key(), record)
            await pipe.execute()

        await store.operator_call("bench", write)

    async def forget(r: Any) -> None:
        await r.delete(rkeys.key_teams(), rkeys.team_keys_built(),
                       *[k for t in TEAMS for k in (rkeys.team_keys(t), rkeys.team_live_keys(t))])

    await store.operator_call("bench", forget)
    await store.close()


async def _listing(port: int) -> float:
    started = time.perf_counter()
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/admin/keys?team=ops&limit=100",
                                                   headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        await r.read()
        assert r.status == 200, r.status
    return time.perf_counter() - started


async def measure(args: argparse.Namespace, e: E.Env) -> dict[str, Any]:
    redis_proc, client = E.start_redis(e)
    url = f"redis://127.0.0.1:{redis_proc.port}/0"
    await _old_keys(url, args.keys)
    mock = E.start_mock(e, 5)
    config = e.workdir / "proxy.toml"
    config.write_text("[cache]\nlocal_max_mb = 0\n")
    penv = {**E.proxy_env(redis_proc.port, mock.port, config), "PROXY_ADMIN_KEY": ADMIN_KEY}
    key = E.create_key(penv, "ads")  # a key of the new version: indexed at once, not a reason to wait
    proc = E.start_proxy(e, penv, 1)
    started = time.monotonic()
    body = json.dumps({"model": MODEL, "input": [hit_text(k) for k in range(8)], "encoding_format": "base64"})
    req = build_request(proc.port, "/v1/embeddings", body.encode(), {"Authorization": f"Bearer {key}"})
    t = Target(proc.port, 16)
    await t.request(req)
    await asyncio.sleep(0.5)
    listing = await _listing(proc.port)
    sides: dict[str, list[Any]] = {"with": [], "without": []}
    while not client.exists("ep:meta:teamkeys-built"):
        sides["with"].append(await t.open_loop(lambda i: req, args.rps, STEP_S))
    built_s = time.monotonic() - started
    for _ in range(max(3, len(sides["with"]))):
        sides["without"].append(await t.open_loop(lambda i: req, args.rps, STEP_S))
    t.close()
    lat = {s: np.concatenate([r.latencies_s for r in rs]) for s, rs in sides.items()}
    p = {s: {q: round(float(np.percentile(v, q)) * 1e3, 2) for q in (50, 99)} for s, v in lat.items()}
    return {"keys": args.keys, "rps": args.rps, "build_s_about": round(built_s, 1),
            "team_listing_during_build_s": round(listing, 3), "live_ms": p,
            "errors": {s: sum(r.errors for r in rs) for s, rs in sides.items()},
            "p99_ratio_with_over_without": round(p["with"][99] / p["without"][99], 2),
            "p50_ratio_with_over_without": round(p["with"][50] / p["without"][50], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.keyindex")
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--rps", type=float, default=100.0)
    args = parser.parse_args()
    e = E.Env(Path(tempfile.mkdtemp(prefix="bench-keyindex-")))
    try:
        print(json.dumps(asyncio.run(measure(args, e)), indent=1))
    finally:
        e.stop_all()


if __name__ == "__main__":
    main()
