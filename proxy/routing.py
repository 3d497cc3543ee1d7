"""What aiohttp does before the middlewares, done so that every answer passes them.

aiohttp handles `Expect` before any middleware runs, and answers an unknown expectation with a plain-text 417
(a 500 when the header's bytes are not UTF-8: it cannot encode its own message). Every route here takes
`expect_continue` instead, which ignores expectations other than 100-continue (RFC 9110 allows it), and unknown
paths reach `unknown_route` instead of aiohttp's built-in 404/405, so their expect handler is ours too.
"""

from __future__ import annotations

from aiohttp import web

from .errors import MethodNotAllowed, NotFound

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


def add_unknown_route(app: web.Application) -> None:
    """Last: the catch-all is tried after every other route."""
    app.router.add_route("*", "/{path:.*}", unknown_route, name=UNMATCHED, expect_handler=expect_continue)
