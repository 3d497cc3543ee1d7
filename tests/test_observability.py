"""Access log lines and in-process metrics of one proxy app (`serve --workers 1`, tests)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.errors import (
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
    UpstreamBadGateway,
    UpstreamTimeout,
)
from proxy.http.accesslog import AccessLog, AccessRecord, access_line, error_code
from proxy.http.app import ACCESS_LOG
from proxy.telemetry.metrics import UPSTREAM_ERROR_KINDS, Metrics, upstream_error_kind
from tests.conftest import UPSTREAM_KEY, Proxy, ProxyFactory, Upstream, make_settings, settle

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def _lines(proxy: Proxy) -> list[dict[str, object]]:
    log = proxy.app[ACCESS_LOG]
    log.flush()
    assert isinstance(log.stream, io.BytesIO)
    return [json.loads(line) for line in log.stream.getvalue().splitlines()]


@pytest.fixture
async def logged(make_proxy: ProxyFactory, upstream: Upstream, redis_url: str) -> Proxy:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url), access_log=AccessLog(io.BytesIO()))
    return p


async def test_one_json_line_per_request_without_secrets(logged: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = logged
    key = await proxy.new_key("search")
    secret_text = "the quarterly numbers are confidential"
    resp = await proxy.embed(key, {"model": MODEL, "input": [secret_text, "hello"]}, **{"x-request-id": "req-1"})
    assert resp.status == 200
    prompt_tokens = (await resp.json())["usage"]["prompt_tokens"]
    await settle(proxy)
    resp = await proxy.embed(key, {"model": MODEL, "input": [secret_text]})
    assert resp.status == 200
    assert (await proxy.embed("sk-gateway-" + "n" * 43, {"model": MODEL, "input": "x"})).status == 401
    assert (await proxy.client.get("/v1/models/some-user-string", headers={"Authorization": f"Bearer {key}"})
            ).status == 404
    assert (await proxy.client.get("/healthz")).status == 200
    assert (await proxy.client.get("/metrics")).status == 200

    lines = _lines(proxy)
    assert [(line["path"], line["status"]) for line in lines] == [
        ("/v1/embeddings", 200), ("/v1/embeddings", 200), ("/v1/embeddings", 401), ("/v1/models/{model}", 404),
    ]  # probes and scrapes are not logged
    first, second, unauthorised, _ = lines
    assert first["request_id"] == "req-1" and first["team"] == "search" and str(first["key_id"]).startswith("key_")
    assert first["model"] == MODEL and first["inputs"] == 2 and first["cache"] == "miss"
    assert first["cache_hits"] == 0 and first["upstream_inputs"] == 2 and first["cached_tokens"] == 0
    assert first["prompt_tokens"] == prompt_tokens and float(str(first["upstream_ms"])) > 0
    assert second["cache"] == "hit" and second["cache_hits"] == 1 and second["cached_tokens"] == second[
        "prompt_tokens"] and second["upstream_ms"] == 0
    assert unauthorised["team"] == "" and unauthorised["error_code"] == "invalid_api_key"
    log = proxy.app[ACCESS_LOG].stream
    assert isinstance(log, io.BytesIO)
    text = log.getvalue().decode() + "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("proxy"))
    assert key not in text and secret_text not in text and UPSTREAM_KEY not in text and "some-user-string" not in text


async def test_failed_request_keeps_its_counts(logged: Proxy, upstream: Upstream) -> None:
    key = await logged.new_key("search")
    upstream.state.fail_next("status", times=100, status=500)
    resp = await logged.embed(key, {"model": MODEL, "input": ["a", "b", "a"]})
    assert resp.status == 502
    (line,) = _lines(logged)
    assert line["status"] == 502 and line["error_code"] == "upstream_error"
    assert line["inputs"] == 3 and line["upstream_inputs"] == 2 and line["prompt_tokens"] == 0
    assert float(str(line["upstream_ms"])) > 0


def test_access_log_buffers_and_flushes() -> None:
    stream = io.BytesIO()
    log = AccessLog(stream)
    log.add(b'{"a":1}')
    assert stream.getvalue() == b""  # buffered until the next flush
    log.flush()
    assert stream.getvalue() == b'{"a":1}\n'
    big = b"x" * 40_000
    log.add(big)
    log.add(big)  # over 64 KiB waiting: written at once
    assert stream.getvalue() == b'{"a":1}\n' + big + b"\n" + big + b"\n"
    off = AccessLog(None)
    assert not off.enabled
    off.add(b"{}")
    off.flush()  # nothing to write to: no error


async def test_access_log_flushes_on_its_interval() -> None:
    stream = io.BytesIO()
    log = AccessLog(stream, flush_interval_s=0.01)
    task = asyncio.create_task(log.run())
    log.add(b"{}")
    for _ in range(200):
        if stream.getvalue():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    assert stream.getvalue() == b"{}\n"

async def test_upstream_key_is_in_no_log_line_and_no_response(
    make_proxy: Any, upstream: Upstream, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Retries, every failure mode and refused credentials, with every logger at DEBUG."""
    caplog.set_level(logging.DEBUG)  # the root: proxy.* and every library logger that propagates
    settings = make_settings(upstream.base_url, redis_url)
    ups = dict(settings.upstreams)
    ups["default"] = dataclasses.replace(ups["default"], deadline_s=1.5, attempt_timeout_s=0.3, max_retries=2)
    proxy = await make_proxy(dataclasses.replace(settings, upstreams=ups))
    key = await proxy.new_key("search")
    seen: list[str] = []

    async def call(inputs: list[str], expected: int) -> None:
        resp = await proxy.embed(key, {"model": MODEL, "input": inputs})
        assert resp.status == expected, await resp.text()
        seen.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")

    upstream.state.fail_next("status", times=2, status=503, retry_after=0.01)
    await call(["retried"], 200)
    for n, (mode, status, expected) in enumerate([
        ("status", 500, 502), ("status", 429, 429), ("status", 400, 400), ("status", 401, 502),
        ("disconnect", 500, 502), ("garbage", 500, 502), ("nan", 500, 502), ("timeout", 500, 504),
    ]):
        upstream.state.reset()
        upstream.state.fail_next(mode, times=3, status=status)
        await call([f"failing {n}"], expected)
        assert upstream.state.last_authorization == f"Bearer {UPSTREAM_KEY}"  # the key was sent each time
    upstream.state.reset()
    upstream.settings.api_key = "sk-some-other-key"  # the upstream now refuses the proxy's credentials
    await call(["refused"], 502)
    for path in ("/metrics", "/readyz", "/healthz"):
        resp = await proxy.client.get(path)
        seen.append(await resp.text())
    await settle(proxy)

    assert any(r.name == "proxy.upstream" and "retrying" in r.getMessage() for r in caplog.records)
    # DEBUG really is captured from library loggers (the proxy itself logs nothing at DEBUG; redis-py's one DEBUG
    # line, about maintenance notifications, is gone since they are off)
    logging.getLogger("aiohttp.client").debug("capture probe")
    assert any(r.levelno == logging.DEBUG and r.name == "aiohttp.client" for r in caplog.records)
    for record in caplog.records:
        assert UPSTREAM_KEY not in record.getMessage(), record.name
    assert UPSTREAM_KEY not in caplog.text  # formatted lines, tracebacks included
    assert all(UPSTREAM_KEY not in text for text in seen)


async def test_in_process_metrics(proxy: Proxy) -> None:
    key = await proxy.new_key("search")
    assert (await proxy.embed(key, {"model": MODEL, "input": ["a", "b"]})).status == 200
    await settle(proxy)
    assert (await proxy.embed(key, {"model": MODEL, "input": ["a", "b", "a"]})).status == 200
    text = await (await proxy.client.get("/metrics")).text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    by_name: dict[str, float] = {}
    for (name, _), v in samples.items():
        by_name[name] = by_name.get(name, 0) + v
    assert by_name["embedding_proxy_requests_in_flight"] == 0
    assert by_name["embedding_proxy_request_duration_seconds_count"] == 2
    assert by_name["embedding_proxy_batch_size_sum"] == 5
    assert by_name["embedding_proxy_cache_saved_tokens_total"] == 3
    assert by_name["embedding_proxy_cache_saved_usd_total"] == pytest.approx(3 * 0.02 / 1e6)
    assert by_name["embedding_proxy_upstream_cost_usd_total"] == pytest.approx(2 * 0.02 / 1e6)
    # fixed enums are exported at zero before anything happens
    assert samples[("embedding_proxy_cache_lookups_total", (("result", "error"),))] == 0
    assert samples[("embedding_proxy_redis_errors_total", (("op", "mget"),))] == 0
    assert samples[("embedding_proxy_upstream_errors_total", (("kind", "timeout"), ("model", MODEL)))] == 0


def test_apps_in_one_process_keep_their_own_registries() -> None:
    a, b = Metrics(), Metrics()
    a.requests.labels("t", "k", "m", "2xx", "hit").inc()
    assert b"embedding_proxy_requests_total{" in a.render()
    assert b"embedding_proxy_requests_total{" not in b.render()


def test_upstream_error_kinds() -> None:
    assert upstream_error_kind(UpstreamTimeout("x")) == "timeout"
    assert upstream_error_kind(ServiceUnavailable("x")) == "unavailable"
    assert upstream_error_kind(RateLimited("x")) == "rate_limited"
    assert upstream_error_kind(InvalidRequest("x")) == "invalid_request"
    assert upstream_error_kind(None) == "other"
    # clients see `upstream_error` for all three; the metrics tell them apart
    for kind in ("bad_gateway", "auth", "connect"):
        err = UpstreamBadGateway("x", kind=kind)
        assert err.body()["error"]["code"] == "upstream_error" and err.to_json().count(b'"upstream_error"') == 1
        assert upstream_error_kind(err) == kind
    assert upstream_error_kind(UpstreamBadGateway("x")) == "bad_gateway"
    assert set(UPSTREAM_ERROR_KINDS) >= {"auth", "connect", "invalid_request", "bad_gateway"}


def test_access_line_literal() -> None:
    line = access_line(AccessRecord("r1", "POST", "/v1/embeddings", 200, 1.23456, team="t", key_id="key_1"),
                       now=1700000000.0)
    doc = json.loads(line)
    assert doc["ts"] == 1700000000.0 and doc["duration_ms"] == 1.235 and doc["status"] == 200
    assert list(doc)[:6] == ["ts", "pid", "request_id", "method", "path", "status"]
    assert error_code(401, b'{"error": {"code": "invalid_api_key"}}') == "invalid_api_key"
    assert error_code(200, b"{}") == "" and error_code(500, b"not json") == ""


def test_counts_are_kept_until_flushed_and_every_render_flushes() -> None:
    m = Metrics()
    m.add(m.requests, "t", "k", "m", "2xx", "hit")
    m.add(m.requests, "t", "k", "m", "2xx", "hit", amount=2)
    m.add(m.local_hits, amount=5)
    m.in_flight_now = 3
    assert m.requests.labels("t", "k", "m", "2xx", "hit")._value.get() == 0  # not written yet
    text = m.render().decode()  # a scrape writes them first
    assert 'embedding_proxy_requests_total{cache="hit",key_id="k",model="m",status_class="2xx",team="t"} 3.0' in text
    assert "embedding_proxy_cache_local_hits_total 5.0" in text
    assert "embedding_proxy_requests_in_flight 3.0" in text
    m.in_flight_now = 0
    m.flush()
    assert "embedding_proxy_requests_in_flight 0.0" in m.render().decode()
    assert 'status_class="2xx",team="t"} 3.0' in m.render().decode()  # written once, not again
