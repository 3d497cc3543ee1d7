"""Issue 21 broken on purpose: the admission budget's line when every holder waits, a slow upload against the
budget, and a client that leaves before its streamed answer starts; against the proxy as operators run it
(`serve --workers 1`, a private redis-server, the mock upstream as a process) where it takes a server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.http.admission import Budget, Lease
from tests.conftest import RedisServer
from tests.helpers import assert_same_vectors, direct, vectors
from tests.stack import CONFIG, MODEL, scrape, value
from tests.test_overload import Stack

pytestmark = pytest.mark.redis


def _start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _holding(budget: Budget, amount: int) -> Lease:
    lease = budget.lease()
    await lease.take(amount)
    return lease


async def test_when_every_holder_waits_for_more_the_head_runs_alone_at_once() -> None:
    """Two admitted requests both want their misses' bytes and neither fits beside the other. Both wait, so the
    head runs alone; before, nobody woke it (only a release did, and nobody was left to release) and it was
    refused 503 after the whole wait."""
    budget = Budget(100, 5.0)
    one, two = await _holding(budget, 60), await _holding(budget, 30)
    first = _start(one.take(50))
    await _turns()
    second = _start(two.take(50))
    await _turns()
    try:
        assert first.done() and first.exception() is None
        assert one.held == 110 and not second.done()
        one.release()
        await asyncio.wait_for(second, 1.0)
        assert two.held == 80 and budget.in_use == 80
    finally:
        for task in (first, second):
            task.cancel()


async def test_only_one_lease_at_a_time_goes_past_the_budget() -> None:
    """Requests reading their bodies piece by piece, all waiting for their next piece: one runs alone past the
    budget; the others stay waiting until it is done, so the use is never more than the budget plus one request."""
    budget = Budget(100, 5.0)
    leases = [await _holding(budget, 30) for _ in range(3)]
    tasks = [_start(lease.take(30)) for lease in leases]
    await _turns()
    try:
        lone = leases[0]
        assert tasks[0].done() and budget.in_use == 120
        for _ in range(5):  # the lone one goes on taking its pieces, past the others' line
            await asyncio.wait_for(lone.take(30), 1.0)
        assert budget.in_use == 270 and not tasks[1].done() and not tasks[2].done()
        assert budget.in_use <= budget.capacity + lone.held
        lone.release()
        await asyncio.wait_for(tasks[1], 1.0)
        assert budget.in_use == 90 and not tasks[2].done()  # 30 + 60: the second runs alone, the third waits
    finally:
        for task in tasks:
            task.cancel()


# --- against real servers ---------------------------------------------------------------------------------------


@pytest.fixture
def stacks(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[Stack]]:
    made: list[Stack] = []
    yield made
    for s in made:
        s.stop()


async def _stack(stacks: list[Stack], tmp_path: Path, redis: RedisServer, config: str, latency_ms: float) -> Stack:
    stacks.append(await asyncio.to_thread(Stack, tmp_path, redis, config, latency_ms))
    return stacks[-1]


def _head(stack: Stack, length: int) -> bytes:
    return (f"POST /v1/embeddings HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {stack.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def _send_slowly(stack: Stack, body: bytes, rate: int) -> bytes:
    """`body` at about `rate` bytes a second (a client on a slow link), then its whole answer."""
    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(_head(stack, len(body)))
        step = max(rate // 10, 1)
        for at in range(0, len(body), step):
            s.sendall(body[at:at + step])
            time.sleep(0.1)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while piece := s.recv(1 << 16):
            answer += piece
    return answer


async def test_a_slow_upload_does_not_shut_every_other_request_out(
        stacks: list[Stack], tmp_path: Path, redis_server: RedisServer) -> None:
    """A 30 KB body sent at 5 KB/s, as from a slow link, while others ask for one input each. Its Content-Length
    was charged ahead at the most such a body could cost once parsed (2048 inputs of the widest model: ~15 MiB),
    more than this 8 MiB budget: it ran alone for the whole upload and every other request got 503 after its wait.
    Now it holds what it has sent, and everyone gets a 200; the upload too, bit for bit."""
    stack = await _stack(stacks, tmp_path, redis_server, CONFIG + "\n[admission]\nbudget_mb = 8\nwait_s = 1\n", 1)
    inputs = [f"slow upload input {k}: " + "words " * 50 for k in range(100)]
    body = orjson.dumps({"model": MODEL, "input": inputs, "encoding_format": "float"})
    assert 25_000 < len(body) < 40_000
    upload = asyncio.create_task(asyncio.to_thread(_send_slowly, stack, body, 5_000))
    await asyncio.sleep(1.0)
    statuses = []
    async with aiohttp.ClientSession() as session:
        for n in range(4):
            async with session.post(stack.url + "/v1/embeddings", json={"model": MODEL, "input": [f"quick {n}"]},
                                    headers={"Authorization": f"Bearer {stack.key}"}) as resp:
                statuses.append((resp.status, await resp.text()))
            await asyncio.sleep(0.3)
    assert not upload.done()  # the upload was still arriving while they were answered
    assert [s for s, _ in statuses] == [200] * 4, statuses
    answer = await upload
    head, _, raw = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"transfer-encoding: chunked" in head.lower()
    upstream = await direct(stack.mock_url + "/v1", {"model": MODEL, "input": inputs, "encoding_format": "base64"})
    assert_same_vectors(vectors(orjson.loads(_dechunk(raw))), vectors(upstream))
    await asyncio.sleep(1.3)  # the worker writes its counts every second
    _, samples = scrape(stack.url + "/metrics")
    assert value(samples, "embedding_proxy_admission_in_use_bytes") == 0
    assert value(samples, "embedding_proxy_admission_refusals_total") == 0


def _dechunk(raw: bytes) -> bytes:
    out, rest = b"", raw
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, rest = out + rest[:size], rest[size + 2:]


async def test_a_client_that_leaves_before_its_streamed_answer_starts_is_no_500(
        stacks: list[Stack], tmp_path: Path, redis_server: RedisServer) -> None:
    """The client sends a 100-input float request (a streamed answer) and leaves while the upstream (300 ms)
    works. Writing the answer's headers failed outside the stream's own handling: an `unhandled error` traceback
    in the log and a 500 in the metrics for a client that was gone."""
    stack = await _stack(stacks, tmp_path, redis_server, CONFIG, 300)
    host, port = stack.url.removeprefix("http://").split(":")
    for n in range(3):
        body = orjson.dumps({"model": MODEL, "input": [f"leaver {n} input {k}" for k in range(100)],
                             "encoding_format": "float"})
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(_head(stack, len(body)) + body)
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # the upstream answered, the answers were attempted, the counts written
    _, samples = scrape(stack.url + "/metrics")
    assert value(samples, "embedding_proxy_requests_total", status_class="5xx") == 0
    assert value(samples, "embedding_proxy_admission_in_use_bytes") == 0
    log = stack.proxy.stderr()
    assert "unhandled error" not in log and "Traceback" not in log, log[-2000:]
