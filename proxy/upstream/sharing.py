"""What this process tells the fleet about its deployments' health, and the probe it claims fleet-wide.

The router (router.py) decides from this process's copy of each deployment's health; with a shared store
(proxy/stores/fleethealth.py, wired by the app) each event the router books here is also booked there: a failed
attempt, a success that ends a streak, a 429's pause, a probe claimed and its outcome. The fleet's state comes back
(`Router.apply`) from the booking's answer and from the announcements of every other process. Bookings run beside
the call (a call never waits on Redis), except a probe's claim: a pause's probe is sent only when this process
holds it fleet-wide, or when Redis cannot be asked (then each process probes by its own view, as before).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from ..config import UpstreamSettings

log = logging.getLogger("proxy.upstream")
PROBE_HOLD_MARGIN_S = 1.0  # a probe's claim outlives its attempt by this much (a process that died releases it so)


class Deployment(Protocol):  # router.Deployment, as far as the fleet's store needs it
    @property
    def model(self) -> str: ...
    @property
    def upstream(self) -> str: ...
    @property
    def solo(self) -> bool: ...
    @property
    def settings(self) -> UpstreamSettings: ...


class SharedHealth(Protocol):
    async def book(self, model: str, upstream: str, op: str, *, allowed: int, cooldown_s: float, solo: bool,
                   arg: float = 0.0) -> bool | None: ...


class HealthSharing:
    def __init__(self, shared: SharedHealth | None = None) -> None:
        self.shared = shared
        self._tasks: set[asyncio.Task[bool | None]] = set()

    def tell(self, d: Deployment, op: str, arg: float = 0.0) -> None:
        """Book `op` for `d` in the shared store, beside the call."""
        if self.shared is None:
            return
        task = asyncio.get_running_loop().create_task(self._book(d, op, arg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def claim_probe(self, d: Deployment, limit_s: float) -> bool:
        """Whether this process may send `d`'s probe: it holds it fleet-wide, or Redis cannot say."""
        granted = await self._book(d, "probe", limit_s + PROBE_HOLD_MARGIN_S)
        return granted is None or granted

    async def _book(self, d: Deployment, op: str, arg: float) -> bool | None:
        if self.shared is None:
            return None
        try:
            return await self.shared.book(d.model, d.upstream, op, allowed=d.settings.allowed_fails,
                                          cooldown_s=d.settings.cooldown_s, solo=d.solo, arg=arg)
        except Exception:  # an unreadable reply must never fail a call: this process goes by its own view
            log.exception("shared health of upstream %s (model %s) not booked", d.upstream, d.model)
            return None

    async def settle(self) -> None:
        """Wait for the bookings under way (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
