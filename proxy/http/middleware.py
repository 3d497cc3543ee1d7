"""The request pipeline, outermost first: the request's trace span (only while tracing is on), observe (in-flight,
request metrics, access log: it sees the final answer), errors (and the request id), then auth for /v1 and /admin
(the console's static files excepted). Health, readiness and /metrics sit outside auth."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..accounts.keys import KeyRecord, bearer_key
from ..console import is_console
from ..embeddings.request import EmbeddingRequest
from ..embeddings.service import Trace
from ..errors import ProxyError, ServiceUnavailable
from ..stores.guard import StoreUnavailable
from ..telemetry.tracing import Span, server_attributes
from .accesslog import AccessRecord, access_line, error_code
from .adminauth import admin_request
from .answers import error_response, from_http_exception, internal_error
from .appkeys import ACCESS_LOG, AUTH, EMBEDDING, KEY, METRICS, MODEL, REQUEST_ID, SERVED, SETTINGS, TRACE, TRACING
from .routing import route_template

log = logging.getLogger("proxy.app")  # the name the app's log lines have always had

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch: echoed in a header, so never a newline
UNLOGGED = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: no access line, no span


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get("x-request-id", "")
    request[REQUEST_ID] = rid if _REQUEST_ID.fullmatch(rid) else os.urandom(16).hex()
    try:
        resp = await handler(request)
    except ProxyError as err:
        resp = error_response(err)
    except StoreUnavailable:  # only paths that cannot do without Redis (admin, key store) get here
        resp = error_response(ServiceUnavailable("The key and quota store is unreachable. Please retry."))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = error_response(from_http_exception(exc))
    except Exception:
        log.exception("unhandled error in request %s", request[REQUEST_ID])
        resp = internal_error()
    if request.content.exception() is not None:
        # The body broke off (body.read_body answered it): close after this answer, and mark the body read, or
        # aiohttp reads on into the broken stream after the answer and logs a traceback.
        request.content.feed_eof()
        resp.force_close()
    resp.headers["x-request-id"] = request[REQUEST_ID]
    return resp


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in UNLOGGED:
        return await handler(request)
    m = request.app[METRICS]
    is_embeddings = request.path == "/v1/embeddings"
    started = time.perf_counter()
    if is_embeddings:
        m.in_flight_now += 1
    try:
        resp = await handler(request)
    except web.HTTPException:
        raise
    except Exception:  # the error middleware answers every error: this is a fault of its own, still counted
        log.exception("error middleware failed in request %s", request.get(REQUEST_ID, ""))
        resp = internal_error()
    finally:
        if is_embeddings:
            m.in_flight_now -= 1
    elapsed = time.perf_counter() - started
    key: KeyRecord | None = request.get(KEY)
    team, key_id = (key.team, key.id) if key else ("", "")
    model, cache = request.get(MODEL, ""), resp.headers.get("x-cache", "")
    if is_embeddings:
        m.observe_request(team, key_id, model, resp.status, cache or "none", elapsed)
    access = request.app[ACCESS_LOG]
    if access.enabled:
        access.add(access_line(AccessRecord(
            request_id=request.get(REQUEST_ID, ""), method=request.method,
            path=route_template(request) or "<unmatched>",
            status=resp.status,
            duration_ms=elapsed * 1e3, team=team, key_id=key_id, model=model, cache=cache,
            error_code=error_code(resp.status, getattr(resp, "body", None)), upstreams=request.get(SERVED),
        ), request.get(TRACE)))
    return resp


@web.middleware
async def trace_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One server span per request (probes and scrapes aside), continuing the client's `traceparent`."""
    if request.path in UNLOGGED:
        return await handler(request)
    with request.app[TRACING].server_span(request.method, route_template(request), request.path,
                                          request.headers) as span:
        resp = await handler(request)
        if span.is_recording():
            _describe(request, resp, span)
    return resp


def _describe(request: web.Request, resp: web.StreamResponse, span: Span) -> None:
    key: KeyRecord | None = request.get(KEY)
    req: EmbeddingRequest | None = request.get(EMBEDDING)
    trace = request.get(TRACE) or Trace()
    for name, value in server_attributes(
        status=resp.status, request_id=request.get(REQUEST_ID, ""), team=key.team if key else None,
        key_id=key.id if key else None, model=req.model if req else None,
        encoding_format=req.encoding_format if req else None,
        dimensions=(req.dimensions or request.app[SETTINGS].models[req.model].dimensions) if req else None,
        inputs=trace.inputs, cache_hits=trace.cache_hits, upstream_inputs=trace.upstream_inputs,
        prompt_tokens=trace.prompt_tokens, cached_tokens=trace.cached_tokens, cache=resp.headers.get("x-cache", ""),
    ).items():
        span.set_attribute(name, value)
    if req is not None:
        span.update_name(f"embeddings {req.model}")  # the GenAI conventions' span name
    if resp.status >= 500:
        span.fail(str(resp.status))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        request[KEY] = await request.app[AUTH].authenticate(bearer_key(request.headers))
    elif request.path.startswith("/admin/") and not is_console(request):
        return await admin_request(request, handler)  # who asks, whether they may, the audit of a refusal
    return await handler(request)
