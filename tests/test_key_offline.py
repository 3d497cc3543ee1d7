"""Key checks while the key store is unreachable: the offline grace, with pinned clocks instead of sleeps."""

from __future__ import annotations

import fakeredis
import pytest

from proxy.accounts.keys import Authenticator, KeyStore
from proxy.config import RedisSettings
from proxy.errors import AuthenticationFailed, ServiceUnavailable
from proxy.stores.guard import Store
from proxy.stores.rediskeys import RedisKeys
from tests.helpers import Clock

GRACE = 120.0


async def test_offline_grace_accepts_recent_keys_and_refuses_older_or_unseen_ones() -> None:
    server = fakeredis.FakeServer()
    mono, wall = Clock(5000.0), Clock(1.8e9)
    store = Store(fakeredis.FakeAsyncRedis(server=server), RedisSettings(retry_interval_s=1.0), clock=mono)
    keystore = KeyStore(store, RedisKeys(), clock=wall)
    auth = Authenticator(keystore, GRACE, cache_s=2.0, clock=mono, wall_clock=wall)
    old_key, old = await keystore.create("search")
    new_key, new = await keystore.create("search")
    unseen_key, _ = await keystore.create("search")

    assert (await auth.authenticate(old_key)).id == old.id  # verified at 5000
    mono.now += 100
    assert (await auth.authenticate(new_key)).id == new.id  # verified at 5100

    server.connected = False  # every Redis call now fails: Store.call raises StoreUnavailable
    mono.now = 5000 + GRACE  # old: exactly at the edge of the grace; new: 20 s into it
    assert (await auth.authenticate(old_key)).id == old.id
    assert (await auth.authenticate(new_key)).id == new.id
    mono.now = 5000 + GRACE + 0.001
    with pytest.raises(ServiceUnavailable) as exc:
        await auth.authenticate(old_key)
    assert exc.value.status == 503
    assert (await auth.authenticate(new_key)).id == new.id
    with pytest.raises(ServiceUnavailable):
        await auth.authenticate(unseen_key)  # never verified by this process
    mono.now = 5100 + GRACE + 0.001
    with pytest.raises(ServiceUnavailable):
        await auth.authenticate(new_key)
    with pytest.raises(AuthenticationFailed):  # a malformed key is refused without asking Redis at all
        await auth.authenticate("sk-gateway-short")

    server.connected = True  # Redis is back: both keys are verified again and work
    mono.now += 1.0  # past the store's retry interval
    assert (await auth.authenticate(old_key)).id == old.id
    assert (await auth.authenticate(unseen_key)).team == "search"
    server.connected = False
    mono.now += 60
    assert (await auth.authenticate(old_key)).id == old.id  # re-verified a minute ago


async def test_revocation_seen_before_the_outage_still_holds_during_it() -> None:
    server = fakeredis.FakeServer()
    mono = Clock(0.0)
    store = Store(fakeredis.FakeAsyncRedis(server=server), RedisSettings(), clock=mono)
    keystore = KeyStore(store, RedisKeys())
    auth = Authenticator(keystore, GRACE, cache_s=2.0, clock=mono)
    key, record = await keystore.create("search")
    await auth.authenticate(key)
    await keystore.revoke(record.id)
    mono.now += 3  # past cache_s: the next check reads the record again
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(key)
    server.connected = False
    mono.now += 1
    with pytest.raises(AuthenticationFailed) as exc:  # the offline copy is the revoked record, not a pass
        await auth.authenticate(key)
    assert exc.value.code == "api_key_revoked"
