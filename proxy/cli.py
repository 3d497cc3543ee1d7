"""The `embedding-proxy` command: serve, mock-upstream, check-config, upstreams; keys, teams and usage live in
operate.py."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import orjson
from aiohttp import web

from . import __version__
from .config import ConfigError, Settings, load
from .operate import add_limit_flags, cmd_cache, cmd_keys, cmd_teams, cmd_usage, parse_day, parse_duration
from .routing import quiet_parser_errors

log = logging.getLogger("proxy.cli")


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
    from aiohttp import web_response

    from .app import KEYSTORE, METRICS, SERVER, STORE, create_app, create_metrics_app

    # Every app's responses get SERVER from a response signal; this also covers the answers aiohttp's HTTP parser
    # gives to malformed requests before any app sees them (its default names the Python and aiohttp versions).
    web_response.SERVER_SOFTWARE = SERVER  # type: ignore[attr-defined]
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
    try:
        app = create_app(settings, metrics_route=metrics_port is None)
    except ConfigError as exc:  # the OTEL_* variables, refused when the tracer starts (`_traces` checked them)
        for r in runners:
            await r.cleanup()
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    runners.insert(0, runner)
    metrics_runner: web.AppRunner | None = None
    if metrics_port is not None:  # /metrics on its own port (not exposed with the API)
        metrics_app = create_metrics_app(app[METRICS], settings.metrics_token)
        metrics_runner = web.AppRunner(metrics_app, access_log=None)
        await metrics_runner.setup()
        runners.append(metrics_runner)
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port or None).start()
        port = runner.addresses[0][1]  # the one the kernel chose for --port 0
        if metrics_runner is not None:
            await web.TCPSite(metrics_runner, host, metrics_port, reuse_port=reuse_port or None).start()
            metrics_port = metrics_runner.addresses[0][1]
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
    if not _report_stores(settings, warn=log.warning):
        return 1
    if (traces := _traces()) is None:
        return 2
    if traces:
        print(f"traces: OTLP/HTTP to {traces}", flush=True)
    if not settings.metrics_token and args.metrics_port is None:
        log.warning("/metrics is served on the API port without PROXY_METRICS_TOKEN: every API client can read "
                    "every team's usage, costs and key ids (set PROXY_METRICS_TOKEN, or serve it with "
                    "--metrics-port on a port clients cannot reach)")
    if workers == 1:
        return run_server(settings, host, port, demo=args.demo, metrics_port=args.metrics_port)
    return supervise(WorkerArgs(args.config, args.log_level, host, port, args.metrics_port), workers)


# --- mock-upstream, check-config ------------------------------------------------------------------------------


def cmd_mock(args: argparse.Namespace, settings: Settings) -> int:
    from .mock_upstream import MockSettings, run

    run(args.host, args.port, MockSettings(api_key=args.api_key, latency_ms=args.latency_ms, shuffle=args.shuffle,
                                           floats_only=args.floats_only, rpm=args.rpm, tpm=args.tpm,
                                           rate_window_s=args.rate_window_s))
    return 0


def _report_stores(settings: Settings, warn: Callable[[str], None]) -> bool:
    """Run the start-up checks of the Redis stores (stores/checks.py): each error on one line on stderr, each
    warning through `warn`. False when there is an error (serve and check-config then exit 1)."""
    from .stores.checks import check_stores

    findings = asyncio.run(check_stores(settings))
    for f in findings:
        if not f.error:
            warn(f.message)
    for f in findings:  # last: what stops the start is what the operator reads first
        if f.error:
            print(f"error: {f.message}", file=sys.stderr)
    return not any(f.error for f in findings)


def _traces() -> str | None:
    """Where traces go ("" when tracing is off), or None after printing why the OTEL_* variables are refused."""
    from .tracing import check

    try:
        return check(os.environ) or ""
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    if not _report_stores(settings, warn=lambda message: print(f"warning: {message}", file=sys.stderr)):
        return 1
    if (traces := _traces()) is None:
        return 2
    stores = "embedded" if not settings.redis.url else f"redis ({settings.redis.type})"
    if settings.cache_redis.url:
        stores += f", cache in its own redis ({settings.cache_redis.type})"
    print(f"{settings.source}: ok; models: {', '.join(settings.models)}; "
          f"store: {stores}; cache scope: {settings.cache.scope}; "
          f"traces: {f'OTLP/HTTP to {traces}' if traces else 'off'}")
    return 0


_UPSTREAM_FIELDS = ("model", "upstream", "kind", "priority", "weight", "state", "cooling_down_until", "paused_until",
                    "last_error", "remaining_requests", "remaining_tokens")


def cmd_upstreams(args: argparse.Namespace, settings: Settings) -> int:
    """Each deployment's state, from a running proxy's GET /admin/upstreams (the state lives in its process)."""
    base = args.url or f"http://{settings.server.host}:{settings.server.port}"
    url = base.rstrip("/") + "/admin/upstreams"
    if not settings.admin_key:
        print("error: this command needs PROXY_ADMIN_KEY (it asks the running proxy's admin API)", file=sys.stderr)
        return 2
    if not settings.admin_key.isascii() or not settings.admin_key.isprintable():
        print("error: PROXY_ADMIN_KEY must be printable ASCII (it travels in an HTTP header)", file=sys.stderr)
        return 2
    try:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {settings.admin_key}"})
    except ValueError as exc:  # not a URL at all
        print(f"error: --url {base!r} is not an http(s) URL: {exc}", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            doc = orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"error: {url} answered {exc.code}: {exc.read()[:300].decode(errors='replace')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot reach {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    except orjson.JSONDecodeError:
        print(f"error: {url} did not answer JSON: is it embedding-proxy?", file=sys.stderr)
        return 1
    except ValueError as exc:  # a malformed URL urllib only finds out about when it connects ("http://[::1")
        print(f"error: --url {base!r} is not a valid URL: {exc}", file=sys.stderr)
        return 2
    rows = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(_UPSTREAM_FIELDS) <= r.keys() for r in rows):
        print(f"error: {url} did not answer with embedding-proxy's deployment states", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0

    def when(t: float | None) -> str:
        return time.strftime("%H:%M:%SZ", time.gmtime(t)) if t else "-"

    def num(v: int | None) -> str:
        return "-" if v is None else str(v)

    lines = [f"{'MODEL':<28} {'UPSTREAM':<16} {'KIND':<6} {'PRI':>3} {'WEIGHT':>6} {'STATE':<13} {'UNTIL':<9} "
             f"{'LAST ERROR':<12} {'REQ LEFT':>8} {'TOK LEFT':>9}"]
    try:
        for r in rows:
            until = r["cooling_down_until"] or r["paused_until"]
            lines.append(
                f"{r['model']:<28} {r['upstream']:<16} {r['kind']:<6} {r['priority']:>3} {r['weight']:>6g} "
                f"{r['state']:<13} {when(until):<9} {r['last_error'] or '-':<12} {num(r['remaining_requests']):>8} "
                f"{num(r['remaining_tokens']):>9}")
    except (TypeError, ValueError, OverflowError, OSError):  # a field of another type than the proxy sends
        print(f"error: {url} did not answer with embedding-proxy's deployment states", file=sys.stderr)
        return 1
    print("\n".join(lines))
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
    add_limit_flags(kc, clearing=False)
    kc.add_argument("--json", action="store_true")
    kl = ksub.add_parser("list", help="list keys (ids and names, never keys)")
    kl.add_argument("--team")
    kl.add_argument("--json", action="store_true")
    ks = ksub.add_parser("show", help="show one key's record")
    ks.add_argument("key_id")
    ks.add_argument("--json", action="store_true")
    kq = ksub.add_parser("limits", help="change a key's own quotas (on top of its team's)")
    kq.add_argument("key_id")
    add_limit_flags(kq, clearing=True)
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
    add_limit_flags(ts, clearing=True)
    tr = tsub.add_parser("reset", help="drop the quotas set at run time: the config's apply again")
    tr.add_argument("name")
    tl = tsub.add_parser("list", help="teams with quotas, from the config and set at run time")
    tl.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_teams)

    u = sub.add_parser("usage", help="usage per team from the ledger, for chargeback (needs REDIS_URL)")
    u.add_argument("--team", help="one team (default: all)")
    u.add_argument("--since", type=parse_day, help="first UTC day, YYYY-MM-DD (default: today)")
    u.add_argument("--until", type=parse_day, help="last UTC day, inclusive (default: today)")
    u.add_argument("--by", choices=["key", "model", "day"], help="one row per team and key, model or day")
    u.add_argument("--format", choices=["table", "json", "csv"], default="table")
    u.set_defaults(func=cmd_usage)

    ca = sub.add_parser("cache", help="cache statistics and purges (needs REDIS_URL)")
    casub = ca.add_subparsers(dest="cache_cmd", required=True)
    cs = casub.add_parser("stats", help="entries and memory per cache server, hit ratio today, purge generations")
    cs.add_argument("--json", action="store_true")
    cp = casub.add_parser("purge", help="stop serving a model's cached vectors, on every proxy within seconds")
    cp.add_argument("--model", required=True)
    cp.add_argument("--team", help='only this team\'s entries (cache.scope = "team" only)')
    ca.set_defaults(func=cmd_cache)

    m = sub.add_parser("mock-upstream", help="run the deterministic fake upstream")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=9000)
    m.add_argument("--latency-ms", type=float, default=0.0)
    m.add_argument("--api-key", default=None, help="require this bearer key")
    m.add_argument("--shuffle", action="store_true", help="list answer items in reverse order (indexes stay right)")
    m.add_argument("--floats-only", action="store_true", help="answer float arrays even when asked for base64")
    m.add_argument("--rpm", type=int, default=0, help="answer 429 beyond this many requests per window")
    m.add_argument("--tpm", type=int, default=0, help="answer 429 beyond this many tokens per window")
    m.add_argument("--rate-window-s", type=float, default=60.0, help="the rate limits' window (default 60)")
    m.set_defaults(func=cmd_mock)

    up = sub.add_parser("upstreams", help="each deployment's state in a running proxy (needs PROXY_ADMIN_KEY)")
    up.add_argument("--url", help="the proxy's base URL (default: http://server.host:server.port)")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_upstreams)

    c = sub.add_parser("check-config", help="validate the configuration, and the Redis stores it names")
    c.set_defaults(func=cmd_check_config)
    return p


def configure_logging(level: str) -> None:
    """Text logs on stderr (the access log is JSON lines on stdout, written by accesslog.AccessLog)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_parser_errors()


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
