"""The web console at /admin/ui/: three static files, read from the package once, served without the admin key.

The page holds no data: it asks for the admin key and calls the public admin API with it. Only the fixed file
names below are served (from memory, never from the file system by request path), so no path can reach another
file. `is_console` tells the auth middleware, by the route the router matched rather than by the path's text,
which requests are for these files.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from ..errors import NotFound
from ..routing import expect_continue

PATH = "/admin/ui/"
_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
          "favicon.svg": "image/svg+xml"}
_ROUTE_NAMES = frozenset({"console-redirect", "console-index", "console-file"})
# No inline script or style, nothing from another origin, never framed; the page only talks to its own origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
FILES: web.AppKey[dict[str, bytes]] = web.AppKey("console_files")


def is_console(request: web.Request) -> bool:
    resource = request.match_info.route.resource
    return resource is not None and resource.name in _ROUTE_NAMES


def _answer(status: int, body: bytes, content_type: str, **headers: str) -> web.Response:
    resp = web.Response(status=status, body=body, content_type=content_type,
                        charset="utf-8" if content_type.startswith("text/") else None)
    resp.headers.update(SECURITY_HEADERS)
    resp.headers.update(headers)
    return resp


async def _redirect(request: web.Request) -> web.Response:
    return _answer(308, b"", "text/plain", Location=PATH)


async def _index(request: web.Request) -> web.Response:
    return _answer(200, request.app[FILES]["index.html"], _FILES["index.html"])


async def _file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = request.app[FILES].get(name)
    if body is None:  # only the fixed files: no path reaches the file system
        raise NotFound("No such console file.", code="unknown_url")
    return _answer(200, body, _FILES[name])


def add_routes(app: web.Application) -> None:
    here = resources.files(__name__)
    app[FILES] = {name: (here / name).read_bytes() for name in _FILES}
    app.router.add_get(PATH.rstrip("/"), _redirect, name="console-redirect", expect_handler=expect_continue)
    app.router.add_get(PATH, _index, name="console-index", expect_handler=expect_continue)
    app.router.add_get(PATH + "{name}", _file, name="console-file", expect_handler=expect_continue)
