"""Vertex AI's predict for text-embedding models as a strict mock:
POST /v1/projects/{project}/locations/{location}/publishers/google/models/{model}:predict with
`Authorization: Bearer TOKEN`, a token its test token endpoint issued and that has not expired (googletoken.py).

`instances` (at most the model's max_inputs) each hold `content`, and optionally task_type (RETRIEVAL_QUERY,
RETRIEVAL_DOCUMENT, SEMANTIC_SIMILARITY, CLASSIFICATION, CLUSTERING, QUESTION_ANSWERING, FACT_VERIFICATION,
CODE_RETRIEVAL_QUERY) and title; `parameters` holds autoTruncate (default true) and outputDimensionality. Each
prediction counts its input's tokens (`statistics.token_count`). Errors are Google's.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

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
from .gemini import TASKS, google_error


def _check_token(request: web.Request, raw: bytes) -> None:
    issued = request.app[PROVIDER_SETTINGS].issued
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or issued is None or not issued.valid(auth[len("Bearer "):]):
        raise Refused(401, "Request had invalid authentication credentials. Expected OAuth 2 access token.")


async def _predict(request: web.Request, body: dict[str, Any]) -> web.Response:
    settings, state = request.app[PROVIDER_SETTINGS], request.app[PROVIDER_STATE]
    name, _, method = request.match_info["spec"].partition(":")
    if method != "predict":
        raise Refused(404, "Method not found.")
    spec = model_of(settings, name)
    check_fields(body, ("instances", "parameters"), ("instances",))
    instances = body["instances"]
    if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
        raise Refused(400, "instances must be an array of objects")
    tasks = set()
    for i, one in enumerate(instances):
        check_fields(one, ("content", "task_type", "title"), ("content",), f"instances[{i}].")
        if one.get("task_type", "RETRIEVAL_QUERY") not in TASKS:
            raise Refused(400, f"Invalid task_type: {one.get('task_type')!r}")
        tasks.add(one.get("task_type"))
    texts = check_texts([one["content"] for one in instances], "instances", spec.max_inputs)
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise Refused(400, "parameters must be an object")
    check_fields(parameters, ("autoTruncate", "outputDimensionality"), (), "parameters.")
    truncate = parameters.get("autoTruncate", True)
    if not isinstance(truncate, bool) or len(tasks) != 1:
        raise Refused(400, "autoTruncate must be a boolean; this mock embeds one task_type per call")
    dims = check_dimensions(spec, parameters.get("outputDimensionality"), "outputDimensionality")
    vectors, tokens = embed(state, settings, name, texts, tasks.pop(), dims, truncate)
    predictions = [{"embeddings": {"statistics": {"truncated": False, "token_count": n}, "values": v.tolist()}}
                   for v, n in zip(vectors, tokens, strict=True)]
    return json_answer({"predictions": predictions,
                        "metadata": {"billableCharacterCount": sum(len(t) for t in texts)}})


def create_app(settings: ProviderMockSettings) -> web.Application:
    app = new_app(settings)
    route = "/v1/projects/{project}/locations/{location}/publishers/google/models/{spec}"
    app.router.add_post(route, endpoint(_predict, google_error, _check_token))
    return app
