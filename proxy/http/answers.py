"""Error answers in OpenAI's shape, built so that they cannot fail: the error middleware is the last line, so a
fault while building one gives the constant internal error instead of aiohttp's plain-text 500."""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from aiohttp import web

from ..errors import InvalidRequest, MethodNotAllowed, NotFound, PayloadTooLarge, ProxyError

log = logging.getLogger("proxy.app")  # the name the app's log lines have always had

SERVER = "embedding-proxy"  # the Server header: no versions (aiohttp's default names Python's and its own)
# The longest wait the proxy can mean: a monthly quota's reset. Anything longer (an upstream's 1e300) is noise.
MAX_RETRY_AFTER_S = 31 * 86400
_INTERNAL_ERROR = ProxyError("The proxy had an internal error.", code="internal_error").to_json()


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def retry_after_header(seconds: float) -> str:
    """Whole seconds from 1 to MAX_RETRY_AFTER_S, whatever came in (an upstream may send 1e309: infinity)."""
    if math.isnan(seconds):
        return "1"
    return str(int(min(max(seconds, 1.0), MAX_RETRY_AFTER_S) + 0.5))


def internal_error() -> web.Response:
    return web.Response(body=_INTERNAL_ERROR, status=500, content_type="application/json")


def error_response(err: ProxyError) -> web.Response:
    """The error's answer; it cannot fail (the error middleware is the last line), so a fault in building it gives
    the constant internal error instead."""
    try:
        resp = web.Response(body=err.to_json(), status=err.status, content_type="application/json")
        resp.headers.update(err.headers)
        if err.retry_after is not None:
            resp.headers["Retry-After"] = retry_after_header(err.retry_after)
    except Exception:
        log.exception("could not build the answer for %s", type(err).__name__)
        return internal_error()
    return resp


def from_http_exception(exc: web.HTTPException) -> ProxyError:
    """What aiohttp raised on its own (an unknown route, a body over client_max_size) as the proxy's error."""
    if exc.status == 404:
        return NotFound("Unknown route.", code="unknown_url")
    if exc.status == 405:
        return MethodNotAllowed("Method not allowed on this route.", code="method_not_allowed")
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    err = (InvalidRequest if exc.status < 500 else ProxyError)(exc.reason or "Error.")
    err.status = exc.status
    return err


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER
