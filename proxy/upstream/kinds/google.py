"""What the Gemini API and Vertex AI share: Google's error answers (`error.message`, `error.status`, a RetryInfo's
`retryDelay` in `error.details`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from ..http import MAX_RETRY_AFTER_S, parse_retry_after
from ..refusals import Refusal, upstream_message
from .base import param_named

_DELAY = re.compile(r"(\d+(?:\.\d+)?)s")  # google.protobuf.Duration in JSON: "37s", "0.5s"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def google_refusal(body: bytes, headers: Mapping[str, str], params: Mapping[str, str]) -> Refusal:
    """The message, the parameter it names, and the wait: the Retry-After header, else the RetryInfo's delay. A
    key Google calls invalid (a 400, reason API_KEY_INVALID) is the proxy's credential, not the client's input:
    a 401 (refused credentials)."""
    message = upstream_message(body)
    details = _details(body)
    wait = parse_retry_after(headers)
    if wait is None:
        wait = _retry_delay(details)
    if any(isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in details):
        return Refusal(message, None, wait, 401)
    return Refusal(message, param_named(message, params), wait)


def _details(body: bytes) -> list[Any]:
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    error = doc.get("error") if isinstance(doc, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return details if isinstance(details, list) else []


def _retry_delay(details: list[Any]) -> float | None:
    for detail in details:
        if isinstance(detail, dict) and detail.get("@type") == _RETRY_INFO and isinstance(detail.get("retryDelay"),
                                                                                          str):
            match = _DELAY.fullmatch(detail["retryDelay"])
            if match:
                return min(float(match.group(1)), MAX_RETRY_AFTER_S)
    return None
