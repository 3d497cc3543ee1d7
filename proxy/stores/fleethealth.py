"""Deployment health shared by every process of every instance: failure streaks, cooldowns, 429 pauses, probes.

Each process's router (proxy/upstream/router.py) decides as before from its own copy of each deployment's health;
this module keeps the fleet's copy in Redis and hands every change to every process at once. An event (a failed
attempt, a success after failures, a 429's pause, a probe claimed or done, a deployment found silent or heard
again) is one bounded call through the store
guard: `lua/health.lua` books it on the deployment's hash (`{prefix}:dep:{{model}|{upstream}}`, one Cluster slot)
by Redis's own clock, PUBLISHes the new state on `{prefix}:fleet:health` (announcements.py: the subscription key
changes and purges already use), and answers it, so the booking process applies it without waiting for its echo.
Every process applies an announced state to its copy (`apply`): a streak of failures through several processes
adds up to one streak, a cooldown, a pause or a silence begun anywhere holds everywhere within the message's latency,
and a probe or trial is claimed in Redis (held `hold_s`), so one call probes fleet-wide.

While Redis is down (or the store is the embedded one: a single process) `book` answers None and each process goes
on by its own view, as it always did. After a lost subscription the states are read again (`catch_up`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

import orjson

from .announcements import Channel
from .guard import Store, StoreUnavailable
from .rediskeys import RedisKeys

log = logging.getLogger("proxy.fleethealth")

# apply(model, upstream, fails, cool_in, paused_in, probe_in, held_in, silent): seconds from now (<= 0: not so), and
# whether it was found silent and has not answered since
Apply = Callable[[str, str, int, float, float, float, float, bool], None]


class FleetHealth:
    def __init__(self, store: Store, rkeys: RedisKeys, apply: Apply, instance: str = "") -> None:
        self._store = store
        self._rkeys = rkeys
        self._apply = apply
        self._instance = instance or f"{socket.gethostname()}:{os.getpid()}"  # who saw it, in the announcement
        self._script = store.client.register_script((resources.files("proxy") / "lua" / "health.lua").read_text())
        self._deployments: list[tuple[str, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def usable(self) -> bool:
        return not self._store.embedded

    def track(self, deployments: Iterable[tuple[str, str]]) -> None:
        """The (model, upstream) pairs `catch_up` reads again."""
        self._deployments = list(deployments)

    def channel(self) -> Channel:
        return Channel(self._rkeys.deployment_health_changes(), self.announced, subscribed=self.catch_up,
                       lost=lambda: None)  # unsubscribed: each process goes by its own view; read again on subscribing

    async def book(self, model: str, upstream: str, op: str, *, allowed: int, cooldown_s: float, solo: bool,
                   arg: float = 0.0) -> bool | None:
        """Book one event (see `lua/health.lua`), apply the fleet's state it answers: whether it was granted (a
        probe's claim), None when Redis cannot be asked (the caller goes by its own view)."""
        if not self.usable:
            return None
        head = orjson.dumps({"model": model, "upstream": upstream, "by": self._instance})[:-1] + b',"state":'
        key = self._rkeys.deployment_health(model, upstream)
        args = [op, allowed, repr(cooldown_s), "1" if solo else "0", repr(arg),
                self._rkeys.deployment_health_changes(), head, self._instance]
        try:
            # a catch-up read is background work: its failure never makes requests bypass Redis (guard.py)
            reply = await self._store.call("fleet_health", lambda r: self._script(keys=[key], args=args, client=r),
                                           mark_down=op != "read")
        except StoreUnavailable:
            return None
        self._take(model, upstream, reply[2])
        return bool(int(reply[1]))

    def announced(self, data: bytes) -> None:
        doc = orjson.loads(data)
        self._take(str(doc["model"]), str(doc["upstream"]), doc["state"])

    def _take(self, model: str, upstream: str, state: Any) -> None:
        text = state.decode() if isinstance(state, bytes) else str(state)
        if not text:
            return  # never booked
        values = [float(x) for x in text.split()]
        if len(values) not in (6, 7) or not all(map(math.isfinite, values)):  # 6: before silences were kept
            raise ValueError(f"not a deployment's health: {text[:200]!r}")  # anyone with Redis access may write
        now, fails, *until = values

        def within(u: float) -> float:
            return u - now if u > 0 else 0.0

        self._apply(model, upstream, int(fails), within(until[0]), within(until[1]), within(until[2]),
                    within(until[3]), len(until) > 4 and until[4] > 0)

    def catch_up(self) -> None:
        """(Re)subscribed: read every deployment's state, which may have changed while no one listened."""
        task = asyncio.get_running_loop().create_task(self._read_all())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_all(self) -> None:
        for model, upstream in self._deployments:
            await self.book(model, upstream, "read", allowed=0, cooldown_s=0.0, solo=True)
