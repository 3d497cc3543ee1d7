"""The proxy's own routes: the OpenAI-compatible /v1 API (embeddings, models) and the operations endpoints
(health, readiness, metrics). The admin API is in admin.py, the console's files in proxy/console."""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from ..accounts.keys import KeyRecord, check_model
from ..embeddings.request import parse_request
from ..embeddings.service import Trace
from ..errors import AuthenticationFailed, NotFound
from ..upstream import SERVED_BY
from .admission import miss_bytes, request_bytes
from .answers import error_response, json_response
from .appkeys import (
    ADMISSION,
    AUTH,
    CACHE_STORE,
    EMBEDDING,
    KEY,
    METRICS,
    METRICS_TOKEN,
    MODEL,
    QUOTAS,
    REQUEST_ID,
    SERVED,
    SERVICE,
    SETTINGS,
    STORE,
    TRACE,
)
from .body import read_charged
from .readiness import readiness
from .stream import send_answer


async def embeddings(request: web.Request) -> web.StreamResponse:
    """Under the admission budget (admission.py): its body as it arrives, exactly its parsed request and answer
    before the cache is read, the misses' upstream answer before it is asked for;
    all of it is held until the answer's last byte is sent."""
    app = request.app
    settings = app[SETTINGS]
    async with app[ADMISSION].lease() as lease:
        body = await read_charged(request, lease.take, settings.server.max_body_bytes)
        req = parse_request(body, settings.models)
        request[MODEL], request[EMBEDDING] = req.model, req
        key: KeyRecord = request[KEY]
        check_model(key, req.model)
        spec = settings.models[req.model]
        dims = req.dimensions or spec.dimensions
        await lease.settle(len(body) + request_bytes(req, len(body), dims))
        del body  # aiohttp keeps its own reference; this one need not outlive the parse

        async def on_misses(count: int) -> None:
            await lease.take(miss_bytes(count, dims, spec.upstream_base64))

        request[TRACE] = trace = Trace()
        served: list[str] = []
        request[SERVED] = served
        SERVED_BY.set(served)  # the upstream calls this request makes inherit it, and name their deployment in it
        outcome = await app[SERVICE].embed(req, key, await app[QUOTAS].ticket(key), trace,  # records it in the ledger
                                           on_misses=on_misses)
        app[METRICS].observe_embedding(
            key.team, key.id, req.model, inputs=trace.inputs, upstream_inputs=trace.upstream_inputs,
            prompt_tokens=outcome.prompt_tokens, billed_tokens=outcome.billed_tokens,
            price_per_million_tokens=spec.price_per_million_tokens,
        )
        headers = {"x-cache": outcome.cache, "x-request-id": request[REQUEST_ID],
                   **(outcome.ticket.headers if outcome.ticket is not None else {})}
        return await send_answer(request, req, outcome, app[SERVICE].local_cache, dims, headers)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "embedding-proxy"}


async def list_models(request: web.Request) -> web.Response:
    key: KeyRecord = request[KEY]
    names = [m for m in request.app[SETTINGS].models if key.allows(m)]
    return json_response({"object": "list", "data": [_model_card(m) for m in names]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    key: KeyRecord = request[KEY]
    if name not in request.app[SETTINGS].models or not key.allows(name):
        raise NotFound(f"The model '{name}' does not exist.", param="model", code="model_not_found")
    return json_response(_model_card(name))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Whether this process can serve (readiness.py): 200 also while it serves through a Redis outage."""
    app = request.app
    status, body = await readiness(app[SETTINGS], app[STORE], app[CACHE_STORE], app[AUTH])
    return json_response(body, status)


def _bearer_matches(header: str | None, token: str) -> bool:
    """Constant-time; header bytes that are not UTF-8 (aiohttp hands them on as surrogates) are a mismatch."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass"))


async def metrics(request: web.Request) -> web.Response:
    token = request.app[METRICS_TOKEN]
    if token and not _bearer_matches(request.headers.get("Authorization"), token):
        # answered here, not raised: the --metrics-port app has no error middleware
        resp = error_response(AuthenticationFailed(
            "The metrics need 'Authorization: Bearer <metrics token>' (PROXY_METRICS_TOKEN).",
            code="invalid_metrics_token"))
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")
