"""An upstream's redirect is an upstream failure: the proxy never follows it, so the upstream's credential (Azure's
`api-key` header, or a Bearer token) and the clients' inputs never go to a host the redirect names."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from tests.conftest import UPSTREAM_KEY, ProxyFactory, make_settings
from tests.helpers import served


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_a_redirecting_upstream_gets_no_credential_forwarded(
    make_proxy: ProxyFactory, redis_url: str, status: int, kind: str
) -> None:
    elsewhere: list[dict[str, Any]] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append({"headers": dict(request.headers), "body": await request.read()})
        return web.json_response({"error": {"message": "not here"}}, status=404)

    other_app = web.Application()
    other_app.router.add_route("*", "/{tail:.*}", other)
    async with served(other_app) as other_port:
        async def redirect(request: web.Request) -> web.Response:
            return web.Response(status=status, headers={"Location": f"http://127.0.0.1:{other_port}{request.path_qs}"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", redirect)
        async with served(app) as port:
            extra = 'kind = "azure"\napi_version = "2024-02-01"\n' if kind == "azure" else ""
            settings = make_settings(f"http://127.0.0.1:{port}/v1", redis_url,
                                     extra + "max_retries = 0\n", PROXY_ADMIN_KEY="sk-admin-test-0123456789abcdef")
            proxy = await make_proxy(settings)
            key = await proxy.new_key()
            resp = await proxy.embed(key, {"model": "text-embedding-3-small", "input": "secret input"})
            assert resp.status == 502, await resp.text()
            body = await resp.json()
            assert body["error"]["code"] == "upstream_error"
            assert UPSTREAM_KEY not in await resp.text()
    assert elsewhere == []
