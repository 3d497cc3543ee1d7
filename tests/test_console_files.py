"""The console's static files: served without the admin key, with a strict Content-Security-Policy, and nothing
else under /admin/ gets past the admin key (no path, encoded or not, reaches another file or an admin route)."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from proxy.console import SECURITY_HEADERS
from tests.conftest import Proxy, ProxyFactory, Upstream, make_settings
from tests.helpers import raw_get

ADMIN = "console-admin-key-0123456789"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@pytest.fixture
async def console(make_proxy: ProxyFactory, upstream: Upstream, redis_url: str) -> Proxy:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN))
    return p


@pytest.mark.parametrize(("target", "ctype", "marker"), [
    ("/admin/ui/", "text/html", b'<label for="admin-key">Admin key</label>'),
    ("/admin/ui/index.html", "text/html", b'<script type="module" src="app.js"></script>'),
    ("/admin/ui/app.js", "text/javascript", b'import {addViews, draw} from "./view.js";'),
    ("/admin/ui/keys.js", "text/javascript", b"export async function keysView(root, params) {"),
    ("/admin/ui/style.css", "text/css", b":root {"),
    ("/admin/ui/favicon.svg", "image/svg+xml", b"<svg"),
])
async def test_files_need_no_admin_key_and_carry_the_policy(console: Proxy, target: str, ctype: str,
                                                             marker: bytes) -> None:
    status, headers, body = await raw_get(console.client.port, target)  # type: ignore[arg-type]
    assert status == 200 and marker in body
    assert headers["content-type"] == (f"{ctype}; charset=utf-8" if ctype.startswith("text/") else ctype)
    assert headers["content-security-policy"] == CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["server"] == "embedding-proxy"


def test_the_page_has_no_inline_script_or_style() -> None:
    from importlib import resources

    html = (resources.files("proxy.console") / "index.html").read_text()
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=|javascript:", html)
    assert html.count("<script") == 1 and '<script type="module" src="app.js"></script>' in html
    assert SECURITY_HEADERS["Content-Security-Policy"] == CSP


# A static import or re-export (`import {a, b as c} from "./x.js";`, `import "./x.js";`, `export {a} from ...`).
_IMPORT = re.compile(r'^(import|export)\s+(?:(\{[^}]*\}|\*(?:\s+as\s+[\w$]+)?|[\w$]+)\s+from\s+)?"([^"]*)";', re.M)
_EXPORT = re.compile(r"^export\s+(?:(?:async\s+)?(?:function|const|let|class)\s+([\w$]+)|\{([^}]*)\}\s*;)", re.M)
MAX_SCRIPT_LINES = 400  # issue 16: no console script over 400 lines


def _exports(source: str) -> set[str]:
    names = set()
    for declared, listed in _EXPORT.findall(source):
        names |= {declared} if declared else {n.split(" as ")[-1].strip() for n in listed.split(",") if n.strip()}
    return names


def _imports(source: str) -> list[tuple[str, list[str]]]:
    """(specifier, names imported) of each static import in a module; every `import` in it must be one of them."""
    code = re.sub(r"//[^\n]*", "", source)
    found = [(m[3], [n.split(" as ")[0].strip() for n in (m[2] or "").strip("{}").split(",") if n.strip()]
              if (m[2] or "").startswith("{") else [])
             for m in _IMPORT.finditer(code)]
    assert len(re.findall(r"\bimport\b", code)) == sum(1 for m in _IMPORT.finditer(code) if m[1] == "import"), \
        "an import this test cannot read (dynamic, or not at the start of a line)"
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """A path of imports that comes back to where it started, or [] when imports flow one way."""
    done: set[str] = set()

    def walk(name: str, path: list[str]) -> list[str]:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return []
        for dep in sorted(graph.get(name, ())):
            if found := walk(dep, [*path, name]):
                return found
        done.add(name)
        return []

    return next((found for name in sorted(graph) if (found := walk(name, []))), [])


async def test_every_script_is_a_small_module_the_server_serves(console: Proxy) -> None:
    """From the page's one script tag, every module it imports (and they import) is served, as JavaScript, and
    exports the names imported from it: a missing module or name cannot ship. Every served script is one of
    them, none is over 400 lines, and no two import each other (directly or around a loop)."""
    from proxy.console import load_files

    served = {name: body.decode() for name, (body, ctype) in load_files().items() if ctype == "text/javascript"}
    lines = {name: len(source.splitlines()) for name, source in served.items()}
    assert max(lines.values()) <= MAX_SCRIPT_LINES, lines
    assert len(served) > 5, served.keys()  # split by screen and shared concern
    port: Any = console.client.port
    _, _, html = await raw_get(port, "/admin/ui/")
    entries = re.findall(r'<script type="module" src="([\w.-]+\.js)"></script>', html.decode())
    assert entries == ["app.js"]
    seen: dict[str, str] = {}
    graph: dict[str, set[str]] = {}
    wanted: list[tuple[str, str, list[str]]] = [("index.html", entries[0], [])]
    while wanted:
        importer, name, names = wanted.pop()
        if name not in seen:
            status, headers, body = await raw_get(port, "/admin/ui/" + name)
            assert status == 200, f"{importer} imports {name}, which is not served"
            assert headers["content-type"] == "text/javascript; charset=utf-8", name
            seen[name] = body.decode()
            for spec, imported in _imports(seen[name]):
                assert re.fullmatch(r"\./[\w-]+\.js", spec), f"{name}: {spec!r} is not a module next to it"
                wanted.append((name, spec[2:], imported))
                graph.setdefault(name, set()).add(spec[2:])
        missing = set(names) - _exports(seen[name])
        assert not missing, f"{importer} imports {sorted(missing)} from {name}, which does not export them"
    assert seen == served, "every served script is a module the page loads, as read at start-up"
    assert not _cycle(graph), f"modules import each other: {_cycle(graph)}"


async def test_bare_path_redirects_to_the_page(console: Proxy) -> None:
    status, headers, _ = await raw_get(console.client.port, "/admin/ui")  # type: ignore[arg-type]
    assert status == 308 and headers["location"] == "/admin/ui/"


@pytest.mark.parametrize("target", [
    "/admin/ui/../keys", "/admin/ui/%2e%2e/keys", "/admin/ui/..%2fkeys", "/admin/ui/..%2f..%2fpyproject.toml",
    "/admin/ui/%2E%2E%2F__init__.py", "/admin/ui/__init__.py", "/admin/ui/./app.js/../../keys",
    "/admin/ui/app.js%00", "/admin/ui/..%5c__init__.py", "/admin/ui//etc/passwd", "/admin/ui/%252e%252e%252fkeys",
    "/admin/ui/app.js/", "/admin/uix", "/admin/ui-files/app.js", "/admin/keys", "/admin/teams", "/admin/usage",
])
async def test_nothing_else_gets_past_the_admin_key(console: Proxy, target: str) -> None:
    status, _, body = await raw_get(console.client.port, target)  # type: ignore[arg-type]
    assert status in (401, 404), (target, status)
    assert b"import" not in body and b"[build-system]" not in body and b"root:" not in body
    assert b'"data"' not in body and b"key_" not in body
    if status == 404 and target.startswith("/admin/ui/"):
        assert orjson.loads(body)["error"]["message"] == "No such console file."  # it serves its fixed files only
    else:
        assert b"admin" in body  # the admin key's 401


async def test_admin_routes_still_need_the_key(console: Proxy) -> None:
    key: Any = await console.new_key("search")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {key}"}):
        resp = await console.client.get("/admin/keys", headers=headers)
        assert resp.status in (401, 403)
    resp = await console.client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status == 200
