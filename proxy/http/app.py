"""The web application: `create_app(settings)` wires every part; importing this module does nothing.

Where the rest lives: the parts built from the settings (wiring.py), their start and stop (lifecycle.py), the
keys the app and each request carry (appkeys.py), the middleware pipeline (middleware.py), the /v1 and operations
handlers (handlers.py), error answers (answers.py), the admin API (admin.py) and the console (proxy/console).
The names tests and the command line use are importable from here as before.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from aiohttp import web

from ..accounts.admins import AdminStore
from ..accounts.audit import AuditLog
from ..accounts.sessions import SessionStore
from ..config import Settings
from ..console import add_routes as add_console_routes
from ..stores.cachestats import process_stats
from ..telemetry.metrics import Metrics
from ..telemetry.tracing import start as start_tracing
from .accesslog import AccessLog
from .admin import CacheAdmin, add_cache_routes
from .admin import add_routes as add_admin_routes
from .adminaudit import add_audit_routes
from .adminauth import install_access
from .adminfleet import add_fleet_routes
from .adminlists import add_list_routes
from .adminusers import add_admin_user_routes
from .answers import SERVER, retry_after_header, server_header
from .appkeys import (
    ACCESS_LOG,
    ADMISSION,
    AUTH,
    CACHE_STORE,
    EMBEDDING,
    KEY,
    KEYSTORE,
    LEDGER,
    METRICS,
    METRICS_TOKEN,
    MODEL,
    QUOTAS,
    REQUEST_ID,
    SERVED,
    SERVICE,
    SETTINGS,
    STORE,
    TEAMS,
    TRACE,
    TRACING,
    UPSTREAM,
)
from .handlers import embeddings, get_model, healthz, list_models, metrics, readyz
from .lifecycle import cleanup_context
from .middleware import Handler, auth_middleware, error_middleware, observe_middleware, trace_middleware
from .routing import add_unknown_route, expect_continue
from .sso import add_sso_routes
from .wiring import Parts, build_parts

__all__ = [
    "ACCESS_LOG", "AUTH", "CACHE_STORE", "EMBEDDING", "KEY", "KEYSTORE", "LEDGER", "METRICS", "METRICS_TOKEN",
    "MODEL", "QUOTAS", "REQUEST_ID", "SERVED", "SERVER", "SERVICE", "SETTINGS", "STORE", "TEAMS", "TRACE", "TRACING",
    "UPSTREAM", "Handler", "auth_middleware", "create_app", "create_metrics_app", "error_middleware",
    "observe_middleware", "retry_after_header", "trace_middleware",
]

# The proxy's own routes (method, path, handler); /metrics is added apart, as it may live on its own port.
ROUTES = (
    ("POST", "/v1/embeddings", embeddings),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/{model}", get_model),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
)


def create_metrics_app(m: Metrics, token: str) -> web.Application:
    """/metrics alone, for `serve --metrics-port` (not exposed with the API); errors in OpenAI's shape, as there."""
    app = web.Application(middlewares=[error_middleware])
    app[METRICS], app[METRICS_TOKEN] = m, token
    app.on_response_prepare.append(server_header)
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
    if access_log is None:
        access_log = AccessLog(sys.stdout.buffer if settings.server.access_log else None)
    parts = build_parts(settings, m, tracing, access_log, clock)
    _put_parts(app, parts)
    app.on_response_prepare.append(server_header)
    app.cleanup_ctx.append(cleanup_context(parts))
    _add_routes(app, parts, metrics_route=metrics_route)
    return app


def _put_parts(app: web.Application, parts: Parts) -> None:
    """The parts the middlewares and handlers read from the app (appkeys.py)."""
    app[SETTINGS], app[STORE], app[KEYSTORE], app[METRICS] = parts.settings, parts.store, parts.keystore, parts.metrics
    app[CACHE_STORE], app[AUTH] = parts.cache_store, parts.auth
    app[UPSTREAM], app[SERVICE] = parts.upstream, parts.service
    app[TEAMS], app[QUOTAS], app[LEDGER] = parts.teams, parts.quotas, parts.ledger
    app[ACCESS_LOG], app[METRICS_TOKEN], app[TRACING] = parts.access_log, parts.settings.metrics_token, parts.tracing
    app[ADMISSION] = parts.budget


def _add_routes(app: web.Application, parts: Parts, *, metrics_route: bool) -> None:
    """Every route on the proxy's app, each taking the proxy's `Expect` handler; the catch-all comes last."""
    for method, path, handler in ROUTES:  # add_get, as before: a GET route answers HEAD too
        add = app.router.add_post if method == "POST" else app.router.add_get
        add(path, handler, expect_handler=expect_continue)
    if metrics_route:
        app.router.add_get("/metrics", metrics, expect_handler=expect_continue)
    settings, m, service, generations = parts.settings, parts.metrics, parts.service, parts.generations
    prices = {name: spec.price_per_million_tokens for name, spec in settings.models.items()}
    add_admin_routes(app, parts.keystore, parts.teams, parts.ledger, settings.admin_key, prices)
    add_list_routes(app)
    audit_lines = parts.access_log.stream or sys.stdout.buffer  # audit lines even with the access log off
    install_access(app, AdminStore(parts.store, parts.rkeys),
                   AuditLog(parts.store, parts.rkeys, settings.admin.audit_retention_days, audit_lines),
                   SessionStore(parts.store, parts.rkeys), settings.admin)
    add_admin_user_routes(app)
    add_sso_routes(app, settings.admin.oidc)
    add_audit_routes(app)
    add_fleet_routes(app, parts.upstream, parts.limits)
    add_cache_routes(app, CacheAdmin(parts.store_refs(), parts.rkeys, generations, parts.ledger,
                                     lambda: process_stats(m, service.local_cache, generations)))
    add_console_routes(app, expect_handler=expect_continue)
    add_unknown_route(app)  # last: the catch-all for every other path
