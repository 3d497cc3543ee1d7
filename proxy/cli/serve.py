"""One server process: the proxy's app (and its /metrics app) listening until SIGINT or SIGTERM.

Both `serve` with one process and each worker of `serve --workers N` (workers.py) run this, so it lives apart
from the command that chooses between them (commands.py): the workers import it without importing the command
line, and the imports stay one way (commands -> workers -> serve).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..config import ConfigError, Settings
from ..http.routing import quiet_parser_errors
from ..telemetry import heapdump
from .failures import listen_failed

if TYPE_CHECKING:
    from ..accounts.keys import KeyStore


def configure_logging(level: str) -> None:
    """Text logs on stderr (the access log is JSON lines on stdout, written by accesslog.AccessLog)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_parser_errors()


def run_server(
    settings: Settings, host: str, port: int, *, demo: bool = False, metrics_port: int | None = None,
    reuse_port: bool = False, on_ready: Callable[[], None] | None = None,
) -> int:
    """One server process (the whole proxy with --workers 1, or one worker of several)."""
    return _run(_serve(settings, host, port, demo, metrics_port=metrics_port, reuse_port=reuse_port,
                       on_ready=on_ready))


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(
    settings: Settings, host: str, port: int, demo: bool, *, metrics_port: int | None = None,
    reuse_port: bool = False, on_ready: Callable[[], None] | None = None,
) -> int:
    from aiohttp import web_response

    from ..http.app import KEYSTORE, METRICS, SERVER, STORE, create_app, create_metrics_app
    from ..http.connections import ConnectionGuard

    # Every app's responses get SERVER from a response signal; this also covers the answers aiohttp's HTTP parser
    # gives to malformed requests before any app sees them (its default names the Python and aiohttp versions).
    web_response.SERVER_SOFTWARE = SERVER  # type: ignore[attr-defined]
    runners: list[web.AppRunner] = []
    demo_admin = ""  # --demo without PROXY_ADMIN_KEY: an admin key for this run, printed once (and nowhere else)
    if demo:
        settings = await _demo_upstream(settings, runners)
        if not settings.admin_key:
            demo_admin = "demo-admin-" + secrets.token_urlsafe(32)
            settings = dataclasses.replace(settings, admin_key=demo_admin)
    try:
        app = create_app(settings, metrics_route=metrics_port is None)
    except ConfigError as exc:  # the OTEL_* variables, refused when the tracer starts (`_traces` checked them)
        for r in runners:
            await r.cleanup()
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    guard = ConnectionGuard.for_process(settings, app[METRICS])  # deadlines and a cap for client connections
    runner = guard.runner(app)
    await runner.setup()
    runners.insert(0, runner)
    metrics_runner: web.AppRunner | None = None
    if metrics_port is not None:  # /metrics on its own port (not exposed with the API)
        metrics_app = create_metrics_app(app[METRICS], settings.metrics_token)
        metrics_runner = guard.runner(metrics_app)
        await metrics_runner.setup()
        runners.append(metrics_runner)
    try:
        port = await _listen(runner, host, port, reuse_port, "--port")
        guard.announce()
        heapdump.install_from_env()  # PROXY_TRACEMALLOC: off unless set (debugging a memory climb)
        if metrics_runner is not None and metrics_port is not None:
            metrics_port = await _listen(metrics_runner, host, metrics_port, reuse_port, "--metrics-port")
        freeze_start_up()
        if on_ready is not None:
            on_ready()
        else:
            print(f"embedding-proxy {__version__} listening on http://{host}:{port}"
                  + (f"; metrics on :{metrics_port}" if metrics_port is not None else ""), flush=True)
        if app[STORE].embedded:
            await _bootstrap_key(app[KEYSTORE], host, port)
        if demo:
            _demo_console(host, port, demo_admin)
        await _until_stopped()
    finally:
        for r in runners:
            await r.cleanup()
    return 0


async def _demo_upstream(settings: Settings, runners: list[web.AppRunner]) -> Settings:
    """`--demo`: start the bundled mock upstream on a free port (its runner joins `runners`) and return the
    settings with the default upstream pointed at it."""
    from ..mock.upstream import MockSettings, serve_mock

    mock = await serve_mock("127.0.0.1", 0, MockSettings())
    runners.append(mock)
    mock_port = mock.addresses[0][1]
    upstreams = dict(settings.upstreams)
    upstreams["default"] = dataclasses.replace(upstreams["default"], base_url=f"http://127.0.0.1:{mock_port}/v1")
    print(f"mock upstream (deterministic fake vectors) on http://127.0.0.1:{mock_port}/v1", flush=True)
    return dataclasses.replace(settings, upstreams=upstreams)


async def _bootstrap_key(keystore: KeyStore, host: str, port: int) -> None:
    """The embedded store starts empty and lives only in this process: issue a key to try the proxy with."""
    key, record = await keystore.create("demo", name="bootstrap")
    print("embedded in-process store: one process, not durable; keys live only as long as this process")
    print(f"gateway key for team 'demo' (id {record.id}): {key}")
    print(
        f"try: curl -s http://{host}:{port}/v1/embeddings -H 'Authorization: Bearer {key}' "
        "-H 'Content-Type: application/json' "
        """-d '{"model": "text-embedding-3-small", "input": "hello world"}'""",
        flush=True,
    )


def _demo_console(host: str, port: int, admin_key: str) -> None:
    """The console's address, and the admin key to sign in with: the one made for this run (on stdout only, never
    in a log), or PROXY_ADMIN_KEY's, which is not repeated."""
    print(f"console: http://{host}:{port}/admin/ui/")
    print(f"admin key for this run only (the console, /admin/...): {admin_key}" if admin_key else
          "admin key: the value of PROXY_ADMIN_KEY", flush=True)


def freeze_start_up() -> None:
    """What start-up made (modules, the app, its settings and scripts) lives as long as the process: frozen
    (gc.freeze), the collector's full collections no longer scan it, so each holds the event loop for less
    (README, "Overload and memory"). A collection first, so that no garbage is kept for good."""
    gc.collect()
    gc.freeze()


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _listen(runner: web.AppRunner, host: str, port: int, reuse_port: bool, flag: str) -> int:
    """Open the port (CommandFailed, in words, when it cannot be: taken, not this machine's address, ...) and
    return it: the one the kernel chose for port 0."""
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
    except OSError as exc:
        raise listen_failed(exc, host, port, flag) from exc
    return int(runner.addresses[0][1])
