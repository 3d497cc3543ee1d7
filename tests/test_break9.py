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


ADMIN = "break9-admin-0123456789"


async def test_usage_report_survives_a_model_name_with_a_bar(make_proxy: Any, upstream: Upstream,
                                                             redis_url: str) -> None:
    """Model names are free-form config keys, but the ledger's field is `key_id|model|metric` and the report
    splits it with `split("|")` into exactly three: one request for a model named `search|small` and every
    /admin/usage report covering that team and day is a 500 (ValueError) from then on."""
    config = ('[models."search|small"]\ndimensions = 1536\nupstream_model = "text-embedding-3-small"\n'
              "price_per_million_tokens = 0.02\n")
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, config, PROXY_ADMIN_KEY=ADMIN))
    key = await proxy.new_key("search")
    resp = await proxy.embed(key, {"model": "search|small", "input": ["hello"]})
    assert resp.status == 200, await resp.text()
    report = await proxy.client.get("/admin/usage?by=model", headers={"Authorization": f"Bearer {ADMIN}"})
    assert report.status == 200, await report.text()
    rows = (await report.json())["data"]
    assert [(r["model"], r["requests"], r["upstream_tokens"]) for r in rows] == [("search|small", 1, 1)]


async def test_a_key_limited_to_a_model_with_a_comma_can_use_it(make_proxy: Any, upstream: Upstream,
                                                                 redis_url: str) -> None:
    """A key's `models` are stored joined with ',' and split on ',' when read: a key created (201) for a
    configured model named `small,v2` reads back as allowed `small` and `v2`, and is refused (403) on the model
    it was created for."""
    config = ('[models."small,v2"]\ndimensions = 1536\nupstream_model = "text-embedding-3-small"\n'
              "price_per_million_tokens = 0.02\n")
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, config, PROXY_ADMIN_KEY=ADMIN))
    created = await proxy.client.post("/admin/keys", json={"team": "search", "models": ["small,v2"]},
                                      headers={"Authorization": f"Bearer {ADMIN}"})
    assert created.status == 201, await created.text()
    key = (await created.json())["key"]
    resp = await proxy.embed(key, {"model": "small,v2", "input": ["hello"]})
    assert resp.status == 200, await resp.text()
