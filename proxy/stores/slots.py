"""Cache reads on a Redis Cluster: a batch of keys split by hash slot, one MGET per slot, in one ClusterPipeline.

redis-py's ClusterPipeline sends each node its commands in one write and waits for every node at once, so a
batch costs one round trip per node, in parallel (MGET cannot span slots; cache keys carry no hash tag, so they
spread over every master). Redirections during a resharding or a failover are followed by the pipeline itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot


async def mget_batches(client: Any, batches: Sequence[Sequence[str]]) -> list[Any]:
    """One reply per batch: its values in key order (None for a miss), or the first error a node answered."""
    pipe = client.pipeline(transaction=False)
    plans: list[list[list[int]]] = []
    for keys in batches:
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(i)
        plan = list(groups.values())
        for idxs in plan:
            pipe.execute_command("MGET", *[keys[i] for i in idxs])  # (ClusterPipeline blocks its mget())
        plans.append(plan)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    out: list[Any] = []
    at = 0
    for keys, plan in zip(batches, plans, strict=True):
        values: list[Any] = [None] * len(keys)
        failed: Any = None
        for idxs, reply in zip(plan, replies[at:at + len(plan)], strict=True):
            if isinstance(reply, Exception):
                failed = reply
                break
            for i, v in zip(idxs, reply, strict=True):
                values[i] = v
        at += len(plan)
        out.append(failed if failed is not None else values)
    return out
