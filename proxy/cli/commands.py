"""The commands about a proxy process: `serve` (one process or workers), `mock-upstream`, `check-config` and
`upstreams` (the deployments' state in a running proxy).

The operator commands against the Redis the proxies share are in operate.py (keys, teams, usage), cache.py and
admins.py (admins, audit); the declaration of every command, flag and help text is the table in main.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable

import orjson

from ..config import ConfigError, Settings
from .adminclient import get_json
from .serve import run_server

log = logging.getLogger("proxy.cli")


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
    from ..http.readiness import upstream_problems

    for problem in [] if args.demo else upstream_problems(settings).values():  # --demo: the mock is the default
        log.warning("%s", problem)
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


def cmd_mock(args: argparse.Namespace, settings: Settings) -> int:
    from ..mock.upstream import MockSettings, run

    run(args.host, args.port, MockSettings(api_key=args.api_key, latency_ms=args.latency_ms, shuffle=args.shuffle,
                                           floats_only=args.floats_only, rpm=args.rpm, tpm=args.tpm,
                                           rate_window_s=args.rate_window_s, strip_empty=args.strip_empty,
                                           max_chars=args.max_chars, max_in_flight=args.max_in_flight,
                                           announce_limits=not args.unannounced))
    return 0


def _report_stores(settings: Settings, warn: Callable[[str], None]) -> bool:
    """Run the start-up checks of the Redis stores (stores/checks.py): each error on one line on stderr, each
    warning through `warn`. False when there is an error (serve and check-config then exit 1)."""
    from ..stores.checks import check_stores

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
    from ..telemetry.tracing import check

    try:
        return check(os.environ) or ""
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    from ..http.readiness import described_upstreams, upstream_problems
    from ..stores.checks import described_stores

    warnings: list[str] = []

    def warn(message: str) -> None:  # loud, and counted for --strict
        warnings.append(message)
        print(f"WARNING: {message}", file=sys.stderr)

    if not _report_stores(settings, warn=warn):
        return 1
    if (traces := _traces()) is None:
        return 2
    for problem in upstream_problems(settings).values():
        warn(f"{problem}; its models fail (and /readyz answers 503 when no model has an upstream it can call)")
    checked = described_upstreams(settings) + described_stores(settings)
    stores = "embedded" if not settings.redis.url else f"redis ({settings.redis.type})"
    if settings.cache_redis.url:
        stores += f", cache in its own redis ({settings.cache_redis.type})"
    failed = bool(warnings and args.strict)
    if args.json:  # the same facts, one object; the warnings are on stderr too
        print(orjson.dumps({"source": settings.source, "ok": not failed, "warnings": warnings, "checked": checked,
                            "models": list(settings.models), "store": stores, "cache_scope": settings.cache.scope,
                            "traces": traces or None}).decode())
    else:
        print("\n".join(["checked:", *(f"  {x}" for x in checked)]))
    if failed:
        print(f"error: {len(warnings)} warning(s) above, and --strict fails on any", file=sys.stderr)
        return 1
    verdict = f"ok with {len(warnings)} warning(s)" if warnings else "ok"
    if not args.json:
        print(f"{settings.source}: {verdict}; models: {', '.join(settings.models)}; "
              f"store: {stores}; cache scope: {settings.cache.scope}; "
              f"traces: {f'OTLP/HTTP to {traces}' if traces else 'off'}")
    return 0


_UPSTREAM_FIELDS = ("model", "upstream", "kind", "priority", "weight", "state", "cooling_down_until", "paused_until",
                    "last_error", "remaining_requests", "remaining_tokens")


def cmd_upstreams(args: argparse.Namespace, settings: Settings) -> int:
    """Each deployment's state, from a running proxy's GET /admin/upstreams (the state lives in its process)."""
    base = args.url or f"http://{settings.server.host}:{settings.server.port}"
    url = base.rstrip("/") + "/admin/upstreams"
    # a named admin's credential (PROXY_ADMIN_CREDENTIAL) when set, else the bootstrap PROXY_ADMIN_KEY
    var, credential = next(((v, c) for v, c in (("PROXY_ADMIN_CREDENTIAL", os.environ.get("PROXY_ADMIN_CREDENTIAL")),
                                                 ("PROXY_ADMIN_KEY", settings.admin_key)) if c), ("", ""))
    if not credential:
        print("error: this command needs PROXY_ADMIN_KEY or PROXY_ADMIN_CREDENTIAL (it asks the running proxy's "
              "admin API)", file=sys.stderr)
        return 2
    if not credential.isascii() or not credential.isprintable():
        print(f"error: {var} must be printable ASCII (it travels in an HTTP header)", file=sys.stderr)
        return 2
    doc = get_json(base, "/admin/upstreams", credential)  # never follows a redirect (adminclient.py)
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
             f"{'LAST ERROR':<12} {'REQ LEFT':>8} {'TOK LEFT':>9} | {'FLEET':<13} {'UNTIL':<9} {'REQ/MIN':>7} "
             f"{'TOK/MIN':>9} {'TOK LEFT':>9} {'IN FLIGHT':>9}"]
    try:
        for r in rows:
            until = r["cooling_down_until"] or r["paused_until"]
            f = r.get("fleet") or {}
            lines.append(
                f"{r['model']:<28} {r['upstream']:<16} {r['kind']:<6} {r['priority']:>3} {r['weight']:>6g} "
                f"{r['state']:<13} {when(until):<9} {r['last_error'] or '-':<12} {num(r['remaining_requests']):>8} "
                f"{num(r['remaining_tokens']):>9} | {f.get('state', '-'):<13} "
                f"{when(f.get('cooling_down_until') or f.get('paused_until')):<9} {num(f.get('requests_used')):>7} "
                f"{num(f.get('tokens_used')):>9} {num(f.get('tokens_left')):>9} {num(f.get('in_flight')):>9}")
            lines += [f"    instance {i['instance']}: last reserved {when(i['last_reserved_at'])}, in flight "
                      f"{i['in_flight']}" for i in f.get("instances", ())]
            if f.get("last_event"):
                e = f["last_event"]
                lines.append(f"    last health event: {e['op']} by {e['by'] or '-'} at {when(e['at'])}")
    except (TypeError, ValueError, OverflowError, OSError):  # a field of another type than the proxy sends
        print(f"error: {url} did not answer with embedding-proxy's deployment states", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0
