"""The usage ledger: requests and tokens per team, key, model and UTC day, in Redis, for chargeback.

Each process adds usage up in memory and writes it every `usage.flush_interval_s` and at shutdown, so the hot path
does no Redis write for it. A flush is a numbered batch applied by one Lua script per ledger hash
(`lua/ledger.lua`) that remembers the last batch of each writer, so a flush whose reply was lost (a timeout does not
mean Redis skipped it) is retried as the same batch and never counts twice. A flush sends what was recorded when it
began, in at most two round trips (a batch left unacknowledged, then one new batch), however much usage arrives
meanwhile: one batch per process per interval under any traffic. Reports wait for this process's flush at most
`REPORT_FLUSH_WAIT_S`. What is recorded for a request answered 200 is exactly what its
client was told in `usage`: `prompt_tokens` split into tokens sent upstream and tokens served without an upstream
call (`cached_tokens`). A request not answered 200 whose own upstream calls were billed anyway records those tokens
in `upstream_tokens` and in `failed_tokens` (not in `requests`): every token the upstream billed is in the ledger.

Flushes and reports are operator work: they get `redis.operator_timeout_s` and never mark Redis down for the hot
path; reports read in pipelines of at most `REPORT_CHUNK` hashes.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import functools
import io
import itertools
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import orjson
from redis.exceptions import NoScriptError

from .stores.guard import Store, StoreUnavailable
from .stores.rediskeys import RedisKeys

log = logging.getLogger("proxy.usage")
METRICS = ("requests", "upstream_tokens", "cached_tokens", "failed_tokens")
GroupBy = Literal["team", "key", "model", "day"]
# A report asks this process to flush first, so its latest usage is in; a slower flush is left to finish later.
REPORT_FLUSH_WAIT_S = 0.5
REPORT_CHUNK = 500  # ledger hashes read per pipeline: each one round trip bounded by operator_timeout_s
Slots = dict[tuple[str, str], dict[str, int]]  # (team, day) -> field -> amount


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _slots() -> Slots:
    return defaultdict(lambda: defaultdict(int))


@dataclass(frozen=True)
class _Batch:
    seq: int  # this writer's batch number: batches are applied in order, each at most once
    slots: Slots


class UsageLedger:
    def __init__(
        self,
        store: Store,
        keys: RedisKeys,
        *,
        retention_days: int = 400,
        clock: Callable[[], float] = time.time,
        writer: str | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self.retention_days = retention_days
        self._retention_s = retention_days * 86400
        self._clock = clock
        self._day: tuple[int, str] = (-1, "")  # (days since the epoch, its UTC date)
        self._writer = writer or secrets.token_hex(8)  # this process's name in the ledger's flush marks
        self._seq = 0
        self._pending = _slots()  # not yet in a batch
        self._unacked: _Batch | None = None  # sent (perhaps applied), not acknowledged: resent as itself
        self._flushing = asyncio.Lock()  # the periodic, the admin report's and the shutdown flush take turns
        self._apply = store.client.register_script((resources.files("proxy") / "lua" / "ledger.lua").read_text())

    def record(self, team: str, key_id: str, model: str, prompt_tokens: int, upstream_tokens: int, *,
               at: float | None = None) -> None:
        """A request answered 200: `prompt_tokens` as the client was told, `upstream_tokens` the part of them it
        sent upstream itself. `at`: when the request started (its quota ticket's time), so that quotas and the
        ledger put a request on the same day."""
        fields, base = self._slot(team, key_id, model, at)
        fields[base + "requests"] += 1
        fields[base + "upstream_tokens"] += upstream_tokens
        fields[base + "cached_tokens"] += prompt_tokens - upstream_tokens

    def record_failed(self, team: str, key_id: str, model: str, upstream_tokens: int, *,
                      at: float | None = None) -> None:
        """A request not answered 200 whose own upstream calls were billed anyway (some of its chunks succeeded,
        or it was cancelled): counted in upstream tokens and cost, not in requests or in tokens served."""
        if upstream_tokens:
            fields, base = self._slot(team, key_id, model, at)
            fields[base + "upstream_tokens"] += upstream_tokens
            fields[base + "failed_tokens"] += upstream_tokens

    def _slot(self, team: str, key_id: str, model: str, at: float | None) -> tuple[dict[str, int], str]:
        day_number = int((self._clock() if at is None else at) // 86400)
        if day_number != self._day[0]:  # formatting the UTC date once a day, not once a request
            self._day = (day_number, day_of(day_number * 86400))
        return self._pending[(team, self._day[1])], f"{key_id}|{model}|"

    async def flush(self, *, wait_s: float | None = None) -> None:
        """Write what is recorded so far: the unacknowledged batch first (as itself), then one batch of everything
        pending. Usage recorded meanwhile waits for the next flush, so a flush is at most two round trips however
        busy the process is. On failure (StoreUnavailable) the unacknowledged batch is kept and sent again, under
        the same number, by the next flush. `wait_s` bounds the whole flush, the wait for another one included
        (a report's); giving up raises StoreUnavailable and loses nothing."""
        try:
            async with asyncio.timeout(wait_s), self._flushing:
                if self._unacked is not None:
                    await self._send(self._unacked)
                if self._pending:
                    self._seq += 1
                    self._unacked = _Batch(self._seq, self._pending)
                    self._pending = _slots()
                    await self._send(self._unacked)
        except TimeoutError:
            raise StoreUnavailable(f"usage flush took over {wait_s}s") from None

    async def _send(self, batch: _Batch) -> None:
        await self._store.operator_call("usage-flush", functools.partial(self._write, batch=batch))
        self._unacked = None

    async def _write(self, r: Any, *, batch: _Batch) -> None:
        # One round trip: EVALSHA per ledger hash (its flush marks share its Cluster slot, see rediskeys), then the
        # team index. NOSCRIPT (Redis restarted or flushed its scripts): load the script, send the batch again.
        for attempt in (1, 2):
            pipe = r.pipeline(transaction=False)
            for (team, day), fields in batch.slots.items():
                args: list[Any] = [self._writer, batch.seq, self._retention_s]
                for name, amount in fields.items():
                    if amount:
                        args += [name, amount]
                # execute_command: a cluster pipeline blocks evalsha() but routes EVALSHA by its keys' slot
                pipe.execute_command("EVALSHA", self._apply.sha, 2, self._keys.usage(team, day),
                                     self._keys.usage_flushes(team, day), *args)
            for team in sorted({team for team, _ in batch.slots}):
                pipe.sadd(self._keys.usage_teams(), team)
            try:
                await pipe.execute()
                return
            except NoScriptError:
                if attempt == 2:
                    raise
                await r.script_load(self._apply.script)

    async def run(self, interval_s: float) -> None:
        """Flush every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except StoreUnavailable:
                log.warning("usage ledger flush failed (redis unreachable or slow); retried at the next flush")

    def check_range(self, since: dt.date, until: dt.date) -> None:
        """A report covers at most the ledger's retention: older days are gone, and an unbounded range would
        mean millions of days to read (ValueError beyond)."""
        if until < since:
            raise ValueError("until is before since")
        if (days := (until - since).days + 1) > self.retention_days:
            raise ValueError(f"the range covers {days} days; a report covers at most {self.retention_days} "
                             "(the ledger's retention, usage.retention_days)")

    async def report(
        self, team: str | None, since: dt.date, until: dt.date, by: GroupBy | None,
        prices: Mapping[str, float],
    ) -> list[dict[str, Any]]:
        """Rows of usage from `since` to `until` (inclusive, UTC days), one per team and `by` group. Money is
        not rounded (the table format rounds for display), so rows add up to their team's total."""
        self.check_range(since, until)
        by = None if by == "team" else by
        days = [(since + dt.timedelta(days=n)).isoformat() for n in range((until - since).days + 1)]
        if team:
            teams = [team]
        else:
            members = await self._store.operator_call("usage-report", lambda r: r.smembers(self._keys.usage_teams()))
            teams = sorted(t.decode() for t in members)
        slots = itertools.product(teams, days)  # lazily: teams x days can be large, each chunk awaits Redis
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        tokens: dict[tuple[str, str], dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
        while chunk := list(itertools.islice(slots, REPORT_CHUNK)):
            for (t, d), raw in zip(chunk, await self._store.operator_call("usage-report", _reader(self._keys, chunk)),
                                   strict=True):
                for name, value in raw.items():
                    key_id, model, metric = name.decode().split("|")
                    group = {"key": key_id, "model": model, "day": d}.get(by or "team", "")
                    row = rows.setdefault((t, group), {"team": t, **({by: group} if by else {}),
                                                       **dict.fromkeys(METRICS, 0)})
                    row[metric] += int(value)
                    tokens[(t, group)][(model, metric)] += int(value)
        out = []
        for k in sorted(rows):
            row = rows[k]
            # tokens served to clients; failed_tokens were billed (in upstream_tokens) but never served
            row["total_tokens"] = row["upstream_tokens"] - row["failed_tokens"] + row["cached_tokens"]
            by_model = tokens[k]
            row["upstream_cost_usd"] = sum(n * prices.get(m, 0.0) for (m, metric), n in by_model.items()
                                           if metric == "upstream_tokens") / 1e6
            row["saved_usd"] = sum(n * prices.get(m, 0.0) for (m, metric), n in by_model.items()
                                   if metric == "cached_tokens") / 1e6
            out.append(row)
        return out



def _reader(keys: RedisKeys, chunk: list[tuple[str, str]]) -> Callable[[Any], Awaitable[list[Any]]]:
    async def read(r: Any) -> list[Any]:
        pipe = r.pipeline(transaction=False)
        for t, d in chunk:
            pipe.hgetall(keys.usage(t, d))
        result: list[Any] = await pipe.execute()
        return result

    return read


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
    # failed_tokens last: CSV consumers reading columns by position keep working
    return ReportFormat(("team", *group, "requests", "upstream_tokens", "cached_tokens", "total_tokens",
                         "upstream_cost_usd", "saved_usd", "failed_tokens"))
