"""Reading a request's body: the one place where aiohttp's payload errors become ours.

aiohttp reports a body it cannot read (a `Content-Encoding` that does not decode, a chunked body that breaks off, a
connection closed before `Content-Length` bytes came) as an exception from `request.read()`. Every handler that
reads a body reads it here, so each of those is a 400 in OpenAI's shape, never a 500 with a traceback.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .errors import InvalidRequest


async def read_body(request: web.Request) -> bytes:
    """The whole body; a body that is too large stays aiohttp's 413 (the error middleware shapes it)."""
    try:
        return await request.read()
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
