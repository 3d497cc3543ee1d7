"""The `embedding-proxy` command: serve, keys, mock-upstream, check-config."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
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
from .limits import LIMIT_WINDOWS, Limits
from .rediskeys import RedisKeys
from .store import Store, StoreUnavailable, connect
from .teams import TeamStore
from .usage import UsageLedger, report_format

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


async def _with_store(settings: Settings, fn: Callable[[Store, RedisKeys], Awaitable[int]]) -> int:
    """Run an operator command against the Redis the proxies share."""
    if not settings.redis.url:
        print("error: this command needs REDIS_URL (the embedded store lives inside one serve process)",
              file=sys.stderr)
        return 2
    redis_settings = dataclasses.replace(settings.redis, socket_timeout_s=5.0)
    client, _ = connect(redis_settings)
    store = Store(client, redis_settings)
    try:
        return await fn(store, RedisKeys(settings.cache.key_prefix))
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def _print_records(records: Sequence[KeyRecord], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps([r.public() for r in records]).decode())
        return
    print(f"{'ID':<22} {'TEAM':<16} {'STATUS':<8} {'EXPIRES':<20} {'LIMITS':<30} NAME")
    now = time.time()
    for r in records:
        status = "revoked" if r.revoked else ("expired" if r.expires_at and r.expires_at <= now else "active")
        expires = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r.expires_at)) if r.expires_at else "-"
        print(f"{r.id:<22} {r.team:<16} {status:<8} {expires:<20} {_limits_text(r.limits):<30} {r.name}")


def _limits_text(limits: Limits) -> str:
    return " ".join(f"{name}={value}" for name, value in limits.items()) or "unlimited"


def _limit_flags(args: argparse.Namespace) -> dict[str, int | None]:
    return {name: getattr(args, name) for name in LIMIT_WINDOWS if getattr(args, name) is not None}


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    async def create(ks: KeyStore) -> int:
        expires_at = time.time() + args.expires_in if args.expires_in else None
        models = tuple(m for m in (args.models or "").split(",") if m)
        unknown = [m for m in models if m not in settings.models]
        if unknown:
            return _fail(f"unknown model {unknown[0]!r}")
        try:
            key, record = await ks.create(args.team, name=args.name, expires_at=expires_at, models=models,
                                          limits=Limits().merged(_limit_flags(args)))
        except ValueError as exc:
            return _fail(str(exc))
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

    async def show(ks: KeyStore) -> int:
        record = await ks.get(args.key_id)
        if record is None:
            return _fail(f"no key with id {args.key_id}", 1)
        _print_records([record], args.json)
        return 0

    async def limits(ks: KeyStore) -> int:
        record = await ks.set_limits(args.key_id, _limit_flags(args))
        if record is None:
            return _fail(f"no key with id {args.key_id}", 1)
        print(f"{record.id} (team {record.team}): {_limits_text(record.limits)}")
        return 0

    async def revoke(ks: KeyStore) -> int:
        record = await ks.revoke(args.key_id)
        if record is None:
            return _fail(f"no key with id {args.key_id}", 1)
        print(f"revoked {record.id} (team {record.team})")
        return 0

    async def rotate(ks: KeyStore) -> int:
        rotated = await ks.rotate(args.key_id, args.grace)
        if rotated is None:
            return _fail(f"no active key with id {args.key_id}", 1)
        key, new, old = rotated
        if args.json:
            print(orjson.dumps({"key": key, **new.public(), "previous": old.public()}).decode())
        else:
            print(key)
            until = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(old.expires_at or 0))
            print(f"new id {new.id}; the old key {old.id} keeps working until {until}", file=sys.stderr)
        return 0

    actions: dict[str, Callable[[KeyStore], Awaitable[int]]] = {
        "create": create, "list": list_, "show": show, "limits": limits, "revoke": revoke, "rotate": rotate,
    }
    action = actions[args.keys_cmd]
    return _run(_with_store(settings, lambda store, rkeys: action(KeyStore(store, rkeys))))


def cmd_teams(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store, rkeys: RedisKeys) -> int:
        teams = TeamStore(store, rkeys, settings.teams)
        if args.teams_cmd == "set":
            try:
                limits = await teams.set(args.name, _limit_flags(args))
            except ValueError as exc:
                return _fail(str(exc))
            print(f"{args.name}: {_limits_text(limits)}")
            return 0
        listed = await teams.all()
        if args.json:
            print(orjson.dumps([{"team": t, "limits": lim.to_dict(), "source": src}
                                for t, (lim, src) in listed.items()]).decode())
            return 0
        print(f"{'TEAM':<20} {'SOURCE':<8} LIMITS")
        for t, (lim, src) in listed.items():
            print(f"{t:<20} {src:<8} {_limits_text(lim)}")
        return 0

    return _run(_with_store(settings, run))


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store, rkeys: RedisKeys) -> int:
        ledger = UsageLedger(store, rkeys)
        today = datetime.datetime.now(datetime.UTC).date()
        prices = {name: spec.price_per_million_tokens for name, spec in settings.models.items()}
        try:
            rows = await ledger.report(args.team, args.since or today, args.until or today, args.by, prices)
        except ValueError as exc:
            return _fail(str(exc))
        sys.stdout.write(report_format(args.by).render(rows, args.format))
        return 0

    return _run(_with_store(settings, run))


def _day(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a non-negative whole number: {text!r}")
    return int(text)


def _add_limit_flags(p: argparse.ArgumentParser, clearing: bool) -> None:
    hint = " (0: unlimited)" if clearing else ""
    p.add_argument("--rpm", type=_count, help="requests per minute" + hint)
    p.add_argument("--tpm", type=_count, help="tokens per minute" + hint)
    p.add_argument("--tokens-per-day", type=_count, help="tokens per UTC day" + hint)
    p.add_argument("--tokens-per-month", type=_count, help="tokens per UTC month" + hint)


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

    k = sub.add_parser("keys", help="issue, list, limit, revoke and rotate gateway keys (needs REDIS_URL)")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="issue a key; prints it alone on the first line")
    kc.add_argument("--team", required=True)
    kc.add_argument("--name", default="")
    kc.add_argument("--expires-in", type=parse_duration, help="e.g. 30d, 12h, 3600")
    kc.add_argument("--models", help="comma-separated models this key may use (default: all)")
    _add_limit_flags(kc, clearing=False)
    kc.add_argument("--json", action="store_true")
    kl = ksub.add_parser("list", help="list keys (ids and names, never keys)")
    kl.add_argument("--team")
    kl.add_argument("--json", action="store_true")
    ks = ksub.add_parser("show", help="show one key's record")
    ks.add_argument("key_id")
    ks.add_argument("--json", action="store_true")
    kq = ksub.add_parser("limits", help="change a key's own quotas (on top of its team's)")
    kq.add_argument("key_id")
    _add_limit_flags(kq, clearing=True)
    kr = ksub.add_parser("revoke", help="revoke a key by id; takes effect at once")
    kr.add_argument("key_id")
    ko = ksub.add_parser("rotate", help="issue a replacement key; the old one works for --grace more")
    ko.add_argument("key_id")
    ko.add_argument("--grace", type=parse_duration, default=86400.0, help="e.g. 1h, 7d (default 1d)")
    ko.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_keys)

    t = sub.add_parser("teams", help="teams and their quotas (needs REDIS_URL)")
    tsub = t.add_subparsers(dest="teams_cmd", required=True)
    ts = tsub.add_parser("set", help="set a team's quotas; flags not given stay as they are")
    ts.add_argument("name")
    _add_limit_flags(ts, clearing=True)
    tl = tsub.add_parser("list", help="teams with quotas, from the config and set at run time")
    tl.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_teams)

    u = sub.add_parser("usage", help="usage per team from the ledger, for chargeback (needs REDIS_URL)")
    u.add_argument("--team", help="one team (default: all)")
    u.add_argument("--since", type=_day, help="first UTC day, YYYY-MM-DD (default: today)")
    u.add_argument("--until", type=_day, help="last UTC day, inclusive (default: today)")
    u.add_argument("--by", choices=["key", "model", "day"], help="one row per team and key, model or day")
    u.add_argument("--format", choices=["table", "json", "csv"], default="table")
    u.set_defaults(func=cmd_usage)

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
