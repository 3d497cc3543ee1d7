"""A model's only deployment, against a scripted local server: backoff, jitter, Retry-After and the deadline.

The fleet client (unbatched) with one deployment, which is never cooled down: its failures are retried with
backoff up to `max_retries`, and a 429 pauses it until the reset it named. Randomness, sleep and clock are injected:
the test records every wait and every jitter bound, and the clock advances only by what the client slept, so
nothing here depends on real time.
"""

from __future__ import annotations

import base64
import dataclasses
import random
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import config
from proxy.errors import InvalidRequest, ProxyError, RateLimited, ServiceUnavailable, UpstreamBadGateway
from proxy.upstream import FleetClient

KEY = "sk-upstream-unit-SECRET-0123456789"
MODEL = "tiny"
VECTOR = np.array([0.5, -0.25, 1.0, 2.0], dtype="<f4")


class RecordingRandom(random.Random):
    """A seeded Random that records the bounds of every jitter draw."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.bounds: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append((a, b))
        return super().uniform(a, b)


class FakeTime:
    """A clock that moves only when the client sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


Reply = tuple[int, dict[str, str], bytes]
OK: Reply = (200, {}, orjson.dumps({
    "object": "list", "model": MODEL, "usage": {"prompt_tokens": 3, "total_tokens": 3},
    "data": [{"object": "embedding", "index": 0, "embedding": base64.b64encode(VECTOR.tobytes()).decode()}],
}))


def failure(status: int, **headers: str) -> Reply:
    return status, headers, orjson.dumps({"error": {"message": f"status {status}", "type": "x", "param": None,
                                                    "code": None}})


@dataclasses.dataclass
class Scripted:
    replies: list[Reply]
    hits: int = 0
    authorizations: list[str | None] = dataclasses.field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.authorizations.append(request.headers.get("Authorization"))
        status, headers, body = self.replies.pop(0) if self.replies else OK
        return web.Response(status=status, headers=headers, body=body, content_type="application/json")


ClientFactory = Callable[..., Awaitable[tuple[FleetClient, Scripted, FakeTime, RecordingRandom]]]


@pytest.fixture
async def scripted_client() -> Any:
    opened: list[tuple[FleetClient, TestServer]] = []

    async def make(replies: list[Reply], **upstream: Any) -> tuple[FleetClient, Scripted, FakeTime, RecordingRandom]:
        script = Scripted(list(replies))
        app = web.Application()
        app.router.add_post("/v1/embeddings", script.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        settings = config.parse(
            "[upstreams.default]\n" + "".join(f"{k} = {v}\n" for k, v in upstream.items())
            + f"[models.{MODEL}]\ndimensions = 4\n",
            "unit.toml", {"UPSTREAM_BASE_URL": str(server.make_url("/v1")), "UPSTREAM_API_KEY": KEY},
        )
        fake, rng = FakeTime(), RecordingRandom(7)
        client = FleetClient(settings, rng=rng, sleep=fake.sleep, clock=fake.clock, batching=False)
        await client.start()
        opened.append((client, server))
        return client, script, fake, rng

    yield make
    for client, server in opened:
        await client.close()
        await server.close()


async def embed(client: FleetClient) -> Any:
    return await client.embed(MODEL, ["x"], [3], None, None)


async def test_waits_grow_exponentially_within_full_jitter_bounds_and_are_capped(scripted_client: Any) -> None:
    client, script, fake, rng = await scripted_client(
        [failure(503)] * 3 + [failure(500), failure(429), failure(502)],
        backoff_base_s=1.0, max_retries=6, deadline_s=1000.0,
    )
    result = await embed(client)
    assert np.array_equal(result.vectors[0], VECTOR) and result.tokens == [3]
    assert script.hits == 7
    assert rng.bounds == [(0, 1.0), (0, 2.0), (0, 4.0), (0, 5.0), (0, 5.0), (0, 5.0)]  # base * 2**n, capped at 5 s
    replay = random.Random(7)
    assert fake.sleeps == [replay.uniform(0, b) for _, b in rng.bounds]  # the wait is the jittered draw itself
    assert all(0 <= w <= b for w, (_, b) in zip(fake.sleeps, rng.bounds, strict=True))
    assert len(set(fake.sleeps)) == 6  # jittered, not fixed
    assert script.authorizations == [f"Bearer {KEY}"] * 7


async def test_retries_stop_after_max_retries_with_the_last_error(scripted_client: Any) -> None:
    client, script, fake, rng = await scripted_client([failure(503)] * 10, backoff_base_s=0.5, max_retries=3)
    with pytest.raises(ServiceUnavailable) as exc:
        await embed(client)
    assert exc.value.status == 503
    assert script.hits == 4 and len(fake.sleeps) == 3
    assert rng.bounds == [(0, 0.5), (0, 1.0), (0, 2.0)]


async def test_retry_after_and_retry_after_ms_are_honoured(scripted_client: Any) -> None:
    client, script, fake, rng = await scripted_client(
        [
            failure(429, **{"Retry-After": "3"}),
            failure(503, **{"retry-after-ms": "1500"}),
            failure(429, **{"retry-after-ms": "250", "Retry-After": "9"}),  # the finer header wins
            failure(503, **{"Retry-After": "7"}),  # the upstream's word beats the 5 s backoff cap
            failure(502, **{"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),  # unparsed: full-jitter backoff
        ],
        backoff_base_s=0.1, max_retries=5, deadline_s=100.0,
    )
    await embed(client)
    assert script.hits == 6
    # A 429's wait is the deployment's pause until the reset it named, a 503's the backoff: the same sleeps.
    assert fake.sleeps[:4] == [3.0, 1.5, 0.25, 7.0]
    assert rng.bounds == [(0, pytest.approx(1.6))]  # only the fifth wait was drawn: 0.1 * 2**4
    assert 0 <= fake.sleeps[4] <= 1.6


@pytest.mark.parametrize(
    ("reply", "error", "status"),
    [
        (failure(429, **{"Retry-After": "30"}), RateLimited, 429),
        (failure(503, **{"retry-after-ms": "60000"}), ServiceUnavailable, 503),
        (failure(502, **{"Retry-After": "10"}), UpstreamBadGateway, 502),  # exactly the deadline: no time left
    ],
)
async def test_retry_after_beyond_the_deadline_stops_at_once(
    scripted_client: Any, reply: Reply, error: type[ProxyError], status: int
) -> None:
    # max_queue_wait_s beyond the deadline: the deadline alone stops the wait for a 429's reset.
    client, script, fake, rng = await scripted_client([reply], deadline_s=10.0, max_retries=3,
                                                      max_queue_wait_s=1000.0)
    with pytest.raises(error) as exc:
        await embed(client)
    assert exc.value.status == status
    assert script.hits == 1 and fake.sleeps == [] and rng.bounds == []
    if status == 429:
        assert exc.value.retry_after == 30.0  # the client is told when the upstream expects it back
        assert client.router.models[MODEL][0].paused_until == 1030.0  # and the deployment waits as long


async def test_deadline_counts_the_time_already_spent(scripted_client: Any) -> None:
    client, script, fake, _ = await scripted_client(
        [failure(429, **{"Retry-After": "6"}), failure(429, **{"Retry-After": "5"})], deadline_s=10.0, max_retries=5,
        max_queue_wait_s=1000.0,  # only the deadline bounds the waits for a 429's reset here
    )
    with pytest.raises(RateLimited) as exc:
        await embed(client)
    assert fake.sleeps == [6.0] and script.hits == 2  # 5 s more would end after the 10 s deadline
    assert exc.value.retry_after == 5.0


async def test_upstream_400_message_is_relayed_without_the_upstream_key(scripted_client: Any) -> None:
    echo = (400, {}, orjson.dumps({"error": {"message": f"bad request from Bearer {KEY} (input too long)"}}))
    client, script, fake, _ = await scripted_client([echo])
    with pytest.raises(InvalidRequest) as exc:
        await embed(client)
    assert script.hits == 1 and fake.sleeps == []
    assert KEY not in exc.value.message and KEY not in exc.value.to_json().decode()
    assert "input too long" in exc.value.message


@pytest.mark.parametrize(
    ("value", "told"),
    [("1e309", 3600.0), ("1e300", 3600.0), ("inf", 3600.0)],
)
async def test_absurd_retry_after_is_cut_to_an_hour_and_never_slept(scripted_client: Any, value: str,
                                                                     told: float) -> None:
    client, script, fake, rng = await scripted_client([failure(429, **{"Retry-After": value})], deadline_s=10.0)
    with pytest.raises(RateLimited) as exc:
        await embed(client)
    assert exc.value.retry_after == told  # what the client is told: bounded, finite
    assert script.hits == 1 and fake.sleeps == [] and rng.bounds == []


async def test_an_hour_is_the_longest_wait_even_within_a_longer_deadline(scripted_client: Any) -> None:
    client, script, fake, _ = await scripted_client([failure(503, **{"Retry-After": "1e300"})], deadline_s=7200.0)
    await embed(client)
    assert fake.sleeps == [3600.0] and script.hits == 2


@pytest.mark.parametrize("value", ["-5", "nan", "soon", "-1e309"])
async def test_retry_after_that_is_no_wait_is_ignored_for_full_jitter(scripted_client: Any, value: str) -> None:
    client, script, fake, rng = await scripted_client(
        [failure(429, **{"Retry-After": value, "retry-after-ms": value})], backoff_base_s=0.5
    )
    await embed(client)
    assert script.hits == 2 and rng.bounds == [(0, 0.5)]  # not an immediate retry: the usual backoff
    assert 0 <= fake.sleeps[0] <= 0.5


async def test_an_answer_larger_than_its_bound_is_refused_unread_and_retried(scripted_client: Any) -> None:
    _, headers, body = OK
    padded = body + b" " * (4 * 64 + 512 + 65536)  # valid JSON, one input of 4 floats: over answer_limit(1, 4)
    client, script, fake, _ = await scripted_client([(200, headers, padded)])
    result = await embed(client)
    assert script.hits == 2 and len(fake.sleeps) == 1  # refused, retried, the next answer taken
    assert np.array_equal(result.vectors[0], VECTOR)


async def test_usage_beyond_its_bound_is_retried_and_never_returned(scripted_client: Any) -> None:
    absurd = orjson.loads(OK[2])
    absurd["usage"] = {"prompt_tokens": 2**63 - 1, "total_tokens": 2**63 - 1}
    client, script, _, _ = await scripted_client([(200, {}, orjson.dumps(absurd))] * 4, max_retries=3)
    with pytest.raises(UpstreamBadGateway) as exc:
        await embed(client)
    assert script.hits == 4 and "9223372036854775807 tokens for 1 inputs" in exc.value.message
