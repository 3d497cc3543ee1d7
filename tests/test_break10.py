"""Regression tests for defects found by breaking issue 10 (Redis Cluster and Sentinel, two stores, start-up checks,
failover, compact entries). Each one failed on the code it was written against."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.conftest import RedisServer, Upstream, free_port, make_settings
from tests.redis_servers import SentinelSet

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def proxy_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "REDIS_", "CACHE_REDIS_"))}
    return subprocess.run([sys.executable, "-m", "proxy", *args], env={**full, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_an_unreachable_cluster_is_a_warning_not_a_traceback() -> None:
    """README: "a store is unreachable (requests degrade until it answers)" is a warning, and the proxy starts. A
    cluster whose seed nodes do not answer made check-config die with redis-py's RedisClusterException traceback:
    checks._facts catches RedisError, OSError and TimeoutError, and RedisClusterException is none of them."""
    seeds = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    done = proxy_cli({"REDIS_URL": seeds, "REDIS_TYPE": "cluster"}, "check-config")
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 0, done.stderr[-600:]
    assert "the state store (REDIS_URL) is unreachable at start-up" in done.stderr


def test_a_cluster_cache_store_that_is_unreachable_is_a_warning_not_a_traceback(redis_server: RedisServer) -> None:
    done = proxy_cli({"REDIS_URL": redis_server.url, "CACHE_REDIS_URL": f"127.0.0.1:{free_port()}",
                      "CACHE_REDIS_TYPE": "cluster"}, "check-config")
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 0, done.stderr[-600:]
    assert "the cache store (CACHE_REDIS_URL) is unreachable at start-up" in done.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_type_cluster_on_a_redis_without_cluster_mode_is_one_error_line(redis_server: RedisServer,
                                                                        command: str) -> None:
    """A single Redis named with REDIS_TYPE=cluster (the reverse of a cluster URL with type single): redis-py
    answers "Cluster mode is not enabled on this node" as a RedisClusterException, which topology.masters re-raises
    and checks._facts does not catch: a 60-line traceback from serve and check-config instead of one error line."""
    args = [command, "--port", str(free_port())] if command == "serve" else [command]
    done = proxy_cli({"REDIS_URL": redis_server.url, "REDIS_TYPE": "cluster"}, *args, timeout=30)
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 1
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "cluster" in errors[0], done.stderr


def test_a_unix_socket_url_for_a_cluster_is_one_error_line() -> None:
    """`unix://` passes topology._SCHEMES for a cluster, then RedisCluster.from_url raises RedisClusterException
    ("Unix domain socket is not supported in cluster mode") out of connect(): a traceback from check-config."""
    done = proxy_cli({"REDIS_URL": "unix:///tmp/ep-redis.sock", "REDIS_TYPE": "cluster"}, "check-config")
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 1
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "REDIS_URL" in errors[0], done.stderr


def test_a_sentinel_url_whose_sentinels_are_urls_is_refused() -> None:
    """The sentinels are host:port; only the master's name was checked for a scheme. `MASTER,redis://h:p` parsed
    as the host 'redis://127.0.0.1' (rpartition on ':'): check-config said ok (exit 0) after a warning of some
    1,200 characters (the repr of two redis-py clients) and serve started against sentinels it can never reach."""
    port = free_port()
    done = proxy_cli({"REDIS_URL": f"ep-master,redis://127.0.0.1:{port}", "REDIS_TYPE": "sentinel"},
                     "check-config")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: REDIS_URL (sentinels): 'redis://127.0.0.1:") or \
        done.stderr.startswith("error: REDIS_URL for sentinel is"), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


async def test_one_hung_sentinel_does_not_stop_every_request(sentinel_set: SentinelSet, make_proxy: Any,
                                                             upstream: Upstream) -> None:
    """A sentinel that answers slowly (here: stopped) first in the list, its master and the two other sentinels
    healthy. Every request of a freshly started proxy was answered 503 "The key store is unreachable" for as long as
    the sentinel hung (25 s observed), and key creation failed: each new master connection asks the sentinels for
    the master inside the hot path's 0.25 s budget (Store.call), the first sentinel's reply is waited for up to
    operator_timeout_s (5 s, topology.build_client's sentinel socket_timeout), so the discovery is cancelled every
    time and never reaches (nor promotes) a sentinel that answers."""
    first = make_settings(upstream.base_url, sentinel_set.url, "", REDIS_TYPE="sentinel")
    key = await (await make_proxy(first)).new_key("search")
    hung = sentinel_set.sentinels[0]
    assert hung.proc is not None
    hung.proc.send_signal(signal.SIGSTOP)
    try:
        proxy = await make_proxy(make_settings(upstream.base_url, sentinel_set.url, "[cache]\nlocal_max_mb = 0\n",
                                               REDIS_TYPE="sentinel"))
        statuses: list[int] = []
        started = time.monotonic()
        while time.monotonic() - started < 15 and 200 not in statuses:  # 15 s: three times the slow sentinel's
            resp = await proxy.embed(key, {"model": MODEL, "input": ["same input"]})
            statuses.append(resp.status)
            await asyncio.sleep(0.25)
    finally:
        hung.proc.send_signal(signal.SIGCONT)
    assert 200 in statuses, f"{len(statuses)} requests in 15 s, all answered {set(statuses)}"


async def test_keys_created_after_a_planned_sentinel_switch_are_kept(sentinel_set: SentinelSet, make_proxy: Any,
                                                                     upstream: Upstream) -> None:
    """`SENTINEL FAILOVER` (a planned switch: maintenance, an upgrade). Once the sentinels name the new master,
    keys created through the proxy must stay: 12 of 30 keys created in the 3 s after the switch was visible were
    lost (answered 401 afterwards). The sentinels disagree for a few seconds and the demoted master keeps
    accepting writes until a sentinel converts it; redis-py asks the first sentinel that answers, so the proxy's
    master connections flip between the old and the new master (topology.build_client: no agreement of the
    sentinels, no check of the master's role) and writes to the old one vanish when it becomes a replica."""
    from proxy.accounts.keys import hash_key
    from proxy.http.app import KEYSTORE
    from tests.redis_servers import SENTINEL_MASTER, wait_until

    config = "[redis]\nsocket_timeout_s = 0.5\nretry_interval_s = 0.3\n[cache]\nlocal_max_mb = 0\n"
    proxy = await make_proxy(make_settings(upstream.base_url, sentinel_set.url, config, REDIS_TYPE="sentinel"))
    before = (await proxy.app[KEYSTORE].create("before"))[0]
    old = sentinel_set.master
    sentinel_set.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", SENTINEL_MASTER)  # type: ignore[no-untyped-call]
    await asyncio.to_thread(wait_until, lambda: sentinel_set.current_master_port() != old.port, 30, "the switch")
    made: list[str] = []
    for _ in range(30):  # 3 s of key creation after the switch is visible
        with contextlib.suppress(Exception):  # refused during the switch: allowed; what was issued must stay
            made.append((await proxy.app[KEYSTORE].create("after"))[0])
        await asyncio.sleep(0.1)
    # the demoted master becomes a replica of the new one (its own writes are then gone)
    await asyncio.to_thread(wait_until, lambda: old.client().info("replication")["role"] == "slave", 30,
                            "the old master to be converted")
    new = sentinel_set.replica.client()
    assert new.exists("ep:key:" + hash_key(before))  # replicated before the switch: the check sees keys
    lost = [k for k in made if not new.exists("ep:key:" + hash_key(k))]
    assert len(made) >= 20
    assert lost == [], f"{len(lost)} of {len(made)} keys issued after the switch are gone"
