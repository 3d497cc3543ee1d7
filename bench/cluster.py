"""The hit and 2048-input scenarios against a 3-master Redis Cluster (`REDIS_TYPE=cluster`), each as a ratio
against a bare cluster read of the same keys by redis-py's asyncio RedisCluster: `GET` for one key,
`mget_nonatomic` (one `MGET` per hash slot, the slots' commands sent per node in one pipeline) for more.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from . import env as E
from .loadgen import Target
from .scenarios import MODEL, Ctx, against_read, cache_keys, hit_scenarios, hit_text, warm_hits

# (inputs, encoding, tier), as in cli.HIT_VARIANTS: the default proxy, and the one whose every hit is a cluster read
HIT_VARIANTS = [(1, "base64", "local"), (1, "base64", "redis"), (100, "base64", "redis")]


def start(e: E.Env, penv: dict[str, str], redis_config: Path,
          workers: int | None) -> tuple[list[E.Proc], dict[str, str]]:
    """The cluster's masters and two proxies on it (default; in-process tier off). Returns every process started
    (masters first) and the proxies' environment."""
    nodes = E.start_cluster(e)
    cenv = {**penv, "REDIS_URL": ",".join(f"127.0.0.1:{n.port}" for n in nodes), "REDIS_TYPE": "cluster"}
    proxy = E.start_proxy(e, cenv, workers, name="proxy-cluster")
    tier = E.start_proxy(e, {**cenv, "PROXY_CONFIG": str(redis_config)}, workers, name="proxy-cluster-redis-tier")
    return [*nodes, proxy, tier], cenv


async def cluster_scenarios(ctx: Ctx, procs: list[E.Proc], cenv: dict[str, str]) -> None:
    nodes, proxy, tier = procs[:-2], procs[-2], procs[-1]
    servers = tuple(redis.Redis(port=n.port) for n in nodes)
    cctx = Ctx(ctx.opts, proxy, ctx.mock, ctx.baseline, nodes[0], servers[0], E.create_key(cenv, "bench"), None, "",
               tier, stats_servers=servers, run_id=ctx.run_id)
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in nodes])
    try:
        await hit_scenarios(cctx, HIT_VARIANTS)  # req/s at p99 <= 10 ms vs the bare aiohttp server, as `hit`
        await _against_cluster_reads(cctx, client)
    finally:
        await client.aclose()
        for s in servers:
            s.close()
    for name, result in cctx.results.items():
        ctx.results[f"cluster-{name}"] = result
    ctx.results["cluster"] = {"masters": len(nodes), "ports": [n.port for n in nodes]}
    ctx.rows += [[f"cluster {r[0]}", *r[1:]] for r in cctx.rows]
    await _single_reference(ctx)


async def _single_reference(ctx: Ctx) -> None:
    """The 1- and 100-input reads at concurrency 1 on the single Redis, the same run: what the cluster changes.
    (The 2048-input ones are the `big` group's.)"""
    await warm_hits(ctx)
    client = aioredis.Redis(port=ctx.redis_proc.port)
    try:
        for count, iters in ((1, 300), (100, 200)):
            texts = [hit_text(k) for k in range(count)]
            keys = cache_keys(texts)
            req = ctx.embed_request({"model": MODEL, "input": texts[0] if count == 1 else texts,
                                     "encoding_format": "base64"}, proc=ctx.redis_tier)

            async def read(keys: list[str] = keys) -> Any:
                return await (client.get(keys[0]) if len(keys) == 1 else client.mget(keys))

            await against_read(ctx, f"single hit-{count}-b64-redis-c1", ctx.redis_tier, req, read, count,
                               "bare GET" if count == 1 else "bare MGET", iters)
    finally:
        await client.aclose()


async def _against_cluster_reads(cctx: Ctx, client: RedisCluster) -> None:
    texts = [f"bench big {k}: a sentence of about a dozen tokens for the batch" for k in range(2048)]
    t = Target(cctx.redis_tier.port, 1)
    status, _ = await t.request(cctx.embed_request({"model": MODEL, "input": texts, "encoding_format": "base64"},
                                                   proc=cctx.redis_tier), 60)
    t.close()
    if status != 200:
        raise RuntimeError(f"cluster 2048-input warm-up failed with status {status}")
    big = cache_keys(texts)
    for _ in range(50):  # cache writes happen after the answer
        if None not in await client.mget_nonatomic(big):
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("the 2048 entries are not all in the cluster under the expected keys")
    cases: list[tuple[str, Any, list[str], int]] = [
        ("hit-1-b64-redis", hit_text(0), cache_keys([hit_text(0)]), 300),
        ("hit-100-b64-redis", [hit_text(k) for k in range(100)], cache_keys([hit_text(k) for k in range(100)]), 200),
        ("hit-2048-b64-redis", texts, big, 0),
        ("hit-2048-b64", texts, big, 0),
    ]
    for name, inp, keys, iters in cases:
        proc = cctx.redis_tier if name.endswith("-redis") else cctx.proxy
        req = cctx.embed_request({"model": MODEL, "input": inp, "encoding_format": "base64"}, proc=proc)

        async def read(keys: list[str] = keys) -> Any:
            return await (client.get(keys[0]) if len(keys) == 1 else client.mget_nonatomic(keys))

        floor = "bare cluster GET" if len(keys) == 1 else "bare cluster mget_nonatomic"
        await against_read(cctx, f"{name}-c1", proc, req, read, len(keys), floor, iters or None)
        cctx.results[f"{name}-c1"]["slots"] = len({key_slot(k.encode()) for k in keys})

