"""The indexes that list gateway keys a page at a time, and count a team's working keys without reading records.

    {prefix}:keys                every key id, by creation time (keys.py writes it with the record)
    {prefix}:teamkeys:{{team}}   one team's key ids, by creation time: a team's page reads only its keys
    {prefix}:teamlive:{{team}}   one team's unrevoked key ids, by when they stop working (inf: never), so
                                 ZCOUNT from now to +inf is the number of its keys that work
    {prefix}:keyteams            the teams that have keys

A page is ordered by (creation time, id), ascending or descending, and its cursor is the id of its last key: the
next page starts strictly after that key's place, so every key that was there when the listing began is on exactly
one page, whatever is created or revoked meanwhile (a key never leaves `{prefix}:keys`, a revoked key stays listed).
The cursor's place is read from the indexes listed (a key's score is its creation time in each), so a page of
several teams (a principal confined to them) merges their indexes from one place, and a cursor naming a key of a
team not listed is refused like an id that never existed: a confined admin learns nothing of other teams' keys.
With a filter (`match`: a search), at most `SCAN_BUDGET` ids are read per page: the page may then be short, even
empty, with `has_more` and a cursor to go on from.

Keys created before these indexes existed are added once, in the background (keyindexbuild.py: one process of the
fleet at a time, from its start, never on a request): `rebuild` reads `{prefix}:keys` a chunk at a time, pausing
between two (slices.py), and marks `{prefix}:meta:teamkeys-built` (CLI `keys reindex` runs it again, for keys a
process of an older version created after the mark). Until the mark is there the team indexes may lack keys, so
a page of some teams reads `{prefix}:keys` and keeps their keys (a filter, as a search is: at most `SCAN_BUDGET`
ids a page, its cursor always a key of those teams), and `working` answers None: not counted yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..stores.guard import Store
from ..stores.rediskeys import RedisKeys
from .keyrecord import KeyRecord, readable
from .slices import Pacer

LIST_CHUNK = 100  # key records read per round trip: parsing them holds the loop about a millisecond
SCAN_BUDGET = 2000  # ids a filtered page reads at most before it answers (short) with a cursor
MAX_CURSOR_CHARS = 100


class BadCursor(ValueError):
    """The cursor names no key: not one of ours, or not a key id at all."""


@dataclass(frozen=True, slots=True)
class Page:
    records: list[KeyRecord]
    has_more: bool
    next_cursor: str | None  # the id to pass as `after` for the next page; None: this was the last


def ends_score(record: KeyRecord) -> float:
    return math.inf if record.ends_at is None else record.ends_at


def queue_indexed(pipe: Any, keys: RedisKeys, record: KeyRecord) -> None:
    """Add a key to its team's indexes (after `{prefix}:keys`, so any id a team index holds has a place there)."""
    pipe.zadd(keys.team_keys(record.team), {record.id: record.created_at})
    if record.revoked:
        pipe.zrem(keys.team_live_keys(record.team), record.id)
    else:
        pipe.zadd(keys.team_live_keys(record.team), {record.id: ends_score(record)})
    pipe.sadd(keys.key_teams(), record.team)


async def read_records(r: Any, keys: RedisKeys, ids: Sequence[str]) -> list[KeyRecord]:
    """The readable records of these ids, in their order (a missing or unreadable one left out): two round trips."""
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)  # GETs, not one MGET: on a cluster the ids span slots
    for i in ids:
        pipe.get(keys.key_id(i))
    digests = await pipe.execute()
    pipe = r.pipeline(transaction=False)
    for d in digests:
        if d is not None:
            pipe.hgetall(keys.key_record(d.decode()))
    return [rec for raw in await pipe.execute() if raw and (rec := readable(raw)) is not None]


async def _chunk_of_ids(r: Any, key: str, start: int) -> list[bytes]:
    return list(await r.zrange(key, start, start + LIST_CHUNK - 1))


def _after(place: tuple[float, str] | None, desc: bool) -> Callable[[tuple[float, str]], bool]:
    if place is None:
        return lambda _: True
    return (lambda e: e < place) if desc else (lambda e: e > place)


class KeyIndex:
    def __init__(self, store: Store, keys: RedisKeys) -> None:
        self._store = store
        self._keys = keys
        self._built = False

    async def built(self) -> bool:
        """Whether the team indexes hold every key (the mark is there; once seen, this process does not ask again)."""
        if not self._built:
            mark = self._keys.team_keys_built()
            self._built = bool(await self._store.operator_call("key-list", lambda r: r.exists(mark)))
        return self._built

    async def between_chunks(self) -> None:
        """Where the build lets the loop serve requests (tests slow it or stop it here)."""

    async def rebuild(self) -> int:
        """Put every key in its team's indexes as its record is now, a chunk at a time with a pause between two;
        returns the number of keys indexed. Idempotent: running it again, or two at once, adds what is there."""
        pacer, done, start = Pacer(), 0, 0
        while True:
            ids: list[bytes] = await self._store.operator_call(
                "key-list", partial(_chunk_of_ids, key=self._keys.key_index(), start=start))
            # by rank: a key never leaves `{prefix}:keys`, and one created meanwhile is indexed by its creation
            done += await self._store.operator_call("key-list", partial(self._index, chunk=[i.decode() for i in ids]))
            if len(ids) < LIST_CHUNK:
                break
            start += LIST_CHUNK
            await self.between_chunks()
            await pacer.pause()
        await self._store.operator_call("key-list", lambda r: r.set(self._keys.team_keys_built(), "1"))
        self._built = True
        return done

    async def _index(self, r: Any, chunk: list[str]) -> int:
        records = await read_records(r, self._keys, chunk)
        pipe = r.pipeline(transaction=False)
        for rec in records:
            queue_indexed(pipe, self._keys, rec)
        await pipe.execute()
        # A revocation or rotation between that read and this write had its own index change (ZREM, ZADD XX)
        # overwritten by ours: read again and index what changed. One after this read writes its index change after
        # ours, so whichever way they interleave the index ends as the record is.
        again = {rec.id: rec for rec in await read_records(r, self._keys, chunk)}
        pipe = r.pipeline(transaction=False)
        for changed in [again[rec.id] for rec in records if again.get(rec.id, rec) != rec]:
            queue_indexed(pipe, self._keys, changed)
        await pipe.execute()
        return len(records)

    async def _place(self, after: str | None, indexes: Sequence[str], teams: Sequence[str] | None = None
                     ) -> tuple[float, str] | None:
        """The cursor's place, read from the indexes listed: a key of a team not listed (of another team, for an
        admin confined to its own) names no key here, as an id that never existed does. With `teams` (read from
        `{prefix}:keys` while the team indexes are built) the key's record must be of one of them."""
        if after is None:
            return None
        if not after or len(after) > MAX_CURSOR_CHARS or not after.isascii() or not after.isprintable():
            raise BadCursor("not a key id")

        async def scores(r: Any) -> tuple[list[float | None], list[KeyRecord]]:
            pipe = r.pipeline(transaction=False)
            for idx in indexes:
                pipe.zscore(idx, after)
            found = list(await pipe.execute())
            return found, [] if teams is None else await read_records(r, self._keys, [after])

        scored, records = await self._store.operator_call("key-list", scores)
        found = [s for s in scored if s is not None]
        if not found or (teams is not None and not any(rec.team in teams for rec in records)):
            raise BadCursor(f"no key listed here has the id {after!r}")
        return (float(found[0]), after)

    async def _ids(self, r: Any, indexes: Sequence[str], place: tuple[float, str] | None, n: int,
                   desc: bool) -> list[tuple[float, str]]:
        """The next `n` (score, id) after `place` over these sorted sets, merged in order."""
        pipe = r.pipeline(transaction=False)
        for idx in indexes:
            if place is None:
                (pipe.zrevrange if desc else pipe.zrange)(idx, 0, n - 1, withscores=True)
                continue
            s = repr(place[0])
            pipe.zrangebyscore(idx, s, s)  # the ids that share the place's score: ordered by id
            if desc:
                pipe.zrevrangebyscore(idx, f"({s}", "-inf", start=0, num=n, withscores=True)
            else:
                pipe.zrangebyscore(idx, f"({s}", "+inf", start=0, num=n, withscores=True)
        replies = await pipe.execute()
        later = _after(place, desc)
        found: set[tuple[float, str]] = set()
        if place is None:
            found.update((float(score), m.decode()) for reply in replies for m, score in reply)
        else:
            for ties, rest in zip(replies[::2], replies[1::2], strict=True):
                found.update(e for m in ties if later(e := (place[0], m.decode())))
                found.update((float(score), m.decode()) for m, score in rest)
        return sorted(found, reverse=desc)[:n]

    async def page(self, *, teams: Sequence[str] | None, after: str | None, limit: int, desc: bool = False,
                   match: Callable[[KeyRecord], bool] | None = None) -> Page:
        """Up to `limit` records after the key `after`, of these teams (None: every team). Raises BadCursor. While
        the team indexes are built, a page of teams reads `{prefix}:keys` and keeps their keys (see above)."""
        scan = bool(teams) and not await self.built()
        every = teams is None or scan
        indexes = [self._keys.key_index()] if every else [self._keys.team_keys(t) for t in teams or ()]
        wanted = set(teams or ())
        place = await self._place(after, indexes, teams if scan else None)
        keep = match
        if scan:
            keep = lambda rec: rec.team in wanted and (match is None or match(rec))  # noqa: E731
        out: list[KeyRecord] = []
        scanned, budget = 0, max(SCAN_BUDGET, limit + 1)
        resume: str | None = None  # where a page cut short goes on from: never a key of a team not listed
        while indexes:
            n = LIST_CHUNK if keep is not None else min(LIST_CHUNK, limit + 1 - len(out))

            async def read(r: Any, place: tuple[float, str] | None = place, n: int = n
                           ) -> tuple[list[tuple[float, str]], list[KeyRecord]]:
                ids = await self._ids(r, indexes, place, n, desc)
                return ids, await read_records(r, self._keys, [i for _, i in ids])

            ids, records = await self._store.operator_call("key-list", read)
            out += [rec for rec in records if keep is None or keep(rec)]
            if len(out) > limit:
                return Page(out[:limit], True, out[limit - 1].id)
            if len(ids) < n:
                break  # every index is read to its end
            place, scanned = ids[-1], scanned + len(ids)
            resume = next((rec.id for rec in reversed(records) if rec.team in wanted), resume) if scan else place[1]
            if scanned >= budget and resume is not None:
                return Page(out, True, resume)
        return Page(out, False, None)

    async def all(self, team: str | None = None) -> list[KeyRecord]:
        """Every readable record (of `team`), oldest first, a page at a time (each an operator call of its own)."""
        out: list[KeyRecord] = []
        after = None
        while True:
            page = await self.page(teams=None if team is None else [team], after=after, limit=1000)
            out += page.records
            if page.next_cursor is None:
                return out
            after = page.next_cursor

    async def working(self, teams: Sequence[str], now: float) -> dict[str, int] | None:
        """How many keys of each team work at `now` (not revoked, not expired, not past a rotation's grace); None
        while the team indexes are built (they may lack keys: not counted yet)."""
        if not await self.built():
            return None

        async def count(r: Any) -> list[int]:
            pipe = r.pipeline(transaction=False)
            for t in teams:
                pipe.zcount(self._keys.team_live_keys(t), f"({now!r}", "+inf")  # works while now < its end
            return list(await pipe.execute())

        counts = await self._store.operator_call("key-list", count) if teams else []
        return dict(zip(teams, counts, strict=True))

    async def teams(self) -> list[str]:
        """The teams that have keys, by name (while the team indexes are built, those of the keys indexed so far
        and of every key created since the indexes existed)."""
        names = await self._store.operator_call("key-list", lambda r: r.smembers(self._keys.key_teams()))
        return sorted(n.decode() for n in names)

