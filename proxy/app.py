"""The web application: `create_app(settings)` wires every part; importing this module does nothing.

Middleware order is the pipeline: observe (in-flight, request metrics, access log: it sees the final answer),
errors (and request id), then auth for /v1. Health, readiness and metrics sit outside auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from .admin import add_fleet_routes, check_admin
from .admin import add_routes as add_admin_routes
from .cache import EmbeddingCache
from .config import Settings
from .errors import MethodNotAllowed, NotFound, PayloadTooLarge, ProxyError, ServiceUnavailable
from .fleet import SERVED_BY, FleetClient
from .keys import Authenticator, KeyRecord, KeyStore, bearer_key, check_model
from .metrics import Metrics
from .quota import Quotas
from .rediskeys import RedisKeys
from .request import parse_request
from .response import render
from .service import EmbeddingService, Trace
from .store import Store, StoreUnavailable, connect
from .teams import TeamStore
from .tokens import make_tokenizer
from .usage import UsageLedger

log = logging.getLogger("proxy.app")

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
KEYSTORE = web.AppKey("keystore", KeyStore)
AUTH = web.AppKey("auth", Authenticator)
SERVICE = web.AppKey("service", EmbeddingService)
UPSTREAM = web.AppKey("upstream", FleetClient)
METRICS = web.AppKey("metrics", Metrics)
TEAMS = web.AppKey("teams", TeamStore)
QUOTAS = web.AppKey("quotas", Quotas)
LEDGER = web.AppKey("ledger", UsageLedger)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
REQUEST_ID = web.RequestKey("request_id", str)
KEY = web.RequestKey("key", KeyRecord)
MODEL = web.RequestKey("model", str)
TRACE = web.RequestKey("trace", Trace)
SERVED: web.RequestKey[list[str]] = web.RequestKey("served_by")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_UNLOGGED = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: no access line


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error_response(err: ProxyError) -> web.Response:
    resp = web.Response(body=err.to_json(), status=err.status, content_type="application/json")
    resp.headers.update(err.headers)
    if err.retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return resp


def _from_http_exception(exc: web.HTTPException) -> ProxyError:
    if exc.status == 404:
        return NotFound("Unknown route.", code="unknown_url")
    if exc.status == 405:
        return MethodNotAllowed("Method not allowed on this route.", code="method_not_allowed")
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    err = ProxyError(exc.reason or "Error.")
    err.status = exc.status
    return err


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get("x-request-id", "")
    request[REQUEST_ID] = rid if rid and _REQUEST_ID.match(rid) else os.urandom(16).hex()
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
        resp = _error_response(ProxyError("The proxy had an internal error.", code="internal_error"))
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
        route = request.match_info.route.resource
        access.add(access_line(AccessRecord(
            request_id=request.get(REQUEST_ID, ""), method=request.method,
            path=route.canonical if route is not None else "<unmatched>", status=resp.status,
            duration_ms=elapsed * 1e3, team=team, key_id=key_id, model=model, cache=cache,
            error_code=error_code(resp.status, getattr(resp, "body", None)), upstreams=request.get(SERVED),
        ), request.get(TRACE)))
    return resp


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        request[KEY] = await request.app[AUTH].authenticate(bearer_key(request.headers))
    elif request.path.startswith("/admin/"):
        check_admin(request)
    return await handler(request)


async def embeddings(request: web.Request) -> web.Response:
    app = request.app
    settings = app[SETTINGS]
    req = parse_request(await request.read(), settings.models)
    request[MODEL] = req.model
    key: KeyRecord = request[KEY]
    check_model(key, req.model)
    request[TRACE] = trace = Trace()
    served: list[str] = []
    request[SERVED] = served
    SERVED_BY.set(served)  # the upstream calls this request makes inherit it, and name their deployment in it
    outcome = await app[SERVICE].embed(req, key.team, await app[QUOTAS].ticket(key), trace)
    app[LEDGER].record(key.team, key.id, req.model, outcome.prompt_tokens, outcome.billed_tokens)
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
    body = {
        "status": "ready" if redis_ok and not problems else "not ready",
        "redis": "embedded" if store.embedded else ("ok" if redis_ok else "unreachable"),
        "upstream": problems or "ok",
    }
    return _json(body, 200 if redis_ok and not problems else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


def create_app(
    settings: Settings, *, metrics_registry: Metrics | None = None, metrics_route: bool = True,
    access_log: AccessLog | None = None,
) -> web.Application:
    """The proxy; `metrics_route=False` leaves /metrics off this app (served on its own port instead);
    `access_log` defaults to stdout (or nothing, with `server.access_log = false`)."""
    app = web.Application(
        middlewares=[observe_middleware, error_middleware, auth_middleware],
        client_max_size=settings.server.max_body_bytes,
    )
    m = metrics_registry or Metrics(models=settings.models)
    client, embedded = connect(settings.redis)
    store = Store(client, settings.redis, embedded=embedded, on_error=lambda op: m.redis_errors.labels(op).inc())
    rkeys = RedisKeys(settings.cache.key_prefix)
    keystore = KeyStore(store, rkeys)
    upstream = FleetClient(settings, metrics=m,
                           on_retry=lambda model, why: m.upstream_retries.labels(model, why).inc())
    cache = EmbeddingCache(store, rkeys, ttl_s=settings.cache.ttl_s, secret=settings.cache_secret)
    tokenizers = {spec.tokenizer: make_tokenizer(spec.tokenizer) for spec in settings.models.values()}
    service = EmbeddingService(settings, cache, upstream, m, tokenizers)
    app[SETTINGS], app[STORE], app[KEYSTORE], app[METRICS] = settings, store, keystore, m
    app[AUTH] = auth = Authenticator(keystore, settings.keys.offline_grace_s, settings.keys.cache_s)
    app[UPSTREAM], app[SERVICE] = upstream, service
    app[TEAMS] = teams = TeamStore(store, rkeys, settings.teams, settings.quotas.team_cache_s)
    app[QUOTAS] = Quotas(store, rkeys, teams, settings.quotas, m)
    app[LEDGER] = ledger = UsageLedger(store, rkeys, retention_days=settings.usage.retention_days)
    if access_log is None:
        access_log = AccessLog(sys.stdout.buffer if settings.server.access_log else None)
    app[ACCESS_LOG] = access_log

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if embedded:
            log.warning("REDIS_URL is not set: using the embedded in-process store (one process, not durable)")
        await upstream.start()
        try:
            await cache.seed()
        except StoreUnavailable:
            log.warning("redis unreachable at start-up: the cache is bypassed until it answers")
        background = [
            asyncio.create_task(ledger.run(settings.usage.flush_interval_s)),
            asyncio.create_task(auth.listen(store.client, rkeys.key_changes(), settings.redis.retry_interval_s)),
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
        access_log.flush()
        m.flush()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics_route:
        app.router.add_get("/metrics", metrics)
    prices = {name: spec.price_per_million_tokens for name, spec in settings.models.items()}
    add_admin_routes(app, keystore, teams, ledger, settings.admin_key, prices)
    add_fleet_routes(app, upstream)
    return app
