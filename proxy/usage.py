"""The usage ledger: requests and tokens per team, key, model and UTC day, in Redis, for chargeback.

Each process adds usage up in memory and writes it with one pipeline of HINCRBY every `usage.flush_interval_s`
and at shutdown, so the hot path does no Redis write for it. If Redis is unreachable the sums are kept and
written on a later flush. What is recorded is exactly what clients were told in `usage`: `prompt_tokens` split
into tokens sent upstream and tokens served without an upstream call (`cached_tokens`).
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .rediskeys import RedisKeys
from .store import Store, StoreUnavailable

log = logging.getLogger("proxy.usage")
METRICS = ("requests", "upstream_tokens", "cached_tokens")
GroupBy = Literal["team", "key", "model", "day"]


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class UsageLedger:
    def __init__(
        self,
        store: Store,
        keys: RedisKeys,
        *,
        retention_days: int = 400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keys = keys
        self._retention_s = retention_days * 86400
        self._clock = clock
        # (team, day) -> field -> amount not yet written
        self._pending: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def record(self, team: str, key_id: str, model: str, prompt_tokens: int, upstream_tokens: int) -> None:
        fields = self._pending[(team, day_of(self._clock()))]
        base = f"{key_id}|{model}|"
        fields[base + "requests"] += 1
        fields[base + "upstream_tokens"] += upstream_tokens
        fields[base + "cached_tokens"] += prompt_tokens - upstream_tokens

    async def flush(self) -> None:
        """Write what was recorded since the last flush; on failure keep it for the next one."""
        if not self._pending:
            return
        pending, self._pending = self._pending, defaultdict(lambda: defaultdict(int))

        async def write(r: Any) -> None:
            pipe = r.pipeline(transaction=False)
            for (team, day), fields in pending.items():
                key = self._keys.usage(team, day)
                for name, amount in fields.items():
                    if amount:
                        pipe.hincrby(key, name, amount)
                pipe.expire(key, self._retention_s)
                pipe.sadd(self._keys.usage_teams(), team)
            await pipe.execute()

        try:
            await self._store.call("usage-flush", write)
        except StoreUnavailable:
            for slot, fields in pending.items():  # merge back, keeping anything recorded meanwhile
                for name, amount in fields.items():
                    self._pending[slot][name] += amount
            raise

    async def run(self, interval_s: float) -> None:
        """Flush every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except StoreUnavailable:
                log.warning("usage ledger flush failed (redis unreachable); kept for the next flush")

    async def report(
        self, team: str | None, since: dt.date, until: dt.date, by: GroupBy | None,
        prices: Mapping[str, float],
    ) -> list[dict[str, Any]]:
        """Rows of usage from `since` to `until` (inclusive, UTC days), one per team and `by` group."""
        if until < since:
            raise ValueError("until is before since")
        by = None if by == "team" else by
        days = [(since + dt.timedelta(days=n)).isoformat() for n in range((until - since).days + 1)]

        async def read(r: Any) -> list[tuple[str, str, dict[bytes, bytes]]]:
            teams = [team] if team else sorted(t.decode() for t in await r.smembers(self._keys.usage_teams()))
            pipe = r.pipeline(transaction=False)
            slots = [(t, d) for t in teams for d in days]
            for t, d in slots:
                pipe.hgetall(self._keys.usage(t, d))
            return [(t, d, raw) for (t, d), raw in zip(slots, await pipe.execute(), strict=True)]

        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for t, d, raw in await self._store.call("usage-report", read):
            for name, value in raw.items():
                key_id, model, metric = name.decode().split("|")
                group = {"key": key_id, "model": model, "day": d}.get(by or "team", "")
                row = rows.setdefault((t, group), {"team": t, **({by: group} if by else {}),
                                                   **dict.fromkeys(METRICS, 0), "upstream_cost_usd": 0.0,
                                                   "saved_usd": 0.0})
                amount = int(value)
                row[metric] += amount
                price = prices.get(model, 0.0) / 1e6
                if metric == "upstream_tokens":
                    row["upstream_cost_usd"] += amount * price
                elif metric == "cached_tokens":
                    row["saved_usd"] += amount * price
        out = [rows[k] for k in sorted(rows)]
        for row in out:
            row["total_tokens"] = row["upstream_tokens"] + row["cached_tokens"]
            row["upstream_cost_usd"] = round(row["upstream_cost_usd"], 6)
            row["saved_usd"] = round(row["saved_usd"], 6)
        return out


@dataclass(frozen=True)
class ReportFormat:
    columns: tuple[str, ...]

    def csv(self, rows: list[dict[str, Any]]) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(self.columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()

    def table(self, rows: list[dict[str, Any]]) -> str:
        cells = [list(self.columns)] + [[_cell(r[c]) for c in self.columns] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                         for row in cells) + "\n"

    @staticmethod
    def json(rows: list[dict[str, Any]]) -> str:
        return orjson.dumps(rows).decode() + "\n"

    def render(self, rows: list[dict[str, Any]], fmt: str) -> str:
        return self.json(rows) if fmt == "json" else self.csv(rows) if fmt == "csv" else self.table(rows)


def _cell(value: Any) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def report_format(by: GroupBy | None) -> ReportFormat:
    group = (by,) if by and by != "team" else ()
    return ReportFormat(("team", *group, "requests", "upstream_tokens", "cached_tokens", "total_tokens",
                         "upstream_cost_usd", "saved_usd"))
