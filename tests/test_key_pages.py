"""Admin lists a page at a time (issue 18, point 13), against a real Redis, single and Cluster: pages of keys cover
every key exactly once while keys are created and revoked, a team's keys come from its own index (kept on create,
revoke and rotation, built once for keys older than it), each team's working keys are counted from that index, and
bad paging parameters are 400s in OpenAI's error shape. The console's Keys screen: tests/test_console.py."""

from __future__ import annotations

import asyncio
import calendar
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from proxy.accounts import keyindex
from proxy.accounts.keyindex import BadCursor, KeyIndex
from proxy.accounts.keyindexbuild import IndexBuild
from proxy.accounts.keyrecord import KeyRecord
from proxy.accounts.keys import KeyStore, generate_key, new_key_id
from proxy.config import RedisSettings
from proxy.http.app import KEYSTORE
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import Cluster, Proxy, Upstream, make_settings
from tests.helpers import Clock
from tests.test_cli import cli

pytestmark = pytest.mark.redis
ADMIN = "admin-secret-for-tests-0123456789"
T0 = float(calendar.timegm((2026, 11, 5, 12, 0, 0)))
TEAMS = ("ads", "search", "ranking", "ops", "billing")


async def create_many(ks: KeyStore, n: int, teams: tuple[str, ...] = TEAMS) -> list[KeyRecord]:
    """n keys written as the key store writes one (its own queued commands), 250 to a pipeline (no HTTP, no round
    trip each), the i-th of team teams[i % len(teams)] and named `svc i`: their records, in the lists' order."""
    # created in the last n * 0.1 ms: a key created for real after them (a test's churn) is listed after them all
    first = time.time() - n * 1e-4
    made = [KeyRecord(new_key_id(), teams[i % len(teams)], f"svc {i}", first + i * 1e-4) for i in range(n)]
    made = [replace(r, lineage=r.id) for r in made]
    for start in range(0, n, 250):

        async def write(r: Any, chunk: list[KeyRecord] = made[start:start + 250]) -> None:
            pipe = r.pipeline(transaction=False)
            for record in chunk:
                ks._queue_create(pipe, generate_key(), record)
            await pipe.execute()

        await ks._store.operator_call("test", write)
    return made


def ids_of(records: list[KeyRecord], *teams: str) -> list[str]:
    return [r.id for r in records if not teams or r.team in teams]


async def forget_the_index(store: Store, rkeys: RedisKeys, teams: tuple[str, ...]) -> None:
    """As a store written before the team indexes existed."""

    async def forget(r: Any) -> None:
        for t in teams:
            await r.delete(rkeys.team_keys(t), rkeys.team_live_keys(t))
        await r.delete(rkeys.key_teams(), rkeys.team_keys_built())

    await store.operator_call("test", forget)


@pytest.fixture(params=["single", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "single":
        settings = RedisSettings(url=request.getfixturevalue("redis_url"))
    else:
        cluster: Cluster = request.getfixturevalue("cluster")
        settings = RedisSettings(url=cluster.seeds, type="cluster", socket_timeout_s=5)
    s = Store(connect(settings)[0], settings)
    yield s
    await s.close()


async def index_built(index: KeyIndex) -> None:
    for _ in range(3000):  # 30 s
        if await index.built():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the team key indexes were not built within 30 s")


async def every_page(index: KeyIndex, limit: int, **kw: Any) -> list[list[str]]:
    pages, after = [], None
    while True:
        page = await index.page(after=after, limit=limit, **kw)
        assert len(page.records) <= limit
        pages.append([r.id for r in page.records])
        if page.next_cursor is None:
            assert not page.has_more
            return pages
        assert page.has_more and page.next_cursor == pages[-1][-1]
        after = page.next_cursor


async def test_pages_cover_every_key_once_while_keys_are_created_and_revoked(store: Store) -> None:
    ks = KeyStore(store, RedisKeys("ep"))
    made = await create_many(ks, 5000)
    ids = ids_of(made)
    stop = asyncio.Event()

    async def churn() -> None:  # new keys (of every team) and revocations while the pages are read
        for i in itertools.count():
            if stop.is_set():
                return
            await ks.create(TEAMS[i % len(TEAMS)], name="meanwhile")
            await ks.revoke(ids[(i * 7919) % len(ids)])

    churning = asyncio.create_task(churn())
    try:
        forward = await every_page(ks.index, 97, teams=None)
        backward = await every_page(ks.index, 1000, teams=None, desc=True)
        ads = await every_page(ks.index, 100, teams=["ads"])
        two = await every_page(ks.index, 333, teams=["ads", "search"], desc=True)
    finally:
        stop.set()
        await churning
    for pages in (forward, backward):
        seen = [i for page in pages for i in page]
        assert len(seen) == len(set(seen)) and set(ids) <= set(seen)
    assert [i for page in forward for i in page][:5000] == ids  # oldest first, by creation
    assert len(forward[0]) == 97 and len(backward[0]) == 1000
    for pages, teams in ((ads, ("ads",)), (two, ("ads", "search"))):
        seen = [i for page in pages for i in page]
        mine = ids_of(made, *teams)
        assert len(seen) == len(set(seen)) and set(mine) <= set(seen)
        records = await ks.records(seen)
        assert {records[i].team for i in seen} == set(teams)  # a team's pages hold its keys alone


async def test_the_team_index_follows_revocation_rotation_and_expiry(store: Store) -> None:
    clock = Clock(T0)
    ks = KeyStore(store, RedisKeys("ep"), clock=clock)
    await ks.index.rebuild()  # a store with no key older than the indexes: built at once
    _, a = await ks.create("ads")
    clock.now += 1
    _, b = await ks.create("ads", expires_at=T0 + 100)
    clock.now += 1
    _, c = await ks.create("ads")
    _, other = await ks.create("search")
    clock.now = T0
    assert await ks.index.working(["ads", "search", "nobody"], T0) == {"ads": 3, "search": 1, "nobody": 0}
    assert await ks.index.working(["ads"], T0 + 100) == {"ads": 2}  # b stops working at T0 + 100
    await ks.revoke(a.id)
    clock.now = T0 + 3
    rotated = await ks.rotate(c.id, grace_s=47)
    clock.now = T0
    assert rotated is not None
    assert await ks.index.working(["ads"], T0) == {"ads": 3}  # b, c (in its grace) and c's replacement
    assert await ks.index.working(["ads"], T0 + 50) == {"ads": 2}  # c's grace is over
    await ks.revoke(rotated[1].id)
    assert await ks.index.working(["ads"], T0) == {"ads": 2}
    listed = [r.id for r in (await ks.index.page(teams=["ads"], after=None, limit=10)).records]
    assert listed == [a.id, b.id, c.id, rotated[1].id]  # revoked keys stay listed, by creation
    assert [r.id for r in await ks.list("search")] == [other.id]
    assert await ks.index.teams() == ["ads", "search"]
    revoked_then_rotated = await ks.create("ads")
    await ks.revoke(revoked_then_rotated[1].id)
    assert await ks.index.working(["ads"], T0) == {"ads": 2}


async def test_keys_older_than_the_index_are_listed_at_once_and_counted_once_built(store: Store) -> None:
    rkeys = RedisKeys("ep")
    ks = KeyStore(store, rkeys)
    made = await create_many(ks, 300, ("ads", "search"))
    await ks.revoke(made[0].id)
    await forget_the_index(store, rkeys, ("ads", "search"))
    fresh = KeyStore(store, rkeys)  # a process of the new version, its indexes not built yet
    # a team's keys read from `ep:keys` meanwhile, nothing built by the listing, no count that would be wrong
    assert [r.id for r in await fresh.list("ads")] == ids_of(made, "ads")
    assert await fresh.index.working(["ads", "search"], 0) is None
    assert await store.operator_call("test", lambda r: r.exists(rkeys.team_keys(made[0].team))) == 0
    assert await IndexBuild(store, rkeys, fresh.index).run() is None
    working = await fresh.index.working(["ads", "search"], 0)
    assert working is not None and sum(working.values()) == 299 and working[made[0].team] == 149
    assert await fresh.index.teams() == ["ads", "search"]
    assert [r.id for r in await fresh.list("ads")] == ids_of(made, "ads")
    assert await store.operator_call("test", lambda r: r.exists(rkeys.team_keys_built())) == 1


async def test_a_search_reads_a_bounded_number_of_keys_per_page(redis_url: str) -> None:
    settings = RedisSettings(url=redis_url)
    store = Store(connect(settings)[0], settings)
    try:
        ks = KeyStore(store, RedisKeys("ep"))
        await create_many(ks, 2500, ("ads",))
        _, needle = await ks.create("ads", name="The Needle")
        match: Callable[[Any], bool] = lambda r: "needle" in r.name.casefold()  # noqa: E731
        first = await ks.index.page(teams=None, after=None, limit=10, match=match)
        assert first.records == [] and first.has_more and first.next_cursor is not None  # 2000 read, none found
        second = await ks.index.page(teams=None, after=first.next_cursor, limit=10, match=match)
        assert [r.id for r in second.records] == [needle.id] and not second.has_more
        with pytest.raises(BadCursor):
            await ks.index.page(teams=None, after="key_nope", limit=10)
    finally:
        await store.close()


def lister(p: Proxy, path: str) -> Callable[[str], Awaitable[tuple[int, Any]]]:
    """GET `path` + a query, as root: (status, JSON)."""
    async def get(query: str) -> tuple[int, Any]:
        resp = await p.client.get(path + query, headers={"Authorization": f"Bearer {ADMIN}"})
        return resp.status, await resp.json()

    return get


async def first_page(get: Callable[[str], Awaitable[tuple[int, Any]]], ids: list[str], field: str) -> Any:
    """The list's first page without parameters: the first 100 (the default page), in the list's envelope."""
    status, first = await get("")
    assert status == 200 and [x[field] for x in first["data"]] == ids[:100]
    assert (first["object"], first["has_more"], first["next_cursor"]) == ("list", True, ids[99])
    assert (first["first_id"], first["last_id"]) == (ids[0], ids[99])
    return first


async def test_admin_keys_pages_searches_and_refuses_bad_parameters(make_proxy: Any, upstream: Upstream,
                                                                     redis_url: str) -> None:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN))
    made = await create_many(p.app[KEYSTORE], 250, ("ads", "search"))
    ids, search = ids_of(made), ids_of(made, "search")

    get = lister(p, "/admin/keys")
    first = await first_page(get, ids, "id")
    _, rest = await get(f"?limit=1000&cursor={first['next_cursor']}")
    assert [k["id"] for k in rest["data"]] == ids[100:] and rest["next_cursor"] is None and not rest["has_more"]
    _, newest = await get("?order=desc&limit=2&team=search")
    assert [k["id"] for k in newest["data"]] == search[:-3:-1] and newest["next_cursor"] == search[-2]
    _, after = await get(f"?order=desc&limit=2&team=search&after={search[-2]}")
    assert [k["id"] for k in after["data"]] == [search[-3], search[-4]]
    _, found = await get("?q=SVC%2012")  # name contains, any case: svc 12, svc 120..129
    assert sorted(k["name"] for k in found["data"]) == sorted(["svc 12", *[f"svc {n}" for n in range(120, 130)]])
    _, by_id = await get(f"?q={search[7][:12]}&team=search")
    assert search[7] in [k["id"] for k in by_id["data"]]
    _, empty = await get("?q=nothing-like-it")
    assert empty["data"] == [] and empty["first_id"] is None and not empty["has_more"]

    for query, param in [("?limit=0", "limit"), ("?limit=1001", "limit"), ("?limit=abc", "limit"),
                         ("?limit=%FF", "limit"), ("?limit=-1", "limit"), ("?limit=1e3", "limit"),
                         ("?after=key_nope", "after"), ("?cursor=%FF%FE", "cursor"), ("?after=a%00b", "after"),
                         (f"?after={ids[1]}&cursor={ids[2]}", "cursor"), ("?order=sideways", "order"),
                         ("?q=" + "x" * 201, "q"), ("?team=Not%20A%20Team", "team")]:
        status, body = await get(query)
        assert status == 400, query
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == param, query


async def test_admin_teams_pages_with_working_key_counts(make_proxy: Any, upstream: Upstream,
                                                         redis_url: str) -> None:
    config = "[teams.alpha]\nrpm = 10\n"
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, config, PROXY_ADMIN_KEY=ADMIN))
    auth = {"Authorization": f"Bearer {ADMIN}"}
    ks: KeyStore = p.app[KEYSTORE]
    await index_built(ks.index)  # at start, in the background (tests/test_key_index_build.py)
    await create_many(ks, 30, ("beta", "gamma", "gamma"))
    _, revoked = await ks.create("beta")
    await ks.revoke(revoked.id)
    first = await (await p.client.get("/admin/teams?limit=2", headers=auth)).json()
    assert [(t["team"], t["source"], t["keys"]) for t in first["data"]] == [("alpha", "config", 0), ("beta", None, 10)]
    assert first["keys_building"] is False
    assert first["has_more"] and first["next_cursor"] == "beta"
    rest = await (await p.client.get("/admin/teams?after=beta", headers=auth)).json()
    assert [(t["team"], t["keys"]) for t in rest["data"]] == [("gamma", 20)] and rest["next_cursor"] is None
    bad = await p.client.get("/admin/teams?limit=0", headers=auth)
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "limit"
    # a team name that is (no longer) listed: the list goes on after it in name order
    for after, then in [("b", ["beta", "gamma"]), ("delta", ["gamma"]), ("zulu", [])]:
        page = await (await p.client.get(f"/admin/teams?after={after}", headers=auth)).json()
        assert [t["team"] for t in page["data"]] == then and not page["has_more"], after
    # a cursor no page of teams ever gives: not UTF-8 (%FF arrives as U+FFFD), not a team name
    for query, param in [("?after=%FF", "after"), ("?cursor=%FF%FE", "cursor"), ("?after=Beta", "after"),
                         ("?after=a%00b", "after"), ("?cursor=" + "a" * 64, "cursor"), ("?after=-x", "after")]:
        resp = await p.client.get("/admin/teams" + query, headers=auth)
        body = await resp.json()
        assert resp.status == 400, query
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param, query
        assert body["error"]["message"].startswith("Invalid cursor: not a team name."), query


async def test_admin_admins_pages_by_creation_time(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    """GET /admin/admins pages as the other lists do (limit, after/cursor, next_cursor), oldest first; a cursor
    that names no admin, or is no admin name at all, is a 400."""
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN))
    auth = {"Authorization": f"Bearer {ADMIN}"}
    names = [f"ops-{n:03d}" for n in range(105)]
    for name in names:
        resp = await p.client.post("/admin/admins", json={"name": name, "role": "viewer"}, headers=auth)
        assert resp.status == 201, await resp.text()
    await p.client.post(f"/admin/admins/{names[3]}/revoke", headers=auth)

    get = lister(p, "/admin/admins")
    first = await first_page(get, names, "name")
    assert first["data"][3]["revoked"]
    assert all("credential" not in a for a in first["data"])
    _, rest = await get(f"?cursor={first['next_cursor']}")
    assert [a["name"] for a in rest["data"]] == names[100:] and not rest["has_more"] and rest["next_cursor"] is None
    pages, after = [], ""
    while True:
        _, page = await get(f"?limit=40{after}")
        pages.append([a["name"] for a in page["data"]])
        if page["next_cursor"] is None:
            break
        after = f"&after={page['next_cursor']}"
    assert [len(x) for x in pages] == [40, 40, 25] and list(itertools.chain(*pages)) == names
    for query, param in [("?after=nobody", "after"), ("?after=%FF", "after"), ("?cursor=a%20b", "cursor"),
                         ("?limit=0", "limit"), ("?limit=1001", "limit")]:
        status, body = await get(query)
        assert status == 400 and body["error"]["param"] == param, (query, body)
        assert body["error"]["type"] == "invalid_request_error", query


def test_cli_keys_list_follows_the_pages(redis_url: str) -> None:
    async def seed() -> list[KeyRecord]:
        settings = RedisSettings(url=redis_url)
        store = Store(connect(settings)[0], settings)
        try:
            return await create_many(KeyStore(store, RedisKeys("ep")), 1203, ("ads", "search", "ops"))
        finally:
            await store.close()

    made = asyncio.run(seed())
    ids = ids_of(made)
    every = cli(redis_url, "keys", "list", "--json")
    assert every.returncode == 0, every.stderr
    assert [k["id"] for k in json.loads(every.stdout)] == ids  # past the first page of 1000
    some = cli(redis_url, "keys", "list", "--team", "search", "--limit", "5")
    assert [line.split()[0] for line in some.stdout.splitlines()[1:]] == ids_of(made, "search")[:5]
    table = cli(redis_url, "keys", "list")
    assert len(table.stdout.splitlines()) == 1 + 1203 and table.stdout.count("ID ") == 1


async def test_a_cursor_from_another_team_names_no_key_for_a_confined_admin(make_proxy: Any, upstream: Upstream,
                                                                             redis_url: str) -> None:
    """A team admin (or a viewer of named teams) who pastes another team's key id as the cursor gets the 400 of an
    id that never existed, not a page: paging tells nothing of other teams' keys, not even that one exists."""
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN))
    root = {"Authorization": f"Bearer {ADMIN}"}
    made = await create_many(p.app[KEYSTORE], 40, ("ads", "search"))
    ads, search = ids_of(made, "ads"), ids_of(made, "search")
    creds = []
    for name, role in (("lead", "team"), ("watcher", "viewer")):
        resp = await p.client.post("/admin/admins", json={"name": name, "role": role, "teams": ["ads"]}, headers=root)
        creds.append({"Authorization": f"Bearer {(await resp.json())['credential']}"})

    async def get(query: str, auth: dict[str, str]) -> tuple[int, Any]:
        resp = await p.client.get("/admin/keys" + query, headers=auth)
        return resp.status, await resp.json()

    for auth in creds:
        never = await get("?after=key_0000000000000000", auth)
        for query in (f"?after={search[5]}", f"?cursor={search[5]}&order=desc"):
            status, body = await get(query, auth)
            assert status == 400 and body["error"]["param"] in ("after", "cursor"), (query, body)
            assert body["error"]["message"] == never[1]["error"]["message"].replace("key_0000000000000000",
                                                                                  search[5])
        status, body = await get(f"?after={ads[4]}&limit=3", auth)
        assert status == 200 and [k["id"] for k in body["data"]] == ads[5:8]
    status, body = await get(f"?team=ads&after={search[5]}", root)  # the cursor belongs to the listing asked
    assert status == 400 and body["error"]["param"] == "after"
    status, body = await get(f"?after={search[5]}&limit=2", root)
    assert status == 200 and [k["id"] for k in body["data"]] == ids_of(made)[12:14]


async def test_a_revocation_or_rotation_during_the_index_build_is_not_undone(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build reads a chunk of records and then writes their index entries: a key revoked (or rotated) between
    the two had its ZREM (its ZADD of the grace end) overwritten by the build's entry from the older read, and
    counted as working for ever. Here the revocation and the rotation land exactly in that gap."""
    clock = Clock(T0)
    rkeys = RedisKeys("ep")
    ks = KeyStore(store, rkeys, clock=clock)
    made = [(await ks.create("ads", name=f"k{i}"))[1] for i in range(3)]
    read = keyindex.read_records
    landed: list[Any] = []

    async def read_then_change(r: Any, keys: RedisKeys, ids: Any) -> list[KeyRecord]:
        records = await read(r, keys, ids)
        if not landed:
            landed.append(await ks.revoke(made[0].id))
            landed.append(await ks.rotate(made[1].id, grace_s=60))
        return records

    monkeypatch.setattr(keyindex, "read_records", read_then_change)
    assert await ks.index.rebuild() == 3
    assert len(landed) == 2 and landed[1] is not None
    # made[1] in its grace, made[2], made[1]'s replacement; after the grace the last two
    assert await ks.index.working(["ads"], T0 + 1) == {"ads": 3}
    assert await ks.index.working(["ads"], T0 + 61) == {"ads": 2}
