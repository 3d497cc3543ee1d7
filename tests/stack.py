"""The proxy as its operators run it: `embedding-proxy serve` and `mock-upstream` as real subprocesses, driven
over plain HTTP, plus /metrics parsing. Used by the multi-worker and Prometheus tests."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.accounts.keys import KeyStore
from proxy.config import RedisSettings
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import UPSTREAM_KEY, free_port

MODEL = "text-embedding-3-small"
# Quick retries (one, then the error), and a team whose third request in a minute is over its quota.
CONFIG = """
[upstreams.default]
backoff_base_s = 0.01
deadline_s = 5.0
attempt_timeout_s = 2.0
max_retries = 1

[teams.quota-team]
rpm = 2
"""


def http(method: str, url: str, body: Any = None, headers: Mapping[str, str] | None = None,
         timeout: float = 10) -> tuple[int, Any]:
    """One request on a fresh connection (so SO_REUSEPORT spreads them); JSON answers are decoded."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                        **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in ctype else raw.decode()


def wait_http(url: str, proc: subprocess.Popen[Any] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout}s") from None
            time.sleep(0.1)


class Server:
    """A subprocess with its stdout and stderr in files (read them after it stops, or while it runs)."""

    def __init__(self, args: list[str], env: Mapping[str, str], workdir: Path,
                 preexec: Callable[[], None] | None = None) -> None:
        self.stdout_path, self.stderr_path = workdir / "stdout.log", workdir / "stderr.log"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(args, env=dict(env), stdout=out, stderr=err, preexec_fn=preexec)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_CONFIG", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")}
    return {**env, **extra}


def start_mock(workdir: Path) -> tuple[Server, str]:
    port = free_port()
    d = workdir / "mock"
    d.mkdir()
    # generous rate limits: the mock sends x-ratelimit-* headers (the remaining-capacity panel reads them)
    server = Server([sys.executable, "-m", "proxy", "mock-upstream", "--port", str(port), "--rpm", "1000000",
                     "--tpm", "1000000000"], base_env(), d)
    wait_http(f"http://127.0.0.1:{port}/_mock/stats", server.proc)
    return server, f"http://127.0.0.1:{port}"


def start_proxy(workdir: Path, mock_url: str, redis_url: str, config: str, *, workers: int,
                metrics_port: int | None = None, env: Mapping[str, str] | None = None,
                port: int | None = None, nofile: int | None = None) -> tuple[Server, str]:
    """`embedding-proxy serve`; `port`: a fixed port (else a free one); `nofile`: its file-descriptor limit (soft and
    hard), as `ulimit -n` would set it."""
    port = port or free_port()
    d = Path(tempfile.mkdtemp(prefix="proxy-", dir=workdir))
    (d / "proxy.toml").write_text(config)
    args = [sys.executable, "-m", "proxy", "--config", str(d / "proxy.toml"), "serve", "--port", str(port),
            "--workers", str(workers)]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    server = Server(args, base_env(REDIS_URL=redis_url, UPSTREAM_BASE_URL=mock_url + "/v1",
                                   UPSTREAM_API_KEY=UPSTREAM_KEY, TMPDIR=str(d), **(env or {})), d,
                    preexec=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                                   (nofile, nofile)))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while "listening on" not in server.stdout():  # printed once every worker listens
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"proxy did not start: {server.stderr()}")
        time.sleep(0.1)
    return server, url


def create_keys(redis_url: str, teams: list[str]) -> dict[str, tuple[str, str]]:
    """team -> (key, key id), written straight to Redis as `embedding-proxy keys create` would."""

    async def go() -> dict[str, tuple[str, str]]:
        settings = RedisSettings(url=redis_url, socket_timeout_s=5.0)
        client, _ = connect(settings)
        store = Store(client, settings)
        keystore = KeyStore(store, RedisKeys("ep"))
        out = {}
        for team in teams:
            key, record = await keystore.create(team)
            out[team] = (key, record.id)
        await store.close()
        return out

    return asyncio.run(go())


def embed(url: str, key: str, inputs: list[str], model: str = MODEL) -> tuple[int, Any]:
    return http("POST", url + "/v1/embeddings", {"model": model, "input": inputs},
                {"Authorization": f"Bearer {key}"})


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[str, Samples]:
    status, text = http("GET", url)
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return round(value(after, name, **labels) - value(before, name, **labels), 12)
