"""Key rotation against a real Redis with pinned clocks: grace periods, inherited expiry, refusals, quota lineage."""

from __future__ import annotations

import calendar
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import pytest

from proxy.accounts.keys import Authenticator, KeyRecord, KeyStore, hash_key
from proxy.config import RedisSettings
from proxy.config.limits import Limits
from proxy.errors import AuthenticationFailed, KeyChanged, KeyNotActive
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.helpers import Clock

pytestmark = pytest.mark.redis
T0 = float(calendar.timegm((2026, 11, 5, 12, 0, 0)))
MONTH = 30 * 86400.0


@pytest.fixture
async def keys(redis_url: str) -> AsyncIterator[tuple[KeyStore, Authenticator, Clock]]:
    settings = RedisSettings(url=redis_url)
    store = Store(connect(settings)[0], settings)
    clock = Clock(T0)
    ks = KeyStore(store, RedisKeys("ep"), clock=clock)
    yield ks, Authenticator(ks, offline_grace_s=120, cache_s=0, wall_clock=clock), clock
    await store.close()


async def expired_code(auth: Authenticator, key: str) -> str | None:
    try:
        await auth.authenticate(key)
    except AuthenticationFailed as exc:
        return exc.code
    return None


async def test_the_old_key_works_until_its_grace_ends(keys: Any) -> None:
    ks, auth, clock = keys
    old, record = await ks.create("search", name="svc", expires_at=T0 + MONTH, limits=Limits(rpm=50))
    rotated = await ks.rotate(record.id, grace_s=3600)
    assert rotated is not None
    new, new_record, old_record = rotated
    assert (new_record.team, new_record.name, new_record.limits) == ("search", "svc", Limits(rpm=50))
    assert new_record.expires_at == T0 + MONTH  # the key's own expiry, inherited
    assert old_record.expires_at == T0 + MONTH and old_record.grace_until == T0 + 3600
    assert old_record.ends_at == T0 + 3600 and old_record.public()["grace_until"] == T0 + 3600
    clock.now = T0 + 3599
    assert await expired_code(auth, old) is None and await expired_code(auth, new) is None
    clock.now = T0 + 3600
    assert await expired_code(auth, old) == "api_key_expired"
    assert await expired_code(auth, new) is None
    clock.now = T0 + MONTH
    assert await expired_code(auth, new) == "api_key_expired"


async def test_rotating_twice_gives_the_second_key_the_original_expiry(keys: Any) -> None:
    ks, _, clock = keys
    _, record = await ks.create("search", expires_at=T0 + MONTH)
    first = await ks.rotate(record.id, grace_s=3600)
    clock.now = T0 + 60
    second = await ks.rotate(record.id, grace_s=7200)  # still in its grace period: it may be rotated again
    assert first is not None and second is not None
    assert first[1].expires_at == second[1].expires_at == T0 + MONTH  # not the old key's grace end
    assert second[2].grace_until == T0 + 3600  # a second rotation never lengthens the grace period
    third = await ks.rotate(second[1].id, grace_s=60)  # a replacement rotated in turn
    assert third is not None and third[1].expires_at == T0 + MONTH
    assert {first[1].quota_id, second[1].quota_id, third[1].quota_id} == {record.id}  # one quota lineage


async def test_an_expired_or_revoked_key_cannot_be_rotated(keys: Any) -> None:
    ks, _, clock = keys
    _, lapsed = await ks.create("search", expires_at=T0 - 1)
    with pytest.raises(KeyNotActive) as err:
        await ks.rotate(lapsed.id, grace_s=60)
    assert err.value.status == 409 and err.value.code == "key_expired" and "cannot be rotated" in err.value.message
    _, graced = await ks.create("search")
    await ks.rotate(graced.id, grace_s=60)
    clock.now = T0 + 60  # its grace period is over
    with pytest.raises(KeyNotActive):
        await ks.rotate(graced.id, grace_s=60)
    _, revoked = await ks.create("search")
    await ks.revoke(revoked.id)
    with pytest.raises(KeyNotActive) as rev:
        await ks.rotate(revoked.id, grace_s=60)
    assert rev.value.code == "key_revoked"
    assert await ks.rotate("key_nope", grace_s=60) is None
    assert len(await ks.list()) == 4  # the refused rotations issued no key


async def test_records_written_before_lineage_and_grace_fields_still_work(keys: Any, redis_server: Any) -> None:
    ks, auth, _ = keys
    key = "sk-gateway-" + "a" * 43
    digest = hash_key(key)
    raw = redis_server.client()
    raw.hset(f"ep:key:{digest}", mapping={"id": "key_legacy", "team": "search", "name": "", "created_at": "1.0",
                                          "expires_at": "", "revoked": "0", "models": "", "rpm": "5", "tpm": "",
                                          "tokens_per_day": "", "tokens_per_month": ""})
    raw.set("ep:keyid:key_legacy", digest)
    raw.zadd("ep:keys", {"key_legacy": 1.0})
    record = await auth.authenticate(key)
    assert record.quota_id == "key_legacy" and record.grace_until is None and record.ends_at is None
    rotated = await ks.rotate("key_legacy", grace_s=60)
    assert rotated is not None and rotated[1].quota_id == "key_legacy" and rotated[1].limits == Limits(rpm=5)


def test_record_round_trip_keeps_grace_and_lineage() -> None:
    rec = KeyRecord("key_2", "search", expires_at=5.0, grace_until=3.0, lineage="key_1")
    back = KeyRecord.from_redis({k.encode(): v.encode() for k, v in rec.to_redis().items()})
    assert back == rec and back.ends_at == 3.0 and back.quota_id == "key_1"
    assert not back.active(3.0) and back.active(2.9)


async def test_a_key_whose_record_is_gone_is_no_such_key_and_gets_no_partial_record(
    keys: Any, redis_server: Any
) -> None:
    ks, _, _ = keys
    key, record = await ks.create("search", limits=Limits(rpm=5))
    raw = redis_server.client()
    raw.delete(f"ep:key:{hash_key(key)}")  # the id still points at it (a partial delete, a restore gone wrong)
    assert await ks.revoke(record.id) is None
    assert await ks.set_limits(record.id, {"rpm": 9}) is None
    assert await ks.get(record.id) is None
    assert await ks.rotate(record.id, grace_s=60) is None
    assert not raw.exists(f"ep:key:{hash_key(key)}")  # nothing half-written
    assert [r.id for r in await ks.list()] == []


class RaceClock(Clock):
    """A clock whose first reading lets `race` run: the rotation has read the key and not yet written."""

    def __init__(self, now: float, race: Any) -> None:
        super().__init__(now)
        self.race = race

    def __call__(self) -> float:
        race, self.race = self.race, None
        if race is not None:
            race()
        return self.now


def _lua(name: str) -> str:
    return (resources.files("proxy") / "lua" / name).read_text()


@pytest.mark.parametrize("rival", ["rotation", "revocation", "limits"])
async def test_a_rotation_that_loses_a_race_issues_no_key(keys: Any, redis_server: Any, rival: str) -> None:
    ks, _, _ = keys
    key, record = await ks.create("search")
    raw = redis_server.client()
    record_key = f"ep:key:{hash_key(key)}"
    # what the rival writes to the old record (through the scripts a real rotation, revocation or limit change
    # runs), landing between this rotation's read and its claim
    rivals = {
        "rotation": lambda: raw.eval(_lua("keyrotate.lua"), 1, record_key, "", repr(T0 + 60)),
        "revocation": lambda: raw.eval(_lua("keyset.lua"), 1, record_key, "revoked", "1"),
        "limits": lambda: raw.eval(_lua("keyset.lua"), 1, record_key, "rpm", "7"),
    }
    racing = KeyStore(ks._store, RedisKeys("ep"), clock=RaceClock(T0, rivals[rival]))
    with pytest.raises(KeyChanged) as err:
        await racing.rotate(record.id, grace_s=3600)
    assert err.value.status == 409 and err.value.code == "key_changed"
    assert [r.id for r in await ks.list()] == [record.id]  # no second key
    got = await ks.get(record.id)
    assert got is not None and got.grace_until == (T0 + 60 if rival == "rotation" else None)
