"""Checks of the Redis stores before `serve` starts (and in `check-config`).

The state store holds what must not be lost: gateway keys, team limits, quota counters, the usage ledger. Any
maxmemory-policy but noeviction lets Redis evict them under memory pressure, silently (a key then answers 401, a
team's chargeback data is gone), so `serve` refuses such a store unless `redis.allow_evicting_state` accepts the
risk. The policy is read with CONFIG GET, or from INFO where CONFIG is disabled (managed services often rename it);
unreadable, it is a warning. On a cluster every master is asked; so is every replica a cluster or the sentinels
know of (a failover makes it the master), for its policy alone, where it answers. A topology that cannot serve (a
URL that does not fit its type, a Redis without cluster mode named as a cluster, uncovered hash slots, a master
name no sentinel knows) is an error; an unreachable store is a warning: the proxy starts and degrades as when Redis
goes down.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisClusterException, RedisError, ResponseError

from ..config import RedisSettings, Settings, public_url
from .topology import TopologyError, describe, masters, replicas, uses_tls


@dataclass(frozen=True)
class Finding:
    error: bool  # true: serve refuses to start
    message: str


@dataclass(frozen=True)
class ServerFacts:
    node: str  # host:port, or "" for a single Redis
    policy: str | None  # None: unreadable
    aof: bool | None
    rdb: bool | None
    replica: bool = False  # a replica (of a cluster or a sentinel set): the master after the next failover


async def read_facts(node: str, r: Any) -> ServerFacts:
    """maxmemory-policy and persistence of one server: CONFIG GET, else INFO (no RDB rules there: unknown)."""
    try:
        policy = _config_value(await r.config_get("maxmemory-policy"), "maxmemory-policy")
        aof = _config_value(await r.config_get("appendonly"), "appendonly") == "yes"
        rdb = bool((_config_value(await r.config_get("save"), "save") or "").strip())
        return ServerFacts(node, policy, aof, rdb)
    except ResponseError:  # CONFIG renamed or disabled
        pass
    try:
        memory = await r.info("memory")
        persistence = await r.info("persistence")
    except ResponseError:
        return ServerFacts(node, None, None, None)
    policy = memory.get("maxmemory_policy")
    aof = persistence.get("aof_enabled")
    return ServerFacts(node, str(policy) if policy is not None else None, None if aof is None else bool(aof), None)


def _config_value(reply: Any, name: str) -> str | None:
    for k, v in dict(reply).items():
        if (k.decode() if isinstance(k, bytes) else k) == name:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


async def inspect(settings: RedisSettings, var: str) -> list[ServerFacts]:
    """The facts of every master of the store `settings` names, then of every replica known (an unreadable replica
    has policy None). Raises TopologyError, or RedisError, RedisClusterException, OSError or TimeoutError when it
    cannot be reached."""
    from .guard import connect  # store.py imports this package

    client, _ = connect(settings, var)
    found: list[tuple[str, Any]] = []
    limit = 2 * settings.operator_timeout_s + 1
    try:
        async with asyncio.timeout(limit):
            found = await masters(client, settings, var)
            facts = [await read_facts(node, r) for node, r in found]
            copies = await replicas(client, settings)
            found += copies
            read = await asyncio.gather(*(read_facts(node, r) for node, r in copies), return_exceptions=True)
    except TimeoutError:
        raise TimeoutError(f"no answer within {limit:g}s") from None
    finally:
        for _, r in found:
            if r is not client:
                await r.aclose()
        await client.aclose()
    for (node, _), f in zip(copies, read, strict=True):
        if isinstance(f, asyncio.CancelledError):
            raise f
        facts.append(dataclasses.replace(f, replica=True) if isinstance(f, ServerFacts) else
                     ServerFacts(node, None, None, None, replica=True))
    return facts


def described_stores(settings: Settings) -> list[str]:
    """One line per store `check_stores` checks, for `check-config`: its type and address, never a password."""
    if not settings.redis.url:
        return ["state store: the embedded in-process store (one process, not durable)"]
    lines = []
    for what, s, var in (("state store", settings.redis, "REDIS_URL"), ("cache store", settings.cache_redis,
                                                                       "CACHE_REDIS_URL")):
        if s.url:
            address = ",".join(public_url(item) for item in s.url.split(",") if item.strip())
            lines.append(f"{what} ({var}): redis ({s.type}{', tls' if uses_tls(s) else ''}) {address}")
    if not settings.cache_redis.url:
        lines.append("cache store: the state store")
    return lines


def _where(var: str, facts: ServerFacts) -> str:
    if facts.replica:
        return f"{var} (replica {facts.node})"
    return f"{var} ({facts.node})" if facts.node else var


async def check_stores(settings: Settings) -> list[Finding]:
    """What `serve` and `check-config` report about the stores; empty for the embedded store."""
    if not settings.redis.url:
        return []
    out: list[Finding] = []
    state = await _facts(settings.redis, "REDIS_URL", "the state store", out)
    shared = not settings.cache_redis.url
    cache = [] if shared else await _facts(settings.cache_redis, "CACHE_REDIS_URL", "the cache store", out)
    for f in state or []:
        where = _where("REDIS_URL", f)
        if f.replica and f.policy in (None, "noeviction"):
            continue  # an unreadable replica is not a finding; persistence and sharing matter on the master
        if f.policy is None:
            out.append(Finding(False, f"could not read maxmemory-policy of the state store {where} (CONFIG and INFO "
                                      "refused): make sure it is noeviction, or keys, limits and the ledger may be "
                                      "evicted"))
        elif f.policy != "noeviction":
            message = (f"the state store {where} has maxmemory-policy {f.policy}: Redis may evict gateway keys, team "
                       "limits, quota counters and the usage ledger. Set maxmemory-policy noeviction on it and give "
                       "the cache a store of its own that may evict (CACHE_REDIS_URL), or set "
                       "redis.allow_evicting_state = true to accept the risk")
            out.append(Finding(not settings.redis.allow_evicting_state, message))
        elif shared and not f.replica:
            out.append(Finding(False, f"the cache shares the state store {where}, whose maxmemory-policy is "
                                      "noeviction: once its memory is full the cache stops admitting entries; give "
                                      "the cache its own store with allkeys-lru (CACHE_REDIS_URL)"))
        if f.aof is False and f.rdb is False and not f.replica:
            out.append(Finding(False, f"the state store {where} has neither AOF (appendonly) nor RDB snapshots "
                                      "(save): a restart of it loses every key, limit and the usage ledger; set "
                                      "appendonly yes"))
    for f in cache or []:
        if f.policy == "noeviction":
            out.append(Finding(False, f"the cache store {_where('CACHE_REDIS_URL', f)} has maxmemory-policy "
                                      "noeviction: once its memory is full the cache stops admitting entries; "
                                      "allkeys-lru evicts the oldest instead"))
    return out


async def _facts(settings: RedisSettings, var: str, what: str, out: list[Finding]) -> list[ServerFacts] | None:
    try:
        return await inspect(settings, var)
    except TopologyError as exc:
        out.append(Finding(True, str(exc)))
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        # A TLS client facing a server without TLS waits for the handshake until the connect timeout
        tls = f"; TLS is on ({var.removesuffix('URL')}TLS or rediss://): is the server serving TLS?" \
            if uses_tls(settings) else ""
        out.append(Finding(False, f"{what} ({var}) is unreachable at start-up ({describe(exc)}{tls}); starting "
                                  "anyway: requests degrade until it answers, and its settings were not checked"))
    return None
