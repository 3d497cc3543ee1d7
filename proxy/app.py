"""The web application: `create_app(settings)` wires every part; importing this module does nothing.

Middleware order is the pipeline: the request's trace span (only while tracing is on: proxy/tracing.py), observe
(in-flight, request metrics, access log: it sees the final answer), errors (and request id), then auth for /v1 and
/admin (the console's static files excepted). Health and readiness
sit outside auth; /metrics asks for `PROXY_METRICS_TOKEN` when it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from .accesslog import AccessLog, AccessRecord, access_line, error_code
from .admin import CacheAdmin, add_cache_routes, add_fleet_routes, check_admin
from .admin import add_routes as add_admin_routes
from .announcements import Channel, listen
from .body import read_body
from .config import Settings
from .console import add_routes as add_console_routes
from .console import is_console
from .errors import (
    AuthenticationFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    ServiceUnavailable,
)
from .keys import Authenticator, KeyRecord, KeyStore, bearer_key, check_model
from .metrics import Metrics
from .quota import Quotas
from .request import EmbeddingRequest, parse_request
from .response import render
from .routing import add_unknown_route, expect_continue, route_template
from .service import EmbeddingService, Trace
from .stores.cache import EmbeddingCache
from .stores.cachestats import StoreRef, process_stats
from .stores.generations import CacheGenerations
from .stores.guard import Store, StoreUnavailable, connect
from .stores.rediskeys import RedisKeys
from .teams import TeamStore
from .tokens import make_tokenizer
from .tracing import Span, Tracing, server_attributes
from .tracing import start as start_tracing
from .upstream import SERVED_BY, FleetClient
from .usage import UsageLedger

log = logging.getLogger("proxy.app")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)  # the state store
CACHE_STORE = web.AppKey("cache_store", Store)  # the state store itself unless CACHE_REDIS_URL is set
KEYSTORE = web.AppKey("keystore", KeyStore)
AUTH = web.AppKey("auth", Authenticator)
SERVICE = web.AppKey("service", EmbeddingService)
UPSTREAM = web.AppKey("upstream", FleetClient)
METRICS = web.AppKey("metrics", Metrics)
TEAMS = web.AppKey("teams", TeamStore)
QUOTAS = web.AppKey("quotas", Quotas)
LEDGER = web.AppKey("ledger", UsageLedger)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
METRICS_TOKEN = web.AppKey("metrics_token", str)
TRACING = web.AppKey("tracing", Tracing)
REQUEST_ID = web.RequestKey("request_id", str)
KEY = web.RequestKey("key", KeyRecord)
MODEL = web.RequestKey("model", str)
TRACE = web.RequestKey("trace", Trace)
EMBEDDING = web.RequestKey("embedding", EmbeddingRequest)
SERVED: web.RequestKey[list[str]] = web.RequestKey("served_by")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch: echoed in a header, so never a newline
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_UNLOGGED = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: no access line
SERVER = "embedding-proxy"  # the Server header: no versions (aiohttp's default names Python's and its own)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


# The longest wait the proxy can mean: a monthly quota's reset. Anything longer (an upstream's 1e300) is noise.
MAX_RETRY_AFTER_S = 31 * 86400
_INTERNAL_ERROR = ProxyError("The proxy had an internal error.", code="internal_error").to_json()


def retry_after_header(seconds: float) -> str:
    """Whole seconds from 1 to MAX_RETRY_AFTER_S, whatever came in (an upstream may send 1e309: infinity)."""
    if math.isnan(seconds):
        return "1"
    return str(int(min(max(seconds, 1.0), MAX_RETRY_AFTER_S) + 0.5))


def _internal_error() -> web.Response:
    return web.Response(body=_INTERNAL_ERROR, status=500, content_type="application/json")


def _error_response(err: ProxyError) -> web.Response:
    """The error's answer; it cannot fail (the error middleware is the last line), so a fault in building it gives
    the constant internal error instead."""
    try:
        resp = web.Response(body=err.to_json(), status=err.status, content_type="application/json")
        resp.headers.update(err.headers)
        if err.retry_after is not None:
            resp.headers["Retry-After"] = retry_after_header(err.retry_after)
    except Exception:
        log.exception("could not build the answer for %s", type(err).__name__)
        return _internal_error()
    return resp


def _from_http_exception(exc: web.HTTPException) -> ProxyError:
    if exc.status == 404:
        return NotFound("Unknown route.", code="unknown_url")
    if exc.status == 405:
        return MethodNotAllowed("Method not allowed on this route.", code="method_not_allowed")
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    err = (InvalidRequest if exc.status < 500 else ProxyError)(exc.reason or "Error.")
    err.status = exc.status
    return err


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get("x-request-id", "")
    request[REQUEST_ID] = rid if _REQUEST_ID.fullmatch(rid) else os.urandom(16).hex()
    try:
        resp = await handler(request)
    except ProxyError as err:
        resp = _error_response(err)
    except StoreUnavailable:  # only paths that cannot do without Redis (admin, key store) get here
        resp = _error_response(ServiceUnavailable("The key and quota store is unreachable. Please retry."))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _error_response(_from_http_exception(exc))
    except Exception:
        log.exception("unhandled error in request %s", request[REQUEST_ID])
        resp = _internal_error()
    if request.content.exception() is not None:
        # The body broke off (body.read_body answered it): close after this answer, and mark the body read, or
        # aiohttp reads on into the broken stream after the answer and logs a traceback.
        request.content.feed_eof()
        resp.force_close()
    resp.headers["x-request-id"] = request[REQUEST_ID]
    return resp


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in _UNLOGGED:
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
        resp = _internal_error()
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
    if request.path in _UNLOGGED:
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
        check_admin(request)
    return await handler(request)


async def embeddings(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    req = parse_request(await read_body(request), settings.models)
    request[MODEL], request[EMBEDDING] = req.model, req
    key: KeyRecord = request[KEY]
    check_model(key, req.model)
    request[TRACE] = trace = Trace()
    served: list[str] = []
    request[SERVED] = served
    SERVED_BY.set(served)  # the upstream calls this request makes inherit it, and name their deployment in it
    outcome = await app[SERVICE].embed(req, key, await app[QUOTAS].ticket(key), trace)  # records it in the ledger
    app[METRICS].observe_embedding(
        key.team, key.id, req.model, inputs=trace.inputs, upstream_inputs=trace.upstream_inputs,
        prompt_tokens=outcome.prompt_tokens, billed_tokens=outcome.billed_tokens,
        price_per_million_tokens=settings.models[req.model].price_per_million_tokens,
    )
    resp = web.Response(body=render(req, outcome, app[SERVICE].local_cache), content_type="application/json")
    resp.headers["x-cache"] = outcome.cache
    if outcome.ticket is not None:
        resp.headers.update(outcome.ticket.headers)
    return resp


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "embedding-proxy"}


async def list_models(request: web.Request) -> web.Response:
    key: KeyRecord = request[KEY]
    names = [m for m in request.app[SETTINGS].models if key.allows(m)]
    return _json({"object": "list", "data": [_model_card(m) for m in names]})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    key: KeyRecord = request[KEY]
    if name not in request.app[SETTINGS].models or not key.allows(name):
        raise NotFound(f"The model '{name}' does not exist.", param="model", code="model_not_found")
    return _json(_model_card(name))


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


def upstream_problems(settings: Settings) -> list[str]:
    problems = []
    for name, up in settings.upstreams.items():
        url = urlsplit(up.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(f"upstream {name}: base_url is not an http(s) URL")
        elif (up.api_key_env and not settings.upstream_api_keys.get(name)
              and url.hostname not in ("127.0.0.1", "localhost", "::1")):  # api_key_env = "": a keyless server
            problems.append(f"upstream {name}: ${up.api_key_env} is not set")
    return problems


async def readyz(request: web.Request) -> web.Response:
    store = request.app[STORE]
    redis_ok = await store.ping()
    problems = upstream_problems(request.app[SETTINGS])
    body: dict[str, Any] = {
        "status": "ready" if redis_ok and not problems else "not ready",
        "redis": "embedded" if store.embedded else ("ok" if redis_ok else "unreachable"),
        "upstream": problems or "ok",
    }
    cache_store = request.app[CACHE_STORE]
    if cache_store is not store:  # informational: without its cache the proxy still answers (from the upstream)
        body["cache_redis"] = "ok" if await cache_store.ping() else "unreachable"
    return _json(body, 200 if redis_ok and not problems else 503)


def _bearer_matches(header: str | None, token: str) -> bool:
    """Constant-time; header bytes that are not UTF-8 (aiohttp hands them on as surrogates) are a mismatch."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass"))


async def metrics(request: web.Request) -> web.Response:
    token = request.app[METRICS_TOKEN]
    if token and not _bearer_matches(request.headers.get("Authorization"), token):
        # answered here, not raised: the --metrics-port app has no error middleware
        resp = _error_response(AuthenticationFailed(
            "The metrics need 'Authorization: Bearer <metrics token>' (PROXY_METRICS_TOKEN).",
            code="invalid_metrics_token"))
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER


def create_metrics_app(m: Metrics, token: str) -> web.Application:
    """/metrics alone, for `serve --metrics-port` (not exposed with the API); errors in OpenAI's shape, as there."""
    app = web.Application(middlewares=[error_middleware])
    app[METRICS], app[METRICS_TOKEN] = m, token
    app.on_response_prepare.append(_server_header)
    app.router.add_get("/metrics", metrics, expect_handler=expect_continue)
    add_unknown_route(app)
    return app


def create_app(
    settings: Settings, *, metrics_registry: Metrics | None = None, metrics_route: bool = True,
    access_log: AccessLog | None = None, clock: Callable[[], float] = time.time,
) -> web.Application:
    """The proxy; `metrics_route=False` leaves /metrics off this app (served on its own port instead);
    `access_log` defaults to stdout (or nothing, with `server.access_log = false`); `clock` (Unix time) places
    requests in quota windows and ledger days. Traces are on when the OTEL_* variables name an endpoint."""
    m = metrics_registry or Metrics(models=settings.models)
    tracing = start_tracing(os.environ, m)  # one provider per process: each worker calls this after it starts
    app = web.Application(
        middlewares=[*([trace_middleware] if tracing.enabled else []), observe_middleware, error_middleware,
                     auth_middleware],
        client_max_size=settings.server.max_body_bytes,
    )
    client, embedded = connect(settings.redis)
    store = Store(client, settings.redis, embedded=embedded, on_error=lambda op: m.redis_errors.labels(op).inc())
    cache_store = store  # without CACHE_REDIS_URL the cache lives in the state store
    if settings.cache_redis.url:
        cache_store = Store(connect(settings.cache_redis, "CACHE_REDIS_URL")[0], settings.cache_redis,
                            on_error=lambda op: m.redis_errors.labels(op).inc(), name="cache redis")
    rkeys = RedisKeys(settings.cache.key_prefix)
    keystore = KeyStore(store, rkeys)
    upstream = FleetClient(settings, metrics=m,
                           on_retry=lambda model, why: m.upstream_retries.labels(model, why).inc(), tracing=tracing)
    cache = EmbeddingCache(cache_store, rkeys, ttl_s=settings.cache.ttl_s, secret=settings.cache_secret, state=store)
    tokenizers = {spec.tokenizer: make_tokenizer(spec.tokenizer) for spec in settings.models.values()}
    ledger = UsageLedger(store, rkeys, retention_days=settings.usage.retention_days, clock=clock)
    generations = CacheGenerations(store, rkeys, settings.models, settings.cache.scope, cache_store=cache_store)
    service = EmbeddingService(settings, cache, upstream, m, tokenizers, ledger, clock, generations=generations,
                              tracing=tracing)
    app[SETTINGS], app[STORE], app[KEYSTORE], app[METRICS] = settings, store, keystore, m
    app[CACHE_STORE] = cache_store
    app[AUTH] = auth = Authenticator(keystore, settings.keys.offline_grace_s, settings.keys.cache_s)
    app[UPSTREAM], app[SERVICE] = upstream, service
    app[TEAMS] = teams = TeamStore(store, rkeys, settings.teams, settings.quotas.team_cache_s)
    app[QUOTAS] = Quotas(store, rkeys, teams, settings.quotas, m, clock=clock, tracing=tracing)
    app[LEDGER] = ledger
    if access_log is None:
        access_log = AccessLog(sys.stdout.buffer if settings.server.access_log else None)
    app[ACCESS_LOG] = access_log
    app[METRICS_TOKEN] = settings.metrics_token
    app[TRACING] = tracing
    app.on_response_prepare.append(_server_header)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if embedded:
            log.warning("REDIS_URL is not set: using the embedded in-process store (one process, not durable)")
        await upstream.start()
        try:
            await cache.seed()
            await generations.refresh()
        except StoreUnavailable:
            log.warning("redis unreachable at start-up: the cache is bypassed until it answers")
        channels = [Channel(rkeys.key_changes(), auth.key_changed, subscribed=auth.forget, lost=auth.forget),
                    Channel(rkeys.cache_generation_changes(), generations.announced, subscribed=generations.stale,
                            lost=lambda: None)]  # while unsubscribed, the periodic re-read catches purges up
        background = [
            asyncio.create_task(ledger.run(settings.usage.flush_interval_s)),
            asyncio.create_task(listen(store.subscriber, channels, settings.redis.retry_interval_s)),
            asyncio.create_task(generations.run(settings.cache.generations_refresh_s)),
            asyncio.create_task(access_log.run()),
            asyncio.create_task(m.run()),
        ]
        yield
        await service.drain()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await ledger.flush()
        except StoreUnavailable:
            log.error("usage not written to the ledger at shutdown: redis unreachable")
        await upstream.close()
        await store.close()
        if cache_store is not store:
            await cache_store.close()
        access_log.flush()
        await tracing.shutdown()
        m.flush()

    app.cleanup_ctx.append(lifecycle)
    r = app.router
    r.add_post("/v1/embeddings", embeddings, expect_handler=expect_continue)
    r.add_get("/v1/models", list_models, expect_handler=expect_continue)
    r.add_get("/v1/models/{model}", get_model, expect_handler=expect_continue)
    r.add_get("/healthz", healthz, expect_handler=expect_continue)
    r.add_get("/readyz", readyz, expect_handler=expect_continue)
    if metrics_route:
        r.add_get("/metrics", metrics, expect_handler=expect_continue)
    prices = {name: spec.price_per_million_tokens for name, spec in settings.models.items()}
    add_admin_routes(app, keystore, teams, ledger, settings.admin_key, prices)
    add_fleet_routes(app, upstream)
    cache_stores = ((StoreRef("state and cache", store, settings.redis),) if cache_store is store else
                    (StoreRef("cache", cache_store, settings.cache_redis), StoreRef("state", store, settings.redis)))
    add_cache_routes(app, CacheAdmin(cache_stores, rkeys, generations, ledger,
                                     lambda: process_stats(m, service.local_cache, generations)))
    add_console_routes(app)
    add_unknown_route(app)  # last: the catch-all for every other path
    return app
