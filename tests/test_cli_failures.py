"""Every command-line failure a user can cause is one line on stderr, exit 1 (2 for a usage error), never a
traceback; and a command that carries the admin key never follows a redirect. Each case runs the real command as
a subprocess (`python -m proxy ...`) against real servers on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.cli.workers import resolve_workers
from proxy.config import load
from tests.conftest import Proxy, free_port
from tests.helpers import served

ADMIN = "cli-admin-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def env_for(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "REDIS_", "CACHE_REDIS_", "OTEL_"))}
    return {**clean, **extra}


def run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], env=env_for(**env), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def one_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The failure's only stderr line (asserting the exit status, one line, no traceback)."""
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port of 127.0.0.1 that a listening socket holds (without SO_REUSEPORT), as another program would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


# --- serve ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("demo", [False, True], ids=["serve", "serve-demo"])
def test_serve_on_a_port_in_use_is_one_line(busy_port: int, demo: bool) -> None:
    """Was a 30-line uvloop traceback (`make demo` with 8080 busy)."""
    args = ["--log-level", "error", "serve", "--port", str(busy_port)] + (["--demo"] if demo else [])
    line = one_line(run(*args, timeout=30), 1)
    assert line == (f"error: cannot listen on 127.0.0.1:{busy_port}: the address is already in use (another "
                    "process holds the port): choose another with --port (make demo PORT=8081)")


def test_serve_without_log_level_still_ends_with_one_error_line(busy_port: int) -> None:
    """Start-up warnings are log lines; the failure itself is one line, the last, and there is no traceback."""
    done = run("serve", "--port", str(busy_port), timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [x for x in done.stderr.splitlines() if " WARNING " not in x]
    assert errors == [done.stderr.splitlines()[-1]] and errors[0].startswith("error: cannot listen on 127.0.0.1:")


def test_metrics_port_in_use_is_one_line(busy_port: int) -> None:
    line = one_line(run("--log-level", "error", "serve", "--port", "0", "--metrics-port", str(busy_port),
                        timeout=30), 1)
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{busy_port}: the address is already in use")
    assert line.endswith("choose another with --metrics-port")


@pytest.mark.redis
def test_workers_on_a_port_in_use_say_it_once(busy_port: int, redis_url: str) -> None:
    """Each worker failed with its own traceback, then the parent logged that it exited."""
    done = run("--log-level", "error", "serve", "--workers", "2", "--port", str(busy_port), timeout=90,
               REDIS_URL=redis_url)
    assert one_line(done, 1).startswith(f"error: cannot listen on 127.0.0.1:{busy_port}: the address is already")


@pytest.mark.parametrize(("host", "says"), [
    ("256.1.1.1", "cannot resolve the host"),
    ("192.0.2.1", "the address is not one of this machine's"),  # TEST-NET-1: never a local address
])
def test_serve_on_an_address_it_cannot_use_is_one_line(host: str, says: str) -> None:
    line = one_line(run("--log-level", "error", "serve", "--host", host, "--port", "0", timeout=30), 1)
    assert line.startswith(f"error: cannot listen on {host}:0: {says}")


def test_make_demo_port_reaches_serve() -> None:
    """`make demo PORT=8081` runs `serve --demo --port 8081` (that serve --demo honours --port, and its mock upstream
    takes a port of its own, test_embedded.test_serve_demo_prints_a_working_key_offline shows)."""
    done = subprocess.run(["make", "-n", "demo", "PORT=18081"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert any(line.endswith("embedding-proxy serve --demo --port 18081") for line in done.stdout.splitlines())


def test_port_0_without_workers_is_one_process() -> None:
    """With REDIS_URL, `serve --port 0` defaulted to one worker per core, each on a port of its own, while the
    start-up line said port 0; port 0 now means one process (a count given explicitly is still refused)."""
    settings = load(None, env={"REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert resolve_workers(None, settings, 0, False) == 1
    assert resolve_workers(2, settings, 0, False) == "--workers > 1 needs a fixed --port (the workers share it)"


# --- usage errors: exit 2, one line -------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "says"), [
    (["--log-level", "verbose", "check-config"], "argument --log-level: invalid choice: 'VERBOSE'"),
    (["serve", "--port", "99999"], "argument --port: not a port: '99999' (0 to 65535)"),  # was: listened on 34463
    (["serve", "--metrics-port", "-1"], "argument --metrics-port: not a port: '-1'"),
    (["mock-upstream", "--port", "65536"], "argument --port: not a port: '65536'"),  # was: OverflowError
    (["usage", "--since", "2026-02-30"], "argument --since: not a date: '2026-02-30'"),
    (["keys", "create"], "the following arguments are required: --team"),
])
def test_usage_errors_are_one_line_exit_2(args: list[str], says: str) -> None:
    line = one_line(run(*args, timeout=30), 2)
    assert says in line and line.startswith("embedding-proxy") and line.endswith("--help)"), line


def test_log_level_is_case_insensitive() -> None:
    done = run("--log-level", "warning", "check-config")
    assert done.returncode == 0, done.stderr


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    line = one_line(run("--config", str(bad), "check-config"), 2)
    assert line == f"config error: {bad}: cannot read: not UTF-8 (byte 20); TOML files are UTF-8"


def test_a_config_that_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    line = one_line(run("--config", str(tmp_path), "check-config", PROXY_CONFIG="ignored"), 2)
    assert line == f"config error: {tmp_path}: cannot read: Is a directory"


def test_a_bad_environment_value_is_one_line() -> None:
    line = one_line(run("keys", "list", REDIS_URL="redis://127.0.0.1:1/0", REDIS_TYPE="bogus"), 2)
    assert line.startswith("config error: environment: REDIS_TYPE must be one of")


# --- operation failures: exit 1, one line ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["keys", "list"], ["teams", "list"], ["usage"], ["cache", "stats"],
                                  ["keys", "create", "--team", "search"]])
def test_redis_unreachable_is_one_line(args: list[str]) -> None:
    line = one_line(run(*args, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"), 1)
    assert line.startswith("error: ") and ("unreachable" in line or "Connect call failed" in line), line


def test_upstreams_with_the_proxy_unreachable_is_one_line() -> None:
    port = free_port()
    line = one_line(run("upstreams", "--url", f"http://127.0.0.1:{port}", PROXY_ADMIN_KEY=ADMIN), 1)
    assert line.startswith(f"error: cannot reach http://127.0.0.1:{port}/admin/upstreams: ")


@pytest.mark.redis
async def test_keys_list_into_head_exits_quietly(proxy: Proxy, redis_url: str) -> None:
    """`embedding-proxy keys list | head -3`: a BrokenPipeError traceback once head had its lines. 1,500 keys make
    ~165 KB of table, more than the pipe and head's read can hold, so the write after head exits always fails."""
    for start in range(0, 1500, 5):  # a few at a time: 50 new pooled connections at once missed their 0.25 s
        await asyncio.gather(*(proxy.new_key(f"team{i % 7}") for i in range(start, start + 5)))  # on a busy CI
    script = f"set -o pipefail; {sys.executable} -m proxy keys list | head -3"
    done = await asyncio.to_thread(subprocess.run, ["bash", "-c", script], env=env_for(REDIS_URL=redis_url),
                                   capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stderr == ""
    assert done.returncode == 1  # python's status (pipefail): 1 on EPIPE, as Python's documentation does it
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["ID", "TEAM", "STATUS"]


@pytest.mark.redis
def test_keys_list_into_a_closed_pipe_exits_quietly(redis_url: str) -> None:
    """The same, without timing: the only read end of stdout is closed before the command writes anything."""
    assert run("keys", "create", "--team", "search", REDIS_URL=redis_url).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "keys", "list"], env=env_for(REDIS_URL=redis_url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert err == b""


# --- point 4: the admin key never follows a redirect --------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_upstreams_refuses_a_redirect_and_keeps_the_admin_key(status: int) -> None:
    """urllib followed a 30x and copied `Authorization: Bearer <admin key>` to the host the Location named; the
    command then printed an empty table and exited 0. Another port of 127.0.0.1 is another origin."""
    elsewhere: list[dict[str, str]] = []
    asked: list[str | None] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(dict(request.headers))
        return web.json_response({"object": "list", "data": []})

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", record)
    async with served(other) as other_port:
        location = f"http://127.0.0.1:{other_port}/admin/upstreams"

        async def redirect(request: web.Request) -> web.Response:
            asked.append(request.headers.get("Authorization"))
            return web.Response(status=status, headers={"Location": location})

        first = web.Application()
        first.router.add_get("/admin/upstreams", redirect)
        async with served(first) as port:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "upstreams", "--url", f"http://127.0.0.1:{port}",
                env=env_for(PROXY_ADMIN_KEY=ADMIN), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                cwd=ROOT)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
    done = subprocess.CompletedProcess[str]([], proc.returncode or 0, out.decode(), err.decode())
    line = one_line(done, 1)
    assert line == (f"error: http://127.0.0.1:{port}/admin/upstreams answered {status} redirecting to {location}; "
                    "not followed, so that the admin key goes only to the address given: point --url at the proxy "
                    "itself")
    assert done.stdout == ""
    assert asked == [f"Bearer {ADMIN}"]  # the address given got the key
    assert elsewhere == []  # the other origin got nothing at all, so certainly no Authorization
