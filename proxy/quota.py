"""Quotas: per-team and per-key limits on requests and tokens in fixed UTC windows.

A request is admitted by one Lua script (`lua/charge.lua`) that checks every counter that applies to it (the
team's and the key's, per minute, day and month) and reserves the request and its tokens in all of them, or in
none: check-and-reserve is atomic in Redis, so it is exact under concurrency and across processes. After the
upstream has answered, the reservation is corrected to the upstream's own count; a request that fails gets its
tokens back (`lua/adjust.lua`). Failed requests keep their place in the request counters: they were made.

Windows are UTC: a minute starts at :00, a day at 00:00, a month on the 1st. The clock is injected.
When Redis is unreachable, `quotas.on_redis_down` decides: "open" runs the same scripts on an in-process store
(each process then enforces the limits alone), "closed" refuses with 503.
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from .config import QuotaSettings
from .errors import ProxyError, QuotaExceeded, RateLimited, ServiceUnavailable, TokensRateLimited
from .keys import KeyRecord
from .limits import LIMIT_WINDOWS, Limits
from .metrics import Metrics
from .rediskeys import RedisKeys
from .store import Store, StoreUnavailable, in_process_redis
from .teams import TeamStore

log = logging.getLogger("proxy.quota")
_LIMIT_TEXT = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "tokens_per_day": "tokens per day",
    "tokens_per_month": "tokens per month",
}


def window(kind: str, now: float) -> tuple[str, float]:
    """The id of the UTC window of `kind` (minute, day, month) that holds `now`, and when it ends."""
    if kind == "minute":
        start = int(now // 60)
        return f"m{start}", (start + 1) * 60.0
    t = time.gmtime(now)
    if kind == "day":
        return f"d{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}", (int(now // 86400) + 1) * 86400.0
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return f"mo{t.tm_year:04d}{t.tm_mon:02d}", float(calendar.timegm((year, month, 1, 0, 0, 0)))


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

    def _args(self, requests: int, tokens: int) -> list[Any]:
        args: list[Any] = []
        for c in self.counters:
            args += [c.limit, requests if c.metric == "req" else tokens, int(c.resets_at) + 60]
        return args

    def queue(self, pipe: Any) -> None:
        """Queue step 1 in a pipeline (its reply goes to `charge_request`)."""
        keys = [c.key for c in self.counters]
        pipe.evalsha(self._quotas.charge_sha, len(keys), *keys, *self._args(1, 0))

    async def charge_request(self, reply: Any = None) -> None:
        """Step 1: `reply` from the queued script, or None (or an error such as NOSCRIPT) to run it now."""
        if reply is None or isinstance(reply, Exception):
            reply = await self._quotas.charge([c.key for c in self.counters], self._args(1, 0))
        self._apply(reply, 1, 0)

    async def charge_tokens(self, tokens: int) -> None:
        """Step 2: reserve `tokens` more (the caller reserves in as many steps as it needs). If they do not fit,
        everything this ticket holds is given back (the request slot and earlier reservations) and it raises 429."""
        if tokens <= 0:
            return
        keys = [c.key for c in self.counters]
        reply = await self._quotas.charge(keys, self._args(0, tokens))
        if reply[0] == 0:
            await self.release_request()
            if self.tokens:
                await self._quotas.adjust([c.key for c in self.counters if c.metric == "tok"], -self.tokens)
                self.tokens = 0
        self._apply(reply, 0, tokens)
        self.tokens += tokens

    async def release_request(self) -> None:
        """Give the request slot back (refused for tokens, or invalid after step 1)."""
        await self._quotas.adjust([c.key for c in self.counters if c.metric == "req"], -1)

    async def settle(self, tokens: int) -> None:
        """Correct the reservation to the tokens the request really consumed (the upstream's count)."""
        delta = tokens - self.tokens
        if delta:
            await self._quotas.adjust([c.key for c in self.counters if c.metric == "tok"], delta)
            self.tokens = tokens
            self.values = [v + delta if c.metric == "tok" else v for c, v in zip(self.counters, self.values,
                                                                                  strict=True)]
            self.headers = rate_headers(self.counters, self.values, self.now)
            self._quotas.observe(self.key, self.counters, self.values)

    async def refund(self) -> None:
        """The request failed: give its tokens back (it keeps its request slot: it was made)."""
        await self.settle(0)

    def _apply(self, reply: Any, requests: int, tokens: int) -> None:
        if reply[0] == 0:
            c = self.counters[int(reply[1]) - 1]
            # Every counter as it stands; refused for tokens, the request slot has just been given back.
            values = [int(v) - (not requests and k.metric == "req") for k, v in zip(self.counters, reply[3:],
                                                                                    strict=True)]
            self._quotas.reject(self.key, c, int(reply[2]), requests if c.metric == "req" else tokens, self.now,
                                self.counters, values)
        self.values = [int(v) for v in reply[1:]]
        self.headers = rate_headers(self.counters, self.values, self.now)
        self._quotas.observe(self.key, self.counters, self.values)


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
    ) -> None:
        self._store = store
        self._keys = keys
        self._teams = teams
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        lua = resources.files("proxy") / "lua"
        self._charge = store.client.register_script((lua / "charge.lua").read_text())
        self._adjust = store.client.register_script((lua / "adjust.lua").read_text())
        self._local: Any = None  # the in-process fallback store, made on first use

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

    async def charge(self, keys: list[str], args: list[Any]) -> Any:
        return await self._run(self._charge, keys, args)

    async def adjust(self, keys: list[str], delta: int) -> None:
        if keys:
            try:
                await self._run(self._adjust, keys, [delta] * len(keys))
            except ProxyError:  # closed mode with Redis down: the reservation is already lost with it
                log.warning("quota correction of %d not applied: redis unreachable", delta)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._store.call("quota", lambda r: script(keys=keys, args=args, client=r))
        except StoreUnavailable:
            if self._settings.on_redis_down == "closed":
                raise ServiceUnavailable(
                    "Quotas cannot be checked right now (the quota store is unreachable). Please retry."
                ) from None
        if self._local is None:
            self._local = in_process_redis()  # same scripts, same semantics, this process only
            log.warning("redis unreachable: quotas are enforced per process until it is back")
        return await script(keys=keys, args=args, client=self._local)

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
