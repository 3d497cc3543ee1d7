"""Fleet-wide limits per deployment: requests and tokens per minute and calls in flight, reserved in Redis.

Each upstream call of a deployment with limits (its own `rpm`, `tpm`, `max_in_flight`, or the budget its upstream
announces in x-ratelimit-* headers) is first reserved by one bounded call of `lua/limits.lua` on the deployment's
keys (`{prefix}:lim:{{model}|{upstream}}` and its leases `...:f`: the health hash's tag, one Cluster slot), by
Redis's own clock: the reservation takes the call's tokens (counted locally) and a lease on an in-flight slot, or
says why not and for how long. When the answer is in, `done` (beside the call, never awaited by it) gives the lease
back, reconciles the tokens to what the upstream billed and records the remaining budget its headers announce,
minus what the fleet still has in flight. A lease left by a process that died expires with its attempt's time
limit. `view` reads the fleet's state of a deployment (budget, leases, health) for /admin/upstreams.

`reserve` answers None while Redis cannot be asked: the caller falls back to its own share (upstream/limiting.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .guard import Store, StoreUnavailable
from .rediskeys import RedisKeys

log = logging.getLogger("proxy.fleetlimits")
DONE_RETRY_S = 0.25  # a lease Redis could not take back is given back again after this, until it has expired


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: bool
    lease: str  # the member to give back ("" when refused)
    second: int  # the Redis second it was booked in
    reason: str = ""  # refused: rpm, tpm, in_flight (configured), requests, tokens (announced)
    wait_s: float = 0.0
    live: int = 1  # processes that reserved for this deployment in the last minute, this one included
    used_requests: int = 0  # in the last minute, fleet-wide, after this reservation
    used_tokens: int = 0
    in_flight: int = 0
    until: float = 0.0  # the event loop's time when its lease expires (done is retried until then)


# What an answer's x-ratelimit-* headers said: remaining, seconds to reset and limit, of requests and of tokens.
Announced = tuple[tuple[int | None, float | None, int | None], tuple[int | None, float | None, int | None]]


@dataclass(slots=True)
class FleetView:
    """One deployment's state in the fleet, as Redis holds it (Unix times: Redis's clock)."""

    now: float
    used_requests: int
    used_tokens: int
    in_flight: int
    budget: dict[str, str] = field(default_factory=dict)
    instances: dict[str, float] = field(default_factory=dict)  # instance -> last reservation
    leases: list[tuple[str, int]] = field(default_factory=list)  # (instance, tokens) per call in flight
    health: dict[str, str] = field(default_factory=dict)


_apps = itertools.count(1)


def instance_name() -> str:
    """This app, as the fleet's views name it: host and process id (`#N` for the Nth app of one process: tests)."""
    n = next(_apps)
    return f"{socket.gethostname()}:{os.getpid()}" + (f"#{n}" if n > 1 else "")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _arg(value: float | int | None) -> str:
    return "" if value is None else repr(value)


class FleetLimits:
    def __init__(self, store: Store, rkeys: RedisKeys, instance: str) -> None:
        self._store = store
        self._rkeys = rkeys
        self.instance = instance
        self._script = store.client.register_script((resources.files("proxy") / "lua" / "limits.lua").read_text())
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False  # shutting down: a lease Redis could not take back is left to expire

    def _keys(self, model: str, upstream: str) -> list[str]:
        budget = self._rkeys.deployment_limits(model, upstream)
        return [budget, f"{budget}:f"]

    async def reserve(self, model: str, upstream: str, limits: tuple[int, int, int], tokens: int,
                      lease_s: float, owed: tuple[int, int] = (0, 0)) -> Reservation | None:
        """Reserve one call of `tokens` within `limits` (rpm, tpm, max_in_flight; 0: none) and the announced
        budget, after booking `owed` (requests, tokens sent on this process's own share while Redis could not be
        asked: booked whether or not the call fits); None when Redis cannot be asked (`owed` is then booked
        again next time, even if this call's reached Redis: too much, never too little)."""
        lease = f"{secrets.token_hex(6)}|{tokens}|{self.instance}"
        args = ["take", *limits, tokens, lease, repr(lease_s), self.instance, *owed]
        keys = self._keys(model, upstream)
        until = asyncio.get_running_loop().time() + lease_s
        try:
            reply = await self._store.call("fleet_limits", lambda r: self._script(keys=keys, args=args, client=r))
        except StoreUnavailable:
            return None
        if int(reply[0]) == 1:
            return Reservation(True, lease, int(reply[1]), live=int(reply[2]), used_requests=int(reply[3]),
                               used_tokens=int(reply[4]), in_flight=int(reply[5]), until=until)
        return Reservation(False, "", 0, _text(reply[1]), float(_text(reply[2])), int(reply[3]), int(reply[4]),
                           int(reply[5]), int(reply[6]))

    def done(self, model: str, upstream: str, r: Reservation, billed_delta: int,
             heard: Callable[[], Announced]) -> None:
        """Give `r`'s lease back, reconcile its tokens (`billed_delta`: billed minus reserved), record the budget
        the answer announced (`heard()`, its resets from the moment it is asked); beside the call. While Redis
        cannot be asked it is tried again until the lease has expired (a blip must not hold an in-flight slot for
        the attempt's whole time limit); the script reconciles a lease's tokens only once."""
        keys = self._keys(model, upstream)
        task = asyncio.get_running_loop().create_task(self._done(keys, ["done", r.lease, billed_delta, r.second],
                                                                 heard, r.until))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _done(self, keys: list[str], args: list[str | int], heard: Callable[[], Announced],
                    until: float) -> None:
        for remaining, reset, limit in heard():
            args += [_arg(remaining), _arg(reset), _arg(limit)]
        loop, tries = asyncio.get_running_loop(), 0
        while True:
            if tries == 0 or self._store.available:  # while it bypasses Redis, no try (nor error) per wait
                tries += 1
                try:
                    await self._store.call("fleet_limits", lambda r: self._script(keys=keys, args=args, client=r))
                    return
                except StoreUnavailable:
                    pass
                except Exception:  # an unreadable reply must never fail a call
                    log.exception("fleet limits: a lease was not given back")
                    return
            left = until - loop.time()
            if left <= 0 or self._closing:
                return  # the lease expires with its attempt's time limit
            await asyncio.sleep(min(DONE_RETRY_S, left))

    async def view(self, model: str, upstream: str) -> FleetView:
        """The fleet's state of one deployment; StoreUnavailable when Redis cannot say."""
        keys = [*self._keys(model, upstream), self._rkeys.deployment_health(model, upstream)]
        reply = [_text(x) for x in await self._store.operator_call(
            "fleet_view", lambda r: self._script(keys=keys, args=["view"], client=r))]
        view = FleetView(float(reply[0]), int(reply[1]), int(reply[2]), int(reply[3]))
        first = reply.index("|", 4)
        second = reply.index("|", first + 1)
        pairs = reply[4:first]
        for name, value in zip(pairs[::2], pairs[1::2], strict=True):
            if name.startswith("p:"):
                view.instances[name[2:]] = float(value)
            else:
                view.budget[name] = value
        for member in reply[first + 1:second]:
            _, tokens, instance = member.split("|", 2)
            view.leases.append((instance, int(tokens)))
        health = reply[second + 1:]
        view.health = dict(zip(health[::2], health[1::2], strict=True))
        return view

    async def settle(self, final: bool = False) -> None:
        """Wait for the leases being given back (tests; `final`: shutdown, no more tries while Redis is down)."""
        self._closing = self._closing or final
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
