"""Quotas: per-team and per-key limits on requests and tokens in fixed UTC windows.

A request is admitted by one Lua script (`lua/charge.lua`) that checks every counter that applies to it (the
team's and the key's, per minute, day and month) and reserves the request and its tokens in all of them, or in
none: check-and-reserve is atomic in Redis, so it is exact under concurrency and across processes. A day or month
token counter starts from what the usage ledger holds for its window (quotaseed.py): the script names one that does
not exist yet instead of charging, and the charge is made again once it is seeded. After the
upstream has answered, the reservation is corrected to the upstream's own count; a request that fails gets its
tokens back (`lua/adjust.lua`). Failed requests keep their place in the request counters: they were made.

Windows are UTC: a minute starts at :00, a day at 00:00, a month on the 1st. The clock is injected.
When Redis is unreachable, `quotas.on_redis_down` decides: "open" runs the same scripts on an in-process store
(each process then enforces the limits alone, each counter starting from the last value this process saw in Redis
for its window), "closed" refuses with 503. A ticket corrects only the store it charged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from ..config import QuotaSettings
from ..config.limits import LIMIT_WINDOWS, Limits, window
from ..errors import ProxyError, QuotaExceeded, RateLimited, ServiceUnavailable, TokensRateLimited
from ..stores.guard import Store, StoreUnavailable, in_process_redis
from ..stores.rediskeys import RedisKeys
from ..telemetry.metrics import Metrics
from ..telemetry.tracing import NO_TRACING, Tracing
from .keys import KeyRecord
from .quotaseed import SEEDED, LedgerSeeder, SeedTarget
from .teams import TeamStore

log = logging.getLogger("proxy.quota")
Where = Literal["redis", "local"]  # the store a charge went to: Redis, or the in-process fallback
REPLY_LOST = object()  # a charge sent in a pipeline whose reply was lost (see Ticket.charge_request)
_SEEN_MAX = 100_000  # counters whose last Redis value is remembered (each ~200 bytes)
_LIMIT_TEXT = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "tokens_per_day": "tokens per day",
    "tokens_per_month": "tokens per month",
}


def format_reset(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: `850ms`, `12s`, `6m0s`, `3h2m1s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


@dataclass(frozen=True, slots=True)
class Counter:
    key: str  # the Redis key of this window's counter
    scope: Literal["team", "key"]
    limit_name: str  # rpm | tpm | tokens_per_day | tokens_per_month
    metric: str  # req | tok
    limit: int
    resets_at: float


class Ticket:
    """One request's reservation, made in two steps so that a cache hit costs no extra round trip:

    1. the request itself (`queue` puts the script in the pipeline that reads the cache; `charge_request` reads
       its reply, or runs it alone), checking request limits, and reading every counter for the headers;
    2. its tokens, once the cache has said what must go upstream (`charge_tokens`, possibly in several steps);
       nothing to do for a full hit when only billable tokens count. If they do not fit, the request slot and
       any earlier reservation are given back too.
    Afterwards `settle` corrects the tokens to the upstream's count, and `refund` gives them back on failure.

    A ticket remembers in which store (Redis, or the in-process fallback while Redis was down) it holds what:
    its corrections go where its charges went, never elsewhere. A correction due in Redis while Redis is
    unreachable is dropped (logged): applied to the in-process store it would free room that is not there.
    """

    def __init__(self, quotas: Quotas, key: KeyRecord, counters: list[Counter], now: float, counts_all: bool) -> None:
        self._quotas = quotas
        self.key = key
        self.counters = counters
        self.now = now
        self.counts_all = counts_all  # quotas count every prompt token, not only those sent upstream
        self.values = [0] * len(counters)  # each counter's value after this request
        self.tokens = 0  # tokens reserved
        self.headers: dict[str, str] = {}
        self._held: dict[Where, list[int]] = {}  # store -> [request slots, tokens] this ticket holds there
        self._last: Where = "redis"  # where its latest charge went: a correction upward goes there too
        # the counters (1-based, as the script numbers them) that start from the ledger: they must exist in Redis
        self.seeded = [i for i, c in enumerate(counters, 1) if c.limit_name in SEEDED]

    def _args(self, requests: int, tokens: int) -> list[Any]:
        args: list[Any] = []
        for c in self.counters:
            args += [c.limit, requests if c.metric == "req" else tokens, int(c.resets_at) + 60]
        return args

    def _keys(self, metric: str | None = None) -> list[str]:
        return [c.key for c in self.counters if metric is None or c.metric == metric]

    def _hold(self, where: Where, requests: int, tokens: int) -> None:
        held = self._held.setdefault(where, [0, 0])
        held[0] += requests
        held[1] += tokens
        self.tokens += tokens
        self._last = where

    def queue(self, pipe: Any) -> None:
        """Queue step 1 in a pipeline (its reply goes to `charge_request`)."""
        keys = self._keys()
        pipe.evalsha(self._quotas.charge_sha, len(keys), *keys, *self._args(1, 0), *self.seeded)

    async def charge_request(self, reply: Any = None) -> None:
        """Step 1: `reply` from the queued script, or None (or an error such as NOSCRIPT) to run it now, or
        REPLY_LOST: the pipeline was sent but its answer lost (a timeout). The script then most likely ran in
        Redis; it is not run a second time, here or in the in-process store, and the slot counts as held in Redis
        (should it not have run, this one request goes uncounted)."""
        with self._quotas.tracing.span("quota charge") as span:
            if span.is_recording():
                span.set_attribute("embedding_proxy.quota.step", "request")
                span.set_attribute("embedding_proxy.quota.in_cache_read",
                                   reply is not None and not isinstance(reply, Exception))
            if reply is REPLY_LOST:
                self._hold("redis", 1, 0)
                return
            where: Where = "redis"
            if reply is None or isinstance(reply, Exception) or reply[0] == -1:  # -1: a counter to seed first
                reply, where = await self._quotas.charge(self, self._args(1, 0))
            else:
                self._quotas.remember(self._keys(), self._args(1, 0), reply)
            if span.is_recording():
                span.set_attribute("embedding_proxy.quota.store", where)
            self._apply(reply, 1, 0)
            self._hold(where, 1, 0)

    async def charge_tokens(self, tokens: int, *, give_back: bool = True) -> None:
        """Step 2: reserve `tokens` more (the caller reserves in as many steps as it needs). If they do not fit, it
        raises 429; with `give_back` everything this ticket holds is given back first (the request slot and
        earlier reservations), else the caller settles what it holds (some of it was billed already)."""
        if tokens <= 0:
            return
        with self._quotas.tracing.span("quota charge") as span:
            if span.is_recording():
                span.set_attribute("embedding_proxy.quota.step", "tokens")
                span.set_attribute("embedding_proxy.quota.tokens", tokens)
            reply, where = await self._quotas.charge(self, self._args(0, tokens))
            if span.is_recording():
                span.set_attribute("embedding_proxy.quota.store", where)
            if reply[0] == 0 and give_back:
                await self.release_request()
                await self._correct_tokens(-self.tokens)
            self._apply(reply, 0, tokens, released=give_back)
            self._hold(where, 0, tokens)

    async def release_request(self) -> None:
        """Give the request slot back (refused for tokens, or invalid after step 1)."""
        for where, held in self._held.items():
            if held[0]:
                held[0] -= 1
                await self._quotas.adjust(where, self._keys("req"), -1)
                return

    async def settle(self, tokens: int) -> None:
        """Correct the reservation to the tokens the request really consumed (the upstream's count)."""
        delta = tokens - self.tokens
        if delta:
            await self._correct_tokens(delta)
            self._show([v + delta if c.metric == "tok" else v for c, v in zip(self.counters, self.values,
                                                                              strict=True)])

    async def refund(self) -> None:
        """The request failed and none of its tokens were billed: give them all back (it keeps its request slot:
        it was made)."""
        await self.settle(0)

    async def _correct_tokens(self, delta: int) -> None:
        """Add `delta` tokens where this ticket's charges went: more to the latest store, less taken from each
        store in turn as far as it holds them."""
        keys = self._keys("tok")
        if delta > 0:
            self._hold(self._last, 0, delta)
            await self._quotas.adjust(self._last, keys, delta)
            return
        for where, held in self._held.items():
            take = min(held[1], -delta)
            if take:
                held[1] -= take
                self.tokens -= take
                delta += take
                await self._quotas.adjust(where, keys, -take)

    def _apply(self, reply: Any, requests: int, tokens: int, released: bool = True) -> None:
        if reply[0] == 0:
            c = self.counters[int(reply[1]) - 1]
            # Every counter as it stands; refused for tokens, the request slot has (usually) just been given back.
            values = [int(v) - (released and not requests and k.metric == "req")
                      for k, v in zip(self.counters, reply[3:], strict=True)]
            self._quotas.reject(self.key, c, int(reply[2]), requests if c.metric == "req" else tokens, self.now,
                                self.counters, values)
        self._show([int(v) for v in reply[1:]])

    def _show(self, values: list[int]) -> None:
        """Each counter's value after this request: the answer's x-ratelimit-* headers and the quota gauges."""
        self.values = values
        self.headers = rate_headers(self.counters, values, self.now)
        self._quotas.observe(self.key, self.counters, values)


def rate_headers(counters: list[Counter], values: list[int], now: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, from the tightest request limit and the tightest token limit."""
    headers: dict[str, str] = {}
    for metric, suffix in (("req", "requests"), ("tok", "tokens")):
        candidates = [(c.limit - v, c) for c, v in zip(counters, values, strict=True) if c.metric == metric]
        if candidates:
            remaining, c = min(candidates, key=lambda rc: (rc[0], rc[1].resets_at))
            headers[f"x-ratelimit-limit-{suffix}"] = str(c.limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, remaining))
            headers[f"x-ratelimit-reset-{suffix}"] = format_reset(c.resets_at - now)
    return headers


class Quotas:
    def __init__(
        self,
        store: Store,
        keys: RedisKeys,
        teams: TeamStore,
        settings: QuotaSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        *,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._store = store
        self.tracing = tracing  # the tickets' charges are spans
        self._keys = keys
        self._teams = teams
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        lua = resources.files("proxy") / "lua"
        self._charge = store.client.register_script((lua / "charge.lua").read_text())
        self._adjust = store.client.register_script((lua / "adjust.lua").read_text())
        self._seed_script = store.client.register_script((lua / "seed.lua").read_text())
        self._ledger_seeder = LedgerSeeder(store, keys, count_all=settings.count == "all")
        self._local: Any = None  # the in-process fallback store, made on first use
        self._seen: dict[str, tuple[int, int]] = {}  # counter key -> (last value seen in Redis, when it expires)

    def counters(self, key: KeyRecord, team_limits: Limits, now: float) -> list[Counter]:
        out = []
        # A key's own counters are keyed by its quota identity: a rotated key spends its predecessor's allowance.
        for scope, key_id, limits in (("team", None, team_limits), ("key", key.quota_id, key.limits)):
            for name, value in limits.items():
                metric, kind = LIMIT_WINDOWS[name]
                win, resets_at = window(kind, now)
                rkey = self._keys.quota_counter(key.team, key_id, metric, win)
                out.append(Counter(rkey, scope, name, metric, value, resets_at))  # type: ignore[arg-type]
        return out

    @property
    def charge_sha(self) -> str:
        return str(self._charge.sha)

    async def ticket(self, key: KeyRecord) -> Ticket | None:
        """A ticket for one request of `key`, or None when neither the key nor its team has limits."""
        team_limits = await self._teams.limits(key.team)
        if not team_limits and not key.limits:
            return None
        now = self._clock()
        counters = self.counters(key, team_limits, now)
        return Ticket(self, key, counters, now, self._settings.count == "all")

    async def charge(self, ticket: Ticket, args: list[Any]) -> tuple[Any, Where]:
        """Run the charge script for `ticket`'s counters; returns its reply and the store that ran it. A day or month
        counter missing in Redis is seeded from the ledger first (the script changes nothing then), at most twice:
        should one vanish again (its window just ended), the charge is made as it was before counters were seeded."""
        keys = [c.key for c in ticket.counters]
        try:
            for attempt in range(3):
                run = functools.partial(self._run_charge, keys, [*args, *ticket.seeded] if attempt < 2 else args)
                reply = await self._store.call("quota", run)
                if reply[0] != -1:
                    break
                await self._seed_from_ledger(ticket, [int(i) for i in reply[1:]])
        except StoreUnavailable:
            if self._settings.on_redis_down == "closed":
                raise ServiceUnavailable(
                    "Quotas cannot be checked right now (the quota store is unreachable). Please retry."
                ) from None
            local = self._local_store()
            await self._seed(local, keys)
            return await self._charge(keys=keys, args=args, client=local), "local"
        self.remember(keys, args, reply)
        return reply, "redis"

    async def adjust(self, where: Where, keys: list[str], delta: int) -> None:
        """Add `delta` to `keys` in the store `where` the charges being corrected went. Redis unreachable: the
        correction is dropped and logged, never applied to the in-process store (it holds other charges)."""
        if not keys:
            return
        args = [delta] * len(keys)
        if where == "local":
            await self._adjust(keys=keys, args=args, client=self._local_store())
            return
        try:
            await self._store.call("quota", lambda r: self._adjust(keys=keys, args=args, client=r))
        except StoreUnavailable:
            log.warning("quota correction of %d dropped: it is due in redis, which is unreachable", delta)
            return
        for k in keys:
            if (seen := self._seen.get(k)) is not None:
                self._seen[k] = (max(0, seen[0] + delta), seen[1])

    async def _run_charge(self, keys: list[str], args: list[Any], r: Any) -> Any:
        return await self._charge(keys=keys, args=args, client=r)

    async def _seed_from_ledger(self, ticket: Ticket, missing: list[int]) -> None:
        key = ticket.key
        targets = [SeedTarget(c.key, None if c.scope == "team" else key.quota_id, LIMIT_WINDOWS[c.limit_name][1],
                              int(c.resets_at) + 60)
                   for c in (ticket.counters[i - 1] for i in missing)]
        await self._ledger_seeder.seed(key.team, key.id, targets, ticket.now)

    def remember(self, keys: list[str], args: list[Any], reply: Any) -> None:
        """Note the counters' values in a charge script's reply from Redis (and when each expires), to seed the
        in-process store with them should Redis become unreachable within the same windows."""
        values = reply[1:] if reply[0] == 1 else reply[3:]
        seen = self._seen
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            seen[k] = (int(v), int(args[3 * i + 2]))
        if len(seen) > _SEEN_MAX:
            now = self._clock()
            for k in [k for k, (_, expires) in seen.items() if expires <= now]:
                del seen[k]
            if len(seen) > _SEEN_MAX:  # all current: forget the oldest noted
                for k in list(seen)[: len(seen) - _SEEN_MAX]:
                    del seen[k]

    def _local_store(self) -> Any:
        if self._local is None:
            self._local = in_process_redis()  # same scripts, same semantics, this process only
            log.warning("redis unreachable: quotas are enforced per process until it is back")
        return self._local

    async def _seed(self, local: Any, keys: list[str]) -> None:
        """Start the in-process counters of `keys` from the last values Redis gave this process for them (each
        only raised, never lowered), not from zero: see the README on the bound during an outage."""
        args: list[Any] = []
        seeded: list[str] = []
        for k in keys:
            if (seen := self._seen.get(k)) is not None:
                seeded.append(k)
                args += list(seen)
        if seeded:
            await self._seed_script(keys=seeded, args=args, client=local)

    def reject(self, key: KeyRecord, c: Counter, used: int, asked: int, now: float, counters: list[Counter],
               values: list[int]) -> None:
        """Raise the 429 for counter `c` (at `used`, asked for `asked` more). `counters` and their current `values`
        fill the x-ratelimit-* headers for both requests and tokens; the refusing side shows `c` as it stands."""
        whose = f"team '{key.team}'" if c.scope == "team" else f"key {key.id}"
        wait = max(0.0, c.resets_at - now)
        self._metrics.quota_rejections.labels(key.team, c.scope, c.limit_name).inc()
        message = (
            f"Rate limit reached for {whose} on {_LIMIT_TEXT[c.limit_name]}: limit {c.limit}, used {used}, "
            f"requested {asked}. Please try again in {format_reset(wait)}."
        )
        err: ProxyError
        if c.limit_name in ("rpm", "tpm"):
            err = (RateLimited if c.metric == "req" else TokensRateLimited)(message, retry_after=wait)
        else:
            err = QuotaExceeded(
                message.replace("Rate limit reached", "Quota exceeded") + " The budget resets then.",
                retry_after=wait,
            )
        err.headers.update(rate_headers(counters, values, now))
        err.headers.update(rate_headers([c], [used], now))  # the counter that refused it, as it stands
        raise err

    def observe(self, key: KeyRecord, counters: list[Counter], values: list[int]) -> None:
        """Export each limit, what is left of it and when its window ends (after that it is all available again:
        the dashboards read the window end, so no task has to reset the gauges at every window edge)."""
        m = self._metrics
        for c, v in zip(counters, values, strict=True):
            key_id = "" if c.scope == "team" else key.id
            m.child(m.quota_limit, key.team, key_id, c.limit_name).set(c.limit)
            m.child(m.quota_remaining, key.team, key_id, c.limit_name).set(max(0, c.limit - v))
            m.child(m.quota_window_end, key.team, key_id, c.limit_name).set(c.resets_at)
