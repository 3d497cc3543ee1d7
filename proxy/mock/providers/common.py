"""What the provider mocks share: their settings and counters, the strict checks of a JSON body, the vectors (the
project's deterministic ones, by model, input type and text) and what each input bills.

A provider mock refuses what its provider refuses: a missing or wrong credential, an unknown field, a missing
required one, a value outside its documented set. It records every body it accepted (`bodies`), what it billed
(`billed_tokens`) and which input types it was sent, for tests to compare with the proxy's answers and ledger.
Failures queued with `fail_next` are answered in the provider's own error shape, one per call.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web

from ...tokens import get_encoding
from ..vectors import vector_for

ENCODING = "cl100k_base"
_JSON = "application/json"


@dataclasses.dataclass(frozen=True)
class ProviderModel:
    dimensions: int
    allowed_dimensions: tuple[int, ...] = ()  # the sizes its output-dimension field takes (empty: none)
    max_input_tokens: int = 8192  # longer inputs are refused unless the call asks to truncate
    max_inputs: int = 96  # per call
    default_dimensions: int = 0  # the size answered when none is asked for (0: `dimensions`; Voyage: 1024 of 2048)


@dataclasses.dataclass
class ProviderMockSettings:
    api_key: str = "provider-test-key"
    models: dict[str, ProviderModel] = dataclasses.field(default_factory=dict)
    extra_tokens: int = 1  # billed per input beyond its cl100k count: the provider's tokenizer is its own
    aws_keys: dict[str, str] = dataclasses.field(default_factory=dict)  # Bedrock: access key id -> secret key
    region: str = "us-east-1"  # Bedrock: the region signatures must name
    issued: Any = None  # Vertex: the tokens its token endpoint issued (googletoken.Issued)


class ProviderState:
    def __init__(self) -> None:
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []  # accepted bodies, in order
        self.billed_tokens = 0  # what it billed, in all (every 200 answer)
        self.calls_billed: list[int] = []  # per 200 answer
        self.input_types: list[str | None] = []  # the provider's input type of each accepted call
        self.call_sizes: list[int] = []  # inputs per accepted call
        # every vector answered: (text, the provider's input type, dimensions) -> the float32 vector
        self.sent: dict[tuple[str, str | None, int | None], npt.NDArray[np.float32]] = {}
        self.pending: collections.deque[tuple[int, str, dict[str, str]]] = collections.deque()

    def fail_next(self, status: int, message: str = "Injected failure.", headers: Mapping[str, str] | None = None,
                  times: int = 1) -> None:
        self.pending.extend([(status, message, dict(headers or {}))] * times)


PROVIDER_SETTINGS = web.AppKey("provider_settings", ProviderMockSettings)
PROVIDER_STATE = web.AppKey("provider_state", ProviderState)


class Refused(Exception):
    """An error answer in the provider's shape: `status`, `message`, extra headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


ErrorAnswer = Callable[[Refused], web.Response]
Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.Response]]


def json_answer(doc: Any, headers: Mapping[str, str] | None = None, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), content_type=_JSON,
                        headers=headers, status=status)


def endpoint(handle: Handler, error: ErrorAnswer,
             check_auth: Callable[[web.Request, bytes], None]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A POST route: credentials checked, a queued failure answered, the body read as a JSON object."""

    async def route(request: web.Request) -> web.Response:
        state = request.app[PROVIDER_STATE]
        state.requests += 1
        raw = await request.read()
        try:
            check_auth(request, raw)
            if state.pending:
                status, message, headers = state.pending.popleft()
                raise Refused(status, message, headers)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise Refused(400, "The request body is not valid JSON.") from None
            if not isinstance(body, dict):
                raise Refused(400, "The request body must be a JSON object.")
            answer = await handle(request, body)
            state.bodies.append(body)
            return answer
        except Refused as exc:
            return error(exc)

    return route


def check_fields(body: Mapping[str, Any], allowed: Collection[str], required: Collection[str],
                 where: str = "") -> None:
    """Refuse unknown and missing fields (400), as the providers' schemas do."""
    for name in body:
        if name not in allowed:
            raise Refused(400, f"Unknown field {where}{name!r}.")
    for name in required:
        if name not in body:
            raise Refused(400, f"Missing required field {where}{name!r}.")


def check_texts(texts: Any, field: str, most: int) -> list[str]:
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise Refused(400, f"'{field}' must be a non-empty array of non-empty strings.")
    if len(texts) > most:
        raise Refused(400, f"'{field}' holds {len(texts)} items; at most {most} are allowed per call.")
    return texts


def model_of(settings: ProviderMockSettings, name: Any) -> ProviderModel:
    if not isinstance(name, str) or name not in settings.models:
        raise Refused(404, f"Model {name!r} not found.")
    return settings.models[name]


def check_dimensions(spec: ProviderModel, value: Any, field: str) -> int | None:
    if value is None:
        return None
    if not spec.allowed_dimensions:
        raise Refused(400, f"'{field}' is not supported by this model.")
    if type(value) is not int or value not in spec.allowed_dimensions:
        raise Refused(400, f"'{field}' must be one of {list(spec.allowed_dimensions)}.")
    return value


def embed(state: ProviderState, settings: ProviderMockSettings, model: str, texts: list[str],
          input_type: str | None, dims: int | None, truncate: bool,
          max_total_tokens: int = 0) -> tuple[list[npt.NDArray[np.float32]], list[int]]:
    """Each text's vector (by model, input type and its cl100k ids) and billed tokens; over-long texts refused
    unless `truncate`, and a call over `max_total_tokens` (0: no limit). Books the call's bill and input type."""
    spec = settings.models[model]
    enc = get_encoding(ENCODING)
    vectors, tokens = [], []
    for text in texts:
        ids = enc.encode(text, disallowed_special=())
        if len(ids) > spec.max_input_tokens:
            if not truncate:
                raise Refused(400, f"input too long: {len(ids)} tokens, the model takes at most "
                                   f"{spec.max_input_tokens}")
            ids = ids[: spec.max_input_tokens]
        size = dims or (spec.default_dimensions if spec.default_dimensions else None)
        vectors.append(vector_for(f"{model}|{input_type or ''}", ids, spec.dimensions, size))
        tokens.append(len(ids) + settings.extra_tokens)
        state.sent[(text, input_type, dims)] = vectors[-1]
    if max_total_tokens and sum(tokens) > max_total_tokens:
        raise Refused(400, f"The batch holds {sum(tokens)} tokens; at most {max_total_tokens} are allowed.")
    state.billed_tokens += sum(tokens)
    state.calls_billed.append(sum(tokens))
    state.input_types.append(input_type)
    state.call_sizes.append(len(texts))
    return vectors, tokens


def new_app(settings: ProviderMockSettings) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[PROVIDER_SETTINGS] = settings
    app[PROVIDER_STATE] = ProviderState()
    get_encoding(ENCODING)
    return app
