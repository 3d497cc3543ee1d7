"""Concurrent requests with a key this process has not verified yet share one Redis read (a real Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.accounts.keys import Authenticator, KeyRecord, KeyStore, hash_key
from proxy.config import RedisSettings
from proxy.errors import AuthenticationFailed, ServiceUnavailable
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys

pytestmark = pytest.mark.redis


class HeldKeyStore(KeyStore):
    """A real key store whose reads are counted and answer only after `release` (read before it: a record from
    before a change made while they wait)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store, RedisKeys("ep"))
        self.release = asyncio.Event()
        self.reads = 0

    async def lookup(self, digest: str) -> KeyRecord | None:
        self.reads += 1
        found = await super().lookup(digest)
        await self.release.wait()
        return found


@pytest.fixture
async def held(redis_url: str) -> AsyncIterator[HeldKeyStore]:
    settings = RedisSettings(url=redis_url)
    store = Store(connect(settings)[0], settings)
    yield HeldKeyStore(store)
    await store.close()


async def started(n: int, coro_factory: object) -> list[asyncio.Task[KeyRecord]]:
    tasks = [asyncio.ensure_future(coro_factory()) for _ in range(n)]  # type: ignore[operator]
    await asyncio.sleep(0.01)
    return tasks


async def test_a_burst_with_a_new_key_makes_one_read(held: HeldKeyStore) -> None:
    key, record = await held.create("search")
    other, other_record = await held.create("search")
    auth = Authenticator(held, offline_grace_s=120, cache_s=60)
    burst = await started(20, lambda: auth.authenticate(key))
    second = await started(5, lambda: auth.authenticate(other))
    assert held.reads == 2  # one per key, not one per request
    held.release.set()
    assert {r.id for r in await asyncio.gather(*burst)} == {record.id}
    assert {r.id for r in await asyncio.gather(*second)} == {other_record.id}
    await auth.authenticate(key)
    assert held.reads == 2  # remembered for cache_s


async def test_a_request_that_leaves_does_not_cancel_the_read_of_the_others(held: HeldKeyStore) -> None:
    key, record = await held.create("search")
    auth = Authenticator(held, offline_grace_s=120, cache_s=60)
    first = await started(1, lambda: auth.authenticate(key))
    rest = await started(3, lambda: auth.authenticate(key))
    first[0].cancel()
    await asyncio.sleep(0)
    held.release.set()
    assert {r.id for r in await asyncio.gather(*rest)} == {record.id}
    assert held.reads == 1


async def test_an_unknown_key_and_an_outage_reach_every_waiter(held: HeldKeyStore, redis_url: str) -> None:
    auth = Authenticator(held, offline_grace_s=120, cache_s=60)
    unknown = "sk-gateway-" + "A" * 43
    tasks = await started(4, lambda: auth.authenticate(unknown))
    held.release.set()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(outcome, AuthenticationFailed)
    assert held.reads == 1

    key, _ = await held.create("search")
    await held._store.close()  # every read now fails: nobody waits forever, each hears the outage
    held._store.client = connect(RedisSettings(url="redis://127.0.0.1:1"))[0]
    tasks = await started(4, lambda: auth.authenticate(key))
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        assert isinstance(outcome, ServiceUnavailable)
    assert held.reads == 2


async def test_a_change_heard_during_a_read_is_not_hidden_by_it(held: HeldKeyStore) -> None:
    key, record = await held.create("search")
    auth = Authenticator(held, offline_grace_s=120, cache_s=60)
    before = await started(2, lambda: auth.authenticate(key))
    await held.revoke(record.id)
    auth.key_changed(hash_key(key).encode())  # as the announcement would
    after = await started(2, lambda: auth.authenticate(key))
    assert held.reads == 2  # requests after the change did not join the read that began before it
    held.release.set()
    await asyncio.gather(*before, return_exceptions=True)
    for outcome in await asyncio.gather(*after, return_exceptions=True):
        assert isinstance(outcome, AuthenticationFailed) and outcome.code == "api_key_revoked"
    with pytest.raises(AuthenticationFailed):  # and the read that began before it was not remembered
        await auth.authenticate(key)


async def test_another_keys_change_during_a_read_does_not_discard_it(held: HeldKeyStore) -> None:
    """Only a change of the key read (or of every key) makes its read forgotten: a burst of other keys' changes
    (a rotation script, a bulk revocation) leaves it remembered, for `cache_s` and for the offline grace."""
    key, record = await held.create("search")
    other, other_record = await held.create("search")
    auth = Authenticator(held, offline_grace_s=120, cache_s=60)
    reading = await started(3, lambda: auth.authenticate(key))
    await held.revoke(other_record.id)
    auth.key_changed(hash_key(other).encode())  # another key's announcement, heard while the read is in flight
    held.release.set()
    assert {r.id for r in await asyncio.gather(*reading)} == {record.id}
    assert (await auth.authenticate(key)).id == record.id
    assert held.reads == 1  # remembered: no second read
    await held._store.close()  # Redis gone (and the subscription with it): the key was verified a moment ago
    held._store.client = connect(RedisSettings(url="redis://127.0.0.1:1"))[0]
    auth.forget()
    assert (await auth.authenticate(key)).id == record.id  # within the offline grace, not 503


async def test_a_change_heard_after_the_read_answered_but_before_its_waiters_resume(held: HeldKeyStore) -> None:
    """The announcement arrives between the read's end and its waiters' turn: the stale answer is not kept."""
    key, record = await held.create("search")
    auth = Authenticator(held, offline_grace_s=120, cache_s=60)
    digest = hash_key(key)
    lookup = held.lookup

    async def then_changed(d: str) -> KeyRecord | None:
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(lambda _: auth.key_changed(digest.encode()))  # after the read's own callbacks
        return await lookup(d)

    held.lookup = then_changed  # type: ignore[method-assign]
    reading = await started(2, lambda: auth.authenticate(key))
    await held.revoke(record.id)
    held.release.set()
    await asyncio.gather(*reading)  # answered before the change: they pass
    held.lookup = lookup  # type: ignore[method-assign]
    with pytest.raises(AuthenticationFailed) as exc:  # the answer from before the change was not remembered
        await auth.authenticate(key)
    assert exc.value.code == "api_key_revoked"


async def test_a_burst_reads_its_teams_limits_once(redis_url: str) -> None:
    from proxy.accounts.teams import TeamStore
    from proxy.config.limits import Limits

    settings = RedisSettings(url=redis_url)
    store = Store(connect(settings)[0], settings)
    reads = 0

    class Counted(TeamStore):
        async def _read(self, team: str, *, operator: bool = False) -> Limits | None:
            nonlocal reads
            if operator:  # the admin's own read (set), not the request path's
                return await super()._read(team, operator=operator)
            reads += 1
            await asyncio.sleep(0.05)  # a read in flight while the rest of the burst arrives
            return await super()._read(team, operator=operator)

    teams = Counted(store, RedisKeys("ep"), {}, cache_s=60)
    await teams.set("search", {"tokens_per_day": 1000})
    limits = await asyncio.gather(*(teams.limits("search") for _ in range(20)))
    assert {lim.tokens_per_day for lim in limits} == {1000}
    assert reads == 1  # one read for the burst, not one per request
    await teams.set("search", {"tokens_per_day": 2000})  # a change: read again at once in this process
    assert (await teams.limits("search")).tokens_per_day == 2000 and reads == 2
    await store.close()
