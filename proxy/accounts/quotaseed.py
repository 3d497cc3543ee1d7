"""Day and month quota counters start from what the usage ledger already holds for their window.

A counter exists only while a limit is in force: before, nobody counts. So a `tokens_per_day` or `tokens_per_month`
limit set part-way through its window (at run time, in the config, or again after it was lifted) must not start from
zero. The charge script (`lua/charge.lua`) refuses to touch such a counter while it does not exist and names it; the
caller then seeds it here with the ledger's sum for the window so far, and runs the script again:

- what counts is what the quota counts: the tokens billed upstream (`upstream_tokens`, which holds `failed_tokens`
  too), plus `cached_tokens` when `quotas.count = "all"`; a team's counter sums every key of the team, a key's
  counter every key of its rotation chain (its lineage: the first key's id and the ids in `{prefix}:lineage:{id}`);
- the seed is written with `SET ... NX EXAT`, so of several processes seeding the same counter at once the first
  wins and the others change nothing, and no charge can land in the counter before its seed (the script never
  creates it); per-minute counters are not seeded (a minute is over before it matters).

The ledger is written by each process every `usage.flush_interval_s`, so the usage of about that last interval
(and of requests still in flight when the limit took effect) is not in the seed.
When a day or month limit is set where none was in force, the counter of the current window is deleted first
(`forget_counters`): it holds only what was charged before the limit was lifted, and the next charge seeds it
again from the ledger.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..config.limits import LIMIT_WINDOWS, Limits, window
from ..stores.guard import Store
from ..stores.rediskeys import RedisKeys

SEEDED = ("tokens_per_day", "tokens_per_month")  # the limits whose counters start from the ledger


@dataclass(frozen=True, slots=True)
class SeedTarget:
    counter: str  # the counter's Redis key
    lineage: str | None  # None: the team's counter; else the rotation chain whose usage it counts
    kind: str  # day | month
    expires_at: int  # unix time, as the charge script sets it


def ledger_days(kind: str, now: float) -> list[str]:
    """The ledger days (UTC, YYYY-MM-DD) of the day or month window that holds `now`, up to `now`'s day."""
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    first = today if kind == "day" else today.replace(day=1)
    return [(first + dt.timedelta(days=n)).isoformat() for n in range((today - first).days + 1)]


def ledger_sum(hashes: Iterable[dict[bytes, bytes]], metrics: tuple[str, ...], key_ids: set[str] | None) -> int:
    """Sum of `metrics` in ledger hashes (fields `key_id|model|metric`), over `key_ids` (None: every key)."""
    total = 0
    for fields in hashes:
        for name, value in fields.items():
            key_id, _, metric = name.decode().split("|")
            if metric in metrics and (key_ids is None or key_id in key_ids):
                total += int(value)
    return total


class LedgerSeeder:
    def __init__(self, store: Store, keys: RedisKeys, *, count_all: bool) -> None:
        self._store = store
        self._keys = keys
        self._metrics = ("upstream_tokens", "cached_tokens") if count_all else ("upstream_tokens",)

    async def seed(self, team: str, key_id: str, targets: list[SeedTarget], now: float) -> None:
        """Create each target counter, if it still does not exist, at what the ledger holds for its window. Two
        round trips: the ledger days (and the key's rotation chain), then one SET NX per counter. Operator-sized
        reads on the request path, once per counter and window: bounded by `redis.operator_timeout_s`, and a
        failure (StoreUnavailable) does not make the hot path bypass Redis."""
        days = sorted({d for t in targets for d in ledger_days(t.kind, now)})
        lineages = sorted({t.lineage for t in targets if t.lineage is not None})

        async def run(r: Any) -> None:
            pipe = r.pipeline(transaction=False)
            for d in days:
                pipe.hgetall(self._keys.usage(team, d))
            for lineage in lineages:
                pipe.smembers(self._keys.lineage(lineage))
            replies = await pipe.execute()
            by_day = dict(zip(days, replies[: len(days)], strict=True))
            chains = {lineage: {lineage, key_id} | {m.decode() for m in members}
                      for lineage, members in zip(lineages, replies[len(days):], strict=True)}
            pipe = r.pipeline(transaction=False)
            for t in targets:
                used = ledger_sum((by_day[d] for d in ledger_days(t.kind, now)), self._metrics,
                                  None if t.lineage is None else chains[t.lineage])
                pipe.set(t.counter, used, nx=True, exat=t.expires_at)
            await pipe.execute()

        await self._store.call("quota", run, timeout_s=self._store.operator_timeout_s, mark_down=False)


def newly_limited(before: Limits, after: Limits) -> list[str]:
    """The day and month limits `after` sets that `before` did not."""
    return [name for name in SEEDED if getattr(before, name) is None and getattr(after, name) is not None]


async def forget_counters(store: Store, keys: RedisKeys, team: str, lineage: str | None, names: list[str],
                          now: float, op: str) -> None:
    """Delete the current window's counters of the limits `names` (of the team, or of a key's `lineage`): the limit
    was not in force, so they hold only what was charged before it was lifted; the next charge seeds them from the
    ledger. One DEL: a team's counters share a Cluster slot. `op`: the operator call's name in the metrics."""
    counters = [keys.quota_counter(team, lineage, LIMIT_WINDOWS[n][0], window(LIMIT_WINDOWS[n][1], now)[0])
                for n in names]
    if counters:
        await store.operator_call(op, lambda r: r.delete(*counters))
