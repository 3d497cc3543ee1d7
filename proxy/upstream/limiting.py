"""Fleet-wide limits per deployment: what each upstream call reserves before it is sent, and gives back after.

A deployment is limited when it (or its upstream) sets `rpm`, `tpm` or `max_in_flight` (limits an upstream enforces
without announcing them), or when its upstream has announced a budget in x-ratelimit-* headers (and, until this
process has had an answer from it, in case it announces one: the fleet learns it from that first answer, and may
know it already from other processes' calls). Each call to it is first reserved fleet-wide, in one round trip to
Redis (proxy/stores/fleetlimits.py): its tokens (counted locally) and one in-flight slot. A call that does not
fit is not sent: the deployment is marked limited for as long as the reservation said (`Deployment.limited`; for
tokens, to calls as large as the one refused), and the router treats that as a rate limit, so the call goes to
another deployment, waits within `max_queue_wait_s` and its deadline, or gets our 429 with Retry-After. After the
answer (`done`, beside the call) the slot is given back, the tokens reconciled to what the upstream billed, and the
budget the answer's headers announce recorded for the fleet. While its calls are reserved, the fleet's figures
alone decide when the next may go (`Deployment.fleet_paced`): this process's own copy of the announced budget, from
its answers' headers, resets a little before the fleet's booking of the same headers (booked after it heard them):
a call woken by it would be refused and wait a second time.

While Redis cannot be asked each process keeps to its own share: the configured limits divided by the number of
processes that reserved for the deployment in the minute before (as Redis last said; 1 until it has said), in a
window of its own that starts with its part (the same division) of what the fleet had used in the minute when Redis
last answered (an outage must not hand out the minute's budget again: the upstream counted it); an announced budget
is then paced by each process's own headers (pacing.py), as before. What a process sends on its own share the
upstream counts too: its next reservation books it in the fleet first, so the fleet's minute holds it.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .pacing import rate_headers
from .router import Deployment

WINDOW_S = 60  # rpm and tpm: any minute
LEASE_MARGIN_S = 1.0  # an in-flight lease outlives its attempt's time limit by this much (a dead process's expires)
IN_FLIGHT_POLL_S = 0.05  # a call waiting for an in-flight slot asks again after this long


class Reservation(Protocol):  # stores.fleetlimits.Reservation, as far as this module needs it
    @property
    def granted(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def wait_s(self) -> float: ...
    @property
    def live(self) -> int: ...
    @property
    def used_requests(self) -> int: ...
    @property
    def used_tokens(self) -> int: ...
    @property
    def in_flight(self) -> int: ...


class SharedLimits(Protocol):
    async def reserve(self, model: str, upstream: str, limits: tuple[int, int, int], tokens: int,
                      lease_s: float, owed: tuple[int, int] = (0, 0)) -> Reservation | None: ...

    # r: the Reservation `reserve` answered (the store's own type)
    # heard(): what the answer announced, its resets counted from when it is called (just before the booking)
    def done(self, model: str, upstream: str, r: Any, billed_delta: int, heard: Callable[[], Announced]) -> None: ...

    async def settle(self, final: bool = False) -> None: ...


Announced = tuple[tuple[int | None, float | None, int | None], tuple[int | None, float | None, int | None]]


def announced(headers: Mapping[str, str]) -> Announced:
    """Remaining, seconds to reset and limit of requests and of tokens, as an answer's headers say (None: not)."""
    return rate_headers(headers, "requests"), rate_headers(headers, "tokens")


class Ticket:
    """One call's reservation, and what its answer said."""

    __slots__ = ("heard", "heard_at", "local", "reservation", "tokens")

    def __init__(self, tokens: int, reservation: Reservation | None) -> None:
        self.tokens = tokens
        self.reservation = reservation  # None: reserved in this process's own share (Redis down)
        self.local = reservation is None
        self.heard: Announced = ((None, None, None), (None, None, None))
        self.heard_at = 0.0

    def hear(self, headers: Mapping[str, str]) -> None:
        self.heard, self.heard_at = announced(headers), time.monotonic()

    def resets_from_now(self) -> Announced:
        """What was heard, its resets counted from now (the fleet's store books them on its own clock)."""
        elapsed = time.monotonic() - self.heard_at
        r, t = self.heard
        return ((r[0], None if r[1] is None else max(0.0, r[1] - elapsed), r[2]),
                (t[0], None if t[1] is None else max(0.0, t[1] - elapsed), t[2]))


class LocalShare:
    """One deployment's share of its limits in this process alone, while Redis cannot be asked."""

    def __init__(self) -> None:
        self.seconds: collections.deque[tuple[int, int, int]] = collections.deque()  # (second, requests, tokens)
        self.in_flight = 0
        self.live = 1  # processes reserving for the deployment, as Redis last said
        # (second, requests, tokens): the fleet's minute when Redis last answered
        self.fleet: tuple[float, int, int] = (-math.inf, 0, 0)
        self.owed = [0, 0]  # requests and tokens sent on this share that the fleet has not booked yet

    def heard(self, r: Reservation, now: float) -> None:
        """Redis answered `r`: the fleet's figures, from which this share starts if Redis cannot be asked next."""
        self.live = max(1, r.live)
        self.fleet = (math.floor(now), r.used_requests, r.used_tokens)

    def booked(self, owed: tuple[int, int]) -> None:
        self.owed = [self.owed[0] - owed[0], self.owed[1] - owed[1]]

    def take(self, limits: tuple[int, int, int], tokens: int, now: float) -> tuple[float, bool]:
        """0 when a call of `tokens` fits this process's share (and is taken), else how long until it may; and
        whether that is for tokens."""
        sec = math.floor(now)
        while self.seconds and self.seconds[0][0] < sec - WINDOW_S:
            self.seconds.popleft()
        rpm, tpm, flight = (math.ceil(x / self.live) if x else 0 for x in limits)
        # this process's part of the fleet's minute as Redis last said, held in that second (it leaves no later)
        seconds: list[tuple[float, int, int]] = [*self.seconds]
        if self.fleet[0] >= sec - WINDOW_S:
            seconds.insert(0, (self.fleet[0], math.ceil(self.fleet[1] / self.live),
                               math.ceil(self.fleet[2] / self.live)))
        for limit, amount, index in ((rpm, 1, 1), (tpm, tokens, 2)):
            used = sum(s[index] for s in seconds)
            if limit and used + amount > limit and (amount <= limit or used > 0):
                freed = 0.0
                for s in seconds:
                    freed += s[index]
                    if freed >= used + amount - limit:
                        return s[0] + WINDOW_S + 1 - now, index == 2
                return WINDOW_S + 1.0, index == 2
        if flight and self.in_flight >= flight:
            return IN_FLIGHT_POLL_S, False
        self.seconds.append((sec, 1, tokens))
        self.in_flight += 1
        self.owed = [self.owed[0] + 1, self.owed[1] + tokens]
        return 0.0, False


class Limiter:
    def __init__(self) -> None:
        self.shared: SharedLimits | None = None
        self._local: dict[tuple[str, str], LocalShare] = {}
        self.fleet: dict[tuple[str, str], Reservation] = {}  # the fleet's figures, by the last reservation
        self._heard: set[tuple[str, str]] = set()  # deployments this process has had an answer from

    def wanted(self, d: Deployment) -> bool:
        """Whether calls to `d` are reserved: it has limits of its own, or its upstream announced some, or this
        process has not heard from it yet (the fleet may know a budget it announced to other processes, and the
        first answer's budget must reach the fleet: a call sent unreserved would go past both)."""
        b = d.budget
        return (any(d.limits) or b.requests.remaining is not None or b.tokens.remaining is not None
                or (self.shared is not None and (d.model, d.upstream) not in self._heard))

    async def reserve(self, d: Deployment, tokens: int, now: float) -> Ticket | None:
        """A ticket for one call of `tokens` to `d`; None when it does not fit (then `d.limited` says how
        long until it may)."""
        local = self._local.setdefault((d.model, d.upstream), LocalShare())
        r, asked = None, time.monotonic()
        if self.shared is not None:
            owed = (max(0, local.owed[0]), max(0, local.owed[1]))
            r = await self.shared.reserve(d.model, d.upstream, d.limits, tokens,
                                          d.settings.attempt_timeout_s + LEASE_MARGIN_S, owed)
            now += time.monotonic() - asked  # a refusal's wait counts from its answer (the fleet's reset is exact)
            if r is not None:
                local.booked(owed)
        d.fleet_paced = r is not None
        by_tokens = False  # refused for tokens: calls as large as this one (router.py, `Deployment.limited`)
        if r is not None:
            local.heard(r, now)
            self.fleet[(d.model, d.upstream)] = r
            wait, by_tokens = (0.0, False) if r.granted else (max(r.wait_s, 0.001), r.reason in ("tpm", "tokens"))
        elif any(d.limits):
            wait, by_tokens = local.take(d.limits, tokens, now)
        else:
            wait = 0.0  # announced only: each process's own headers pace it (pacing.py)
        if wait > 0:
            d.limited(now + wait, now, tokens if by_tokens else None)
            return None
        return Ticket(tokens, r)

    def done(self, d: Deployment, ticket: Ticket, billed: int) -> None:
        """The call of `ticket` is over, `billed` tokens by the upstream's account."""
        if ticket.heard_at:
            self._heard.add((d.model, d.upstream))
        if ticket.reservation is not None and self.shared is not None:
            self.shared.done(d.model, d.upstream, ticket.reservation, billed - ticket.tokens,
                             ticket.resets_from_now)
        elif ticket.local and any(d.limits):
            local = self._local[(d.model, d.upstream)]
            local.in_flight -= 1
            local.owed[1] += billed - ticket.tokens  # what the upstream counted, to book in the fleet

    async def settle(self, final: bool = False) -> None:
        if self.shared is not None:
            await self.shared.settle(final)
