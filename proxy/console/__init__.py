"""The web console at /admin/ui/: static files, read from the package once, served without the admin key.

The page holds no data: it asks for the admin key and calls the public admin API with it. Its script is a set of ES
modules (`app.js` imports the rest), loaded by the browser itself: no build step. Only the fixed files below are
served: the page, its stylesheet and icon, and the `*.js` modules found in this folder at start-up, all from memory
(never from the file system by request path), so no path can reach another file. `is_console` tells the auth
middleware, by the route the router matched rather than by the path's text, which requests are for these files.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from ..errors import NotFound

PATH = "/admin/ui/"
_PAGE = {"index.html": "text/html", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
_SCRIPT = "text/javascript"  # browsers run a module only when it comes with a JavaScript type
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
FILES: web.AppKey[dict[str, tuple[bytes, str]]] = web.AppKey("console_files")
# What answers an `Expect` header before the handler runs: the HTTP layer's, which every other route takes too.
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


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


def load_files() -> dict[str, tuple[bytes, str]]:
    """Every file the console serves, by name: (body, content type). The page's files, and each ES module here."""
    here = resources.files(__name__)
    files = {name: ((here / name).read_bytes(), ctype) for name, ctype in _PAGE.items()}
    for entry in here.iterdir():
        if entry.name.endswith(".js") and entry.is_file():
            files[entry.name] = (entry.read_bytes(), _SCRIPT)
    return files


async def _index(request: web.Request) -> web.Response:
    return _answer(200, *request.app[FILES]["index.html"])


async def _file(request: web.Request) -> web.Response:
    found = request.app[FILES].get(request.match_info["name"])
    if found is None:  # only the fixed files: no path reaches the file system
        raise NotFound("No such console file.", code="unknown_url")
    return _answer(200, *found)


def add_routes(app: web.Application, *, expect_handler: ExpectHandler) -> None:
    """The console's routes on the proxy's app. The HTTP layer, which serves the console, passes its own
    `expect_handler` in (the console ranks below it, so it does not import it)."""
    app[FILES] = load_files()
    app.router.add_get(PATH.rstrip("/"), _redirect, name="console-redirect", expect_handler=expect_handler)
    app.router.add_get(PATH, _index, name="console-index", expect_handler=expect_handler)
    app.router.add_get(PATH + "{name}", _file, name="console-file", expect_handler=expect_handler)
