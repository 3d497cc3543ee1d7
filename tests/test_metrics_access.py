"""Who sees what: /metrics behind PROXY_METRICS_TOKEN on either port, the start-up warning when anyone can read
it, and a Server header that names no versions on every kind of response."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from proxy.http.app import create_metrics_app
from proxy.telemetry.metrics import Metrics
from tests.conftest import Proxy, ProxyFactory, Upstream, make_settings
from tests.helpers import raw_get
from tests.stack import CONFIG, http, start_mock, start_proxy

TOKEN = "metrics-token-0123456789"


def _refused(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert orjson.loads(body) == {"error": {
        "message": "The metrics need 'Authorization: Bearer <metrics token>' (PROXY_METRICS_TOKEN).",
        "type": "invalid_request_error", "param": None, "code": "invalid_metrics_token"}}


async def _check_token(port: int) -> None:
    for lines in (b"", b"Authorization: Bearer wrong\r\n", b"Authorization: Basic " + TOKEN.encode() + b"\r\n",
                  b"Authorization: Bearer " + TOKEN.encode() + b"x\r\n", b"Authorization: Bearer \xff\xfe\r\n",
                  b"Authorization: Bearer " + TOKEN.encode()[:-1] + b"\xff\r\n", b"Authorization: Bearer\r\n"):
        _refused(*await raw_get(port, "/metrics", lines))
    status, headers, body = await raw_get(port, "/metrics", b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")
    assert status == 200 and b"embedding_proxy_build_info" in body
    assert headers["server"] == "embedding-proxy"


@pytest.fixture
async def guarded(make_proxy: ProxyFactory, upstream: Upstream, redis_url: str) -> Proxy:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_METRICS_TOKEN=TOKEN,
                                              PROXY_ADMIN_KEY="admin-key"))
    return p


async def test_metrics_on_the_api_port_need_the_token(guarded: Proxy) -> None:
    await _check_token(guarded.client.port)  # type: ignore[arg-type]


async def test_metrics_on_their_own_port_need_the_token() -> None:
    server = TestServer(create_metrics_app(Metrics(models={}), TOKEN), host="127.0.0.1")
    await server.start_server()
    try:
        await _check_token(server.port)  # type: ignore[arg-type]
        status, headers, _ = await raw_get(server.port, "/nothing")  # type: ignore[arg-type]
        assert status == 404 and headers["server"] == "embedding-proxy"
    finally:
        await server.close()


async def test_without_a_token_metrics_stay_open(proxy: Proxy) -> None:
    resp = await proxy.client.get("/metrics")
    assert resp.status == 200


async def test_server_header_names_no_version(guarded: Proxy) -> None:
    port: Any = guarded.client.port
    key = await guarded.new_key("search")
    auth = b"Authorization: Bearer " + key.encode() + b"\r\n"
    targets = [
        ("/healthz", b""), ("/readyz", b""), ("/nowhere", b""), ("/v1/models", b""),  # 200, 404, 401
        ("/v1/models", auth), ("/v1/embeddings", auth),  # 200, 405
        ("/admin/keys", b"Authorization: Bearer wrong\r\n"), ("/admin/ui/", b""), ("/admin/ui/app.js", b""),
        ("/admin/ui/missing.js", b""), ("/admin/ui", b""), ("/metrics", b""),
    ]
    statuses = set()
    for target, lines in targets:
        status, headers, _ = await raw_get(port, target, lines)
        statuses.add(status)
        assert headers["server"] == "embedding-proxy", (target, headers)
    assert statuses == {200, 308, 401, 404, 405}


def test_serve_warns_when_anyone_can_read_the_metrics(redis_url: str, tmp_path: Path) -> None:
    mock, mock_url = start_mock(tmp_path)
    servers = [mock]
    try:
        open_proxy, _ = start_proxy(tmp_path, mock_url, redis_url, CONFIG, workers=1)
        servers.append(open_proxy)
        guarded, url = start_proxy(tmp_path, mock_url, redis_url, CONFIG, workers=1,
                                   env={"PROXY_METRICS_TOKEN": TOKEN})
        servers.append(guarded)
        assert http("GET", url + "/metrics")[0] == 401
        assert http("GET", url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        status, headers, _ = asyncio.run(raw_get(int(url.rsplit(":", 1)[1]), "/" + "a" * 9000))  # the parser's 400
        assert status == 400 and headers["server"] == "embedding-proxy"
    finally:
        for s in servers:
            s.stop()
    warning = "every API client can read every team's usage"
    assert warning in open_proxy.stderr()
    assert warning not in guarded.stderr()
