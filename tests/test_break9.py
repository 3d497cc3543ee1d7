"""Defects found by the break9 review (each test fails on the code it was written against).

Each test drives real servers: the proxy on a real socket (`served`), a private redis-server, the mock upstream.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from proxy.config import ConfigError, parse
from proxy.http.app import create_app, create_metrics_app
from proxy.http.routing import quiet_parser_errors
from proxy.telemetry.metrics import Metrics
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


@pytest.mark.parametrize("name", ["search|small", "small,v2", "has space", "-leading", "a" * 129, "émb"])
def test_a_model_name_the_ledger_or_key_records_cannot_hold_is_refused_in_the_config(name: str) -> None:
    """The ledger's fields are `key_id|model|metric` and a key's models are stored joined with ',': a model named
    `search|small` made every usage report covering it a 500, and a key limited to `small,v2` was refused it.
    Such names are refused where they come from, the config, naming the key."""
    config = f'[models."{name}"]\ndimensions = 1536\n'
    with pytest.raises(ConfigError) as err:
        parse(config, "proxy.toml", {})
    assert str(err.value).startswith(f"proxy.toml: [models.{name}]: a model name is 1-128 characters")


@pytest.mark.parametrize("name", ["text-embedding-3-small", "BAAI/bge-small-en-v1.5", "nomic-embed-text:v1.5",
                                  "e5@2", "m=1+2"])
def test_model_names_seen_in_the_wild_are_accepted(name: str) -> None:
    settings = parse(f'[models."{name}"]\ndimensions = 8\n', "proxy.toml", {})
    assert list(settings.models) == [name]


async def test_an_unparseable_request_is_one_debug_line_not_an_error_traceback(
    upstream: Upstream, redis_url: str, caplog: Any
) -> None:
    """aiohttp logged an ERROR with a full traceback for each request it could not parse: a log flood any client
    could cause. With `serve`'s logging it is one DEBUG line (so nothing at the default level)."""
    quiet_parser_errors()
    app = create_app(make_settings(upstream.base_url, redis_url))
    caplog.set_level(logging.INFO)
    async with served(app) as port:
        for raw in (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx",
                    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"):
            answer = await raw_http(port, raw)
            assert answer is not None and answer.status == 400
    assert [r for r in caplog.records if r.name == "aiohttp.server"] == []
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    async with served(app) as port:
        await raw_http(port, b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n")
    lines = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in lines] == [
        ("DEBUG", "unparseable request refused with 400 (InvalidURLError)", None)]
