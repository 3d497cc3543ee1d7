"""Break-it review (i19) of provider credentials got inside the attempt: Bedrock's from a real container
credentials endpoint (botocore's ContainerProvider on loopback), refreshed, failing and stalled; Vertex's from a
token endpoint that answers something other than a token."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import ProxyFactory
from tests.helpers import served, until
from tests.providers import AWS_KEY_ID, AWS_SECRET, Mocks, provider_settings

pytestmark = pytest.mark.redis


class CredentialEndpoint:
    """A container credentials endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI) handing out credentials for `lifetime`:
    5 minutes by default, within botocore's mandatory refresh window (10 minutes), so each call refreshes them first;
    `failing`: it answers 500; `stall`, while set and not yet fired: it holds every request."""

    def __init__(self, lifetime: datetime.timedelta = datetime.timedelta(minutes=5)) -> None:
        self.lifetime = lifetime
        self.failing = False
        self.requests = 0
        self.stall: asyncio.Event | None = None
        self.waiting = 0  # requests held by the stall now

    async def creds(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.stall is not None:
            self.waiting += 1
            try:
                await self.stall.wait()
            finally:
                self.waiting -= 1
        if self.failing:
            return web.Response(status=500, text="broken")
        expires = datetime.datetime.now(datetime.UTC) + self.lifetime
        return web.json_response({"AccessKeyId": AWS_KEY_ID, "SecretAccessKey": AWS_SECRET, "Token": "session",
                                  "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")})


@pytest.fixture
async def endpoint(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[CredentialEndpoint]:
    """botocore's chain finds no keys in the environment, only the container credentials endpoint."""
    endpoint = CredentialEndpoint()
    app = web.Application()
    app.router.add_get("/creds", endpoint.creds)
    async with served(app) as port:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{port}/creds")
        try:
            yield endpoint
        finally:
            if endpoint.stall is not None:
                endpoint.stall.set()


async def test_a_failed_aws_credential_refresh_fails_over_quietly(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str, endpoint: CredentialEndpoint,
        caplog: pytest.LogCaptureFixture) -> None:
    """Bedrock's credentials from a container endpoint that expire within botocore's mandatory refresh window, so
    each call refreshes them: when the endpoint fails, the call fails over to Cohere (as after any failure to get
    a provider's credentials) instead of escaping the fleet as an unexpected error (502, a traceback logged)."""
    cohere, bedrock = await provider_mocks("cohere"), await provider_mocks("bedrock-cohere")
    model = ('[models."embed-v4.0"]\ndimensions = 1536\nallowed_dimensions = [256, 512, 1024, 1536]\n'
             'input_type = "required"\ndeployments = [{ upstream = "bedrock", '
             'upstream_model = "cohere.embed-v4:0" }, { upstream = "cohere", priority = 1 }]\n')
    upstreams = cohere.upstream_toml("cohere") + bedrock.upstream_toml("bedrock", max_retries=0)
    proxy = await make_proxy(provider_settings(redis_url, upstreams, model))
    key = await proxy.new_key()
    resp = await proxy.embed(key, {"model": "embed-v4.0", "input": "one", "input_type": "query"})
    assert resp.status == 200, (await resp.text())[:300]
    assert bedrock.state.requests == 1 and cohere.state.requests == 0
    endpoint.failing = True
    resp = await proxy.embed(key, {"model": "embed-v4.0", "input": "two", "input_type": "query"})
    assert resp.status == 200, (await resp.text())[:300]
    assert bedrock.state.requests == 1 and cohere.state.requests == 1  # nothing sent unsigned
    errors = [r.getMessage() for r in caplog.records if r.name.startswith("proxy") and r.levelno >= logging.ERROR]
    assert not errors  # not "upstream call failed unexpectedly", with a traceback


async def test_credentials_not_yet_due_sign_while_a_stalled_refresh_runs(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str, endpoint: CredentialEndpoint) -> None:
    """Credentials with 12 minutes left are in botocore's advisory refresh window (15 min), not its mandatory one
    (10 min): a refresh is attempted but nobody has to wait for it (botocore itself lets every other thread sign with
    the current ones meanwhile). With the credential endpoint stalled, the calls still sign and pass while the
    refresh is held; before, every call waited for the shared refresh and got a 504 at its attempt's time."""
    endpoint.lifetime = datetime.timedelta(minutes=12)
    mock = await provider_mocks("bedrock")
    upstream = mock.upstream_toml("b", max_retries=0).replace("attempt_timeout_s = 5.0", "attempt_timeout_s = 1.0")
    proxy = await make_proxy(provider_settings(redis_url, upstream, mock.spec.model_toml("b")))
    key = await proxy.new_key()
    resp = await proxy.embed(key, {"model": "titan-v2", "input": "warm"})
    assert resp.status == 200, (await resp.text())[:300]
    assert endpoint.requests == 2  # resolved, then refreshed (the call waited: no credentials were held yet)
    endpoint.stall = asyncio.Event()
    first = asyncio.create_task(proxy.embed(key, {"model": "titan-v2", "input": "starts the refresh"}))
    await until(lambda: endpoint.waiting >= 1)  # the refresh has reached the endpoint (a CI run once read it before)
    answers = await asyncio.gather(*(proxy.embed(key, {"model": "titan-v2", "input": f"text {i}"})
                                     for i in range(4)))
    answers.append(await first)
    assert [a.status for a in answers] == [200] * 5, (await answers[0].text())[:300]
    assert endpoint.waiting >= 1  # while the refresh is held by the stall


def point_at(credentials_file: str, token_uri: str) -> None:
    """The service account's key file, its `token_uri` replaced."""
    path = Path(credentials_file)
    path.write_text(json.dumps({**json.loads(path.read_text()), "token_uri": token_uri}))


async def test_a_token_endpoint_answering_no_token_fails_over_quietly(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A 200 from Google's token endpoint that is not a token (a proxy's HTML page): google-auth raised TypeError,
    which escaped the attempt as an unexpected error (502, a traceback, no failover). Now it fails the attempt as an
    unreachable endpoint does, and the call fails over to the other Vertex deployment."""
    portal = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>sign in to the network</html>", content_type="text/html")

    portal.router.add_post("/token", page)
    async with served(portal) as port:
        v1, v2 = await provider_mocks("vertex"), await provider_mocks("vertex")
        point_at(v1.credentials_file, f"http://127.0.0.1:{port}/token")
        model = ('[models."text-embedding-005"]\ndimensions = 768\nallowed_dimensions = [128, 256, 512, 768]\n'
                 'deployments = [{ upstream = "v1" }, { upstream = "v2", priority = 1 }]\n')
        upstreams = v1.upstream_toml("v1", max_retries=0) + v2.upstream_toml("v2")
        proxy = await make_proxy(provider_settings(redis_url, upstreams, model))
        resp = await proxy.embed(await proxy.new_key(), {"model": "text-embedding-005", "input": "hello"})
        assert resp.status == 200, (await resp.text())[:300]
        assert v1.state.requests == 0 and v2.state.requests == 1
        errors = [r.getMessage() for r in caplog.records if r.name.startswith("proxy") and r.levelno >= logging.ERROR]
        assert not errors
