"""Structured access log: one JSON line per request on the `proxy.access` logger.

Only bounded, non-secret facts: ids, team, model, counts, timings, status. Never a key, an input, a header value
other than the request id, or anything about the upstream's credentials.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from .service import Outcome

LOGGER_NAME = "proxy.access"
log = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True, slots=True)
class AccessRecord:
    request_id: str
    method: str
    path: str  # the route template for /v1/models/{model}, so no user string lands in the log
    status: int
    duration_ms: float
    team: str = ""
    key_id: str = ""
    model: str = ""
    inputs: int = 0
    cache: str = ""  # hit, miss, partial; empty when no embeddings were served
    cache_hits: int = 0  # unique inputs found in the cache
    upstream_inputs: int = 0  # unique inputs this request sent upstream
    prompt_tokens: int = 0
    cached_tokens: int = 0
    upstream_ms: float = 0.0
    error_code: str = ""


def access_line(record: AccessRecord, *, now: float | None = None) -> bytes:
    """The JSON line for one request (without the newline)."""
    ts = time.time() if now is None else now
    doc = {"ts": round(ts, 3), "pid": os.getpid(), **asdict(record)}
    doc["duration_ms"] = round(record.duration_ms, 3)
    doc["upstream_ms"] = round(record.upstream_ms, 3)
    return orjson.dumps(doc)


def error_code(status: int, body: object) -> str:
    """The OpenAI error `code` of an error answer the proxy built (a fixed enum), or empty."""
    if status < 400 or not isinstance(body, bytes):
        return ""
    try:
        code = orjson.loads(body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""
    return code if isinstance(code, str) else ""


def log_access(record: AccessRecord, outcome: Outcome | None = None) -> None:
    """Log one request; `outcome` (when embeddings were served) adds the counts and the upstream time."""
    if not log.isEnabledFor(logging.INFO):
        return
    if outcome is not None:
        record = replace(
            record, inputs=len(outcome.positions), cache_hits=outcome.cache_hits,
            upstream_inputs=outcome.upstream_inputs, prompt_tokens=outcome.prompt_tokens,
            cached_tokens=outcome.cached_tokens, upstream_ms=outcome.upstream_s * 1e3,
        )
    log.info(access_line(record).decode())


class JsonLineFormatter(logging.Formatter):
    """Prints the message alone: access lines are already JSON documents."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def configure(stream_handler: logging.Handler | None = None) -> None:
    """Send `proxy.access` to its own handler as bare JSON lines, not through the root's text format."""
    handler = stream_handler or logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLineFormatter())
    log.handlers[:] = [handler]
    log.propagate = False
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
