"""The proxy's parts, built from the settings in one place: which Redis holds the state and which the cache, and
the key store, upstream fleet, cache, ledger, service and quotas that stand on them. `create_app` puts them on the
app (app.py) and `lifecycle.py` starts and stops them; nothing here talks to the network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..accounts.keys import Authenticator, KeyStore
from ..accounts.quota import Quotas
from ..accounts.teams import TeamStore
from ..accounts.usage import UsageLedger
from ..config import Settings
from ..embeddings.service import EmbeddingService
from ..stores.cache import EmbeddingCache
from ..stores.cachestats import StoreRef
from ..stores.fleetlimits import FleetLimits, instance_name
from ..stores.generations import CacheGenerations
from ..stores.guard import Store, connect
from ..stores.rediskeys import RedisKeys
from ..telemetry.looplag import LoopLag
from ..telemetry.metrics import Metrics
from ..telemetry.tracing import Tracing
from ..tokens import make_tokenizer
from ..upstream import FleetClient
from .accesslog import AccessLog
from .admission import Budget
from .memory import MemoryReturn


@dataclass(frozen=True)
class Parts:
    settings: Settings
    metrics: Metrics
    tracing: Tracing
    store: Store  # the state store
    cache_store: Store  # the state store itself unless CACHE_REDIS_URL is set
    embedded: bool  # no REDIS_URL: the in-process store (one process, not durable)
    rkeys: RedisKeys
    keystore: KeyStore
    auth: Authenticator
    upstream: FleetClient
    limits: FleetLimits  # the deployments' fleet-wide limits and the fleet's view of them
    cache: EmbeddingCache
    ledger: UsageLedger
    generations: CacheGenerations
    service: EmbeddingService
    teams: TeamStore
    quotas: Quotas
    access_log: AccessLog
    lag: LoopLag  # how long the event loop was blocked: a stall is never taken for a Redis failure
    budget: Budget  # the admission budget (README "Overload and memory")
    memory: MemoryReturn

    def store_refs(self) -> tuple[StoreRef, ...]:
        """The Redis stores /admin/cache reports on: one, or the cache's and the state's."""
        if self.cache_store is self.store:
            return (StoreRef("state and cache", self.store, self.settings.redis),)
        return (StoreRef("cache", self.cache_store, self.settings.cache_redis),
                StoreRef("state", self.store, self.settings.redis))


def _stores(settings: Settings, m: Metrics, lag: LoopLag) -> tuple[Store, Store, bool]:
    """The state store, the cache store (the same one without CACHE_REDIS_URL), and whether the state store is the
    embedded one. Every failed Redis call counts in redis_errors_total by its operation; the start of a bypass and a
    timeout blamed on the event loop count by store."""
    client, embedded = connect(settings.redis)
    store = Store(client, settings.redis, embedded=embedded, on_error=lambda op: m.redis_errors.labels(op).inc(),
                  lag=lag, on_event=_events(m, "state"))
    cache_store = store
    if settings.cache_redis.url:
        cache_store = Store(connect(settings.cache_redis, "CACHE_REDIS_URL")[0], settings.cache_redis,
                            on_error=lambda op: m.redis_errors.labels(op).inc(), name="cache redis", lag=lag,
                            on_event=_events(m, "cache"))
    return store, cache_store, embedded


def _events(m: Metrics, store: str) -> Callable[[str], None]:
    def event(kind: str) -> None:
        m.add(m.redis_bypasses if kind == "bypass" else m.redis_stalled_timeouts, store)

    return event
def _admission(settings: Settings, m: Metrics) -> tuple[Budget, MemoryReturn]:
    """The admission budget and the memory return that follows it, reported at every metrics flush."""
    a = settings.admission
    budget = Budget(a.budget_mb << 20, a.wait_s, a.retry_after_s)
    memory = MemoryReturn(budget, enabled=a.return_memory)
    m.admission_budget.set(budget.capacity)
    counted = {"refused": 0, "alone": 0, "trims": 0, "returned": 0}

    def report() -> None:
        stats = budget.stats
        m.admission_in_use.set(budget.in_use)
        m.admission_waiting.set(budget.waiting)
        waits, stats.waits = stats.waits, []
        for seconds in waits:
            m.admission_wait.observe(seconds)
        for name, metric, now in (("refused", m.admission_refusals, stats.refused),
                                  ("alone", m.admission_alone, stats.alone),
                                  ("trims", m.memory_trims, memory.trims),
                                  ("returned", m.memory_returned, memory.returned_bytes)):
            if now > counted[name]:
                metric.inc(now - counted[name])
                counted[name] = now

    m.on_flush(report)
    return budget, memory


def build_parts(settings: Settings, m: Metrics, tracing: Tracing, access_log: AccessLog,
                clock: Callable[[], float]) -> Parts:
    """Every part, in the order each needs the ones before it; `clock` (Unix time) places requests in quota
    windows and ledger days."""
    lag = LoopLag(observe=m.event_loop_lag.observe)
    store, cache_store, embedded = _stores(settings, m, lag)
    rkeys = RedisKeys(settings.cache.key_prefix)
    keystore = KeyStore(store, rkeys)
    upstream = FleetClient(settings, metrics=m,
                           on_retry=lambda model, why: m.upstream_retries.labels(model, why).inc(), tracing=tracing)
    limits = FleetLimits(store, rkeys, instance_name())
    upstream.share_limits(limits)
    cache = EmbeddingCache(cache_store, rkeys, ttl_s=settings.cache.ttl_s, secret=settings.cache_secret, state=store)
    tokenizers = {spec.tokenizer: make_tokenizer(spec.tokenizer) for spec in settings.models.values()}
    ledger = UsageLedger(store, rkeys, retention_days=settings.usage.retention_days, clock=clock)
    generations = CacheGenerations(store, rkeys, settings.models, settings.cache.scope, cache_store=cache_store)
    service = EmbeddingService(settings, cache, upstream, m, tokenizers, ledger, clock, generations=generations,
                               tracing=tracing)
    auth = Authenticator(keystore, settings.keys.offline_grace_s, settings.keys.cache_s)
    teams = TeamStore(store, rkeys, settings.teams, settings.quotas.team_cache_s, wall_clock=clock)
    quotas = Quotas(store, rkeys, teams, settings.quotas, m, clock=clock, tracing=tracing)
    budget, memory = _admission(settings, m)
    return Parts(settings=settings, metrics=m, tracing=tracing, store=store, cache_store=cache_store,
                 embedded=embedded, rkeys=rkeys, keystore=keystore, auth=auth, upstream=upstream, limits=limits,
                 cache=cache,
                 ledger=ledger, generations=generations, service=service, teams=teams, quotas=quotas,
                 access_log=access_log, lag=lag, budget=budget, memory=memory)
