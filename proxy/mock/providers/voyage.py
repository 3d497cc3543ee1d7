"""Voyage AI's embeddings API as a strict mock: POST /v1/embeddings with `Authorization: Bearer KEY`.

Fields as Voyage documents them (input, model, input_type, truncation, output_dimension, output_dtype,
encoding_format); `input` and `model` required; `input_type` null, "query" or "document"; at most 1,000 inputs and
120K tokens per call; `truncation` defaults to true. Errors are `{"detail": ...}`.
"""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web

from .cohere import check_auth
from .common import (
    PROVIDER_SETTINGS,
    PROVIDER_STATE,
    ProviderMockSettings,
    Refused,
    check_dimensions,
    check_fields,
    check_texts,
    embed,
    endpoint,
    json_answer,
    model_of,
    new_app,
)

FIELDS = ("input", "model", "input_type", "truncation", "output_dimension", "output_dtype", "encoding_format")
MAX_TOKENS = 120_000


def error(exc: Refused) -> web.Response:
    return json_answer({"detail": exc.message}, exc.headers, exc.status)


async def _embeddings(request: web.Request, body: dict[str, Any]) -> web.Response:
    settings, state = request.app[PROVIDER_SETTINGS], request.app[PROVIDER_STATE]
    check_fields(body, FIELDS, ("input", "model"))
    spec = model_of(settings, body["model"])
    raw = body["input"]
    texts = check_texts([raw] if isinstance(raw, str) else raw, "input", 1000)
    input_type = body.get("input_type")
    if input_type not in (None, "query", "document"):
        raise Refused(400, "input_type must be null, 'query' or 'document'.")
    truncation = body.get("truncation", True)
    if not isinstance(truncation, bool):
        raise Refused(400, "truncation must be a boolean.")
    if body.get("output_dtype", "float") != "float":
        raise Refused(400, "This mock answers output_dtype 'float' only.")
    fmt = body.get("encoding_format")
    if fmt not in (None, "base64"):
        raise Refused(400, "encoding_format must be null or 'base64'.")
    dims = check_dimensions(spec, body.get("output_dimension"), "output_dimension")
    vectors, tokens = embed(state, settings, body["model"], texts, input_type, dims, truncation, MAX_TOKENS)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt else v.tolist()}
            for i, v in enumerate(vectors)]
    return json_answer({"object": "list", "data": data, "model": body["model"],
                        "usage": {"total_tokens": sum(tokens)}})


def create_app(settings: ProviderMockSettings) -> web.Application:
    app = new_app(settings)
    app.router.add_post("/v1/embeddings", endpoint(_embeddings, error, check_auth))
    return app
