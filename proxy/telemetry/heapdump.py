"""Allocation snapshots for telling a bounded fill from a leak (README "Overload and memory"). Off by default.

With `PROXY_TRACEMALLOC=DIR` set, each server process (the one of `serve`, or every worker of `serve --workers N`)
starts Python's tracemalloc once it listens (`FRAMES` frames per allocation) and, on SIGUSR2, writes
`DIR/tracemalloc-<pid>-<n>.txt`: the Python heap traced now, the allocation sites that grew most since the
previous snapshot (the first one: since start-up) and since the first snapshot, and the largest sites now.
Send the signal to the worker processes (a `--workers N` parent has no handler: SIGUSR2 would stop it).
Debugging only: tracing slows every allocation (about 2x CPU on the request path) and holds its own bookkeeping
(tens of MB), and a snapshot stops the event loop while it is taken and compared (seconds of CPU for a few
hundred thousand blocks). Without the variable nothing here runs and SIGUSR2 keeps its default action.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tracemalloc
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("proxy.heapdump")

ENV = "PROXY_TRACEMALLOC"
FRAMES = 8
TOP = 25


class HeapDumps:
    """Snapshots on demand, each written as text beside the growth since the previous and the first one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0
        self._first: tracemalloc.Snapshot | None = None
        self._previous: tracemalloc.Snapshot | None = None

    def dump(self) -> Path:
        snap = tracemalloc.take_snapshot()
        self.count += 1
        path = self.directory / f"tracemalloc-{os.getpid()}-{self.count}.txt"
        traced, peak = tracemalloc.get_traced_memory()
        lines = [f"snapshot {self.count} of pid {os.getpid()}: traced {traced / 2**20:.1f} MiB "
                 f"(peak {peak / 2**20:.1f} MiB), tracemalloc's own {tracemalloc.get_tracemalloc_memory() / 2**20:.1f}"
                 f" MiB, {len(snap.traces)} blocks"]
        for title, base in (("since the previous snapshot", self._previous), ("since the first snapshot", self._first)):
            if base is None:
                continue
            lines += ["", f"top growth {title} (size delta, count delta, site):"]
            lines += [f"{s.size_diff / 1024:+10.1f} KiB {s.count_diff:+8d}  {s.traceback[0]}"
                      for s in snap.compare_to(base, "lineno")[:TOP]]
            if base is self._previous:
                lines += ["", f"top growth {title} by call stack (innermost last):"]
                for s in snap.compare_to(base, "traceback")[:5]:
                    lines.append(f"{s.size_diff / 1024:+10.1f} KiB {s.count_diff:+8d}")
                    lines += [f"    {frame}" for frame in reversed(s.traceback)]
        lines += ["", "largest sites now (size, blocks, site):"]
        lines += [f"{s.size / 1024:10.1f} KiB {s.count:8d}  {s.traceback[0]}" for s in snap.statistics("lineno")[:TOP]]
        self.directory.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        self._first = self._first or snap
        self._previous = snap
        log.warning("tracemalloc snapshot %d written to %s", self.count, path)
        return path


def install_from_env(environ: Mapping[str, str] = os.environ) -> HeapDumps | None:
    """When `PROXY_TRACEMALLOC` names a directory: start tracing, dump on SIGUSR2 (from the running loop), and
    return the dumper; else None and nothing runs. Called once the server listens: start-up's imports and
    one-time allocations are not traced (tracing them would slow the start several times over)."""
    directory = environ.get(ENV, "").strip()
    if not directory:
        return None
    if not tracemalloc.is_tracing():
        tracemalloc.start(FRAMES)
    dumps = HeapDumps(Path(directory))

    def dump() -> None:
        try:
            dumps.dump()
        except OSError as exc:  # an unwritable directory must not stop the server
            log.error("tracemalloc snapshot not written: %s", exc)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, dump)
    log.warning("tracemalloc on (%s): SIGUSR2 writes a snapshot to %s", ENV, directory)
    return dumps
