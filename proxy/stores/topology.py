"""The Redis topologies, chosen in one place from `type` (single | cluster | sentinel), as envoyproxy/ratelimit does.

    single    url: redis://[user:password@]host:port/db or rediss://...   -> redis.asyncio.Redis
    cluster   url: host:port,host:port,... (seed nodes) or one node's URL  -> redis.asyncio.cluster.RedisCluster
    sentinel  url: MASTER_NAME,host:port,host:port,... (the sentinels)    -> Sentinel(...).master_for(MASTER_NAME)

Everything above sees one client whatever the topology; what differs is here: parsing the URL, building the
client, the pub/sub connection (a cluster's is a plain connection to one node, the next one after a failure), the
masters (and replicas) a start-up check must ask, turning a topology failure into one line for the operator, and on
a Sentinel set the master's address: one bounded query for every connection opened at once, and the sentinels'
agreement on it before operator work (confirm_master).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_.])?")


def _host_port(text: str, what: str) -> tuple[str, int]:
    """host:port, a name or an IPv4 address, or an IPv6 address in brackets ([::1]:7000); nothing else (a URL's
    scheme or credentials would otherwise pass as part of the host, and never connect)."""
    item = text.strip()
    host, sep, port = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        valid = _is_ipv6(host)
    else:
        valid = bool(_HOSTNAME.fullmatch(host))
    if not sep or not valid or not port.isdigit() or not 0 < int(port) < 65536:
        raise TopologyError(f"{what}: {item!r} is not host:port")
    return host, int(port)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text.partition("%")[0]), ipaddress.IPv6Address)
    except ValueError:
        return False


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
        if settings.tls and not url.startswith("rediss://"):  # else: TLS asked for, plaintext sent
            tls = var.removesuffix("URL") + "TLS"
            raise TopologyError(f"{tls} is true but {var} is {_shown(url)}: a single Redis takes TLS from its URL; "
                                "use rediss://")
        return Endpoint(kind, url=url)
    items = [i.strip() for i in url.split(",") if i.strip()]
    if kind == "cluster":
        if any(i.startswith("unix://") for i in items):
            raise TopologyError(f"{var}: a cluster cannot be reached over a unix socket (redis-py's cluster client "
                                f"speaks TCP only); give host:port seed nodes, not {_shown(url)}")
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


def uses_tls(settings: RedisSettings) -> bool:
    return settings.tls or settings.url.strip().startswith("rediss://")


class _SentinelMaster(aioredis.Redis):
    """The master a Sentinel set names; closing it also closes the connections to the sentinels."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for s in self.sentinel_manager.sentinels:
                await s.aclose()


class MasterUncertain(RedisConnectionError):
    """The sentinels do not (yet) agree on the master: a write now could land on a master being demoted."""


class _MasterPool(SentinelConnectionPool):
    """redis-py's sentinel pool, with two changes.

    A connection is never used while it points at a server other than the master last named (redis-py only drops
    idle connections when the master changes; one in use then went back to the pool and kept talking to the old
    master). And the discovery of the master is one query shared by every connection that needs it at once (each
    new connection asks; a burst of them would ask the sentinels as many times), run to its end even when the
    request that started it gave up: a hung sentinel first in the list then costs one sentinel timeout, after which
    redis-py moves the sentinel that answered to the front."""

    _discovery: asyncio.Future[Any] | None = None

    async def get_master_address(self) -> Any:
        if self._discovery is None or self._discovery.done():
            self._discovery = asyncio.ensure_future(super().get_master_address())  # type: ignore[no-untyped-call]
            self._discovery.add_done_callback(_retrieve)
        return await asyncio.shield(self._discovery)

    async def ensure_connection(self, connection: Any) -> None:
        if (self.master_address is not None and connection.is_connected
                and (connection.host, connection.port) != tuple(self.master_address)):
            await connection.disconnect()  # it reconnects to the master the sentinels name now
        await super().ensure_connection(connection)

    async def point_at(self, address: tuple[str, int]) -> None:
        """Make `address` the master (as get_master_address does when a sentinel names a new one)."""
        if self.master_address != address:
            self.master_address = address
            await self.disconnect(inuse_connections=False)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # seen (its waiters, if any, got it): no "exception was never retrieved"


# The share of socket_timeout_s one sentinel may take to connect, and to answer.
SENTINEL_TIMEOUT_SHARE = 0.5
# The share of operator_timeout_s one cluster node may take to connect: a topology refresh (CLUSTER SLOTS) asks the
# nodes one after another, so a node that drops SYNs (its host gone) must leave an operator call time for the next
# ones; a connect that needed one SYN retransmission (about 1 s, a loaded host) still fits with the defaults.
CLUSTER_CONNECT_SHARE = 1 / 3


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
    # Each new master connection asks the sentinels first, inside the caller's time limit (socket_timeout_s on the
    # request path): a sentinel that does not answer must cost a fraction of it, once (no retries), so that the
    # next sentinel is asked in time.
    sentinel_kw: dict[str, Any] = {"socket_connect_timeout": settings.socket_timeout_s * SENTINEL_TIMEOUT_SHARE,
                                   "socket_timeout": settings.socket_timeout_s * SENTINEL_TIMEOUT_SHARE,
                                   "retry": Retry(NoBackoff(), 0)}
    if settings.sentinel_password:
        sentinel_kw["password"] = settings.sentinel_password
    if settings.tls:
        sentinel_kw["ssl"] = True
    sentinel = Sentinel(list(endpoint.nodes), sentinel_kwargs=sentinel_kw, **kw)
    master = sentinel.master_for(endpoint.master, redis_class=_SentinelMaster, connection_pool_class=_MasterPool)
    master.sentinel_manager = sentinel
    return master


def is_sentinel(client: Any) -> bool:
    return isinstance(client, _SentinelMaster) and isinstance(client.connection_pool, _MasterPool)


async def confirm_master(client: Any) -> None:
    """Before operator work on a Sentinel set (key, limit and ledger writes): the master every answering sentinel
    names (a majority of them must answer, none may be in the middle of a failover), and the client's connections
    pointed at it. Raises MasterUncertain otherwise. redis-py trusts the first sentinel that answers, and keeps
    using connections to a master the sentinels have demoted; a write there is lost once a sentinel turns that
    server into a replica."""
    if not is_sentinel(client):
        return
    pool: _MasterPool = client.connection_pool
    sentinels = client.sentinel_manager.sentinels
    replies = await asyncio.gather(*(s.sentinel_master(pool.service_name) for s in sentinels),
                                   return_exceptions=True)
    named: set[tuple[str, int]] = set()
    answered = unknown = 0
    for reply in replies:
        if isinstance(reply, BaseException):
            if isinstance(reply, asyncio.CancelledError):
                raise reply
            unknown += isinstance(reply, ResponseError) and "no such master" in str(reply).lower()
            continue
        answered += 1
        flags = reply.get("flags", "")
        flags = set(flags.split(",")) if isinstance(flags, str) else set(flags)
        if "failover_in_progress" in flags:
            raise MasterUncertain("a sentinel is failing the master over")
        named.add((str(reply["ip"]), int(reply["port"])))
    if unknown > len(sentinels) // 2:
        raise TopologyError(f"no sentinel knows a master named {pool.service_name!r} (the first item of the sentinel "
                            "URL)")
    if answered <= len(sentinels) // 2:
        raise MasterUncertain(f"{answered} of {len(sentinels)} sentinels answered; a majority must name the master")
    if len(named) != 1:
        raise MasterUncertain("the sentinels name different masters (a failover is under way): "
                              + ", ".join(f"{h}:{p}" for h, p in sorted(named)))
    await pool.point_at(named.pop())


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


def _server_kwargs(settings: RedisSettings) -> dict[str, Any]:
    return {"socket_connect_timeout": settings.operator_timeout_s, "socket_timeout": settings.operator_timeout_s,
            **auth_kwargs(settings)}


async def masters(client: Any, settings: RedisSettings, var: str = "REDIS_URL") -> list[tuple[str, Any]]:
    """(name, a client of that server alone) for every master behind `client`, to ask each for its settings.
    The caller closes every client that is not `client`. Raises TopologyError for a Redis without cluster mode named
    as a cluster, a cluster with uncovered slots or a master name no sentinel knows; RedisError, OSError or (a
    cluster's) RedisClusterException when unreachable."""
    kw = _server_kwargs(settings)
    if is_cluster(client):
        await _initialize(client, var)
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


async def replicas(client: Any, settings: RedisSettings) -> list[tuple[str, Any]]:
    """(name, a client of that server alone) for every replica the cluster or the sentinels know of (after
    `masters`); none for a single Redis. A replica becomes a master at the next failover."""
    kw = _server_kwargs(settings)
    if is_cluster(client):
        return [(n.name, aioredis.Redis(host=n.host, port=n.port, **kw)) for n in client.get_replicas()]
    if isinstance(client, _SentinelMaster) and client.sentinel_manager is not None:
        name: str = getattr(client.connection_pool, "service_name", "")
        found = [(str(h), int(p)) for h, p in await client.sentinel_manager.discover_slaves(name)]
        return [(f"{h}:{p}", aioredis.Redis(host=h, port=p, **kw)) for h, p in found]
    return []


async def _initialize(cluster: RedisCluster, var: str) -> None:
    """The cluster's slot map, or TopologyError where no waiting can help."""
    try:
        await cluster.initialize()
    except RedisClusterException as exc:
        if "not covered" in str(exc):
            raise TopologyError(f"the Redis cluster does not cover every hash slot ({_first_line(exc)}); "
                                "fix the cluster (CLUSTER INFO: cluster_state) before starting") from exc
        if "Cluster mode is not enabled" in str(exc):
            kind = var.removesuffix("URL") + "TYPE"
            raise TopologyError(f"{var} names a Redis without cluster mode, but {kind} is cluster: set {kind}=single "
                                "with a redis:// URL (or sentinel), or give the nodes of a Redis Cluster") from exc
        raise


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
    """One line for a Redis failure at start-up or in the CLI, in words (a timeout has no message of its own, and
    asyncio's is raised from a bare CancelledError)."""
    cause = exc.__cause__ or exc
    if isinstance(cause, asyncio.CancelledError):
        cause = exc
    raw = str(cause).strip()
    if raw:
        return raw.splitlines()[0] if cause is exc else f"{type(cause).__name__}: {raw.splitlines()[0]}"
    timeout = isinstance(cause, TimeoutError | RedisTimeoutError)
    return f"{type(cause).__name__}: {'no answer in time' if timeout else 'no message'}"
