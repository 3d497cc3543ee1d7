"""The Redis topologies, chosen in one place from `type` (single | cluster | sentinel), as envoyproxy/ratelimit does.

    single    url: redis://[user:password@]host:port/db or rediss://...   -> redis.asyncio.Redis
    cluster   url: host:port,host:port,... (seed nodes) or one node's URL  -> redis.asyncio.cluster.RedisCluster
    sentinel  url: MASTER_NAME,host:port,host:port,... (the sentinels)    -> Sentinel(...).master_for(MASTER_NAME)

Everything above sees one client whatever the topology; what differs is here: parsing the URL, building the
client, the pub/sub connection (a cluster's is a plain connection to one node, the next one after a failure), the
masters a start-up check must ask, and turning a topology failure into one line for the operator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.connection import parse_url
from redis.exceptions import RedisClusterException

from ..config import RedisSettings

_SCHEMES = ("redis://", "rediss://", "unix://")


class TopologyError(Exception):
    """A Redis URL that does not fit its type, or a topology that cannot serve (uncovered slots, unknown master).
    The message is one line for the operator."""


@dataclass(frozen=True)
class Endpoint:
    type: str
    url: str = ""  # single, or a cluster given as one node's URL
    nodes: tuple[tuple[str, int], ...] = ()  # cluster seed nodes, or the sentinels
    master: str = ""  # sentinel: the monitored master's name


def _host_port(text: str, what: str) -> tuple[str, int]:
    item = text.strip()
    host, sep, port = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # [::1]:7000
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TopologyError(f"{what}: {item!r} is not host:port")
    return host, int(port)


def parse_endpoint(settings: RedisSettings, var: str = "REDIS_URL") -> Endpoint:
    """The endpoint `settings.url` names for `settings.type`; `var` names it in errors (REDIS_URL, CACHE_REDIS_URL)."""
    url, kind = settings.url.strip(), settings.type
    if kind == "single":
        try:
            valid = url.startswith(_SCHEMES) and "," not in url and bool(parse_url(url))  # type: ignore[no-untyped-call]
        except ValueError:
            valid = False
        if not valid:
            raise TopologyError(f"{var} must be a redis:// or rediss:// URL for a single Redis (type single), "
                                f"not {_shown(url)}; a cluster or sentinel set needs REDIS_TYPE")
        return Endpoint(kind, url=url)
    items = [i.strip() for i in url.split(",") if i.strip()]
    if kind == "cluster":
        if len(items) == 1 and items[0].startswith(_SCHEMES):
            return Endpoint(kind, url=items[0])
        if not items or any(i.startswith(_SCHEMES) for i in items):
            raise TopologyError(f"{var} for a cluster is host:port,host:port,... (seed nodes) or one node's "
                                f"redis:// URL, not {_shown(url)}")
        return Endpoint(kind, nodes=tuple(_host_port(i, f"{var} (cluster seed nodes)") for i in items))
    if len(items) < 2 or items[0].startswith(_SCHEMES) or _looks_like_host_port(items[0]):
        raise TopologyError(f"{var} for sentinel is MASTER_NAME,host:port,host:port,... (the master's name, then "
                            f"the sentinels), not {_shown(url)}")
    return Endpoint(kind, master=items[0], nodes=tuple(_host_port(i, f"{var} (sentinels)") for i in items[1:]))


def _looks_like_host_port(item: str) -> bool:
    try:
        _host_port(item, "")
    except TopologyError:
        return False
    return True


def _shown(url: str) -> str:
    """The URL for an error message, without a password."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return repr(f"{scheme}://***@{rest.rpartition('@')[2]}")
    return repr(url)


def auth_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """Credentials and TLS from the environment, for cluster nodes, the sentinel master and single's URL gaps."""
    kw: dict[str, Any] = {}
    if settings.username:
        kw["username"] = settings.username
    if settings.password:
        kw["password"] = settings.password
    if settings.tls:
        kw["ssl"] = True
    return kw


class _SentinelMaster(aioredis.Redis):
    """The master a Sentinel set names; closing it also closes the connections to the sentinels."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for s in self.sentinel_manager.sentinels:
                await s.aclose()


def build_client(settings: RedisSettings, var: str = "REDIS_URL", **kwargs: Any) -> Any:
    """The redis-py client for `settings` (url set). `kwargs` are the connection options every topology shares."""
    endpoint = parse_endpoint(settings, var)
    kw = {**kwargs, **auth_kwargs(settings)}
    if endpoint.type == "single":
        kw.pop("ssl", None)  # single: rediss:// says it
        return aioredis.Redis.from_url(endpoint.url, **kw)
    if endpoint.type == "cluster":
        if endpoint.url:
            return RedisCluster.from_url(endpoint.url, **kw)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in endpoint.nodes], **kw)
    sentinel_kw: dict[str, Any] = {"socket_connect_timeout": kw.get("socket_connect_timeout"),
                                   "socket_timeout": settings.operator_timeout_s}
    if settings.sentinel_password:
        sentinel_kw["password"] = settings.sentinel_password
    if settings.tls:
        sentinel_kw["ssl"] = True
    sentinel = Sentinel(list(endpoint.nodes), sentinel_kwargs=sentinel_kw, **kw)  # type: ignore[no-untyped-call]
    master = sentinel.master_for(endpoint.master, redis_class=_SentinelMaster)
    master.sentinel_manager = sentinel
    return master


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


class NodeSubscriber:
    """`pubsub()` for a cluster: a plain connection to one node (PUBLISH reaches every node of a cluster), the next
    node the cluster client knows after each call, so a resubscription after a failure moves away
    from a dead node."""

    def __init__(self, cluster: RedisCluster, settings: RedisSettings, **kwargs: Any) -> None:
        self._cluster = cluster
        self._kwargs = {**kwargs, **auth_kwargs(settings)}
        self._clients: dict[str, aioredis.Redis] = {}
        self._turn = random.randrange(1 << 16)  # instances spread over the nodes

    def pubsub(self, **kw: Any) -> Any:
        nodes = self._cluster.get_nodes() or list(self._cluster.nodes_manager.startup_nodes.values())
        self._turn += 1
        node = nodes[self._turn % len(nodes)]
        client = self._clients.get(node.name)
        if client is None:
            client = self._clients[node.name] = aioredis.Redis(host=node.host, port=int(node.port), **self._kwargs)
        return client.pubsub(**kw)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


async def masters(client: Any, settings: RedisSettings) -> list[tuple[str, Any]]:
    """(name, a client of that server alone) for every master behind `client`, to ask each for its settings.
    The caller closes every client that is not `client`. Raises TopologyError for a cluster with uncovered slots
    or a master name no sentinel knows; RedisError or OSError when unreachable."""
    kw: dict[str, Any] = {"socket_connect_timeout": settings.operator_timeout_s,
                          "socket_timeout": settings.operator_timeout_s, **auth_kwargs(settings)}
    if is_cluster(client):
        try:
            await client.initialize()
        except RedisClusterException as exc:
            if "not covered" in str(exc):
                raise TopologyError(f"the Redis cluster does not cover every hash slot ({_first_line(exc)}); "
                                    "fix the cluster (CLUSTER INFO: cluster_state) before starting") from exc
            raise
        return [(n.name, aioredis.Redis(host=n.host, port=n.port, **kw)) for n in client.get_primaries()]
    if isinstance(client, _SentinelMaster) and client.sentinel_manager is not None:
        name: str = getattr(client.connection_pool, "service_name", "")
        try:
            host, port = await client.sentinel_manager.discover_master(name)
        except MasterNotFoundError as exc:
            await _unknown_master(client.sentinel_manager, name, exc)
            raise
        return [(f"{host}:{port}", aioredis.Redis(host=host, port=port, **kw))]
    return [("", client)]


async def _unknown_master(sentinel: Sentinel, name: str, exc: Exception) -> None:
    """A TopologyError if some sentinel answered and none monitors `name` (else: they are unreachable)."""
    answered = False
    for s in sentinel.sentinels:
        try:
            known = await s.sentinel_masters()
        except Exception:  # this sentinel is unreachable; another may answer
            continue
        answered = True
        if name in known:
            return
    if answered:
        raise TopologyError(f"no sentinel knows a master named {name!r} (the first item of the sentinel URL)") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def describe(exc: BaseException) -> str:
    """One line for a Redis failure at start-up or in the CLI."""
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {_first_line(cause)}" if cause is not exc else _first_line(exc)
