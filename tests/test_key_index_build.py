"""The one-time build of the team key indexes off the request path (issue 18, point 13's review), against a real
Redis (single and Cluster where no app is needed): each app starts it in the background without any request; lists
answer right while it is held mid-way (a team's keys read from `ep:keys`, Teams counts null); two apps started
together build once (a lock); a holder that died is taken over when its lock expires; a failure is retried;
shutdown stops it and frees the lock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.accounts import keyindexbuild
from proxy.accounts.keyindex import KeyIndex
from proxy.accounts.keyindexbuild import IndexBuild
from proxy.accounts.keys import KeyStore
from proxy.config import RedisSettings
from proxy.http.app import KEYSTORE
from proxy.stores.guard import Store, StoreUnavailable, connect
from proxy.stores.rediskeys import RedisKeys
from tests import test_key_pages
from tests.conftest import Proxy, Upstream, make_settings
from tests.test_key_pages import ADMIN, create_many, forget_the_index, ids_of, index_built

pytestmark = pytest.mark.redis
AUTH = {"Authorization": f"Bearer {ADMIN}"}
RKEYS = RedisKeys("ep")
store = test_key_pages.store  # the fixture: single and Cluster


class Gate:
    """Holds every build after its first chunk (KeyIndex.between_chunks) until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held = asyncio.Event()
        self.open = asyncio.Event()
        self.builds = 0
        rebuild = KeyIndex.rebuild

        async def counted(index: KeyIndex) -> int:
            self.builds += 1
            return await rebuild(index)

        async def hold(_: KeyIndex) -> None:
            self.held.set()
            await self.open.wait()

        monkeypatch.setattr(KeyIndex, "between_chunks", hold)
        monkeypatch.setattr(KeyIndex, "rebuild", counted)


async def older_keys(store: Store | str, n: int) -> list[Any]:
    """n keys of ads and search written before the team indexes existed (in this store, or at this URL)."""
    if isinstance(store, str):
        settings = RedisSettings(url=store)
        at = Store(connect(settings)[0], settings)
        try:
            return await older_keys(at, n)
        finally:
            await at.close()
    made = await create_many(KeyStore(store, RKEYS), n, ("ads", "search"))
    await forget_the_index(store, RKEYS, ("ads", "search"))
    return made


async def every_id(p: Proxy, query: str, auth: dict[str, str] = AUTH) -> list[str]:
    ids, after = [], ""
    while True:
        resp = await p.client.get(f"/admin/keys?{query}{after}", headers=auth)
        body = await resp.json()
        assert resp.status == 200, body
        ids += [k["id"] for k in body["data"]]
        if body["next_cursor"] is None:
            return ids
        after = f"&after={body['next_cursor']}"


async def test_the_build_starts_with_the_app_and_lists_answer_while_it_is_held(
        make_proxy: Any, upstream: Upstream, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made = await older_keys(redis_url, 450)
    gate = Gate(monkeypatch)
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN))
    await asyncio.wait_for(gate.held.wait(), 10)  # started by the app alone: no request was made
    # held after its first chunk: a team's keys are all listed, from `ep:keys`, each page a key of the team's
    assert await every_id(p, "team=ads&limit=40") == ids_of(made, "ads")
    assert await every_id(p, "team=search&limit=1000&order=desc") == ids_of(made, "search")[::-1]
    resp = await p.client.post("/admin/admins", json={"name": "lead", "role": "team", "teams": ["search"]},
                               headers=AUTH)
    lead = {"Authorization": f"Bearer {(await resp.json())['credential']}"}
    assert await every_id(p, "limit=7", lead) == ids_of(made, "search")
    other = await p.client.get(f"/admin/keys?after={ids_of(made, 'ads')[300 // 2]}", headers=lead)
    assert other.status == 400  # a cursor of another team's key names no key, built or not
    teams = await (await p.client.get("/admin/teams", headers=AUTH)).json()
    assert teams["keys_building"] is True and all(t["keys"] is None for t in teams["data"])
    gate.open.set()
    await asyncio.wait_for(index_built(p.app[KEYSTORE].index), 30)
    teams = await (await p.client.get("/admin/teams", headers=AUTH)).json()
    assert teams["keys_building"] is False
    assert [(t["team"], t["keys"]) for t in teams["data"]] == [("ads", 225), ("search", 225)]
    assert await every_id(p, "team=ads&limit=40") == ids_of(made, "ads")  # now from the team's index
    assert gate.builds == 1


async def test_two_apps_started_together_build_once(make_proxy: Any, upstream: Upstream, redis_url: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    await older_keys(redis_url, 250)
    gate = Gate(monkeypatch)
    monkeypatch.setattr(keyindexbuild, "POLL_S", 0.02)
    steps, polled = 0, asyncio.Event()
    step = IndexBuild._step

    async def counted(build: IndexBuild) -> bool:
        nonlocal steps
        steps += 1
        if steps >= 6:  # the other app found the lock taken, again and again, while the first was held
            polled.set()
        return await step(build)

    monkeypatch.setattr(IndexBuild, "_step", counted)
    settings = make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN)
    apps: list[Proxy] = list(await asyncio.gather(make_proxy(settings), make_proxy(settings)))
    await asyncio.wait_for(gate.held.wait(), 10)
    await asyncio.wait_for(polled.wait(), 10)
    gate.open.set()
    for p in apps:
        await asyncio.wait_for(index_built(p.app[KEYSTORE].index), 30)
    assert gate.builds == 1


async def test_a_lock_whose_holder_died_is_taken_over(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    made = await older_keys(store, 120)
    monkeypatch.setattr(keyindexbuild, "POLL_S", 0.02)
    await store.operator_call("test", lambda r: r.set(RKEYS.team_keys_lock(), "gone:0", px=300))
    index = KeyStore(store, RKEYS).index
    build = IndexBuild(store, RKEYS, index)
    await asyncio.wait_for(build.run(), 10)
    assert build.builds == 1 and await index.working(["ads"], 0) == {"ads": len(ids_of(made, "ads"))}


async def test_a_failed_build_is_tried_again(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    made = await older_keys(store, 250)
    monkeypatch.setattr(keyindexbuild, "RETRY_MIN_S", 0.01)
    failures = ["redis down", "a bug"]

    async def fail(_: KeyIndex) -> None:
        if failures:
            reason = failures.pop(0)
            raise StoreUnavailable(reason) if reason == "redis down" else RuntimeError(reason)

    monkeypatch.setattr(KeyIndex, "between_chunks", fail)
    index = KeyStore(store, RKEYS).index
    build = IndexBuild(store, RKEYS, index)
    await asyncio.wait_for(build.run(), 10)  # the lock each failed attempt held is released: no wait for it
    assert build.builds == 3 and await index.working(["search"], 0) == {"search": len(ids_of(made, "search"))}


async def test_shutdown_stops_the_build_and_frees_the_lock(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    await older_keys(store, 250)
    gate = Gate(monkeypatch)
    index = KeyStore(store, RKEYS).index
    task = asyncio.create_task(IndexBuild(store, RKEYS, index).run())
    await asyncio.wait_for(gate.held.wait(), 10)
    assert await store.operator_call("test", lambda r: r.exists(RKEYS.team_keys_lock())) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.operator_call("test", lambda r: r.exists(RKEYS.team_keys_lock())) == 0
    assert not await index.built()
