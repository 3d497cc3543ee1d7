"""The work a request leaves running after it is answered or gone: upstream calls other requests may share, cache
writes, and the settlement of a cancelled request. Held here so that none is garbage-collected mid-flight and
shutdown can wait for all of it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Wait for every task running now (their failures are theirs: logged or passed on where they happen)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
