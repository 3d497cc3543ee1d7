"""Sending the embeddings answer: small ones whole, large ones streamed in pieces as they are encoded.

A 2048-input float answer is about 38 MB of JSON. Built whole it costs that, plus the copy that joins it, plus
what the socket has not taken yet; streamed (chunked transfer encoding), the process holds one piece of about
`CHUNK_BYTES` at a time and waits for the client to take it before it encodes the next (aiohttp's write drains
past 64 KiB), so a slow reader slows its own answer, not the process's memory. The bytes are the same either way
(response.py). Between pieces other requests run, so one large answer no longer holds the event loop for the
whole of its encoding.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web

from ..embeddings.request import EmbeddingRequest
from ..embeddings.service import Outcome
from ..stores.localcache import LocalCache
from .response import chunks, render

log = logging.getLogger("proxy.app")

CHUNK_BYTES = 1 << 20  # one piece of a streamed answer
STREAM_ABOVE_BYTES = 1 << 20  # answers whose text is estimated above this are streamed
_TEXT_BYTES_PER_VALUE = {"float": 13, "base64": 16 / 3}  # a float32 as JSON text (typical length), as base64


def text_estimate(inputs: int, dimensions: int, encoding: str) -> float:
    return inputs * dimensions * _TEXT_BYTES_PER_VALUE[encoding]


async def send_answer(request: web.Request, req: EmbeddingRequest, outcome: Outcome, local: LocalCache | None,
                      dimensions: int, headers: Mapping[str, str]) -> web.StreamResponse:
    """The answer, with `headers` (all of them: a streamed answer's headers are sent before its body)."""
    if text_estimate(len(outcome.positions), dimensions, req.encoding_format) <= STREAM_ABOVE_BYTES:
        resp = web.Response(body=render(req, outcome, local), content_type="application/json")
        resp.headers.update(headers)
        return resp
    stream = web.StreamResponse(headers=headers)
    stream.content_type = "application/json"
    try:
        await stream.prepare(request)  # the client may have left while its answer was found: nothing to send
        for piece in chunks(req, outcome, local, CHUNK_BYTES):
            await stream.write(piece)
        await stream.write_eof()
    except ConnectionError:  # the client left mid-answer: there is no one to tell
        log.debug("client closed the connection during a streamed answer")
    except Exception:  # the status is sent: cut the connection, so the client sees a broken answer, not a short one
        log.exception("a streamed answer could not be finished")
        if request.transport is not None:
            request.transport.close()
    return stream
