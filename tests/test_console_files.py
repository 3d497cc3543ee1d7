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
    ("/admin/ui/index.html", "text/html", b"<script src=\"app.js\" defer></script>"),
    ("/admin/ui/app.js", "text/javascript", b'"use strict";'),
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
    assert html.count("<script") == 1 and '<script src="app.js" defer></script>' in html
    assert SECURITY_HEADERS["Content-Security-Policy"] == CSP


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
