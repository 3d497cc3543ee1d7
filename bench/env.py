"""The processes a run needs, all on 127.0.0.1: a private redis-server, the mock upstream, the proxy, the bare
aiohttp baseline. Plus what is read from outside them: CPU time and RSS from /proc, Redis INFO deltas.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

UPSTREAM_KEY = "sk-bench-upstream-key"
CACHE_SECRET = "bench-cache-secret"  # fixed, so the bench can compute the proxy's cache keys for the MGET floor
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} at start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout_s:.0f}s")


def bin_path(name: str) -> str:
    """A console script of this venv (next to the running python), else from PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found; run `make install`")
    return found


def descendants(pid: int) -> list[int]:
    """pid and every process below it (serve --workers N forks workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of these processes (clock-tick resolution: 10 ms)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _TICK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    cores: set[int] | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[int]:
        return descendants(self.pid)

    def pin(self, cores: set[int]) -> str:
        """Pin the process and its children; returns what was done, for the report."""
        try:
            for pid in self.tree():
                os.sched_setaffinity(pid, cores)
        except OSError as exc:
            return f"{self.name}: not pinned ({exc.strerror})"
        self.cores = cores
        return f"{self.name} (pid {self.pid}) -> core {','.join(map(str, sorted(cores)))}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@dataclass
class Env:
    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def start(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> Proc:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                 cwd=Path(__file__).resolve().parents[1])
        proc = Proc(name, popen, port)
        self.procs.append(proc)
        wait_port(port, popen, name)
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def start_redis(env: Env) -> tuple[Proc, redis.Redis]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    data = tempfile.mkdtemp(prefix="redis-", dir=env.workdir)
    proc = env.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                               "no", "--dir", data, "--protected-mode", "no"], port)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return proc, client


def start_mock(env: Env, latency_ms: float, name: str = "mock-upstream", extra: list[str] | None = None) -> Proc:
    """The mock upstream; `extra` are more mock-upstream options (`--rpm 60 --rate-window-s 3`)."""
    port = free_port()
    return env.start(name, [bin_path("embedding-proxy"), "--log-level", "WARNING", "mock-upstream", "--port",
                            str(port), "--latency-ms", str(latency_ms), "--api-key", UPSTREAM_KEY, *(extra or [])],
                     port)


def _cluster_port() -> int:
    """A free port <= 55535 whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = free_port()
        if port > 55535:
            continue
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 10000))
            return port
    raise RuntimeError("no free port pair (<= 55535, and +10000) for a cluster node")


def start_cluster(env: Env, masters: int = 3) -> list[Proc]:
    """A Redis Cluster of `masters` masters and no replicas, built with `redis-cli --cluster create`."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("redis-server and redis-cli must be on PATH for the cluster scenario")
    nodes = []
    for n in range(masters):
        port = _cluster_port()
        data = tempfile.mkdtemp(prefix=f"cluster-{n}-", dir=env.workdir)
        nodes.append(env.start(f"cluster-{n}", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                                "--appendonly", "no", "--dir", data, "--protected-mode", "no",
                                                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
                               port))
    out = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p.port}" for p in nodes), "--cluster-yes"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed: {(out.stdout + out.stderr)[-400:]}")
    deadline = time.monotonic() + 30
    while not all(b"cluster_state:ok" in redis.Redis(port=p.port).execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER", "INFO") for p in nodes):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not reach cluster_state:ok within 30 s")
        time.sleep(0.1)
    return nodes


def start_baseline(env: Env) -> Proc:
    port = free_port()
    return env.start("baseline", [sys.executable, "-m", "bench.baseline", "--port", str(port)], port)


def serve_help() -> str:
    out = subprocess.run([bin_path("embedding-proxy"), "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    return out.stdout


def check_config(path: Path) -> tuple[bool, str]:
    out = subprocess.run([bin_path("embedding-proxy"), "--config", str(path), "check-config"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "UPSTREAM_API_KEY": UPSTREAM_KEY})
    return out.returncode == 0, (out.stdout + out.stderr).strip()


def proxy_env(redis_port: int, mock_port: int, config: Path) -> dict[str, str]:
    return {
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "UPSTREAM_BASE_URL": f"http://127.0.0.1:{mock_port}/v1",
        "UPSTREAM_API_KEY": UPSTREAM_KEY,
        "PROXY_CACHE_SECRET": CACHE_SECRET,
        "PROXY_CONFIG": str(config),
    }


def start_proxy(env: Env, penv: dict[str, str], workers: int | None, name: str = "proxy") -> Proc:
    port = free_port()
    argv = [bin_path("embedding-proxy"), "--log-level", "WARNING", "serve", "--host", "127.0.0.1", "--port",
            str(port)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    return env.start(name, argv, port, penv)


def create_key(penv: dict[str, str], team: str) -> str:
    out = subprocess.run([bin_path("embedding-proxy"), "--log-level", "WARNING", "keys", "create", "--team", team],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **penv})
    if out.returncode != 0:
        raise RuntimeError(f"keys create failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0].strip()


class RedisStats:
    """Commands and socket reads (round trips, for a client that waits for each answer) between two points, summed
    over the servers given (a cluster's masters)."""

    def __init__(self, *clients: redis.Redis) -> None:
        self._clients = clients

    def snapshot(self) -> dict[str, int]:
        out = {"_reads": 0}
        for client in self._clients:
            stats: dict[str, Any] = client.info("stats")
            cmds: dict[str, Any] = client.info("commandstats")
            out["_reads"] += int(stats.get("total_reads_processed", 0))
            for name, v in cmds.items():
                if name.startswith("cmdstat_"):
                    out[name[8:]] = out.get(name[8:], 0) + int(v["calls"])
        out["_servers"] = len(self._clients)
        return out

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        d["info"] = 0  # the bench's own INFO calls
        d["_reads"] = max(0, d["_reads"] - 2 * after["_servers"])  # the two INFO calls per server of `after`
        d["_servers"] = 0
        return {k: v for k, v in d.items() if v}


def pin_plan(ncpu: int) -> tuple[set[int] | None, set[int] | None]:
    """(cores for the proxy and the baseline server, cores for the load generator, redis and the mock)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return None, None
    if len(allowed) < 2:
        return None, None
    half = max(1, len(allowed) // 2)
    return set(allowed[:half]), set(allowed[half:])


def pin_self(cores: set[int]) -> str:
    try:
        os.sched_setaffinity(0, cores)
    except OSError as exc:
        return f"load generator: not pinned ({exc.strerror})"
    return f"load generator (pid {os.getpid()}) -> core {','.join(map(str, sorted(cores)))}"
