"""A deterministic OpenAI-compatible fake embeddings upstream, for tests, demos and benchmarks.

A vector depends only on the model and the input's cl100k_base token ids, so a string and its ids embed alike
(a model with a `tokenizer` file counts and embeds by that tokenizer's ids, special tokens included as TEI does, or
left out as Infinity does with `special_tokens=False`).
Failures queued with `MockState.fail_next` (or `POST /_mock/fail`) are consumed one per embeddings request; their
kinds are in faults.py.
Azure OpenAI's route (`/openai/deployments/{name}/embeddings?api-version=V`, `api-key` header) answers alike, and
with `rpm`/`tpm` set the mock enforces a rate limit per window and sends OpenAI's x-ratelimit-* headers (or, with
`announce_limits = False`, enforces it without a word: a bare 429), and `max_in_flight` answers 429 to a call beyond
that many at once. `GET /_mock/stats` tells the most calls it had in flight at once and the busiest window.
What it billed (the true token count of every 200 answer it sent: a malformed one too, as an upstream bills the work
whatever the client makes of the answer, and a stalled one once it answers) is counted in all and per request
`user` (`MockState.billed`, `GET /_mock/stats`), for tests that compare it with the proxy's ledger.
As Infinity does (issue 15), `strip_empty` counts an input of only whitespace, control and format characters as 0
tokens (answered 200), and `max_chars` refuses a longer input string with FastAPI's 422 validation error.

The parts: state.py (settings, counters, the rate-limit window), inputs.py (what it accepts, as OpenAI and as
Infinity), vectors.py (the deterministic vectors), faults.py (injected failures); this module is the HTTP face
(routes and handlers) and names the public surface: `from proxy.mock.upstream import MockSettings, create_mock_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from ..tokens import get_encoding
from .faults import MALFORMED_MODES, Failure, malform
from .inputs import ENCODING, MALFORMED, Invalid, blank, count_items, parse_request, too_long_answer
from .state import MOCK_SETTINGS, MOCK_STATE, MockModel, MockSettings, MockState, busiest_window, rate_limit
from .vectors import embedding_item, vector_for

__all__ = [
    "HUGE_BODY_BYTES",
    "MOCK_SETTINGS",
    "MOCK_STATE",
    "MockModel",
    "MockSettings",
    "MockState",
    "create_mock_app",
    "run",
    "serve_mock",
    "vector_for",
]

MAX_BODY_BYTES = 64 * 1024 * 1024  # aiohttp's 1 MiB default is below what OpenAI's limits allow
KEPT_BODIES = 100
TIMEOUT_SLEEP = 60.0  # the "timeout" failure's stall; cut short when the app shuts down
HUGE_BODY_BYTES = 64 * 1024 * 1024  # the "huge_body" answer's padding, streamed: far above any answer's size
_JSON = "application/json"


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type=_JSON)


def _check_auth(request: web.Request, settings: MockSettings) -> web.Response | None:
    if settings.api_key is None or request.headers.get("Authorization") == f"Bearer {settings.api_key}":
        return None
    return _error(401, "Incorrect API key provided.", code="invalid_api_key")


async def _injected(request: web.Request, failure: Failure) -> web.StreamResponse | None:
    """The answer for an injected failure, or None when normal handling follows."""
    mode, status = failure.mode, failure.status
    if mode == "status":
        return _error(status, f"Injected failure (status {status}).", headers=failure.headers(),
                      type_="server_error" if status >= 500 else "invalid_request_error",
                      code="rate_limit_exceeded" if status == 429 else None)
    if mode == "garbage":
        return web.Response(body=b"<html>502 Bad Gateway: this is not JSON", content_type=_JSON)
    if mode == "disconnect":
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)  # never sent: writing to the aborted transport fails quietly
    if mode == "timeout":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(request.app[MOCK_STATE].closing.wait(), TIMEOUT_SLEEP)
    return None


async def _azure_embeddings(request: web.Request) -> web.StreamResponse:
    """Azure OpenAI: the deployment in the path, `api-version` required, the key in `api-key`."""
    settings = request.app[MOCK_SETTINGS]
    deployment = request.match_info["deployment"]
    model = settings.azure_deployments.get(deployment, deployment)
    if not request.query.get("api-version"):
        return _error(404, "Resource not found")  # what Azure answers without api-version
    if model not in settings.models:
        return _error(404, "The API deployment for this resource does not exist.", code="DeploymentNotFound")
    return await _embeddings(request, azure_model=model)


async def _embeddings(request: web.Request, azure_model: str | None = None) -> web.StreamResponse:
    state, settings = request.app[MOCK_STATE], request.app[MOCK_SETTINGS]
    _note(request, state)
    if settings.max_in_flight and state.in_flight >= settings.max_in_flight:
        state.rate_limited += 1
        return _error(429, "Too many concurrent requests.", type_="requests", code="rate_limit_exceeded")
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    try:
        return await _embed(request, state, settings, azure_model)
    finally:
        state.in_flight -= 1


async def _embed(request: web.Request, state: MockState, settings: MockSettings,
                 azure_model: str | None) -> web.StreamResponse:
    if azure_model is not None:
        if settings.api_key is not None and state.last_api_key != settings.api_key:
            return _error(401, "Access denied due to invalid subscription key.", code="401")
    elif (denied := _check_auth(request, settings)) is not None:
        return denied
    body = await _read_body(request, state, azure_model)
    inputs = count_items(body.get("input")) if isinstance(body, dict) else 0
    await asyncio.sleep((settings.latency_ms + settings.latency_per_input_ms * inputs) / 1000)
    mode = None
    if state.pending:
        failure = state.pending.popleft()
        mode = failure.mode
        if (answer := await _injected(request, failure)) is not None:
            return answer
    if settings.max_chars and (too_long := too_long_answer(body, settings.max_chars)) is not None:
        return too_long
    try:
        model, ids, b64, dims = parse_request(body, settings.models)
    except Invalid as exc:
        return _error(exc.status, exc.message, param=exc.param, code=exc.code)
    if settings.strip_empty:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        ids = [[] if isinstance(t, str) and blank(t) else i for t, i in zip(texts, ids, strict=True)]
    fits, rate_headers = rate_limit(state, settings, sum(map(len, ids)))
    if not fits:
        state.rate_limited += 1
        return _error(429, "Rate limit reached for requests.", type_="requests", code="rate_limit_exceeded",
                      headers=rate_headers)
    doc, tokens = _answer(settings, model, ids, b64, dims, mode)
    state.billed_tokens += tokens
    state.answered.append((time.monotonic(), tokens))
    state.billed[body.get("user") or ""] += tokens
    payload = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if mode == "huge_body":
        return await _huge_body(request, payload)
    return web.Response(body=payload, content_type=_JSON, headers=rate_headers)


def _note(request: web.Request, state: MockState) -> None:
    """What tests read back about the last embeddings request: its credentials, trace headers and path."""
    state.requests += 1
    state.last_authorization = request.headers.get("Authorization")
    state.last_api_key = request.headers.get("api-key")
    state.last_traceparent = request.headers.get("traceparent")
    state.last_tracestate = request.headers.get("tracestate")
    state.last_path = request.path_qs


async def _read_body(request: web.Request, state: MockState, azure_model: str | None) -> Any:
    """The JSON body (MALFORMED when it is not JSON), kept and its inputs counted; Azure's body names no model:
    the path does."""
    try:
        body: Any = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = MALFORMED
    if isinstance(body, dict) and azure_model is not None:
        body = {"model": azure_model, **body}
    if isinstance(body, dict):
        state.bodies.append(body)
        del state.bodies[:-KEPT_BODIES]
        state.inputs += count_items(body.get("input"))
    return body


def _answer(settings: MockSettings, model: str, ids: list[list[int]], b64: bool, dims: int | None,
            mode: str | None) -> tuple[dict[str, Any], int]:
    """The answer's document and the tokens it bills; a queued fault (`mode`) changes it (faults.py)."""
    vectors = [vector_for(model, t, settings.models[model].dimensions, dims) for t in ids]
    if mode == "wrong_count":
        vectors.pop()
    elif mode == "wrong_dims":
        vectors = [v[:-1] for v in vectors]
    elif mode == "nan":
        vectors[0] = np.concatenate([np.array([np.nan], dtype=np.float32), vectors[0][1:]])
    data = [embedding_item(i, v, b64 and not settings.floats_only) for i, v in enumerate(vectors)]
    tokens = sum(map(len, ids)) + settings.token_skew * len(ids)
    doc = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    if mode in MALFORMED_MODES:
        malform(mode, doc, vectors)
    if settings.shuffle:
        data.reverse()
    return doc, tokens


async def _huge_body(request: web.Request, body: bytes) -> web.StreamResponse:
    """A correct answer followed by HUGE_BODY_BYTES of JSON whitespace, chunked, until the client hangs up."""
    state = request.app[MOCK_STATE]
    resp = web.StreamResponse(headers={"Content-Type": _JSON})
    await resp.prepare(request)
    pad = b" " * 65536
    try:
        await resp.write(body)
        for _ in range(HUGE_BODY_BYTES // len(pad)):
            await resp.write(pad)
            state.huge_body_sent += len(pad)
        await resp.write_eof()
    except ConnectionError:  # the client stopped reading: what it should do
        pass
    return resp


async def _models(request: web.Request) -> web.StreamResponse:
    if (denied := _check_auth(request, request.app[MOCK_SETTINGS])) is not None:
        return denied
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "mock"} for n in request.app[MOCK_SETTINGS].models]
    return _json({"object": "list", "data": data})


async def _stats(request: web.Request) -> web.StreamResponse:  # GET /_mock/stats, POST /_mock/reset
    state = request.app[MOCK_STATE]
    if request.method == "POST":
        state.reset()
    calls, tokens = busiest_window(state, request.app[MOCK_SETTINGS].rate_window_s)
    return _json({"requests": state.requests, "inputs": state.inputs, "billed_tokens": state.billed_tokens,
                  "billed": state.billed, "rate_limited": state.rate_limited, "peak_in_flight": state.peak_in_flight,
                  "busiest_window": {"requests": calls, "tokens": tokens}})


async def _fail(request: web.Request) -> web.StreamResponse:
    try:
        doc = orjson.loads(await request.read())
        wait, wait_ms = doc.get("retry_after"), doc.get("retry_after_ms")
        request.app[MOCK_STATE].fail_next(doc["mode"], int(doc.get("times", 1)), int(doc.get("status", 500)),
                                          wait if wait is None or isinstance(wait, str) else float(wait),
                                          None if wait_ms is None else str(wait_ms))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return _error(400, f"Bad failure spec: {exc!r}")
    return _json({"ok": True})


async def _on_shutdown(app: web.Application) -> None:
    app[MOCK_STATE].closing.set()


def create_mock_app(settings: MockSettings | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[MOCK_SETTINGS] = settings if settings is not None else MockSettings()
    app[MOCK_STATE] = MockState()
    get_encoding(ENCODING)  # load the BPE ranks (cached) now rather than during the first request
    app.on_shutdown.append(_on_shutdown)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/openai/deployments/{deployment}/embeddings", _azure_embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/_mock/stats", _stats)
    app.router.add_post("/_mock/reset", _stats)
    app.router.add_post("/_mock/fail", _fail)
    return app


async def serve_mock(host: str, port: int, settings: MockSettings) -> web.AppRunner:
    runner = web.AppRunner(create_mock_app(settings), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def run(host: str, port: int, settings: MockSettings) -> None:
    line = f"mock upstream listening on http://{host}:{port}/v1"  # printed once the port is bound
    web.run_app(create_mock_app(settings), host=host, port=port, print=lambda _: print(line, flush=True),
                access_log=None)
