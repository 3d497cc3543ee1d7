"""`serve --workers N`: N worker processes answering on one port, their metrics summed.

Each worker is a fresh interpreter (spawn) running the same single-process server with SO_REUSEPORT, so the
kernel spreads connections across them. The parent only supervises: it creates a private directory for
prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR) before the workers start, waits until every
worker listens, forwards SIGTERM/SIGINT as a graceful stop to all of them, and removes the directory at the end.
If one worker dies, the parent stops the others and exits non-zero: the supervisor above it (Kubernetes, compose,
systemd) restarts the whole set, which keeps the metric files and the port consistent.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from types import FrameType

from .. import __version__
from ..config import Settings
from ..telemetry.metrics import MULTIPROC_ENV

log = logging.getLogger("proxy.workers")
# A worker not listening this long after it was started fails the start-up (all are stopped, exit 1).
_START_TIMEOUT_S = 60.0
# After SIGTERM, workers have this long to finish in-flight requests; then they are killed. Keep it below the
# orchestrator's grace period (compose stop_grace_period 35 s, Kubernetes terminationGracePeriodSeconds 40 s).
_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerArgs:
    config: str | None
    log_level: str
    host: str
    port: int
    metrics_port: int | None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(requested: int | None, settings: Settings, port: int, demo: bool) -> int | str:
    """How many workers to run, or why the request is refused."""
    embedded = not settings.redis.url
    if requested is None:  # port 0: each worker would get a port of its own
        return 1 if embedded or demo or port == 0 else cpu_count()
    if requested < 1:
        return "--workers must be at least 1"
    if requested > 1 and embedded:
        return ("--workers > 1 needs REDIS_URL: the embedded in-process store cannot be shared between "
                "processes (set REDIS_URL, or use --workers 1)")
    if requested > 1 and demo:
        return "--demo runs one process; drop --workers"
    if requested > 1 and port == 0:
        return "--workers > 1 needs a fixed --port (the workers share it)"
    return requested


def _worker(args: WorkerArgs, conn: multiprocessing.connection.Connection) -> None:
    """One worker: sends "ready" once it listens, or, when it cannot start for a reason the user can fix (the
    port is taken, ...), that reason's one line, which the parent prints once for all workers."""
    from ..config import load
    from .failures import explain
    from .serve import configure_logging, run_server

    configure_logging(args.log_level)

    def ready() -> None:
        conn.send("ready")
        conn.close()

    try:
        code = run_server(load(args.config), args.host, args.port, metrics_port=args.metrics_port, reuse_port=True,
                          on_ready=ready)
    except Exception as exc:
        if (failure := explain(exc)) is None:
            raise
        if conn.closed:  # it was listening: its own line, as a single process would print it
            print(failure[0], file=sys.stderr)
        else:
            with contextlib.suppress(OSError):  # the parent is gone already
                conn.send(failure[0])
        code = failure[1]
    sys.exit(code)


def supervise(args: WorkerArgs, count: int) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="embedding-proxy-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the workers, read when they import prometheus_client
    ctx = multiprocessing.get_context("spawn")
    stop_requested: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        pending: dict[multiprocessing.connection.Connection, int] = {}
        for i in range(count):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(args, writer), name=f"embedding-proxy-worker-{i}")
            proc.start()
            writer.close()
            procs.append(proc)
            pending[reader] = i
        if not _wait_ready(pending, procs, stop_requested):
            return 1 if not stop_requested else 0
        print(f"embedding-proxy {__version__} listening on http://{args.host}:{args.port} ({count} workers)"
              + (f"; metrics on :{args.metrics_port}" if args.metrics_port else ""), flush=True)
        while not stop_requested:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                log.error("worker %s exited with %s; stopping the others", dead[0].name, dead[0].exitcode)
                return 1
            multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.5)
        log.info("signal %d: stopping %d workers", stop_requested[0], count)
        return 0
    finally:
        _stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _wait_ready(
    pending: dict[multiprocessing.connection.Connection, int],
    procs: list[multiprocessing.process.BaseProcess],
    stop_requested: list[int],
) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while pending:
        if stop_requested:
            return False
        if time.monotonic() > deadline:
            log.error("workers did not start within %.0fs", _START_TIMEOUT_S)
            return False
        ready = multiprocessing.connection.wait(list(pending), timeout=0.5)
        for conn in [c for c in pending if c in ready]:
            i = pending.pop(conn)
            try:
                said = conn.recv()
            except EOFError:
                procs[i].join(1)
                log.error("worker %d exited before it was listening (exit code %s)", i, procs[i].exitcode)
                return False
            if said != "ready":  # why it cannot start, on one line (the others fail alike: said once)
                print(said, file=sys.stderr)
                return False
    return True


def _stop(procs: list[multiprocessing.process.BaseProcess]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker drains in-flight requests and closes its pools
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("worker %s did not stop in time; killing it", p.name)
            p.kill()
            p.join()
