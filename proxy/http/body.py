"""Reading a request's body: the one place where aiohttp's payload errors become ours.

aiohttp reports a body it cannot read (a `Content-Encoding` that does not decode, a chunked body that breaks off, a
connection closed before `Content-Length` bytes came) as an exception from `request.read()`. Every handler that
reads a body reads it here, so each of those is a 400 in OpenAI's shape, never a 500 with a traceback; a body that
arrives below the minimum rate (bodyrate.py) is a 408.

`read_charged` reads it under the admission budget (admission.py): each piece is charged as it arrives, before it
is kept, so a body holds what it has sent, not what its `Content-Length` announces: a client on a slow link (or one
that trickles at the minimum rate) sending a 16 MB body holds the bytes it sent so far, not the whole budget for the
hours its upload takes. A piece that finds no room waits like any charge (then 503); the rest of that body is never
kept (aiohttp discards it after the answer). A `Content-Length` over the limit is a 413 before anything is read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config.connections import ConnectionSettings
from ..errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from .appkeys import METRICS, SETTINGS
from .bodyrate import BodyTooSlow, minimum_rate


async def read_body(request: web.Request) -> bytes:
    """The whole body; a body that is too large stays aiohttp's 413 (the error middleware shapes it)."""
    return await _reading(request.read(), request)


async def read_charged(request: web.Request, take: Callable[[int], Awaitable[None]], max_bytes: int) -> bytes:
    """The whole body, each piece charged (`take`) as it arrives; over `max_bytes`, 413."""
    length = request.content_length
    if length is not None and length > max_bytes and not request.headers.get("Content-Encoding"):
        raise PayloadTooLarge("The request body is too large.")
    return await _reading(_pieces(request, take, max_bytes), request)


async def _pieces(request: web.Request, take: Callable[[int], Awaitable[None]], max_bytes: int) -> bytes:
    body = bytearray()
    while piece := await request.content.readany():
        if len(body) + len(piece) > max_bytes:
            raise PayloadTooLarge("The request body is too large.")
        await take(2 * len(piece))  # kept here, then copied once when it is complete
        body += piece
    return bytes(body)


async def _reading(read: Awaitable[bytes], request: web.Request) -> bytes:
    settings = request.app[SETTINGS].connections if SETTINGS in request.app else ConnectionSettings()
    try:
        with minimum_rate(request.content, settings):
            return await read
    except BodyTooSlow:  # the stream keeps the exception: the error middleware closes the connection
        if METRICS in request.app:
            m = request.app[METRICS]
            m.add(m.connections_closed, "body_timeout")
        raise RequestTimeout(f"The request body arrived slower than {settings.min_body_rate_bytes_s:g} bytes per "
                             "second.") from None
    except (web.RequestPayloadError, HttpProcessingError):
        if request.headers.get("Content-Encoding"):
            raise InvalidRequest("The request body could not be decoded with its Content-Encoding.",
                                 code="invalid_body") from None
        raise InvalidRequest("The request body could not be read.", code="invalid_body") from None
    except ConnectionError:  # the client closed the connection before the body was complete
        raise InvalidRequest("The request body ended before it was complete.", code="invalid_body") from None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """An admin body: a JSON object, or {} when there is no body."""
    raw = await read_body(request)
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    return body
