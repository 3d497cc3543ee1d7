"""Structured access log: one JSON line per request on the `proxy.access` logger.

Only bounded, non-secret facts: ids, team, model, counts, timings, status. Never a key, an input, a header value
other than the request id, or anything about the upstream's credentials.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
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


def access_line(record: AccessRecord, outcome: Outcome | None = None, *, now: float | None = None) -> bytes:
    """The JSON line for one request (without the newline); `outcome` adds the counts and the upstream time."""
    doc = {
        "ts": round(time.time() if now is None else now, 3), "pid": os.getpid(),
        "request_id": record.request_id, "method": record.method, "path": record.path, "status": record.status,
        "duration_ms": round(record.duration_ms, 3), "team": record.team, "key_id": record.key_id,
        "model": record.model, "inputs": record.inputs, "cache": record.cache, "cache_hits": record.cache_hits,
        "upstream_inputs": record.upstream_inputs, "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens, "upstream_ms": round(record.upstream_ms, 3),
        "error_code": record.error_code,
    }
    if outcome is not None:  # set by hand, not dataclasses.replace/asdict: this runs on every request
        doc["inputs"] = len(outcome.positions)
        doc["cache_hits"] = outcome.cache_hits
        doc["upstream_inputs"] = outcome.upstream_inputs
        doc["prompt_tokens"] = outcome.prompt_tokens
        doc["cached_tokens"] = outcome.cached_tokens
        doc["upstream_ms"] = round(outcome.upstream_s * 1e3, 3)
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
    if log.isEnabledFor(logging.INFO):
        log.info(access_line(record, outcome).decode())


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
