"""Structured access log: one JSON line per request, on stdout.

Only bounded, non-secret facts: ids, team, model, counts, timings, status. Never a key, an input, a header value
other than the request id, or anything about the upstream's credentials.

Lines are buffered and written together, every `flush_interval_s` and whenever 64 KiB are waiting, and at
shutdown: one write per batch instead of a logging record, a lock and a write per request (the logging module cost
about a tenth of a small cache hit). A process killed with SIGKILL loses at most its last interval of lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import orjson

if TYPE_CHECKING:
    from ..embeddings.service import Trace

log = logging.getLogger("proxy.accesslog")
_MAX_BUFFER = 64 * 1024


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
    cache: str = ""  # hit, miss, partial; empty when no embeddings were served
    error_code: str = ""
    upstreams: list[str] | None = None  # the deployments ([upstreams.NAME]) whose answers this request used


def access_line(record: AccessRecord, trace: Trace | None = None, *, now: float | None = None) -> bytes:
    """The JSON line for one request (without the newline); `trace` adds the counts and the upstream time."""
    doc = {
        "ts": round(time.time() if now is None else now, 3), "pid": os.getpid(),
        "request_id": record.request_id, "method": record.method, "path": record.path, "status": record.status,
        "duration_ms": round(record.duration_ms, 3), "team": record.team, "key_id": record.key_id,
        "model": record.model, "inputs": 0, "cache": record.cache, "cache_hits": 0, "upstream_inputs": 0,
        "prompt_tokens": 0, "cached_tokens": 0, "upstream_ms": 0.0, "error_code": record.error_code,
        "upstreams": record.upstreams or [],
    }
    if trace is not None:
        doc["inputs"] = trace.inputs
        doc["cache_hits"] = trace.cache_hits
        doc["upstream_inputs"] = trace.upstream_inputs
        doc["prompt_tokens"] = trace.prompt_tokens
        doc["cached_tokens"] = trace.cached_tokens
        doc["upstream_ms"] = round(trace.upstream_s * 1e3, 3)
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


class AccessLog:
    """Buffered JSON lines to `stream` (None: access logging is off)."""

    def __init__(self, stream: BinaryIO | None, flush_interval_s: float = 0.25) -> None:
        self.stream = stream
        self.enabled = stream is not None
        self._interval = flush_interval_s
        self._lines: list[bytes] = []
        self._size = 0

    def add(self, line: bytes) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= _MAX_BUFFER:
            self.flush()

    def flush(self) -> None:
        if not self._lines or self.stream is None:
            return
        data = b"\n".join(self._lines) + b"\n"
        self._lines, self._size = [], 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # closed or broken stdout: the proxy keeps serving
            log.warning("access log lines dropped: %s", type(exc).__name__)

    async def run(self) -> None:
        """Flush every interval until cancelled (the app's shutdown flushes what is left)."""
        while True:
            await asyncio.sleep(self._interval)
            self.flush()
