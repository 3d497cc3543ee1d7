"""Jina AI's embeddings API as a strict mock: POST /v1/embeddings with `Authorization: Bearer KEY`.

Fields as Jina documents them (model, input, task, dimensions, embedding_type, normalized, late_chunking, truncate);
`model` and `input` required; `task` one of retrieval.query, retrieval.passage, separation, classification,
text-matching; this mock answers `embedding_type` "float" only. Errors are FastAPI's `{"detail": ...}`.
"""

from __future__ import annotations

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

FIELDS = ("model", "input", "task", "dimensions", "embedding_type", "normalized", "late_chunking", "truncate")
TASKS = ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching")


def error(exc: Refused) -> web.Response:
    return json_answer({"detail": exc.message}, exc.headers, exc.status)


async def _embeddings(request: web.Request, body: dict[str, Any]) -> web.Response:
    settings, state = request.app[PROVIDER_SETTINGS], request.app[PROVIDER_STATE]
    check_fields(body, FIELDS, ("model", "input"))
    spec = model_of(settings, body["model"])
    texts = check_texts(body["input"], "input", spec.max_inputs)
    task = body.get("task")
    if task is not None and task not in TASKS:
        raise Refused(422, f"task must be one of {', '.join(TASKS)}.")
    if body.get("embedding_type", "float") != "float":
        raise Refused(422, "This mock answers embedding_type 'float' only.")
    truncate = body.get("truncate", False)
    if not isinstance(truncate, bool):
        raise Refused(422, "truncate must be a boolean.")
    dims = check_dimensions(spec, body.get("dimensions"), "dimensions")
    vectors, tokens = embed(state, settings, body["model"], texts, task, dims, truncate)
    data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
    return json_answer({"model": body["model"], "object": "list", "data": data,
                        "usage": {"total_tokens": sum(tokens), "prompt_tokens": sum(tokens)}})


def create_app(settings: ProviderMockSettings) -> web.Application:
    app = new_app(settings)
    app.router.add_post("/v1/embeddings", endpoint(_embeddings, error, check_auth))
    return app
