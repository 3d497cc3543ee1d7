"""Access log lines and in-process metrics of one proxy app (`serve --workers 1`, tests)."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.accesslog import AccessRecord, access_line, error_code
from proxy.errors import UpstreamBadGateway
from proxy.metrics import UPSTREAM_ERROR_KINDS, Metrics, upstream_error_kind
from tests.conftest import UPSTREAM_KEY, Proxy, settle

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def _access(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxy.access"]


async def test_one_json_line_per_request_without_secrets(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
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

    lines = _access(caplog)
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
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert key not in text and secret_text not in text and UPSTREAM_KEY not in text and "some-user-string" not in text


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
    assert upstream_error_kind("upstream_timeout", 504) == "timeout"
    assert upstream_error_kind("service_unavailable", 503) == "unavailable"
    assert upstream_error_kind("rate_limit_exceeded", 429) == "rate_limited"
    assert upstream_error_kind("upstream_error", 502) == "bad_gateway"
    assert upstream_error_kind(None, 400) == "invalid_request"
    assert upstream_error_kind(None, 0) == "other"
    # clients see `upstream_error` for all three; the metrics tell them apart
    for kind in ("bad_gateway", "auth", "connect"):
        err = UpstreamBadGateway("x", kind=kind)
        assert err.body()["error"]["code"] == "upstream_error" and err.to_json().count(b'"upstream_error"') == 1
        assert upstream_error_kind(err.code, err.status) == kind
    assert upstream_error_kind(UpstreamBadGateway("x").code, 502) == "bad_gateway"
    assert set(UPSTREAM_ERROR_KINDS) >= {"auth", "connect", "invalid_request", "bad_gateway"}


def test_access_line_literal() -> None:
    line = access_line(AccessRecord("r1", "POST", "/v1/embeddings", 200, 1.23456, team="t", key_id="key_1"),
                       now=1700000000.0)
    doc = json.loads(line)
    assert doc["ts"] == 1700000000.0 and doc["duration_ms"] == 1.235 and doc["status"] == 200
    assert list(doc)[:6] == ["ts", "pid", "request_id", "method", "path", "status"]
    assert error_code(401, b'{"error": {"code": "invalid_api_key"}}') == "invalid_api_key"
    assert error_code(200, b"{}") == "" and error_code(500, b"not json") == ""
