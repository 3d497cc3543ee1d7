"""Defects found by attacking the OpenTelemetry tracing (issue 12, item 2); each test fails on the code as merged.

Real servers throughout: the proxy on a real socket (tests.helpers.served) or the CLI in a fresh interpreter, a
private redis-server, the mock upstream and tests/test_tracing.py's OTLP/HTTP receiver.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.cli.main import main
from proxy.http.app import KEYSTORE, create_app
from proxy.telemetry import otel
from tests.conftest import ProxyFactory, Upstream, make_settings
from tests.helpers import raw_http, served, until
from tests.test_tracing import Receiver, dropped, otel_env, serving_receiver

MODEL = "text-embedding-3-small"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
ROOT = Path(__file__).parent.parent


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Receiver, str]]:
    """tests/test_tracing.py's OTLP/HTTP receiver on a free port."""
    async with serving_receiver() as served:
        yield served

# What a worker does at start-up with the OTEL_* variables (create_app calls tracing.start): prints "started", or
# "config error: ..." for a ConfigError; anything else is a traceback and exit code 1.
_START = """
import os
from proxy.config import ConfigError
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.tracing import start
try:
    start(os.environ, Metrics())
except ConfigError as exc:
    print("config error:", exc)
else:
    print("started")
"""


def _otel_only_env(**otel_vars: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "REDIS_", "PROXY_", "CACHE_REDIS"))}
    env.update({"UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    env.update(otel_vars)
    return env


@pytest.mark.parametrize("otel_vars", [
    # a reasonable smaller queue: the SDK's default batch of 512 no longer fits in it
    {"OTEL_BSP_MAX_QUEUE_SIZE": "100"},
    {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "0"},
    {"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "many"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:99999"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://[::1"},
], ids=["queue-below-batch", "batch-0", "attribute-limit-not-a-number", "port-out-of-range", "bad-ipv6"])
def test_bad_otel_values_are_one_clear_error_or_are_served_never_a_traceback(otel_vars: dict[str, str]) -> None:
    """Repro: `OTEL_BSP_MAX_QUEUE_SIZE=100 embedding-proxy serve` (and the other values here).
    Observed: `check-config` says ok (or itself prints a traceback, for the endpoints), then `serve` (every worker of
    `--workers N`) dies at create_app with a ValueError traceback from the SDK or urllib.
    Expected: either tracing starts (e.g. the batch size capped at the queue size) or a ConfigError that
    check-config reports too (exit 2, one line naming the variable).
    Root cause: proxy/tracing.py:traces_endpoint validates only the exporter, protocol and URL scheme, and
    `_safe` (tracing.py:153) reads `parts.port`, which raises ValueError; proxy/otel.py:OtelTracing.__init__
    (otel.py:214) builds BatchSpanProcessor/TracerProvider/the SDK import unguarded, so the SDK's ValueErrors
    (queue < batch size, batch 0, non-integer span limits at `import opentelemetry.sdk.trace`) escape."""
    env = _otel_only_env(**otel_vars)
    started = subprocess.run([sys.executable, "-c", _START], env=env, capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
    assert "Traceback" not in started.stderr, started.stderr[-600:]
    assert started.returncode == 0
    check = subprocess.run([sys.executable, "-m", "proxy.cli.main", "check-config"], env=env, capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
    assert "Traceback" not in check.stderr, check.stderr[-600:]
    if started.stdout.startswith("config error:"):
        assert check.returncode == 2 and next(iter(otel_vars)) in check.stderr
    else:
        assert started.stdout.strip() == "started" and check.returncode == 0


@pytest.mark.parametrize("otel_vars", [
    {"OTEL_TRACES_SAMPLER": "traceidratio0.1"},  # a typo for traceidratio + OTEL_TRACES_SAMPLER_ARG=0.1
    {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1%"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "5"},
], ids=["sampler-typo", "arg-not-a-number", "arg-above-1"])
def test_a_sampler_the_sdk_cannot_use_is_refused_not_replaced_by_sampling_everything(
    otel_vars: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Repro: `OTEL_TRACES_SAMPLER=traceidratio0.1 embedding-proxy check-config` (or an ARG of "1%" or 5).
    Observed: check-config exits 0; `serve` logs one SDK warning ("Couldn't recognize sampler" / "Could not convert
    TRACES_SAMPLER_ARG to float. Using default rate 1.0") and samples EVERY request (parentbased_always_on, or a
    ratio of 1.0): an operator who asked for 10% or 1% exports 10-100x the spans, silently.
    Expected: a config error naming the variable, like the other OTEL_* values the proxy cannot honour.
    Root cause: proxy/tracing.py:traces_endpoint never looks at OTEL_TRACES_SAMPLER[_ARG]; the SDK's
    `_get_from_env_or_default` (opentelemetry/sdk/trace/sampling.py) falls back instead of failing."""
    for name in ("PROXY_CONFIG", "REDIS_URL", "CACHE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    otel_env(monkeypatch, "http://127.0.0.1:4318", **otel_vars)
    monkeypatch.setenv("UPSTREAM_BASE_URL", "http://127.0.0.1:9/v1")
    assert main(["check-config"]) == 2
    assert "OTEL_TRACES_SAMPLER" in capsys.readouterr().err


async def test_spans_in_an_export_cut_off_at_shutdown_are_counted_as_dropped(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str, collector: tuple[Receiver, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Repro: a collector that accepts the POST and never answers; one request (3 spans: server, cache read,
    upstream call) is exported into it; then the proxy stops.
    Observed: shutdown gives up after SHUTDOWN_S and counts only what is still *queued* (as "shutdown"); the spans
    inside the POST in flight (1 to 3 of them, as the batch timer fell) were already `taken` off the count, so
    embedding_proxy_trace_spans_dropped_total says 2 or fewer although none of the 3 reached the collector (the
    process exits with the daemon export thread).
    Expected: every span not exported is counted (module docstring of proxy/otel.py): 3 dropped.
    Root cause: proxy/otel.py:_CountingExporter.export calls `queue.taken` before the export finishes
    (otel.py:152), and `_Queue.abandon` (otel.py:138) only sees `pending`."""
    monkeypatch.setattr(otel, "SHUTDOWN_S", 0.5)  # the bound is what is under test, not its length
    rec, endpoint = collector
    otel_env(monkeypatch, endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="60")
    rec.hold.clear()
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "exported into a hung collector"})).status == 200
    await until(lambda: rec.held == 1)  # the export thread is inside the POST
    await proxy.client.close()  # the app's cleanup: tracing.shutdown
    assert rec.spans == []
    total = sum(dropped(proxy, reason) for reason in otel.DROP_REASONS)
    assert total == 3


async def test_a_hostile_tracestate_is_not_written_into_the_proxys_log(
    upstream: Upstream, redis_url: str, collector: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Repro: POST /v1/embeddings with `tracestate: a=1,CONFIDENTIAL INPUT xxxx...` (4 KB, an invalid member).
    Observed: every such request makes the SDK log a WARNING "Member doesn't match the w3c identifiers format
    <the client's member verbatim>" (opentelemetry.trace.span): any client writes ~8 KB of its own text per
    request into the operator's log, unthrottled, outside the structured access log (log flooding and injection;
    a client that puts an input or a key there has it in the logs).
    Expected: a bad tracestate is dropped quietly (the request is answered either way; it is), or at most logged
    without the client's text.
    Root cause: proxy/otel.py:server_span calls TraceContextTextMapPropagator.extract (otel.py:226) with the
    SDK's `opentelemetry.trace.span` logger left at WARNING."""
    _, endpoint = collector
    otel_env(monkeypatch, endpoint)
    app = create_app(make_settings(upstream.base_url, redis_url))
    caplog.set_level(logging.INFO)
    async with served(app) as port:
        key, _ = await app[KEYSTORE].create("search")
        for i in range(3):
            body = json.dumps({"model": MODEL, "input": f"hostile tracestate {i}"}).encode()
            answer = await raw_http(port, (
                b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                b"Authorization: Bearer " + key.encode() + b"\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                b"traceparent: 00-" + TRACE_ID.encode() + b"-" + PARENT_ID.encode() + b"-01\r\n"
                b"tracestate: a=1,CONFIDENTIAL INPUT " + b"x" * 4000 + b"\r\n\r\n" + body))
            assert answer is not None and answer.status == 200
    logged = [r.getMessage() for r in caplog.records]
    assert not [m[:120] for m in logged if "CONFIDENTIAL INPUT" in m]


def test_an_unusable_collector_header_is_not_logged_with_its_credential(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    """Repro: `OTEL_EXPORTER_OTLP_HEADERS='authorization=Bearer tok;secret-7f3a'` (a `;` the spec wants
    URL-encoded), `embedding-proxy serve`.
    Observed: check-config says ok; at start-up the SDK logs WARNING "Header format invalid! ... :
    authorization=Bearer tok;secret-7f3a" (the collector's credential in the clear, once per exporter), drops the
    header, and the proxy serves with every export refused by the collector (counted as export_failed).
    Expected: a config error naming OTEL_EXPORTER_OTLP_HEADERS without its value, and no credential in any log.
    Root cause: proxy/tracing.py:traces_endpoint does not parse the headers variables; the SDK's
    opentelemetry.util.re.parse_env_headers logs the raw value (reached from otel.py:214, OTLPSpanExporter())."""
    for name in ("PROXY_CONFIG", "REDIS_URL", "CACHE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    otel_env(monkeypatch, "http://127.0.0.1:4318", OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer tok;secret-7f3a")
    monkeypatch.setenv("UPSTREAM_BASE_URL", "http://127.0.0.1:9/v1")
    caplog.set_level(logging.INFO)
    from proxy.telemetry.metrics import Metrics
    from proxy.telemetry.tracing import start

    code = main(["check-config"])
    err = capsys.readouterr().err
    if code == 0:  # accepted: then the exporter must not log the credential when it is made
        tracing = start(os.environ, Metrics())
        assert isinstance(tracing, otel.OtelTracing)
        tracing.provider.shutdown()
    else:
        assert code == 2 and "OTEL_EXPORTER_OTLP_HEADERS" in err
    assert "secret-7f3a" not in err
    assert not [r.getMessage()[:120] for r in caplog.records if "secret-7f3a" in r.getMessage()]

