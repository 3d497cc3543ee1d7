"""File descriptors: raise the soft limit to the hard one at start, and keep client connections below it.

Every client connection is a file descriptor. Past the soft RLIMIT_NOFILE (1024 by systemd's default) `accept()`
fails with EMFILE: new connections wait in the kernel's backlog and are reset, /healthz included, with nothing in
the proxy's log. So each process raises its soft limit to the hard one when it starts, and caps its client
connections below what is left once its own pools are counted: Redis connections (per store), the upstream
connection pools, and a margin for everything else (log files, the metrics files of `--workers N`, DNS).
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

from ..config import Settings

log = logging.getLogger("proxy.connections")
_MARGIN = 64  # descriptors kept for everything that is neither a client, a Redis nor an upstream connection
_FLOOR = 16  # the fewest client connections a process takes, however low its limit


@dataclass(frozen=True)
class FdPlan:
    soft_before: int  # the soft limit the process started with
    soft: int  # after raising it (the hard limit, when that could be done)
    reserved: int  # descriptors kept for Redis, the upstreams and the margin
    max_connections: int  # client connections this process keeps open at most


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # a hard limit above the kernel's nr_open
            log.warning("could not raise the file-descriptor limit from %d to %d (%s)", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


def reserved_fds(settings: Settings) -> int:
    """Descriptors the process may need besides client connections."""
    redis = settings.redis.max_connections if settings.redis.url else 0
    redis += settings.cache_redis.max_connections if settings.cache_redis.url else 0
    upstream = sum(u.pool_size for u in settings.upstreams.values())
    return redis + upstream + _MARGIN


def plan(settings: Settings) -> FdPlan:
    """Raise the soft limit and size the connection cap (the setting, or less when descriptors are short)."""
    before, soft = raise_soft_limit()
    reserved = reserved_fds(settings)
    wanted = settings.connections.max_connections
    cap = min(wanted, max(_FLOOR, soft - reserved))
    if cap < wanted:
        log.warning("client connections capped at %d per process (connections.max_connections is %d): the "
                    "file-descriptor limit is %d and %d are kept for Redis, the upstreams and the process itself; "
                    "raise the hard limit (ulimit -Hn, LimitNOFILE=) to allow more", cap, wanted, soft, reserved)
    return FdPlan(before, soft, reserved, cap)


def open_fds() -> int | None:
    """Descriptors open in this process (None where /proc is not there)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None
