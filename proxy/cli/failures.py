"""How the command line fails: one line on stderr and an exit status, never a traceback for what a user can cause.

Exit status 2 is a usage error (argparse's own, a refused argument value, an invalid configuration); 1 is an
operation that failed (a port already in use, Redis unreachable, a proxy that answered an error). `explain` maps
our error hierarchy and the operating system's errors to that line; anything else is a bug, and keeps its
traceback. `cli.main` is the one place that calls it (and `serve --workers` passes a worker's line to the parent).
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from ..config import ConfigError
from ..errors import ProxyError
from ..stores.guard import StoreUnavailable
from ..stores.topology import TopologyError, describe


class CommandFailed(Exception):
    """A command could not do what it was asked; `message` is the whole explanation, on one line."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _flat(text: str) -> str:
    return " ".join(str(text).split())


def _os_error(exc: OSError) -> str:
    if exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__


def explain(exc: BaseException) -> tuple[str, int] | None:
    """The one line to print and the exit status for a failure a user can cause or fix; None for anything else."""
    if isinstance(exc, CommandFailed):
        return f"error: {_flat(exc.message)}", exc.code
    if isinstance(exc, ConfigError):
        return f"config error: {_flat(str(exc))}", 2
    if isinstance(exc, StoreUnavailable):
        return f"error: {_flat(str(exc))} ({_flat(describe(exc))})", 1
    if isinstance(exc, TopologyError):
        return f"error: {_flat(str(exc))}", 1
    if isinstance(exc, ProxyError):
        return f"error: {_flat(exc.message)}", 1
    if isinstance(exc, OSError):
        return f"error: {_flat(_os_error(exc))}", 1
    return None


def listen_failed(exc: OSError, host: str, port: int, flag: str = "--port") -> CommandFailed:
    """Why `serve` cannot open a port (`flag` names the option that chose it), in words that say what to do."""
    if isinstance(exc, socket.gaierror):
        reason = f"cannot resolve the host ({exc.strerror}): use an address of this machine with --host"
    elif exc.errno == errno.EADDRINUSE:
        reason = f"the address is already in use (another process holds the port): choose another with {flag}"
        if flag == "--port":
            reason += " (make demo PORT=8081)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "the address is not one of this machine's: use one of its addresses with --host"
    elif exc.errno == errno.EACCES:
        reason = f"permission denied (ports below 1024 need privileges): choose another with {flag}"
    else:
        reason = os.strerror(exc.errno) if exc.errno else _os_error(exc)
    return CommandFailed(f"cannot listen on {host}:{port}: {reason}")


def stdout_gone() -> int:
    """The reader of stdout went away (`embedding-proxy keys list | head -3`): as Python's documentation
    recommends (signal.SIGPIPE notes), point stdout at devnull so that the flush at exit does not fail again, and
    exit quietly with status 1."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1
