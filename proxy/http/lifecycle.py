"""What the proxy does when its app starts and stops (aiohttp's cleanup context): warm the cache's secret and
generations, run the background tasks (ledger flush, key and purge announcements, generation refresh, access log,
metrics flush, the one-time build of the team key indexes), and at shutdown drain the requests in flight before
writing the ledger and closing every store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

from ..accounts.keyindexbuild import IndexBuild
from ..stores.announcements import Channel, listen
from ..stores.fleethealth import FleetHealth
from ..stores.guard import StoreUnavailable
from .wiring import Parts

log = logging.getLogger("proxy.app")  # the name the app's log lines have always had


def cleanup_context(parts: Parts) -> Callable[[web.Application], AsyncIterator[None]]:
    """For `app.cleanup_ctx`: starts the parts, yields while the app serves, then stops them."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await _start(parts)
        background = [asyncio.create_task(job) for job in _background_jobs(parts)]
        yield
        await _stop(parts, background)

    return lifecycle


async def _start(parts: Parts) -> None:
    if parts.embedded:
        log.warning("REDIS_URL is not set: using the embedded in-process store (one process, not durable)")
    await parts.upstream.start()
    try:
        await parts.cache.seed(at_start=True)
        await parts.generations.refresh()
    except StoreUnavailable:
        log.warning("redis unreachable at start-up: the cache is bypassed until it answers")


def _background_jobs(parts: Parts) -> list[Coroutine[Any, Any, None]]:
    settings, auth, generations = parts.settings, parts.auth, parts.generations
    channels = [Channel(parts.rkeys.key_changes(), auth.key_changed, subscribed=auth.forget, lost=auth.forget),
                Channel(parts.rkeys.cache_generation_changes(), generations.announced, subscribed=generations.stale,
                        lost=lambda: None)]  # while unsubscribed, the periodic re-read catches purges up
    # deployment health, fleet-wide
    health = FleetHealth(parts.store, parts.rkeys, parts.upstream.apply_health, parts.limits.instance)
    health.track(parts.upstream.share_health(health))
    channels.append(health.channel())
    return [
        parts.ledger.run(settings.usage.flush_interval_s),
        listen(parts.store.subscriber, channels, settings.redis.retry_interval_s),
        generations.run(settings.cache.generations_refresh_s),
        parts.access_log.run(),
        parts.metrics.run(),
        parts.lag.run(),
        parts.memory.run(),
        IndexBuild(parts.store, parts.rkeys, parts.keystore.index, parts.limits.instance).run(),
    ]


async def _stop(parts: Parts, background: list[asyncio.Task[None]]) -> None:
    await parts.service.drain()
    for task in background:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    try:
        await parts.ledger.flush()
    except StoreUnavailable:
        log.error("usage not written to the ledger at shutdown: redis unreachable")
    await parts.upstream.close()
    await parts.store.close()
    if parts.cache_store is not parts.store:
        await parts.cache_store.close()
    parts.access_log.flush()
    await parts.tracing.shutdown()
    parts.metrics.flush()
