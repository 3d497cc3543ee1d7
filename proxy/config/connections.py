"""`[connections]`: how long a client connection may take over each part of a request, and how many a process
keeps open. What happens when each limit is hit is in README "Connections"; the guard is proxy/http/connections.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ranges import bounded


@dataclass(frozen=True)
class ConnectionSettings:
    # A request's line and headers must arrive within this long: counted from the connection's start for its first
    # request, from the first byte of each later one. Past it: 408 in OpenAI's shape if some of the request came
    # (nothing, if nothing did), and the connection is closed.
    header_timeout_s: float = bounded(20.0, 0, 3600, above=True)
    # An idle keep-alive connection (a request answered, no byte of the next one yet) is closed after this long.
    keepalive_timeout_s: float = bounded(75.0, 0, 86400, above=True)
    # A request body must arrive at this many bytes per second at least, averaged from the end of its headers,
    # after `body_grace_s`; slower: 408 and the connection is closed. 0 turns the check off.
    min_body_rate_bytes_s: float = bounded(240.0, 0)
    body_grace_s: float = bounded(5.0, 0, 3600)
    # Client connections one process keeps open (API and metrics ports together); never more than its file
    # descriptors allow (the soft RLIMIT_NOFILE, raised to the hard one at start, less what Redis and the upstream
    # pools may hold). At the cap a new connection closes the oldest one still waiting for its first request, else
    # the keep-alive connection idle longest; when none is idle it is refused with 503 and Retry-After.
    max_connections: int = bounded(10000, 1)
