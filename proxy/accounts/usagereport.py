"""Reading a usage report in short slices: a report over many days and keys must not stall live requests.

A 400-day report by key over 1,000 keys reads millions of ledger fields. Done in one go on the event loop it
blocked its worker for hundreds of milliseconds at a time: live requests waited, and their Redis calls timed out
as if Redis had failed. Now the ledger is read in round trips sized by the fields they bring: the sizes of up to
`REPORT_CHUNK` (team, day) hashes first (HLEN; empty days are then not read at all), then their contents in
pipelines of about `REPORT_FIELDS_PER_READ` fields; a hash larger than that (a month's totals by key, a busy day) is
read alone, in HSCAN pieces of about as many fields, each its own round trip (`scanned`). Each is an ordinary
async Redis call whose reply the loop parses in a millisecond or two. What is done with them (decoding, adding up,
pricing the rows) runs on the loop in slices of at most `SLICE_S`, each followed by a turn of the loop, so a live
request waits for at most a slice at a time (slices.py says why not a worker thread). Which hashes a report reads
(month roll-ups, ledger days) is rollups.py's choice; this module reads and adds them up.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Generator, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

from ..stores.guard import Store
from .money import cost_usd
from .slices import CHECK_EVERY, SLICE_S, sliced

METRICS = ("requests", "upstream_tokens", "cached_tokens", "failed_tokens", "unconfirmed_tokens")
GroupBy = Literal["team", "key", "model", "day"]
REPORT_CHUNK = 500  # ledger hashes sized per round trip (and read per round trip at most)
# Fields one round trip should bring: parsing a reply runs on the loop, so this bounds what one reply costs it.
REPORT_FIELDS_PER_READ = 2_000
_CHECK_EVERY = 256  # fields between two looks at the clock (each costs about a microsecond)
Slot = tuple[str, str]  # (team, day)
T = TypeVar("T")


class Tally:
    """Rows being added up; `add` and `rows` are generators that yield whenever they have held the loop for
    SLICE_S (`sliced` runs them, letting the loop turn at each yield).

    A field is summed under its raw name as it comes (an int parse and a dict update: a 400-day report by key reads
    the same 9,000 names of 1,000 keys in every month), and each distinct name is decoded into its row once, when
    the rows are made, or when more than `FOLD_AT` distinct names are waiting (a report by day over ledger days,
    whose names differ by day), so memory stays bounded."""

    FOLD_AT = 100_000

    def __init__(self, by: GroupBy | None) -> None:
        self.by = None if by == "team" else by
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}
        self._tokens: dict[tuple[str, str], dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
        # (team, the slot's day when grouping by day, whether the names are a month's per-day fields) -> name -> sum
        self._sums: dict[tuple[str, str, bool], dict[bytes, int]] = {}
        self._waiting = 0  # distinct names in _sums, an upper bound

    def add(self, chunk: Sequence[Slot], hashes: Sequence[Mapping[bytes, bytes]], sign: int = 1,
            days: Container[str] | None = None) -> Iterator[None]:
        """Add (`sign` -1: take away) the hashes of `chunk`'s (team, day) slots: ledger days or month totals, field
        key_id|model|metric. With `days`: a month's per-day hash (rollups.py), field day|model|metric, its days in
        `days` only and its marks (`#...`) skipped."""
        per_day, wanted = days is not None, () if days is None else days
        clock, n, until = time.perf_counter, 0, time.perf_counter() + SLICE_S
        for (t, d), raw in zip(chunk, hashes, strict=True):
            slot = (t, d if self.by == "day" and not per_day else "", per_day)
            sums = self._sums.get(slot)
            if sums is None:
                sums = self._sums[slot] = {}
            get = sums.get
            self._waiting += len(raw)
            for name, value in raw.items():
                n += 1
                if not n % _CHECK_EVERY and clock() > until:
                    yield
                    until = clock() + SLICE_S
                if per_day and (name[:1] == b"#" or name.split(b"|", 1)[0].decode() not in wanted):
                    continue
                sums[name] = get(name, 0) + sign * int(value)
            if self._waiting > self.FOLD_AT:
                until = yield from self._fold(until)

    def fold(self) -> Iterator[None]:
        """The waiting names added into their rows now: a malformed one (not `a|b|metric`, an unknown metric)
        raises here, as it did in `add` before names were summed raw; a report folds before it writes a roll-up."""
        yield from self._fold(time.perf_counter() + SLICE_S)

    def _fold(self, until: float) -> Generator[None, None, float]:
        """Each waiting name decoded once and its sum added to its row, within its caller's slice: `until` is
        where that slice ends, and the end of the slice it is in is returned (a fold given a fresh slice of its own
        after `add` or before `rows` had used most of theirs held the loop for two slices)."""
        by, rows, tokens = self.by, self._rows, self._tokens
        clock, n = time.perf_counter, 0
        pending, self._sums, self._waiting = self._sums, {}, 0
        while pending:  # taken apart as folded: 100,000 sums freed at once, after the last look at the clock, held
            (t, d, per_day), sums = pending.popitem()  # the loop 1-2 ms more
            while sums:
                name, amount = sums.popitem()
                n += 1
                if not n % CHECK_EVERY and clock() > until:
                    yield
                    until = clock() + SLICE_S
                if per_day:
                    d, model, metric = name.decode().split("|")
                    key_id = ""
                else:
                    key_id, model, metric = name.decode().split("|")
                group = "" if by is None else key_id if by == "key" else model if by == "model" else d
                row = rows.get((t, group))
                if row is None:
                    row = rows[(t, group)] = {"team": t, **({by: group} if by else {}), **dict.fromkeys(METRICS, 0)}
                row[metric] += amount
                tokens[(t, group)][(model, metric)] += amount
        return until

    def rows(self, prices: Mapping[str, float], out: list[dict[str, Any]]) -> Iterator[None]:
        """The rows, priced, appended to `out` in order (a row whose counts are all 0, left by a subtraction, is
        no row: the ledger writes no zero)."""
        clock = time.perf_counter
        until = yield from self._fold(clock() + SLICE_S)
        for n, k in enumerate(sorted(self._rows), 1):
            if not n % CHECK_EVERY and clock() > until:
                yield
                until = clock() + SLICE_S
            row = self._rows[k]
            if not any(row[m] for m in METRICS):
                continue
            # tokens served to clients; failed_tokens were billed (in upstream_tokens) but never served
            row["total_tokens"] = row["upstream_tokens"] - row["failed_tokens"] + row["cached_tokens"]
            by_model = self._tokens[k]
            row["upstream_cost_usd"] = cost_usd((n, prices.get(m, 0.0)) for (m, metric), n in by_model.items()
                                                if metric == "upstream_tokens")
            row["saved_usd"] = cost_usd((n, prices.get(m, 0.0)) for (m, metric), n in by_model.items()
                                        if metric == "cached_tokens")
            out.append(row)

    async def priced(self, prices: Mapping[str, float]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        await sliced(self.rows(prices, rows))
        return rows


async def read_hashes(store: Store, names: Sequence[str], sizes: Sequence[int] | None = None
                      ) -> AsyncIterator[tuple[list[int], list[dict[bytes, bytes]]]]:
    """The non-empty hashes `names` (their indexes, their contents) in round trips of about REPORT_FIELDS_PER_READ
    fields: sized first (HLEN, up to REPORT_CHUNK a round trip) unless `sizes` are known. Every round trip is an
    operator call (`redis.operator_timeout_s`; never marks Redis down for the request path)."""
    for at in range(0, len(names), REPORT_CHUNK):
        chunk = list(range(at, min(at + REPORT_CHUNK, len(names))))
        known = [sizes[i] for i in chunk] if sizes is not None else await store.operator_call(
            "usage-report", pipelined([names[i] for i in chunk], "hlen"))
        for part in parts(chunk, known):
            if known[part[0] - at] > REPORT_FIELDS_PER_READ:  # a large hash: alone in its part, read in pieces
                yield part, [await scanned(store, names[part[0]])]
            else:
                yield part, await store.operator_call("usage-report", pipelined([names[i] for i in part], "hgetall"))


async def scanned(store: Store, name: str) -> dict[bytes, bytes]:
    """A hash read in pieces of about REPORT_FIELDS_PER_READ fields (HSCAN), each its own round trip: the loop
    serves requests between two and parses one piece at a time, not one reply of all its fields. A field HSCAN
    gives twice (the hash was rehashed meanwhile) is one entry here, its value the last one read: never counted
    twice. Like the report's other reads, pieces are not one snapshot: a flush meanwhile may be in some fields."""
    out: dict[bytes, bytes] = {}
    cursor = 0
    while True:
        cursor, piece = await store.operator_call("usage-report", functools.partial(_hscan, name, cursor))
        out.update(piece)
        if not cursor:
            return out


async def _hscan(name: str, cursor: int, r: Any) -> tuple[int, dict[bytes, bytes]]:
    got: tuple[int, dict[bytes, bytes]] = await r.hscan(name, cursor, count=REPORT_FIELDS_PER_READ)
    return got


def parts(chunk: Sequence[T], sizes: Sequence[int]) -> Iterator[list[T]]:
    """`chunk`'s non-empty items in runs of at most REPORT_FIELDS_PER_READ fields (a larger hash alone)."""
    part: list[T] = []
    fields = 0
    for item, size in zip(chunk, sizes, strict=True):
        if not size:
            continue
        if part and fields + size > REPORT_FIELDS_PER_READ:
            yield part
            part, fields = [], 0
        part.append(item)
        fields += size
    if part:
        yield part


def pipelined(names: Sequence[str], command: str, *args: Any) -> Callable[[Any], Awaitable[list[Any]]]:
    """One round trip: `command` on each of `names`."""
    async def read(r: Any) -> list[Any]:
        pipe = r.pipeline(transaction=False)
        for name in names:
            getattr(pipe, command)(name, *args)
        result: list[Any] = await pipe.execute()
        return result

    return read



