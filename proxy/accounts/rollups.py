"""Usage reports over months: whole months from the month roll-ups, only the other days from the ledger's days.

Each flush adds its batch to the month's roll-up too (`lua/rollup.lua`, in the same round trip as the days): the
month's totals per key, model and metric (`usage-month`), and per day and model (`usage-month-days`, with the
roll-up's marks). A roll-up is used only where it provably equals the sum of its days: a day's part is applied at
most once per writer and batch, and the roll-up records, per day, the last batch of each writer it holds; the day's
ledger hash records the same in its flush marks (`lua/ledger.lua`). Each batch raises its writer's mark, so when the
two agree for every day of the month, the roll-up holds exactly what the days hold. A report reads those marks
first (small hashes) and reads a month from its roll-up only if they agree; otherwise (usage written before the
roll-ups, or a process killed between the day's script and the month's) it reads the month's days, and when it has
read all of them it writes the roll-up it has just added up (`lua/rollup_set.lua`, only over the version it read
before the days: a flush meanwhile leaves the roll-up to the next report; so does a roll-up holding a batch that
a day has yet to get, see `Month.ahead`). Days written without flush marks (an old
ledger) are marked `#{day}|-` in the roll-up that counted them; the first batch flushed into such a day marks it
`-` in its flush marks too (`lua/ledger.lua`), so a roll-up holding that batch alone does not agree with it.

A report by team, model or day reads each month's per-day hash alone (about 15 fields a day), whatever the number
of keys. A report by key reads a month's totals, plus or minus the ledger days of its part outside the range when
that is fewer days than reading its days in the range. A month's ledger days expire (`usage.retention_days`) before
its roll-up (twice that): a day gone past the retention is taken from the roll-up as it was.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from ..stores.guard import Store
from ..stores.rediskeys import RedisKeys
from .slices import CHECK_EVERY, SLICE_S, sliced
from .usagereport import REPORT_CHUNK, GroupBy, Tally, pipelined, read_hashes

__all__ = ["Month", "months_of", "read_months"]
UNMARKED = "-"  # the writer of a day that has no flush marks (written by a ledger without them)


@dataclass
class Month:
    team: str
    month: str  # YYYY-MM
    days: list[str]  # every day of the month
    inside: frozenset[str]  # the days in the report's range
    per_day: dict[bytes, bytes] = field(default_factory=dict)  # the roll-up per day and model, with its marks
    version: str = "0"
    marks: dict[str, dict[str, str]] = field(default_factory=dict)  # day -> writer -> batch, as rolled up
    ledger: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)  # day -> (fields, flush marks)
    valid: bool = False

    def check(self, today: dt.date, retention_days: int) -> None:
        """Whether the roll-up holds exactly what the month's ledger days hold (or held, for days expired)."""
        marks: dict[str, dict[str, str]] = {d: {} for d in self.days}
        for name, value in self.per_day.items():
            if name == b"#v":
                self.version = value.decode()
            elif name[:1] == b"#":
                day, writer = name[1:].decode().split("|")
                marks.setdefault(day, {})[writer] = value.decode()
        self.marks = marks
        self.valid = all(self._agrees(d, today, retention_days) for d in self.days)

    def _agrees(self, day: str, today: dt.date, retention_days: int) -> bool:
        size, flushed = self.ledger[day]
        if self.marks[day] == held(size, flushed):
            return True
        # a day past the retention may have expired: the roll-up keeps it
        return not size and not flushed and (today - dt.date.fromisoformat(day)).days >= retention_days

    def ahead(self) -> bool:
        """Whether the roll-up holds a writer's batch that a day has not got yet: on a Cluster a flush's month
        script can run before its day's (another node). A rebuild then would roll the month back below that batch,
        which is never sent to it again, and the writer's next batch would make the marks agree without it."""
        return any(w != UNMARKED and int(s) > int(self.ledger[d][1].get(w, "0"))
                   for d in self.days for w, s in self.marks[d].items())

    def with_data(self, inside: bool) -> list[str]:
        """The days in (or out of) the range with usage in the ledger or in the roll-up."""
        return [d for d in self.days if (self.ledger[d][0] or self.marks[d]) and (d in self.inside) == inside]

    def readable(self, days: list[str]) -> bool:
        return all(self.ledger[d][0] for d in days)


def held(size: int, flushed: dict[str, str]) -> dict[str, str]:
    """The marks a roll-up holding exactly a ledger day has: the day's flush marks (with `-` -> 0 when it also has
    fields written without them, lua/ledger.lua), or `-` -> 0 alone for a day written without any."""
    return flushed or ({UNMARKED: "0"} if size else {})


def months_of(teams: Sequence[str], since: dt.date, until: dt.date) -> list[Month]:
    out = []
    first = since.replace(day=1)
    while first <= until:
        n = calendar.monthrange(first.year, first.month)[1]
        days = [first.replace(day=d) for d in range(1, n + 1)]
        inside = frozenset(d.isoformat() for d in days if since <= d <= until)
        out += [Month(t, first.isoformat()[:7], [d.isoformat() for d in days], inside) for t in teams]
        if days[-1] == dt.date.max:  # 9999-12: no month after it (a date past it is an OverflowError)
            break
        first = days[-1] + dt.timedelta(days=1)
    return out


@dataclass
class _Reads:
    """What a report reads from the ledger days and the month totals, by sign."""
    fallback: list[tuple[str, str, int]] = field(default_factory=list)  # (team, day, fields): no roll-up
    days: list[tuple[str, str, int]] = field(default_factory=list)  # a roll-up's days read for a report by key
    minus: list[tuple[str, str, int]] = field(default_factory=list)
    totals: list[Month] = field(default_factory=list)
    rebuild: list[Month] = field(default_factory=list)


async def read_months(store: Store, keys: RedisKeys, months: list[Month], by: GroupBy | None,
                      prices: Mapping[str, float], *, today: dt.date, retention_days: int, ttl_s: int,
                      daily: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The report's rows (and with `daily`, its rows by day too, from the same reads)."""
    await _load(store, keys, months)
    for m in months:
        m.check(today, retention_days)
    tally, series = Tally(by), Tally("day") if daily else None
    reads = _Reads()
    for m in months:
        for t in (tally, series):
            if t is not None and m.valid and t.by != "key":
                await sliced(t.add([(m.team, "")], [m.per_day], days=m.inside))
        inside, outside = m.with_data(True), m.with_data(False)
        if not m.valid:
            reads.fallback += [(m.team, d, m.ledger[d][0]) for d in inside]
            if not outside and (today - dt.date.fromisoformat(m.days[0])).days < retention_days and not m.ahead():
                reads.rebuild.append(m)  # every day with usage is read anyway: the roll-up from them
        elif tally.by == "key" and not outside:
            reads.totals.append(m)
        elif tally.by == "key" and len(outside) < len(inside) and m.readable(outside):
            reads.totals.append(m)
            reads.minus += [(m.team, d, m.ledger[d][0]) for d in outside]
        elif tally.by == "key":
            reads.days += [(m.team, d, m.ledger[d][0]) for d in inside]
    rebuilt = {(m.team, m.month): _Rebuilt() for m in reads.rebuild}
    await _add_days(store, keys, reads.fallback, [tally] if series is None else [tally, series], rebuilt)
    await _add_days(store, keys, reads.days, [tally], {})
    await _add_totals(store, keys, reads, tally)
    for t in (tally, series):
        if t is not None:  # a malformed field raises here, before a roll-up is written with it (Tally.fold)
            await sliced(t.fold())
    if reads.rebuild:
        await _write_rebuilt(store, keys, reads.rebuild, rebuilt, ttl_s)
    return await tally.priced(prices), None if series is None else await series.priced(prices)


async def _add_totals(store: Store, keys: RedisKeys, reads: _Reads, tally: Tally) -> None:
    """Month totals less their days outside the range, as they were when their marks were checked: read, then
    the months' versions and those days' flush marks read again. A flush meanwhile (into today, outside the range)
    would be in the totals and not in the days taken away: such a month is read as its days in the range."""
    totals: list[dict[bytes, bytes]] = [{} for _ in reads.totals]
    async for part, hashes in read_hashes(store, [keys.usage_month(m.team, m.month) for m in reads.totals]):
        for i, h in zip(part, hashes, strict=True):
            totals[i] = h
    minus: list[tuple[tuple[str, str], dict[bytes, bytes]]] = []
    async for part, hashes in read_hashes(store, [keys.usage(t, d) for t, d, _ in reads.minus],
                                          [n for _, _, n in reads.minus]):
        minus += [((reads.minus[i][0], reads.minus[i][1]), h) for i, h in zip(part, hashes, strict=True)]
    now = [await store.operator_call("usage-report", pipelined(
        [keys.usage_month_days(m.team, m.month) for m in reads.totals[at:at + REPORT_CHUNK]], "hget", "#v"))
        for at in range(0, len(reads.totals), REPORT_CHUNK)]
    flushed = [await store.operator_call("usage-report", pipelined(
        [keys.usage_flushes(t, d) for t, d, _ in reads.minus[at:at + REPORT_CHUNK]], "hgetall"))
        for at in range(0, len(reads.minus), REPORT_CHUNK)]
    by_month = {(m.team, m.month): m for m in reads.totals}
    changed = {(m.team, m.month) for m, v in zip(reads.totals, [v for c in now for v in c], strict=True)
               if (v or b"0").decode() != m.version}
    changed |= {(t, d[:7]) for (t, d, _), f in zip(reads.minus, [f for c in flushed for f in c], strict=True)
                if {w.decode(): n.decode() for w, n in f.items()} != by_month[(t, d[:7])].ledger[d][1]}
    again = [(m.team, d, m.ledger[d][0]) for m in reads.totals if (m.team, m.month) in changed
             for d in m.with_data(True)]
    await _add_days(store, keys, again, [tally], {})
    kept = [i for i, m in enumerate(reads.totals) if (m.team, m.month) not in changed]
    await sliced(tally.add([(reads.totals[i].team, "") for i in kept], [totals[i] for i in kept]))
    kept_minus = [(slot, h) for slot, h in minus if (slot[0], slot[1][:7]) not in changed]
    await sliced(tally.add([slot for slot, _ in kept_minus], [h for _, h in kept_minus], -1))


async def _load(store: Store, keys: RedisKeys, months: list[Month]) -> None:
    """Each month's per-day roll-up (and its version) first, then each of its days' size and flush marks: a
    rebuild writes only over the version read before the days."""
    names = [keys.usage_month_days(m.team, m.month) for m in months]
    async for part, hashes in read_hashes(store, names):
        for i, h in zip(part, hashes, strict=True):
            months[i].per_day = h
    days = [(m, d) for m in months for d in m.days]
    for at in range(0, len(days), REPORT_CHUNK):
        chunk = days[at:at + REPORT_CHUNK]
        got = await store.operator_call("usage-report", functools.partial(_sizes_and_marks, keys, chunk))
        for (m, d), size, flushed in zip(chunk, got[::2], got[1::2], strict=True):
            m.ledger[d] = (size, {w.decode(): s.decode() for w, s in flushed.items()})


async def _sizes_and_marks(keys: RedisKeys, chunk: list[tuple[Month, str]], r: Any) -> list[Any]:
    pipe = r.pipeline(transaction=False)
    for m, d in chunk:
        pipe.hlen(keys.usage(m.team, d))
        pipe.hgetall(keys.usage_flushes(m.team, d))
    result: list[Any] = await pipe.execute()
    return result


class _Rebuilt:
    def __init__(self) -> None:
        self.totals: dict[bytes, int] = {}
        self.per_day: dict[str, int] = {}

    def add(self, day: str, raw: Mapping[bytes, bytes]) -> Iterator[None]:
        totals, per_day = self.totals, self.per_day
        clock, until = time.perf_counter, time.perf_counter() + SLICE_S
        for i, (name, value) in enumerate(raw.items(), 1):
            if not i % CHECK_EVERY and clock() > until:
                yield
                until = clock() + SLICE_S
            n = int(value)
            totals[name] = totals.get(name, 0) + n
            k = day + "|" + name.decode().split("|", 1)[1]
            per_day[k] = per_day.get(k, 0) + n


async def _add_days(store: Store, keys: RedisKeys, days: list[tuple[str, str, int]], tallies: list[Tally],
                    rebuilt: dict[tuple[str, str], _Rebuilt], sign: int = 1) -> None:
    names = [keys.usage(t, d) for t, d, _ in days]
    async for part, hashes in read_hashes(store, names, [n for _, _, n in days]):
        slots = [(days[i][0], days[i][1]) for i in part]
        for t in tallies:
            await sliced(t.add(slots, hashes, sign))
        for (team, day), raw in zip(slots, hashes, strict=True):
            if (r := rebuilt.get((team, day[:7]))) is not None:
                await sliced(r.add(day, raw))


async def _write_rebuilt(store: Store, keys: RedisKeys, months: list[Month], rebuilt: dict[tuple[str, str], _Rebuilt],
                         ttl_s: int) -> None:
    """Each month's roll-up rebuilt from its days, if no day was flushed since its marks were read (so what was
    read is what those marks say) and the roll-up is still the version read before them."""
    days = [(m, d) for m in months for d in m.days]
    names = [keys.usage_flushes(m.team, d) for m, d in days]
    now = [await store.operator_call("usage-rollup", pipelined(names[at:at + REPORT_CHUNK], "hgetall"))
           for at in range(0, len(names), REPORT_CHUNK)]
    flushed = [{w.decode(): s.decode() for w, s in h.items()} for chunk in now for h in chunk]
    changed = {(m.team, m.month) for (m, d), f in zip(days, flushed, strict=True) if f != m.ledger[d][1]}
    script = store.client.register_script((resources.files("proxy") / "lua" / "rollup_set.lua").read_text())
    for m in months:
        if (m.team, m.month) in changed:
            continue
        r = rebuilt[(m.team, m.month)]
        args: list[Any] = [m.version, ttl_s, len(r.totals)]
        for name, n in r.totals.items():
            args += [name, n]
        for k, n in r.per_day.items():
            args += [k, n]
        for d in m.days:
            size, marks = m.ledger[d]
            for w, s in held(size, marks).items():
                args += [f"#{d}|{w}", s]
        await store.operator_call("usage-rollup", functools.partial(
            _evalsha, script, [keys.usage_month(m.team, m.month), keys.usage_month_days(m.team, m.month)], args))


async def _evalsha(script: Any, keys: list[str], args: list[Any], r: Any) -> Any:
    try:
        return await r.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:  # Redis restarted or flushed its scripts: load it, once
        await r.script_load(script.script)
        return await r.evalsha(script.sha, len(keys), *keys, *args)
