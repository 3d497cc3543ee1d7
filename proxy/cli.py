"""The `embedding-proxy` command: serve, keys, mock-upstream, check-config."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import orjson
from aiohttp import web

from . import __version__
from .config import ConfigError, Settings, load
from .keys import KeyRecord, KeyStore
from .rediskeys import RedisKeys
from .store import Store, StoreUnavailable, connect

log = logging.getLogger("proxy.cli")
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `30d`, `2w` -> seconds."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 3600, 15m, 12h, 30d)")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# --- serve ---------------------------------------------------------------------------------------------------


async def _serve(
    settings: Settings, host: str, port: int, demo: bool, *, metrics_port: int | None = None,
    reuse_port: bool = False, on_ready: Callable[[], None] | None = None,
) -> int:
    from .app import KEYSTORE, METRICS, STORE, create_app, metrics

    runners: list[web.AppRunner] = []
    if demo:
        from .mock_upstream import MockSettings, serve_mock

        mock = await serve_mock("127.0.0.1", 0, MockSettings())
        runners.append(mock)
        mock_port = mock.addresses[0][1]
        upstreams = dict(settings.upstreams)
        upstreams["default"] = dataclasses.replace(upstreams["default"], base_url=f"http://127.0.0.1:{mock_port}/v1")
        settings = dataclasses.replace(settings, upstreams=upstreams)
        print(f"mock upstream (deterministic fake vectors) on http://127.0.0.1:{mock_port}/v1", flush=True)
    app = create_app(settings, metrics_route=metrics_port is None)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    runners.insert(0, runner)
    metrics_runner: web.AppRunner | None = None
    if metrics_port is not None:  # /metrics on its own port (not exposed with the API)
        metrics_app = web.Application()
        metrics_app[METRICS] = app[METRICS]
        metrics_app.router.add_get("/metrics", metrics)
        metrics_runner = web.AppRunner(metrics_app, access_log=None)
        await metrics_runner.setup()
        runners.append(metrics_runner)
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
        if metrics_runner is not None:
            await web.TCPSite(metrics_runner, host, metrics_port, reuse_port=reuse_port or None).start()
        if on_ready is not None:
            on_ready()
        else:
            print(f"embedding-proxy {__version__} listening on http://{host}:{port}"
                  + (f"; metrics on :{metrics_port}" if metrics_port is not None else ""), flush=True)
        if app[STORE].embedded:
            key, record = await app[KEYSTORE].create("demo", name="bootstrap")
            print("embedded in-process store: one process, not durable; keys live only as long as this process")
            print(f"gateway key for team 'demo' (id {record.id}): {key}")
            print(
                f"try: curl -s http://{host}:{port}/v1/embeddings -H 'Authorization: Bearer {key}' "
                "-H 'Content-Type: application/json' "
                """-d '{"model": "text-embedding-3-small", "input": "hello world"}'""",
                flush=True,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for r in runners:
            await r.cleanup()
    return 0


def run_server(
    settings: Settings, host: str, port: int, *, demo: bool = False, metrics_port: int | None = None,
    reuse_port: bool = False, on_ready: Callable[[], None] | None = None,
) -> int:
    """One server process (the whole proxy with --workers 1, or one worker of several)."""
    return _run(_serve(settings, host, port, demo, metrics_port=metrics_port, reuse_port=reuse_port,
                       on_ready=on_ready))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from .workers import WorkerArgs, resolve_workers, supervise

    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    workers = resolve_workers(args.workers, settings, port, args.demo)
    if isinstance(workers, str):
        print(f"error: {workers}", file=sys.stderr)
        return 2
    if workers == 1:
        return run_server(settings, host, port, demo=args.demo, metrics_port=args.metrics_port)
    return supervise(WorkerArgs(args.config, args.log_level, host, port, args.metrics_port), workers)


# --- keys ------------------------------------------------------------------------------------------------------


async def _with_keystore(settings: Settings, fn: Callable[[KeyStore], Awaitable[int]]) -> int:
    if not settings.redis.url:
        print("error: keys commands need REDIS_URL (the embedded store lives inside one serve process)",
              file=sys.stderr)
        return 2
    client, _ = connect(dataclasses.replace(settings.redis, socket_timeout_s=max(2.0, settings.redis.socket_timeout_s)))
    store = Store(client, dataclasses.replace(settings.redis, socket_timeout_s=5.0))
    try:
        return await fn(KeyStore(store, RedisKeys(settings.cache.key_prefix)))
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def _print_records(records: Sequence[KeyRecord], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps([r.public() for r in records]).decode())
        return
    print(f"{'ID':<22} {'TEAM':<16} {'STATUS':<8} {'EXPIRES':<20} NAME")
    now = time.time()
    for r in records:
        status = "revoked" if r.revoked else ("expired" if r.expires_at and r.expires_at <= now else "active")
        expires = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r.expires_at)) if r.expires_at else "-"
        print(f"{r.id:<22} {r.team:<16} {status:<8} {expires:<20} {r.name}")


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    async def create(ks: KeyStore) -> int:
        expires_at = time.time() + args.expires_in if args.expires_in else None
        models = tuple(m for m in (args.models or "").split(",") if m)
        unknown = [m for m in models if m not in settings.models]
        if unknown:
            print(f"error: unknown model {unknown[0]!r}", file=sys.stderr)
            return 2
        try:
            key, record = await ks.create(args.team, name=args.name, expires_at=expires_at, models=models)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(orjson.dumps({"key": key, **record.public()}).decode())
        else:
            print(key)
            print(f"id {record.id}, team {record.team}: store this key now, it cannot be shown again",
                  file=sys.stderr)
        return 0

    async def list_(ks: KeyStore) -> int:
        _print_records(await ks.list(args.team), args.json)
        return 0

    async def revoke(ks: KeyStore) -> int:
        record = await ks.revoke(args.key_id)
        if record is None:
            print(f"error: no key with id {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked {record.id} (team {record.team})")
        return 0

    action: dict[str, Callable[[KeyStore], Awaitable[int]]] = {"create": create, "list": list_, "revoke": revoke}
    return _run(_with_keystore(settings, action[args.keys_cmd]))


# --- mock-upstream, check-config ------------------------------------------------------------------------------


def cmd_mock(args: argparse.Namespace, settings: Settings) -> int:
    from .mock_upstream import MockSettings, run

    run(args.host, args.port, MockSettings(api_key=args.api_key, latency_ms=args.latency_ms))
    return 0


def cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    print(f"{settings.source}: ok; models: {', '.join(settings.models)}; "
          f"store: {'redis' if settings.redis.url else 'embedded'}; cache scope: {settings.cache.scope}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embedding-proxy", description="OpenAI-compatible embeddings gateway")
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument("--config", help="TOML config file (default: $PROXY_CONFIG, else built-in defaults)")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--demo", action="store_true",
                   help="also start the bundled mock upstream and point the proxy at it (works offline)")
    s.add_argument("--workers", type=int,
                   help="worker processes sharing the port (default: one per core with REDIS_URL, else 1)")
    s.add_argument("--metrics-port", type=int, help="serve /metrics on this port instead of the API port")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="issue, list and revoke gateway keys (needs REDIS_URL)")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="issue a key; prints it alone on the first line")
    kc.add_argument("--team", required=True)
    kc.add_argument("--name", default="")
    kc.add_argument("--expires-in", type=parse_duration, help="e.g. 30d, 12h, 3600")
    kc.add_argument("--models", help="comma-separated models this key may use (default: all)")
    kc.add_argument("--json", action="store_true")
    kl = ksub.add_parser("list", help="list keys (ids and names, never keys)")
    kl.add_argument("--team")
    kl.add_argument("--json", action="store_true")
    kr = ksub.add_parser("revoke", help="revoke a key by id; takes effect at once")
    kr.add_argument("key_id")
    k.set_defaults(func=cmd_keys)

    m = sub.add_parser("mock-upstream", help="run the deterministic fake upstream")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=9000)
    m.add_argument("--latency-ms", type=float, default=0.0)
    m.add_argument("--api-key", default=None, help="require this bearer key")
    m.set_defaults(func=cmd_mock)

    c = sub.add_parser("check-config", help="validate the configuration offline")
    c.set_defaults(func=cmd_check_config)
    return p


def configure_logging(level: str) -> None:
    """Text logs on stderr; the access log (`proxy.access`) as bare JSON lines on stdout."""
    from . import accesslog

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    accesslog.configure()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = load(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    result: Any = args.func(args, settings)
    return int(result)


if __name__ == "__main__":
    sys.exit(main())
