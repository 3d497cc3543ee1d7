"""The Gemini API's batchEmbedContents as a strict mock: POST /v1beta/models/{model}:batchEmbedContents with
`x-goog-api-key: KEY`.

Each of `requests` (at most 100) names the path's model as `models/{model}` and holds `content.parts[].text`; its
optional fields are taskType (RETRIEVAL_QUERY, RETRIEVAL_DOCUMENT, SEMANTIC_SIMILARITY, CLASSIFICATION, CLUSTERING,
QUESTION_ANSWERING, FACT_VERIFICATION, CODE_RETRIEVAL_QUERY), title (RETRIEVAL_DOCUMENT only) and
outputDimensionality. An unknown field is refused as Google refuses it ("Invalid JSON payload received. Unknown
name"). The answer counts no tokens (as the real one); what it would bill is still booked. Errors are Google's
`{"error": {"code", "message", "status"}}`; a wrong key is a 400 with reason API_KEY_INVALID, as Google answers.
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
    embed,
    endpoint,
    json_answer,
    model_of,
    new_app,
)

TASKS = ("RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY", "CLASSIFICATION", "CLUSTERING",
         "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY")
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def google_error(exc: Refused, details: list[dict[str, Any]] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": exc.status, "message": exc.message, "status": _STATUS.get(exc.status, "UNKNOWN")}
    if exc.status == 429 and "x-retry-delay" in exc.headers:  # a RetryInfo, as Google sends with quota errors
        details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": exc.headers.pop("x-retry-delay")}]
    if details:
        error["details"] = details
    return json_answer({"error": error}, exc.headers, exc.status)


def _check_key(request: web.Request, raw: bytes) -> None:
    key = request.headers.get("x-goog-api-key")
    if key is None:
        raise Refused(403, "Method doesn't allow unregistered callers. Please use API Key or other form of API "
                           "consumer identity to call this API.")
    if key != request.app[PROVIDER_SETTINGS].api_key:
        raise Refused(400, "API key not valid. Please pass a valid API key.", {"x-reason": "API_KEY_INVALID"})


def _error(exc: Refused) -> web.Response:
    if exc.headers.pop("x-reason", None) == "API_KEY_INVALID":
        return google_error(exc, [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                                   "domain": "googleapis.com"}])
    return google_error(exc)


async def _batch(request: web.Request, body: dict[str, Any]) -> web.Response:
    settings, state = request.app[PROVIDER_SETTINGS], request.app[PROVIDER_STATE]
    name, _, method = request.match_info["spec"].partition(":")
    if method != "batchEmbedContents":
        raise Refused(404, "Method not found.")
    spec = model_of(settings, name)
    check_fields(body, ("requests",), ("requests",))
    requests = body["requests"]
    if not isinstance(requests, list) or not 1 <= len(requests) <= 100:
        raise Refused(400, "* BatchEmbedContentsRequest.requests: at least 1 and at most 100 requests.")
    texts, tasks, sizes = [], set(), set()
    for i, one in enumerate(requests):
        where = f"requests[{i}]."
        if not isinstance(one, dict):
            raise Refused(400, f"Invalid JSON payload received. {where} must be an object.")
        check_fields(one, ("model", "content", "taskType", "title", "outputDimensionality"), ("model", "content"),
                     where)
        if one["model"] != f"models/{name}":
            raise Refused(400, f"* BatchEmbedContentsRequest.{where}model: unexpected model name format")
        parts = one["content"].get("parts") if isinstance(one["content"], dict) else None
        if not isinstance(parts, list) or len(parts) != 1 or set(parts[0]) != {"text"} or not parts[0]["text"]:
            raise Refused(400, f"* BatchEmbedContentsRequest.{where}content: one text part is expected")
        if one.get("taskType", "RETRIEVAL_QUERY") not in TASKS:
            raise Refused(400, f"Invalid value at '{where}task_type'")
        if "title" in one and one.get("taskType") != "RETRIEVAL_DOCUMENT":
            raise Refused(400, "title is only applicable to RETRIEVAL_DOCUMENT")
        texts.append(parts[0]["text"])
        tasks.add(one.get("taskType"))
        sizes.add(check_dimensions(spec, one.get("outputDimensionality"), "output_dimensionality"))
    if len(tasks) != 1 or len(sizes) != 1:
        raise Refused(400, "This mock embeds one taskType and outputDimensionality per batch.")
    vectors, _ = embed(state, settings, name, texts, tasks.pop(), sizes.pop(), False)
    return json_answer({"embeddings": [{"values": v.tolist()} for v in vectors]})


def create_app(settings: ProviderMockSettings) -> web.Application:
    app = new_app(settings)
    app.router.add_post("/v1beta/models/{spec}", endpoint(_batch, _error, _check_key))
    return app
