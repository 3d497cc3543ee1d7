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
in `upstream_tokens` and in `failed_tokens` (not in `requests`), and so do answers the proxy refused (wrong size,
count or index) whose usage is plausible: every token the upstream billed is in the ledger. Attempts that may have
been billed without a usage the proxy read (sent, then timed out or cut) add their local count to
`unconfirmed_tokens`, apart: `upstream_tokens + unconfirmed_tokens` bounds what the upstream can invoice.

Flushes and reports are operator work: they get `redis.operator_timeout_s` and never mark Redis down for the hot
path; reports read in pipelines sized by the fields they bring and add up in a worker thread (usagereport.py), so a
report over many days and keys never stalls live requests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import io
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from ..stores.guard import Store, StoreUnavailable, failure
from ..stores.rediskeys import RedisKeys
from .csvcells import SafeDictWriter
from .rollups import months_of, read_months
from .slices import mapped
from .usagereport import METRICS, REPORT_CHUNK, GroupBy

__all__ = ["METRICS", "REPORT_CHUNK", "REPORT_FLUSH_WAIT_S", "GroupBy", "ReportFormat", "UsageLedger", "day_of",
           "report_format"]
log = logging.getLogger("proxy.usage")
# A report asks this process to flush first, so its latest usage is in; a slower flush is left to finish later.
REPORT_FLUSH_WAIT_S = 0.5
ROLLED_KEEP = 10_000  # (team, day) entries of the writer's last batches kept before the old days are forgotten
ROLLUP_MAX_DAYS = 100 * 366  # as usage.retention_days: a far longer EXPIRE is a Redis error
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
        self._rolled: dict[tuple[str, str], int] = {}  # (team, day) -> this writer's last batch in its roll-up
        self._flushing = asyncio.Lock()  # the periodic, the admin report's and the shutdown flush take turns
        self._apply = store.client.register_script((resources.files("proxy") / "lua" / "ledger.lua").read_text())
        self._rollup = store.client.register_script((resources.files("proxy") / "lua" / "rollup.lua").read_text())
        # month roll-ups outlive the days they sum (README, "Usage ledger"): twice the days' retention
        self._rollup_ttl_s = min(2 * retention_days, ROLLUP_MAX_DAYS) * 86400

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

    def record_unconfirmed(self, team: str, key_id: str, model: str, tokens: int, *, at: float | None = None) -> None:
        """Tokens (local count) of attempts that may have been billed without a usage the proxy read: not in
        upstream tokens or cost, which hold only what the upstream confirmed."""
        if tokens:
            fields, base = self._slot(team, key_id, model, at)
            fields[base + "unconfirmed_tokens"] += tokens

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
        # One round trip: EVALSHA per ledger hash (its flush marks share its Cluster slot, see rediskeys), the same
        # batch per month roll-up (rollups.py: its two hashes share a slot), then the team index. NOSCRIPT (Redis
        # restarted or flushed its scripts): load the scripts, send the batch again (each script skips what it did).
        months: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for attempt in (1, 2):
            pipe = r.pipeline(transaction=False)
            for (team, day), fields in batch.slots.items():
                prev = self._rolled.get((team, day), 0)
                args: list[Any] = [self._writer, batch.seq, self._retention_s, prev]
                for name, amount in fields.items():
                    if amount:
                        args += [name, amount]
                if len(args) == 4:
                    continue  # nothing to add (every amount 0)
                # execute_command: a cluster pipeline blocks evalsha() but routes EVALSHA by its keys' slot
                pipe.execute_command("EVALSHA", self._apply.sha, 2, self._keys.usage(team, day),
                                     self._keys.usage_flushes(team, day), *args)
                if attempt == 1:
                    months[(team, day[:7])] += [day, prev, (len(args) - 4) // 2, *args[4:]]
            for (team, month), days in months.items():
                pipe.execute_command("EVALSHA", self._rollup.sha, 2, self._keys.usage_month(team, month),
                                     self._keys.usage_month_days(team, month), self._writer, batch.seq,
                                     self._rollup_ttl_s, *days)
            for team in sorted({team for team, _ in batch.slots}):
                pipe.sadd(self._keys.usage_teams(), team)
            try:
                await pipe.execute()
                self._rolled_up(batch.seq, [slot for slot, fields in batch.slots.items() if any(fields.values())])
                return
            except NoScriptError:
                if attempt == 2:
                    raise
                await r.script_load(self._apply.script)
                await r.script_load(self._rollup.script)

    def _rolled_up(self, seq: int, slots: list[tuple[str, str]]) -> None:
        """This writer's last batch rolled up per (team, day), sent with the next one (lua/rollup.lua applies a
        batch only on top of it). Days a week older than the newest are forgotten: a batch into one (not expected:
        a request's day is its start's) would only leave its month to be read from its days until rebuilt."""
        for slot in slots:
            self._rolled[slot] = seq
        if len(self._rolled) > 4 * ROLLED_KEEP:
            newest = max(day for _, day in self._rolled)
            self._rolled = {s: n for s, n in self._rolled.items() if (dt.date.fromisoformat(newest)
                                                                      - dt.date.fromisoformat(s[1])).days < 7}

    async def run(self, interval_s: float) -> None:
        """Flush every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except StoreUnavailable as exc:  # unreachable, slow, or an error reply (Redis's words: failure())
                log.warning("usage ledger flush failed (%s); retried at the next flush",
                            failure(exc.__cause__) if exc.__cause__ else "redis unreachable")

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
        """Rows of usage from `since` to `until` (inclusive, UTC days), one per team and `by` group. Money is a
        decimal string with 6 decimals, each row's computed exactly and rounded once (money.py)."""
        return (await self.report_daily(team, since, until, by, prices, daily=False))[0]

    async def report_daily(
        self, team: str | None, since: dt.date, until: dt.date, by: GroupBy | None,
        prices: Mapping[str, float], *, daily: bool = True,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """`report`'s rows, and with `daily` the same range's rows by day too (a chart's), from the same reads:
        whole months from their roll-ups, other days from the ledger (rollups.py)."""
        self.check_range(since, until)
        if team:
            teams = [team]
        else:
            members = await self._store.operator_call("usage-report", lambda r: r.smembers(self._keys.usage_teams()))
            teams = sorted(t.decode() for t in members)
        today = dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()
        # read in bounded round trips and added up in slices, so live requests keep their latency (usagereport.py)
        return await read_months(self._store, self._keys, months_of(teams, since, until), by, prices, today=today,
                                 retention_days=self.retention_days, ttl_s=self._rollup_ttl_s, daily=daily)


@dataclass(frozen=True)
class ReportFormat:
    columns: tuple[str, ...]  # the CSV's order: a new column goes last, so readers by position keep working
    table_columns: tuple[str, ...] = ()  # the table's order, for people (empty: the CSV's)

    def csv(self, rows: list[dict[str, Any]]) -> str:
        buf = io.StringIO()
        w = SafeDictWriter(buf, fieldnames=list(self.columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()

    async def csv_sliced(self, rows: list[dict[str, Any]]) -> str:
        """`csv`, written in slices (slices.py): a report by key or day can have tens of thousands of rows."""
        buf = io.StringIO()
        w = SafeDictWriter(buf, fieldnames=list(self.columns), lineterminator="\n")
        w.writeheader()
        await mapped(rows, w.writerow)
        return buf.getvalue()

    def table(self, rows: list[dict[str, Any]]) -> str:
        columns = self.table_columns or self.columns
        cells = [list(columns)] + [[_cell(r[c]) for c in columns] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                         for row in cells) + "\n"

    @staticmethod
    def json(rows: list[dict[str, Any]]) -> str:
        return orjson.dumps(rows).decode() + "\n"

    def render(self, rows: list[dict[str, Any]], fmt: str) -> str:
        return self.json(rows) if fmt == "json" else self.csv(rows) if fmt == "csv" else self.table(rows)


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)  # money is already text with 6 decimals (money.py)


def report_format(by: GroupBy | None) -> ReportFormat:
    group = (by,) if by and by != "team" else ()
    counts = ("requests", "upstream_tokens", "cached_tokens", "total_tokens", "upstream_cost_usd", "saved_usd")
    # failed_tokens, unconfirmed_tokens, then (by key) key_name, last: CSV consumers reading columns by position
    # keep working; the table shows a key's name beside its id (keynames.py)
    named = ("key_name",) if by == "key" else ()
    return ReportFormat(("team", *group, *counts, "failed_tokens", "unconfirmed_tokens", *named),
                        ("team", *group, *named, *counts, "failed_tokens", "unconfirmed_tokens"))
