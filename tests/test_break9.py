"""Defects found by the break9 review (each test fails on the code it was written against).

Each test drives real servers: the proxy on a real socket (`served`), a private redis-server, the mock upstream.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.app import create_app, create_metrics_app
from proxy.metrics import Metrics
from tests.conftest import Upstream, make_settings
from tests.helpers import raw_http, served

pytestmark = pytest.mark.redis


def _get(path: bytes, expect: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nExpect: " + expect + b"\r\n\r\n"


@pytest.mark.parametrize("path", [b"/admin/ui", b"/admin/ui/", b"/admin/ui/app.js", b"/admin/ui/nothing"])
async def test_console_routes_survive_an_expect_header_that_is_not_utf8(
    upstream: Upstream, redis_url: str, path: bytes, caplog: Any
) -> None:
    """The console's routes take aiohttp's default expect handler, not `routing.expect_continue`: an `Expect`
    value that is not UTF-8 makes aiohttp fail building its own 417 (UnicodeEncodeError), so any caller, with no
    credentials, gets a plain-text 500 and a traceback in the log."""
    app = create_app(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY="break9-admin-0123456789"))
    async with served(app) as port:
        answer = await raw_http(port, _get(path, b"\xff\xfe"))
    assert answer is not None
    assert answer.status < 500, (answer.status, answer.body[:100])


async def test_metrics_port_survives_an_expect_header_that_is_not_utf8() -> None:
    """`serve --metrics-port`: the metrics app's route (and its unknown paths) take aiohttp's default expect
    handler too: `Expect: \\xff` is a 500 there."""
    app = create_metrics_app(Metrics(models={}), "")
    async with served(app) as port:
        scrape = await raw_http(port, _get(b"/metrics", b"\xff"))
    assert scrape is not None
    assert scrape.status < 500, (scrape.status, scrape.body[:100])
