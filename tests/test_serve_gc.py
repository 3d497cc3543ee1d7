"""Issue 21: a worker freezes what its start-up made (gc.freeze) once it is ready, so that the collector's full
collections, which hold the event loop, no longer scan the long-lived objects."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator

import pytest

from proxy.cli.serve import run_server
from tests.conftest import RedisServer, make_settings

pytestmark = pytest.mark.redis


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_ready_worker_has_frozen_its_start_up_objects(redis_server: RedisServer, unfrozen: None) -> None:
    frozen: list[int] = []

    def ready() -> None:
        frozen.append(gc.get_freeze_count())
        asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)  # then stop, as an operator

    assert gc.get_freeze_count() == 0
    settings = make_settings("http://127.0.0.1:9", redis_server.url)
    assert run_server(settings, "127.0.0.1", 0, on_ready=ready) == 0
    assert frozen and frozen[0] > 10_000  # the modules and the app, at least
