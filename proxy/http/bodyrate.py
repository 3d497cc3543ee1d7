"""A request body's minimum rate: a client trickling its body holds a connection, a handler and the bytes read so
far for as long as it likes, unless the body has to keep up.

From when the proxy starts reading it, a body must have arrived at `min_body_rate_bytes_s` on average once
`body_grace_s` has passed ([connections], as Kestrel's MinRequestBodyDataRate). A timer is due when the bytes so far
stop being enough; if no more came by then, the body's stream is failed with `BodyTooSlow`, which body.py answers
with 408 (and the error middleware closes the connection). A body that is complete before the grace period ends, as
almost all are, costs one timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from aiohttp import StreamReader

from ..config.connections import ConnectionSettings


class BodyTooSlow(Exception):
    """The body arrived below the minimum rate."""


@contextlib.contextmanager
def minimum_rate(content: StreamReader, settings: ConnectionSettings) -> Iterator[None]:
    """While reading `content`: fail it with BodyTooSlow as soon as it falls below the minimum rate."""
    rate = settings.min_body_rate_bytes_s
    if not rate or content.is_eof():
        yield
        return
    loop = asyncio.get_running_loop()
    start = loop.time() + settings.body_grace_s
    handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal handle
        handle = None
        if content.is_eof() or content.exception() is not None:
            return
        due = start + content.total_bytes / rate  # when the bytes so far stop being enough
        if loop.time() >= due:
            content.set_exception(BodyTooSlow())
        else:
            handle = loop.call_at(due, check)

    handle = loop.call_at(start, check)
    try:
        yield
    finally:
        if handle is not None:
            handle.cancel()
