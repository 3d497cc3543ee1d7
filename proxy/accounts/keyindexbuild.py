"""The one-time build of the team key indexes (keyindex.py), in the background from each process's start, one
process of the fleet at a time, never on a request.

A process whose indexes lack the mark `{prefix}:meta:teamkeys-built` takes the lock `{prefix}:meta:teamkeys-lock`
(SET NX PX `LOCK_S`, its own token in it), renews it every third of that while it builds, and releases it when done
(lua/lockhold.lua: only while its token is there). The others look for the mark every `POLL_S` and take the lock if
its holder stopped renewing it (a process that died: the lock expires). The build is idempotent, so a holder that
lost its lock to a stall and another that took it over may both run, harmlessly. A failure (Redis unreachable, or
anything else) is logged and tried again after a pause that doubles, from `RETRY_MIN_S` to `RETRY_MAX_S`: the
worker never stops for it. Shutdown cancels the build between two chunks and releases the lock, so a process
still running takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from importlib import resources
from typing import Any

from ..stores.guard import Store, StoreUnavailable
from ..stores.rediskeys import RedisKeys
from .keyindex import KeyIndex

log = logging.getLogger("proxy.keyindex")
LOCK_S = 30.0  # how long the lock outlives a holder that stopped renewing it
POLL_S = 2.0  # how often a process that does not build looks for the mark (or an expired lock)
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
RELEASE_TIMEOUT_S = 1.0  # the longest a shutdown waits to release the lock (it expires anyway)


class IndexBuild:
    def __init__(self, store: Store, keys: RedisKeys, index: KeyIndex, owner: str = "") -> None:
        self._store = store
        self._keys = keys
        self._index = index
        self._token = f"{owner}:{secrets.token_hex(8)}"
        self._hold = store.client.register_script((resources.files("proxy") / "lua" / "lockhold.lua").read_text())
        self.builds = 0  # the builds this process ran (a test reads it)

    async def run(self) -> None:
        """Until the indexes are built, by this process or another (the background task of the app's start)."""
        retry = RETRY_MIN_S
        while True:
            try:
                if await self._step():
                    return
                retry = RETRY_MIN_S
                await asyncio.sleep(POLL_S)
            except Exception as exc:  # whatever failed, the worker keeps serving and tries again
                log.warning("building the team key indexes failed (%s); trying again in %.1fs",
                            type(exc).__name__, retry, exc_info=not isinstance(exc, StoreUnavailable))
                await asyncio.sleep(retry)
                retry = min(RETRY_MAX_S, retry * 2)

    async def _step(self) -> bool:
        """Whether the indexes are built: by another process, or by this one now if it got the lock."""
        if await self._index.built():
            return True
        lock, ttl_ms = self._keys.team_keys_lock(), int(LOCK_S * 1000)
        async def take(r: Any) -> bool:  # or still hold: a release that failed (Redis down) left our token there
            return bool(await r.set(lock, self._token, nx=True, px=ttl_ms)) or await self._held(r, ttl_ms)

        if not await self._store.operator_call("key-index-lock", take):
            return False
        renewing = asyncio.create_task(self._renew(ttl_ms))
        try:
            self.builds += 1
            indexed = await self._index.rebuild()
            if indexed:  # a store whose keys all came with their index entries (a new one) says nothing
                log.info("team key indexes built: %d keys created before them", indexed)
            return True
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            with contextlib.suppress(Exception):
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    await self._store.operator_call("key-index-lock", lambda r: self._held(r, 0))

    async def _renew(self, ttl_ms: int) -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            try:
                if not await self._store.operator_call("key-index-lock", lambda r: self._held(r, ttl_ms)):
                    log.warning("the team key index lock expired while building (another process may build too)")
            except Exception as exc:  # the next renewal tries again; the build goes on regardless
                log.warning("renewing the team key index lock failed (%s)", type(exc).__name__)

    async def _held(self, r: Any, ttl_ms: int) -> bool:
        return bool(await self._hold(keys=[self._keys.team_keys_lock()], args=[self._token, ttl_ms], client=r))
