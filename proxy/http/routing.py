"""What aiohttp does before the middlewares, done so that every answer passes them.

aiohttp handles `Expect` before any middleware runs, and answers an unknown expectation with a plain-text 417
(a 500 when the header's bytes are not UTF-8: it cannot encode its own message). Every route here takes
`expect_continue` instead, which ignores expectations other than 100-continue (RFC 9110 allows it), and unknown
paths reach `unknown_route` instead of aiohttp's built-in 404/405, so their expect handler is ours too.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import MethodNotAllowed, NotFound

UNMATCHED = "unmatched"  # the catch-all's name: the access log shows `<unmatched>`, never a client's path


async def expect_continue(request: web.Request) -> None:
    if request.version == (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the final answer's size is counted from here


async def unknown_route(request: web.Request) -> web.StreamResponse:
    """404, or 405 when another route has this path."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise MethodNotAllowed("Method not allowed on this route.", code="method_not_allowed")
    raise NotFound("Unknown route.", code="unknown_url")


def route_template(request: web.Request) -> str | None:
    """The matched route's template (`/v1/models/{model}`), or None for the catch-all: never the client's path."""
    route = request.match_info.route.resource
    return route.canonical if route is not None and route.name != UNMATCHED else None


def add_unknown_route(app: web.Application) -> None:
    """Last: the catch-all is tried after every other route."""
    app.router.add_route("*", "/{path:.*}", unknown_route, name=UNMATCHED, expect_handler=expect_continue)


class ParserErrorFilter(logging.Filter):
    """aiohttp logs an ERROR with a traceback for every request it cannot parse (a NUL in the request line, an
    unsupported Content-Encoding, an over-long header...), before any middleware: any client could flood the logs.
    Such a record becomes one DEBUG line naming the error; the client got aiohttp's 400 all the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "unparseable request refused with 400 (%s)", (type(exc).__name__,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)  # handlers do not check levels again
        return True


def quiet_parser_errors() -> None:
    """Install ParserErrorFilter on aiohttp's server logger (once per process; `serve` and its workers)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ParserErrorFilter) for f in logger.filters):
        logger.addFilter(ParserErrorFilter())
