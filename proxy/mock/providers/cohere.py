"""Cohere's v2 embed API as a strict mock: POST /v2/embed with `Authorization: Bearer KEY`.

Fields as Cohere documents them (model, texts, images, inputs, input_type, embedding_types, output_dimension,
max_tokens, truncate); `model` and `input_type` required (v3 models and later), at most 96 texts, this mock answers
`embedding_types: ["float"]` only. `output_dimension` only where the model has sizes (embed-v4.0). Over-long texts are
refused with truncate NONE. Errors are `{"id", "message"}`. Bedrock's Cohere models share the body checks
(`check_cohere_body`).
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from .common import (
    PROVIDER_SETTINGS,
    PROVIDER_STATE,
    ProviderMockSettings,
    ProviderModel,
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

INPUT_TYPES = ("search_document", "search_query", "classification", "clustering", "image")
FIELDS = ("model", "texts", "images", "inputs", "input_type", "embedding_types", "output_dimension", "max_tokens",
          "truncate")


def error(exc: Refused) -> web.Response:
    return json_answer({"id": str(uuid.uuid4()), "message": exc.message}, exc.headers, exc.status)


def check_auth(request: web.Request, raw: bytes) -> None:
    expected = f"Bearer {request.app[PROVIDER_SETTINGS].api_key}"
    if request.headers.get("Authorization") != expected:
        raise Refused(401, "invalid api token")


def check_cohere_body(body: dict[str, Any], spec: ProviderModel, fields: tuple[str, ...]) -> tuple[list[str], str,
                                                                                                    int | None, bool]:
    """(texts, input_type, output_dimension, truncate) of a valid body, or the refusal."""
    check_fields(body, fields, [f for f in ("model", "texts", "input_type") if f in fields])
    texts = check_texts(body["texts"], "texts", spec.max_inputs)
    if body["input_type"] not in INPUT_TYPES:
        raise Refused(400, f"invalid request: input_type must be one of {', '.join(INPUT_TYPES)}")
    if body.get("embedding_types", ["float"]) != ["float"]:
        raise Refused(400, "invalid request: this mock answers embedding_types [\"float\"] only")
    truncate = body.get("truncate", "END")
    if truncate not in ("NONE", "START", "END"):
        raise Refused(400, "invalid request: truncate must be one of NONE, START, END")
    dims = check_dimensions(spec, body.get("output_dimension"), "output_dimension")
    return texts, body["input_type"], dims, truncate != "NONE"


async def _embed(request: web.Request, body: dict[str, Any]) -> web.Response:
    settings, state = request.app[PROVIDER_SETTINGS], request.app[PROVIDER_STATE]
    spec = model_of(settings, body.get("model"))
    texts, input_type, dims, truncate = check_cohere_body(body, spec, FIELDS)
    vectors, tokens = embed(state, settings, body["model"], texts, input_type, dims, truncate)
    return json_answer({
        "id": str(uuid.uuid4()), "embeddings": {"float": [v.tolist() for v in vectors]}, "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": sum(tokens)}},
        "response_type": "embeddings_by_type",
    })


def create_app(settings: ProviderMockSettings) -> web.Application:
    app = new_app(settings)
    app.router.add_post("/v2/embed", endpoint(_embed, error, check_auth))
    return app
