"""OpenTelemetry traces, checked at a real OTLP/HTTP receiver started here (it parses what the SDK's exporter sends
with opentelemetry-proto), with a real redis-server and the mock upstream."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from proxy.cli.main import main
from proxy.config import ConfigError
from proxy.http.app import KEYSTORE, METRICS, TRACING, trace_middleware
from proxy.telemetry.otel import OtelTracing
from proxy.telemetry.tracing import NO_TRACING, traces_endpoint
from tests.conftest import UPSTREAM_KEY, Proxy, ProxyFactory, Upstream, free_port, make_settings
from tests.helpers import until
from tests.stack import CONFIG, create_keys, embed, start_mock, start_proxy

MODEL = "text-embedding-3-small"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
# Inputs that must never reach a span: the test looks for them in every byte the receiver got.
SECRET_INPUTS = ["confidential input alpha 7c1e", "confidential input beta 93ad"]


class Receiver:
    """POST /v1/traces: keeps every request's bytes and spans; while `hold` is clear it answers nothing."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.held = 0  # requests waiting on `hold` now

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if not self.hold.is_set():
            self.held += 1
            await self.hold.wait()
            self.held -= 1
        self.raw.append(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for rs in message.resource_spans:
            self.resources.append({a.key: value(a.value) for a in rs.resource.attributes})
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(span: Span) -> dict[str, Any]:
    return {a.key: value(a.value) for a in span.attributes}


@contextlib.asynccontextmanager
async def serving_receiver() -> AsyncIterator[tuple[Receiver, str]]:
    """A Receiver on a free port and its base URL."""
    r = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", r.traces)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield r, f"http://127.0.0.1:{server.port}"
    r.hold.set()
    await server.close()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    async with serving_receiver() as served:
        yield served


def otel_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, **extra: str) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "embedding-proxy-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # milliseconds: spans reach the receiver at once
    for name, v in extra.items():
        monkeypatch.setenv(name, v)


def dropped(proxy: Proxy, reason: str) -> float:
    m = proxy.app[METRICS]
    return float(m.child(m.trace_spans_dropped, reason)._value.get())


async def test_a_request_continues_the_clients_trace_with_child_spans_and_no_inputs_or_keys(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str, receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, endpoint = receiver
    otel_env(monkeypatch, endpoint)
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, "[teams.search]\nrpm = 100\ntpm = 100000\n"))
    assert isinstance(proxy.app[TRACING], OtelTracing)
    key, record = await proxy.app[KEYSTORE].create("search", name="svc")
    # first, the quota script gets loaded (the first charge queued in the cache read's pipeline meets NOSCRIPT)
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200
    body = {"model": MODEL, "input": [*SECRET_INPUTS, SECRET_INPUTS[0]], "encoding_format": "base64",
            "dimensions": 256}
    resp = await proxy.embed(key, body, traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01", **{"x-request-id": "trace-1"})
    assert resp.status == 200
    prompt_tokens = (await resp.json())["usage"]["prompt_tokens"]
    # the server span and the upstream call's, in the client's trace
    await until(lambda: len([s for s in rec.named(f"embeddings {MODEL}") if s.trace_id.hex() == TRACE_ID]) == 2)

    [server] = [s for s in rec.named(f"embeddings {MODEL}") if s.kind == Span.SPAN_KIND_SERVER
                and s.trace_id.hex() == TRACE_ID]
    assert (server.trace_id.hex(), server.parent_span_id.hex()) == (TRACE_ID, PARENT_ID)
    assert attrs(server) == {
        "http.request.method": "POST", "http.route": "/v1/embeddings", "url.path": "/v1/embeddings",
        "http.response.status_code": 200, "embedding_proxy.request_id": "trace-1",
        "embedding_proxy.team": "search", "embedding_proxy.key_id": record.id,
        "gen_ai.operation.name": "embeddings", "gen_ai.request.model": MODEL,
        "gen_ai.request.encoding_formats": ["base64"], "gen_ai.embeddings.dimension.count": 256,
        "gen_ai.usage.input_tokens": prompt_tokens, "embedding_proxy.inputs": 3, "embedding_proxy.cache_hits": 0,
        "embedding_proxy.upstream_inputs": 2, "embedding_proxy.cached_tokens": 9, "embedding_proxy.cache": "miss",
    }
    assert prompt_tokens == 25  # 9 + 7 + 9: the repeat of the first input is sent once and counted as cached
    children = {s.name: s for s in rec.spans if s.parent_span_id == server.span_id}
    assert set(children) == {"cache read", "quota charge", f"embeddings {MODEL}"}
    assert all(s.trace_id == server.trace_id for s in children.values())
    assert attrs(children["cache read"]) == {
        "db.system.name": "redis", "embedding_proxy.cache.lookups": 2, "embedding_proxy.cache.hits": 0,
        "embedding_proxy.quota.in_cache_read": True,
    }
    charges = [attrs(s) for s in rec.named("quota charge") if s.trace_id == server.trace_id]
    assert sorted(charges, key=lambda a: a["embedding_proxy.quota.step"]) == [
        {"embedding_proxy.quota.step": "request", "embedding_proxy.quota.in_cache_read": True,
         "embedding_proxy.quota.store": "redis"},
        {"embedding_proxy.quota.step": "tokens", "embedding_proxy.quota.tokens": 16,
         "embedding_proxy.quota.store": "redis"},
    ]
    call = children[f"embeddings {MODEL}"]
    assert call.kind == Span.SPAN_KIND_CLIENT
    assert attrs(call) == {
        "gen_ai.operation.name": "embeddings", "gen_ai.request.model": MODEL, "server.address": "127.0.0.1",
        "server.port": upstream.server.port, "http.request.method": "POST", "http.response.status_code": 200,
        "embedding_proxy.model": MODEL, "embedding_proxy.upstream": "default", "embedding_proxy.upstream.kind":
        "openai", "embedding_proxy.upstream.inputs": 2, "embedding_proxy.upstream.callers": 1,
        "gen_ai.usage.input_tokens": 16,
    }
    # the upstream was called with the upstream span as its parent, in the client's trace
    assert upstream.state.last_traceparent == f"00-{TRACE_ID}-{call.span_id.hex()}-01"
    assert rec.resources[0]["service.name"] == "embedding-proxy-test"

    # the same inputs again: a hit, and the span says so
    resp = await proxy.embed(key, body)
    assert resp.status == 200
    await until(lambda: len(rec.named(f"embeddings {MODEL}")) == 5)  # warm-up 2, traced 2, this one's server span
    [again] = [s for s in rec.named(f"embeddings {MODEL}")[4:] if s.kind == Span.SPAN_KIND_SERVER]
    assert len(again.parent_span_id) == 0  # no traceparent: a new trace
    got = attrs(again)
    assert (got["embedding_proxy.cache"], got["embedding_proxy.cache_hits"], got["embedding_proxy.upstream_inputs"],
            got["embedding_proxy.cached_tokens"], got["gen_ai.usage.input_tokens"]) == ("hit", 2, 0, 25, 25)

    exported = b"".join(rec.raw)
    for secret in [*SECRET_INPUTS, key, key.removeprefix("sk-gateway-"), UPSTREAM_KEY]:
        assert secret.encode() not in exported
    assert record.id.encode() in exported  # the key's id is there: the check above would see a key


async def test_a_refused_request_is_a_span_without_the_refusals_message(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str, receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, endpoint = receiver
    otel_env(monkeypatch, endpoint)
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    key = await proxy.new_key()
    upstream.state.fail_next("status", status=400)  # the mock's 400 names no input; a real upstream's may
    resp = await proxy.embed(key, {"model": MODEL, "input": SECRET_INPUTS[0]})
    assert resp.status == 400
    resp = await proxy.embed("sk-gateway-" + "x" * 40, {"model": MODEL, "input": "x"})
    assert resp.status == 401
    resp = await proxy.client.get(f"/v1/models/{MODEL}", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    await until(lambda: len([s for s in rec.spans if s.kind == Span.SPAN_KIND_SERVER]) == 3)
    codes = sorted(attrs(s)["http.response.status_code"] for s in rec.spans if s.kind == Span.SPAN_KIND_SERVER)
    assert codes == [200, 400, 401]
    [model] = rec.named("GET /v1/models/{model}")  # the route's template names it, the path is the path
    assert (attrs(model)["http.route"], attrs(model)["url.path"]) == ("/v1/models/{model}", f"/v1/models/{MODEL}")
    [call] = [s for s in rec.spans if s.kind == Span.SPAN_KIND_CLIENT]
    assert (attrs(call)["http.response.status_code"], attrs(call)["error.type"]) == (400, "invalid_request")
    assert call.status.code == call.status.STATUS_CODE_ERROR and call.status.message == ""
    assert not any(e.name == "exception" for s in rec.spans for e in s.events)
    assert SECRET_INPUTS[0].encode() not in b"".join(rec.raw) and b"Injected" not in b"".join(rec.raw)


async def test_a_merged_upstream_call_is_in_its_first_callers_trace_and_links_the_others(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str, receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, endpoint = receiver
    otel_env(monkeypatch, endpoint)
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    key = await proxy.new_key()
    upstream.settings.latency_ms = 300
    first = asyncio.ensure_future(proxy.embed(key, {"model": MODEL, "input": "first, alone"}))
    await until(lambda: upstream.state.requests == 1)  # its call is in flight: the next two wait and merge
    rest = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": f"merged {i}"}) for i in range(2)))
    assert [r.status for r in [await first, *rest]] == [200, 200, 200]
    assert upstream.state.requests == 2
    await until(lambda: len([s for s in rec.spans if s.kind == Span.SPAN_KIND_SERVER]) == 3
                and len([s for s in rec.spans if s.kind == Span.SPAN_KIND_CLIENT]) == 2)

    servers = {s.span_id: s for s in rec.spans if s.kind == Span.SPAN_KIND_SERVER}
    [merged] = [s for s in rec.spans if s.kind == Span.SPAN_KIND_CLIENT and attrs(s)["embedding_proxy.upstream.callers"]
                == 2]
    parent = servers[merged.parent_span_id]
    [lone] = [s for s in rec.spans if s.kind == Span.SPAN_KIND_CLIENT and s is not merged]
    assert merged.trace_id == parent.trace_id and parent.span_id != lone.parent_span_id  # not the first's
    [link] = merged.links
    other = servers[link.span_id]
    assert link.trace_id == other.trace_id and other not in (parent, servers[lone.parent_span_id])
    assert attrs(merged)["embedding_proxy.upstream.inputs"] == 2
    assert upstream.state.last_traceparent is not None
    version, trace_id, span_id, flags = upstream.state.last_traceparent.split("-")
    assert (version, trace_id, span_id) == ("00", parent.trace_id.hex(), merged.span_id.hex())
    assert int(flags, 16) & 1  # sampled (the SDK may also set W3C level 2's "random trace id" flag)


async def test_a_hung_collector_neither_slows_nor_fails_requests_and_every_span_is_exported_or_counted(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str, receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, endpoint = receiver
    otel_env(monkeypatch, endpoint, OTEL_BSP_MAX_QUEUE_SIZE="4", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="2",
             OTEL_EXPORTER_OTLP_TIMEOUT="60")
    rec.hold.clear()
    # no limits (no quota spans), no in-process tier (every hit reads Redis): 2 spans per hit, 3 for the miss
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, "[cache]\nlocal_max_mb = 0\n"))
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "x"})).status == 200
    await until(lambda: rec.held == 1)  # the exporter is stuck in a POST the collector does not answer
    for _ in range(20):
        assert (await proxy.embed(key, {"model": MODEL, "input": "x"})).status == 200
    assert rec.held == 1 and not rec.spans  # all answered while the collector held the exporter
    assert dropped(proxy, "queue_full") >= 20 * 2 + 3 - 4 - 2  # beyond the queue and the batch in the POST
    rec.hold.set()
    await until(lambda: len(rec.spans) + dropped(proxy, "queue_full") == 20 * 2 + 3)
    assert dropped(proxy, "export_failed") == 0
    text = proxy.app[METRICS].render().decode()
    assert f'embedding_proxy_trace_spans_dropped_total{{reason="queue_full"}} {dropped(proxy, "queue_full")}' in text


async def test_an_unreachable_collector_counts_failed_exports(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    otel_env(monkeypatch, f"http://127.0.0.1:{free_port()}", OTEL_EXPORTER_OTLP_TIMEOUT="0.5")
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    key = await proxy.new_key()
    for i in range(5):
        assert (await proxy.embed(key, {"model": MODEL, "input": f"unexported {i}"})).status == 200
    await until(lambda: dropped(proxy, "export_failed") == 5 * 3)  # server, cache read, upstream call each


async def test_off_by_default_and_when_disabled(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str, receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec, endpoint = receiver
    otel_env(monkeypatch, endpoint, OTEL_SDK_DISABLED="true")
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    assert proxy.app[TRACING] is NO_TRACING and trace_middleware not in proxy.app.middlewares
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "x"}, traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01"))\
        .status == 200
    assert upstream.state.last_traceparent is None
    assert "trace_spans_dropped_total{" not in proxy.app[METRICS].render().decode()  # no series while off
    await proxy.client.close()  # the app's cleanup: a provider would flush here
    assert rec.raw == []


async def test_each_worker_has_its_own_provider_and_flushes_at_shutdown(
    redis_url: str, receiver: tuple[Receiver, str], tmp_path: Path,
) -> None:
    rec, endpoint = receiver
    mock, mock_url = await asyncio.to_thread(start_mock, tmp_path)
    # a minute between exports: what arrives was sent by each worker's flush at shutdown
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    proxy, url = await asyncio.to_thread(start_proxy, tmp_path, mock_url, redis_url, CONFIG, workers=2, env=env)
    try:
        [(key, _)] = (await asyncio.to_thread(create_keys, redis_url, ["search"])).values()
        for i in range(20):  # each on a new connection: the kernel spreads them over the workers
            assert (await asyncio.to_thread(embed, url, key, [f"worker input {i}"]))[0] == 200
        assert "traces: OTLP/HTTP to " + endpoint + "/v1/traces" in proxy.stdout()
        assert rec.raw == []
    finally:
        assert await asyncio.to_thread(proxy.stop) == 0
        mock.stop()
    servers = [s for s in rec.spans if s.kind == Span.SPAN_KIND_SERVER]
    assert len(servers) == 20
    assert len({r["process.pid"] for r in rec.resources}) == 2  # two providers, one per worker


def test_check_config_and_serve_name_the_traces_endpoint_or_refuse_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("PROXY_CONFIG", "REDIS_URL", "CACHE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    otel_env(monkeypatch, "http://collector.example:4318")
    monkeypatch.setenv("UPSTREAM_BASE_URL", "http://127.0.0.1:9/v1")
    assert main(["check-config"]) == 0
    assert capsys.readouterr().out.endswith("; traces: OTLP/HTTP to http://collector.example:4318/v1/traces\n")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert main(["check-config"]) == 2
    assert main(["serve", "--port", "0"]) == 2
    assert capsys.readouterr().err.count("config error: OTEL_EXPORTER_OTLP_PROTOCOL='grpc'") == 2


def test_without_an_endpoint_no_tracing_module_is_imported(tmp_path: Path) -> None:
    """A fresh interpreter serves a request (embedded store, mock upstream) with tracing off."""
    script = tmp_path / "serve_one.py"
    script.write_text(f"""
import asyncio, os, sys, threading
from aiohttp.test_utils import TestClient, TestServer
from proxy.http.app import KEYSTORE, TRACING, create_app
from proxy.config import load
from proxy.mock.upstream import MockSettings, create_mock_app
from proxy.telemetry.tracing import NO_TRACING

async def main():
    mock = TestServer(create_mock_app(MockSettings()), host="127.0.0.1")
    await mock.start_server()
    settings = load(None, env={{"UPSTREAM_BASE_URL": str(mock.make_url("/v1")), "UPSTREAM_API_KEY": "k"}})
    app = create_app(settings)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        key, _ = await app[KEYSTORE].create("t")
        resp = await client.post("/v1/embeddings", json={{"model": "{MODEL}", "input": "x"}},
                                 headers={{"Authorization": "Bearer " + key}})
        assert resp.status == 200, await resp.text()
    await mock.close()
    assert app[TRACING] is NO_TRACING
    # redis-py imports OpenTelemetry's API and metrics SDK when they are installed (its own observability, off);
    # the proxy's tracing is the trace SDK, its exporter, its propagator and proxy/otel.py
    ours = ("proxy.telemetry.otel", "opentelemetry.sdk.trace", "opentelemetry.exporter",
            "opentelemetry.trace.propagation.tracecontext")
    print("loaded:", sorted(m for m in sys.modules if m.startswith(ours)),
          [t.name for t in threading.enumerate() if t.name.startswith("Otel")])

asyncio.run(main())
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "REDIS_", "PROXY_"))}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "loaded: [] []"


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://u:pw@t/x?q=1"},
     "https://t/x"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_SDK_DISABLED": "true"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     "http://a:4318/v1/traces"),
])
def test_traces_endpoint(env: dict[str, str], expected: str | None) -> None:
    assert traces_endpoint(env) == expected


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "OTEL_EXPORTER_OTLP_PROTOCOL='grpc': the proxy exports traces over OTLP/HTTP only"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_TRACES_EXPORTER": "zipkin"},
     "OTEL_TRACES_EXPORTER='zipkin': the proxy exports traces with OTLP only"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "the OTLP traces endpoint"),
])
def test_traces_endpoint_refuses_what_it_cannot_do(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        traces_endpoint(env)


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:0"}, "OTEL_EXPORTER_OTLP_ENDPOINT: port 0 cannot be sent to"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://u:pw@a:70000/v1/traces"},
     "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: not a valid URL"),
    ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "api-key=abc%0D%0Ainjected: 1", "OTEL_EXPORTER_OTLP_HEADERS": "a=b"},
     "OTEL_EXPORTER_OTLP_TRACES_HEADERS: member 1 is not name=value"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "a=b, =c"}, "OTEL_EXPORTER_OTLP_HEADERS: member 2 is not name=value"),
    ({"OTEL_EXPORTER_OTLP_TIMEOUT": "10s"}, "OTEL_EXPORTER_OTLP_TIMEOUT='10s': a number of seconds above 0"),
    ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT='0': a number of seconds"),
    ({"OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"}, "OTEL_EXPORTER_OTLP_COMPRESSION='brotli': one of none, gzip"),
    ({"OTEL_SPAN_LINK_COUNT_LIMIT": ""}, "OTEL_SPAN_LINK_COUNT_LIMIT='': a whole number of 0 or more or 'unset'"),
    ({"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "-1"}, "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT='-1': a whole number"),
    ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE='0': a whole number of at least 1"),
    ({"OTEL_BSP_SCHEDULE_DELAY": "5s"}, "OTEL_BSP_SCHEDULE_DELAY='5s': a whole number of at least 1"),
    ({"OTEL_TRACES_SAMPLER": "probability"}, "OTEL_TRACES_SAMPLER='probability': one of always_on, always_off"),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"},
     "OTEL_TRACES_SAMPLER_ARG='nan': the parentbased_traceidratio sampler's ratio is a number from 0 to 1"),
])
def test_traces_endpoint_refuses_what_the_sdk_would_refuse_or_replace(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", **env})
    assert str(refused.value).startswith(message)
    assert "pw" not in str(refused.value) and "abc" not in str(refused.value)  # no credential, no header value


def test_the_checked_config_is_what_the_sdk_is_given() -> None:
    from opentelemetry.sdk.trace import sampling

    from proxy.telemetry.tracingconfig import SAMPLERS, read

    assert set(SAMPLERS) == set(sampling._KNOWN_SAMPLERS)  # the SDK's names, no more and no fewer
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318"}
    config = read({**base, "OTEL_BSP_MAX_QUEUE_SIZE": "100"})
    assert config is not None and (config.queue_size, config.batch_size) == (100, 100)  # capped, not refused
    config = read({**base, "OTEL_TRACES_SAMPLER": "TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.05",
                   "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "Unset", "OTEL_EXPORTER_OTLP_HEADERS": "a=b%3Bc, x-k = v w"})
    assert config is not None and (config.sampler, config.ratio) == ("traceidratio", 0.05)
    config = read({**base, "OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_SAMPLER_ARG": "5"})  # no argument taken
    assert config is not None and (config.sampler, config.ratio) == ("always_on", 1.0)


def test_an_sdk_failure_at_start_is_one_config_error_in_check_config_and_serve(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """What tracingconfig did not foresee: check-config and serve build the SDK's objects once and report it."""
    for name in ("PROXY_CONFIG", "REDIS_URL", "CACHE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    otel_env(monkeypatch, "http://127.0.0.1:4318")
    monkeypatch.setenv("UPSTREAM_BASE_URL", "http://127.0.0.1:9/v1")

    def refuse(*args: object) -> None:
        raise ValueError("a setting the SDK refuses")

    monkeypatch.setattr(OtelTracing, "__init__", refuse)
    assert main(["check-config"]) == 2
    assert main(["serve", "--port", "0"]) == 2
    assert capsys.readouterr().err.count("config error: OpenTelemetry could not start with these OTEL_* variables: "
                                         "ValueError: a setting the SDK refuses\n") == 2


@pytest.mark.parametrize(("tracestate", "forwarded"), [
    ("vendor=abc,other@tenant=x y", True),
    (",".join(f"k{i}=v" for i in range(33)), False),  # over 32 members
    ("k=" + "v" * 255 + ",l=" + "v" * 255, False),  # over 512 characters
    ("k=v,K=v", False),  # an upper-case key
    ("k=v,k=w", False),  # a key twice
])
async def test_a_clients_tracestate_goes_upstream_only_when_valid_and_within_the_limits(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str, receiver: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tracestate: str, forwarded: bool,
) -> None:
    _, endpoint = receiver
    otel_env(monkeypatch, endpoint)
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    key = await proxy.new_key()
    caplog.set_level(logging.DEBUG, logger="opentelemetry")
    resp = await proxy.embed(key, {"model": MODEL, "input": "x"}, traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01",
                             tracestate=tracestate)
    assert resp.status == 200
    assert upstream.state.last_traceparent is not None and upstream.state.last_traceparent.split("-")[1] == TRACE_ID
    assert upstream.state.last_tracestate == (tracestate if forwarded else None)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")]
