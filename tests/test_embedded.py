"""The embedded default: no REDIS_URL runs the same code on an in-process store, and `serve --demo` works offline."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import aiohttp
import pytest

from tests.conftest import Proxy, Upstream, free_port, make_settings, settle

MODEL = "text-embedding-3-small"


async def test_embedded_store_serves_caches_and_enforces_quotas(
    make_proxy: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.app")
    settings = make_settings(upstream.base_url, "", "[teams.demo]\nrpm = 3\n")
    assert settings.redis.url == ""
    p: Proxy = await make_proxy(settings)
    assert any("embedded in-process store" in r.message for r in caplog.records)
    key = await p.new_key("demo")
    body = {"model": MODEL, "input": ["one", "two"]}
    first = await p.embed(key, body)
    assert first.status == 200 and first.headers["x-cache"] == "miss"
    await settle(p)
    second = await p.embed(key, body)
    assert second.headers["x-cache"] == "hit" and second.headers["x-ratelimit-remaining-requests"] == "1"
    assert (await p.embed(key, body)).status == 200
    refused = await p.embed(key, body)
    assert refused.status == 429 and (await refused.json())["error"]["code"] == "rate_limit_exceeded"
    ready = await (await p.client.get("/readyz")).json()
    assert ready["redis"] == "embedded"


@pytest.mark.parametrize("given_admin_key", ["", "admin-key-from-the-environment-0123456789"],
                         ids=["generated", "PROXY_ADMIN_KEY"])
async def test_serve_demo_prints_a_working_key_an_admin_key_and_the_console_offline(given_admin_key: str) -> None:
    """`make demo` runs `serve --demo`: a gateway key that works, and (issue 18) the console's address with an admin
    key for this run, made when PROXY_ADMIN_KEY is unset: printed once on stdout, in no log line. A PROXY_ADMIN_KEY
    that is set is used, and not repeated."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "PROXY_CONFIG", "UPSTREAM_BASE_URL", "PROXY_ADMIN_KEY")}
    if given_admin_key:
        env["PROXY_ADMIN_KEY"] = given_admin_key
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--demo", "--port", str(port), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    printed: list[str] = []
    try:
        assert proc.stdout is not None
        while not printed or not printed[-1].startswith("admin key"):
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, f"serve --demo exited before printing its admin key: {printed}"
            printed.append(line)
        key = next(ln for ln in printed if ln.startswith("gateway key for team 'demo'")).rsplit(" ", 1)[1].strip()
        assert key.startswith("sk-gateway-")
        url = f"http://127.0.0.1:{port}"
        assert f"console: {url}/admin/ui/\n" in printed
        if given_admin_key:
            admin = given_admin_key
            assert printed[-1] == "admin key: the value of PROXY_ADMIN_KEY\n"
        else:
            admin = printed[-1].rsplit(" ", 1)[1].strip()
            assert printed[-1].startswith("admin key for this run only") and len(admin) >= 40
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "hello world"},
                              headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 200
                body = await resp.json()
                assert len(body["data"][0]["embedding"]) == 1536 and body["usage"]["prompt_tokens"] == 2
            async with s.get(f"{url}/admin/ui/") as resp:
                assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
            async with s.get(f"{url}/admin/keys", headers={"Authorization": f"Bearer {admin}"}) as resp:
                assert resp.status == 200  # the console signs in with it
                assert [k["team"] for k in (await resp.json())["data"]] == ["demo"]
            async with s.get(f"{url}/admin/keys", headers={"Authorization": "Bearer demo-admin-wrong"}) as resp:
                assert resp.status == 401
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0  # a clean shutdown on SIGTERM
    assert proc.stdout is not None and proc.stderr is not None
    out = "".join(printed) + (await proc.stdout.read()).decode()  # with the access log's lines
    err = (await proc.stderr.read()).decode()
    assert out.count(admin) == (0 if given_admin_key else 1) and admin not in err


async def test_serve_on_port_0_prints_the_port_it_listens_on() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROXY_CONFIG")}
    env["UPSTREAM_BASE_URL"] = "http://127.0.0.1:9/v1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", "0", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = ""
        while " listening on " not in line:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "serve exited before it was listening"
        port = int(line.split(" listening on http://127.0.0.1:", 1)[1].split()[0].rstrip(";"))
        assert port != 0
        while not line.startswith("try: curl"):
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "serve exited before printing its example"
        assert f" http://127.0.0.1:{port}/v1/embeddings " in line
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_embedded_store_serves_many_concurrent_requests(make_proxy: Any, upstream: Upstream) -> None:
    """fakeredis refuses more than 100 connections at once by default; the embedded store must not."""
    p: Proxy = await make_proxy(make_settings(upstream.base_url, "", "[teams.demo]\nrpm = 100000\n"))
    key = await p.new_key("demo")
    responses = await asyncio.gather(*(p.embed(key, {"model": MODEL, "input": f"c{i % 50}"}) for i in range(400)))
    assert sorted({r.status for r in responses}) == [200]
