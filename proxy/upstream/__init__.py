"""The upstream side: several deployments per model, failover, pacing by rate-limit headers, micro-batching.

    client.py    FleetClient: what the service calls; one call's loop in named steps (choose, decide, send)
    callstate.py what a call remembers between attempts: retry, failover and backoff decisions, the refusal
    permits.py   each upstream's max_concurrency slots, and the calls dropped before sending (CallAbandoned)
    attempt.py   one attempt: the POST, the checked answer, the deployment's health and pacing booked
    failures.py  a failed attempt, and what it may have cost (billed to the caller)
    status.py    the deployments' state for /admin/upstreams and the gauges
    router.py    which deployment: weights, priorities, cooldowns, 429 pauses
    pacing.py    the upstream's x-ratelimit-* headers, and how long a call must wait to fit
    batching.py  concurrent misses of one model merged into one upstream call, and split back
    kinds/       one module per provider kind (openai, azure, cohere, voyage, jina, gemini, vertex, bedrock): URL,
                 credentials, body, the answer read, errors mapped
    http.py      the connection pool, one POST per attempt, and the strict check of an answer (the only module that
                 sees aiohttp client errors)
"""

from .client import SERVED_BY, CallAbandoned, FleetClient
from .pacing import parse_duration

__all__ = ["SERVED_BY", "CallAbandoned", "FleetClient", "parse_duration"]
