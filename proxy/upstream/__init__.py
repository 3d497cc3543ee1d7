"""The upstream side: several deployments per model, failover, pacing by rate-limit headers, micro-batching.

    client.py    FleetClient: what the service calls, attempts and failover
    router.py    which deployment: weights, priorities, cooldowns, 429 pauses
    pacing.py    the upstream's x-ratelimit-* headers, and how long a call must wait to fit
    batching.py  concurrent misses of one model merged into one upstream call, and split back
    kinds.py     openai and azure: URL, key header, body
    http.py      the connection pool, one POST per attempt, and the strict check of an answer (the only module that
                 sees aiohttp client errors)
"""

from .client import SERVED_BY, FleetClient
from .pacing import parse_duration

__all__ = ["SERVED_BY", "FleetClient", "parse_duration"]
