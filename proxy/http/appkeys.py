"""What the proxy's app carries (its parts, set once by `create_app`) and what each request carries on its way
through the middlewares and handlers. Typed keys: aiohttp checks nothing else, and every module reads them here."""

from __future__ import annotations

from aiohttp import web

from ..accounts.keys import Authenticator, KeyRecord, KeyStore
from ..accounts.quota import Quotas
from ..accounts.teams import TeamStore
from ..accounts.usage import UsageLedger
from ..config import Settings
from ..embeddings.request import EmbeddingRequest
from ..embeddings.service import EmbeddingService, Trace
from ..stores.guard import Store
from ..telemetry.metrics import Metrics
from ..telemetry.tracing import Tracing
from ..upstream import FleetClient
from .accesslog import AccessLog
from .admission import Budget

# The app's parts
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
ADMISSION = web.AppKey("admission", Budget)

# What a request learns on its way: set by the middlewares and handlers, read by the observe and trace middlewares
REQUEST_ID = web.RequestKey("request_id", str)
KEY = web.RequestKey("key", KeyRecord)
MODEL = web.RequestKey("model", str)
TRACE = web.RequestKey("trace", Trace)
EMBEDDING = web.RequestKey("embedding", EmbeddingRequest)
SERVED: web.RequestKey[list[str]] = web.RequestKey("served_by")
