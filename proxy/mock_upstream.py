"""A deterministic OpenAI-compatible fake embeddings upstream, for tests, demos and benchmarks.

A vector depends only on the model and the input's cl100k_base token ids, so a string and its ids embed alike
(a model with a `tokenizer` file counts and embeds by that tokenizer's ids, special tokens included, as TEI does).
Failures queued with `MockState.fail_next` (or `POST /_mock/fail`) are consumed one per embeddings request; their
kinds are in mock_faults.py.
Azure OpenAI's route (`/openai/deployments/{name}/embeddings?api-version=V`, `api-key` header) answers alike, and
with `rpm`/`tpm` set the mock enforces a rate limit per window and sends OpenAI's x-ratelimit-* headers.
What it billed (the usage of each answer sent with 200 and no injected failure) is counted in all and per request
`user` (`MockState.billed`, `GET /_mock/stats`), for tests that compare it with the proxy's ledger.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import tokenizers
import xxhash
from aiohttp import web

from .mock_faults import FAIL_MODES, MALFORMED_MODES, Failure, malform
from .tokens import get_encoding

ENCODING = "cl100k_base"
MAX_INPUTS = 2048  # inputs per request, as OpenAI
MAX_INPUT_TOKENS = 8192  # tokens per input
MAX_REQUEST_TOKENS = 300_000  # tokens summed over a request's inputs
MAX_BODY_BYTES = 64 * 1024 * 1024  # aiohttp's 1 MiB default is below what OpenAI's limits allow
KEPT_BODIES = 100
TIMEOUT_SLEEP = 60.0  # the "timeout" failure's stall; cut short when the app shuts down
FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})  # anything else is refused
HUGE_BODY_BYTES = 64 * 1024 * 1024  # the "huge_body" answer's padding, streamed: far above any answer's size
_JSON = "application/json"
_MALFORMED = object()  # stands for a body that is not JSON


@dataclasses.dataclass(frozen=True)
class MockModel:
    dimensions: int
    supports_dimensions: bool
    tokenizer: str | None = None  # a Hugging Face tokenizer.json: text is counted and embedded by its ids


def _default_models() -> dict[str, MockModel]:
    small, large, ada = MockModel(1536, True), MockModel(3072, True), MockModel(1536, False)
    return {"text-embedding-3-small": small, "text-embedding-3-large": large, "text-embedding-ada-002": ada}


@dataclasses.dataclass
class MockSettings:
    api_key: str | None = None  # when set, /v1 requests need `Authorization: Bearer <api_key>`
    latency_ms: float = 0.0  # added sleep per embeddings request
    token_skew: int = 0  # extra tokens reported in `usage` per input
    shuffle: bool = False  # return `data` in reversed order (indexes stay correct)
    floats_only: bool = False  # answer float arrays even when asked for base64, as some compatible servers do
    models: dict[str, MockModel] = dataclasses.field(default_factory=_default_models)
    # Azure route: deployment name -> model (a deployment named like a model serves that model).
    azure_deployments: dict[str, str] = dataclasses.field(default_factory=dict)
    # Rate limits per window (0: none), counted over requests that were answered (429s are not counted).
    rpm: int = 0
    tpm: int = 0
    rate_window_s: float = 60.0


class MockState:
    """Counters and pending failures of one mock app."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()  # set on app shutdown, so a "timeout" stall does not hold it up
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.inputs = 0
        # What it billed: the usage of every well-formed 200 answer it sent, in all and per request `user`.
        self.billed_tokens = 0
        self.billed: collections.Counter[str] = collections.Counter()
        self.last_authorization: str | None = None
        self.bodies: list[dict[str, Any]] = []
        self.pending: collections.deque[Failure] = collections.deque()
        self.huge_body_sent = 0  # bytes of "huge_body" answers the client took before it hung up
        self.last_path: str | None = None  # path and query of the last embeddings request
        self.last_api_key: str | None = None  # its `api-key` header (Azure)
        self.last_traceparent: str | None = None  # its W3C `traceparent` header (tracing tests)
        self.last_tracestate: str | None = None
        self.rate_limited = 0  # 429s sent for the rpm/tpm limit
        self.window_start = -math.inf
        self.window_requests = 0
        self.window_tokens = 0

    def fail_next(self, mode: str, times: int = 1, status: int = 500, retry_after: float | str | None = None,
                  retry_after_ms: str | None = None) -> None:
        """Queue `times` failures. The "status" mode's `retry_after` in seconds is sent as both `Retry-After` and
        `retry-after-ms`; a string (`"1e309"`, `"soon"`, a date) as `Retry-After` alone, verbatim, and
        `retry_after_ms` as `retry-after-ms`, verbatim."""
        if mode not in FAIL_MODES:
            raise ValueError(f"unknown failure mode {mode!r}; known: {sorted(FAIL_MODES)}")
        if times < 1 or not 100 <= status <= 599:
            raise ValueError("times must be >= 1 and status a valid HTTP status")
        self.pending.extend([Failure(mode, status, retry_after, retry_after_ms)] * times)


MOCK_STATE = web.AppKey("mock_state", MockState)
MOCK_SETTINGS = web.AppKey("mock_settings", MockSettings)


def vector_for(model: str, token_ids: Sequence[int] | npt.NDArray[Any], native_dims: int,
               dimensions: int | None) -> npt.NDArray[np.float32]:
    seed = xxhash.xxh64_intdigest(model.encode() + b"\0" + np.asarray(token_ids, dtype="<u4").tobytes())
    v = np.random.default_rng(seed).standard_normal(native_dims, dtype=np.float32)
    v /= np.linalg.norm(v)
    if dimensions:
        v = v[:dimensions]
        v /= np.linalg.norm(v)
    return v


class _Invalid(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def _error(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type=_JSON)


def _count_items(raw: Any) -> int:
    if isinstance(raw, list) and raw:
        return len(raw) if isinstance(raw[0], str | list) else 1
    return int(isinstance(raw, str))


def _parse_input(raw: Any) -> list[list[int]]:
    """Token ids per input; raises _Invalid for anything OpenAI refuses."""
    enc = get_encoding(ENCODING)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise _Invalid("'input' must be a non-empty string or array.", "input")
    if len(raw) > MAX_INPUTS and type(raw[0]) is not int:  # one array of token ids is one input
        raise _Invalid(f"Invalid 'input': maximum array size is {MAX_INPUTS}, got {len(raw)}.", "input")
    if all(isinstance(s, str) for s in raw):
        if not all(raw):
            raise _Invalid("Invalid 'input': strings must not be empty.", "input")
        ids: list[list[int]] = [enc.encode_ordinary(s) for s in raw]  # encode_ordinary_batch: slower here
    elif type(raw[0]) is int or all(isinstance(t, list) for t in raw):
        ids = [raw] if type(raw[0]) is int else raw
        for i, t in enumerate(ids):
            if not t or not all(type(x) is int and 0 <= x < enc.n_vocab for x in t):
                raise _Invalid(f"Invalid 'input[{i}]': a token array must be non-empty integers in [0, {enc.n_vocab}).",
                               "input")
    else:
        raise _Invalid("'input' must be a string, an array of strings, of integers or of integer arrays.", "input")
    if (longest := max(map(len, ids))) > MAX_INPUT_TOKENS:
        raise _Invalid(f"Invalid 'input': maximum input length is {MAX_INPUT_TOKENS} tokens, got {longest}.", "input")
    if (total := sum(map(len, ids))) > MAX_REQUEST_TOKENS:
        raise _Invalid(f"Requested {total} tokens, max {MAX_REQUEST_TOKENS} tokens per request.", "input")
    return ids


def _parse_request(body: Any, models: dict[str, MockModel]) -> tuple[str, list[list[int]], bool, int | None]:
    if body is _MALFORMED:
        raise _Invalid("We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        raise _Invalid("The request body must be a JSON object.")
    if unknown := sorted(set(body) - FIELDS):
        raise _Invalid(f"Unrecognized request argument supplied: {unknown[0]}")
    model, fmt, dims = body.get("model"), body.get("encoding_format"), body.get("dimensions")
    if not isinstance(model, str) or not model:
        raise _Invalid("You must provide a model parameter (a string).", "model")
    if "input" not in body:
        raise _Invalid("Missing required parameter: 'input'.", "input")
    if model not in models:
        raise _Invalid(f"The model `{model}` does not exist.", None, 404, "model_not_found")
    spec = models[model]
    if fmt not in (None, "float", "base64"):
        raise _Invalid("Invalid 'encoding_format': must be 'float' or 'base64'.", "encoding_format")
    if dims is not None:
        if type(dims) is not int or not 1 <= dims <= spec.dimensions:
            raise _Invalid(f"Invalid 'dimensions': must be an integer in [1, {spec.dimensions}].", "dimensions")
        if not spec.supports_dimensions:
            raise _Invalid(f"The model `{model}` does not support specifying dimensions.", "dimensions")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _Invalid("Invalid 'user': must be a string.", "user")
    ids = _parse_input(body["input"])
    if spec.tokenizer is not None:
        raw = body["input"]
        texts = [raw] if isinstance(raw, str) else raw
        if not all(isinstance(t, str) for t in texts):
            raise _Invalid(f"The model `{model}` takes text only.", "input")
        ids = [e.ids for e in _hf(spec.tokenizer).encode_batch(texts, add_special_tokens=True)]
    return model, ids, fmt == "base64", dims


@functools.cache
def _hf(path: str) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(path)


def _embedding_item(index: int, vec: npt.NDArray[np.float32], b64: bool) -> dict[str, Any]:
    emb: Any
    if b64:
        emb = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    elif vec.size and np.isnan(vec[0]):  # JSON has no NaN: write it as Python json does
        emb = orjson.Fragment(b"[NaN" + orjson.dumps(vec, option=orjson.OPT_SERIALIZE_NUMPY)[len(b"[null"):])
    else:
        emb = vec
    return {"object": "embedding", "index": index, "embedding": emb}


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


def _duration(seconds: float) -> str:
    """OpenAI's reset format (`1s`, `6m0s`, `850ms`), rounded up so a client that trusts it is never early."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms / 1000, 60)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


def _rate_limit(state: MockState, settings: MockSettings, tokens: int) -> tuple[bool, dict[str, str]]:
    """Whether a call of `tokens` fits the current window (and is counted), and the headers to send."""
    if not settings.rpm and not settings.tpm:
        return True, {}
    now = time.monotonic()
    if now >= state.window_start + settings.rate_window_s:
        state.window_start, state.window_requests, state.window_tokens = now, 0, 0
    fits = (not settings.rpm or state.window_requests + 1 <= settings.rpm) and (
        not settings.tpm or state.window_tokens + tokens <= settings.tpm)
    if fits:
        state.window_requests += 1
        state.window_tokens += tokens
    reset = _duration(state.window_start + settings.rate_window_s - now)
    headers = {}
    for name, limit, used in (("requests", settings.rpm, state.window_requests),
                              ("tokens", settings.tpm, state.window_tokens)):
        if limit:
            headers[f"x-ratelimit-limit-{name}"] = str(limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - used))
            headers[f"x-ratelimit-reset-{name}"] = reset
    return fits, headers


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
    state.requests += 1
    state.last_authorization = request.headers.get("Authorization")
    state.last_api_key = request.headers.get("api-key")
    state.last_traceparent = request.headers.get("traceparent")
    state.last_tracestate = request.headers.get("tracestate")
    state.last_path = request.path_qs
    if azure_model is not None:
        if settings.api_key is not None and state.last_api_key != settings.api_key:
            return _error(401, "Access denied due to invalid subscription key.", code="401")
    elif (denied := _check_auth(request, settings)) is not None:
        return denied
    try:
        body: Any = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = _MALFORMED
    if isinstance(body, dict) and azure_model is not None:
        body = {"model": azure_model, **body}  # Azure's body names no model: the path does
    if isinstance(body, dict):
        state.bodies.append(body)
        del state.bodies[:-KEPT_BODIES]
        state.inputs += _count_items(body.get("input"))
    await asyncio.sleep(settings.latency_ms / 1000)
    mode = None
    if state.pending:
        failure = state.pending.popleft()
        mode = failure.mode
        if (answer := await _injected(request, failure)) is not None:
            return answer
    try:
        model, ids, b64, dims = _parse_request(body, settings.models)
    except _Invalid as exc:
        return _error(exc.status, exc.message, param=exc.param, code=exc.code)
    fits, rate_headers = _rate_limit(state, settings, sum(map(len, ids)))
    if not fits:
        state.rate_limited += 1
        return _error(429, "Rate limit reached for requests.", type_="requests", code="rate_limit_exceeded",
                      headers=rate_headers)
    vectors = [vector_for(model, t, settings.models[model].dimensions, dims) for t in ids]
    if mode == "wrong_count":
        vectors.pop()
    elif mode == "wrong_dims":
        vectors = [v[:-1] for v in vectors]
    elif mode == "nan":
        vectors[0] = np.concatenate([np.array([np.nan], dtype=np.float32), vectors[0][1:]])
    data = [_embedding_item(i, v, b64 and not settings.floats_only) for i, v in enumerate(vectors)]
    tokens = sum(map(len, ids)) + settings.token_skew * len(ids)
    doc = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    if mode in MALFORMED_MODES:
        malform(mode, doc, vectors)
    if settings.shuffle:
        data.reverse()
    if mode is None:
        state.billed_tokens += tokens
        state.billed[body.get("user") or ""] += tokens
    payload = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if mode == "huge_body":
        return await _huge_body(request, payload)
    return web.Response(body=payload, content_type=_JSON, headers=rate_headers)


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
    return _json({"requests": state.requests, "inputs": state.inputs, "billed_tokens": state.billed_tokens,
                  "billed": state.billed, "rate_limited": state.rate_limited})


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
