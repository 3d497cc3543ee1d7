"""Issue 16: the fleet client's call in named steps, each tested on its own (pinned clock, pinned randomness).

The decisions between attempts (callstate.py), the slots and the calls dropped before sending (permits.py), and a
failed attempt's cost (failures.py). The whole loop against real servers: test_fleet.py, test_break11.py,
test_upstream_slots.py, test_upstream_probe.py, test_break15_billing.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from proxy.errors import InvalidRequest, RateLimited, ServiceUnavailable, UpstreamBadGateway, UpstreamTimeout
from proxy.telemetry.metrics import Metrics
from proxy.upstream.callstate import MAX_BACKOFF_S, CallState, refusal
from proxy.upstream.client import CallAbandoned
from proxy.upstream.failures import Failure, report_lost
from proxy.upstream.permits import MIN_ATTEMPT_S, Slots
from proxy.upstream.router import Choice, Deployment, Router
from tests.test_fleet_units import FLEET_TOML
from tests.test_fleet_units import settings as unit_settings

BACKOFF_TOML = FLEET_TOML.replace('[upstreams.b]\n', '[upstreams.b]\nbackoff_base_s = 1.5\nmax_concurrency = 1\n')


class Highest(random.Random):
    """Every jittered backoff at its upper bound: the waits are literal."""

    def uniform(self, a: float, b: float) -> float:
        return b


def deployments() -> dict[str, Deployment]:
    router = Router(unit_settings(BACKOFF_TOML), random.Random(1))
    return {d.upstream: d for d in router.deployments()}


def failed_call(d: Deployment, *, retries: int = 3, deadline: float = 100.0, retry_after: float | None = None,
                ) -> CallState:
    """A call whose one attempt at `d` just failed with a retryable 502."""
    call = CallState(deadline=deadline, retries=retries)
    call.tried[d.upstream] = 1
    call.failed(d, Failure(UpstreamBadGateway("bad"), retry_after, final=False))
    return call


def test_after_a_failure_an_untried_deployment_is_a_failover_at_once() -> None:
    ds = deployments()
    call = failed_call(ds["a"])
    assert call.after_failure(ds["az"], 0.0, Highest()) == ("failover", 0.0)
    assert call.retries == 3  # a failover spends no retry


def test_a_deployment_the_call_waited_for_is_retried_at_once_retries_left_or_not() -> None:
    ds = deployments()
    call = failed_call(ds["a"], retries=1)
    call.waited_for(Choice(None, 2.0, False))
    assert call.after_failure(ds["a"], 0.0, Highest()) == ("retry", 0.0) and call.retries == 0
    assert call.after_failure(ds["a"], 0.0, Highest()) == ("retry", 0.0) and call.retries == 0  # never below 0


def test_a_retry_of_the_same_deployment_backs_off_exponentially_capped_then_gives_up() -> None:
    d = deployments()["b"]  # backoff_base_s = 1.5, max_retries = 3
    call = failed_call(d)
    waits = [call.after_failure(d, 0.0, Highest()) for _ in range(3)]
    assert waits == [("backoff", 1.5), ("backoff", 3.0), ("backoff", MAX_BACKOFF_S)]  # 6.0 capped at 5
    with pytest.raises(UpstreamBadGateway):
        call.after_failure(d, 0.0, Highest())  # no retry left: the last error


def test_a_backoff_takes_the_upstreams_retry_after_and_never_ends_past_the_deadline() -> None:
    d = deployments()["b"]
    assert failed_call(d, retry_after=7.0).after_failure(d, 0.0, Highest()) == ("backoff", 7.0)
    call = failed_call(d, deadline=10.0)
    error = call.error
    with pytest.raises(UpstreamBadGateway) as raised:
        call.after_failure(d, 8.5, Highest())  # 1.5 s of backoff would end at the deadline: fail now
    assert raised.value is error and call.retries == 2


def test_waits_for_rate_limits_are_bounded_for_the_whole_call_and_any_wait_by_the_deadline() -> None:
    call = CallState(deadline=100.0, retries=3)
    limited = Choice(None, 4.0, True, 10.0)  # max_queue_wait_s = 10
    assert call.may_wait(limited, 0.0)
    call.waited_for(limited)
    call.waited_for(limited)
    assert call.rate_waited == 8.0 and call.waited
    assert not call.may_wait(limited, 0.0)  # 4 s more would be 12 s of waiting in all
    cooling = Choice(None, 50.0, False)
    assert call.may_wait(cooling, 0.0) and not call.may_wait(cooling, 50.0)  # it would end at the deadline


def test_the_refusal_says_why_nothing_can_take_the_call() -> None:
    last = UpstreamBadGateway("bad")
    assert refusal("m", Choice(None), last) is last
    never = refusal("m", Choice(None), None)
    assert isinstance(never, ServiceUnavailable) and never.message == "No upstream deployment of 'm' can take the call."
    limited = refusal("m", Choice(None, 2.4, True, 10.0), last)
    assert isinstance(limited, RateLimited) and limited.retry_after == 2.4
    assert limited.message == ("Every upstream deployment of 'm' is at its rate limit for 2.4s more; please retry "
                               "after that.")
    cooling = refusal("m", Choice(None, 30.0, False), last)
    assert type(cooling) is ServiceUnavailable and cooling.retry_after == 30.0
    assert "cooling down after failures for 30.0s more" in cooling.message


def test_a_final_failure_leaves_the_call_or_ends_it() -> None:
    ds = deployments()
    call = CallState(deadline=100.0, retries=3)
    call.failed(ds["a"], Failure(UpstreamBadGateway("no", kind="auth"), None, final=True))
    assert call.refused == {"a"} and call.previous is ds["a"]  # the others may still take it
    with pytest.raises(InvalidRequest):  # the client's input: relayed, whatever the deployment
        call.failed(ds["az"], Failure(InvalidRequest("bad input"), None, final=True))
    with pytest.raises(UpstreamBadGateway):  # the model's only deployment
        CallState(deadline=100.0, retries=3).failed(ds["b"], Failure(UpstreamBadGateway("no"), None, final=True))
    assert ds["b"].solo


def test_a_failed_attempts_cost_goes_to_the_caller_and_unconfirmed_ones_to_the_metrics() -> None:
    d = deployments()["a"]
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    seen: list[tuple[str, list[int]]] = []

    def lost(column: str, tokens: Sequence[int]) -> None:
        seen.append((column, list(tokens)))

    error = UpstreamBadGateway("bad")
    report_lost(metrics, d, Failure(error, None, final=False, billed=[3, 4]), [2, 2], lost)
    report_lost(metrics, d, Failure(error, None, final=False, billed=[0, 0], unconfirmed="cut"), [2, 2], lost)
    report_lost(metrics, d, Failure(error, None, final=False), [2, 2], lost)  # never sent: no cost
    metrics.flush()
    assert seen == [("failed", [3, 4]), ("unconfirmed", [2, 2])]
    assert registry.get_sample_value("embedding_proxy_upstream_unconfirmed_attempts_total",
                                     {"model": "m", "upstream": "a", "reason": "cut"}) == 1.0


async def test_a_call_holding_its_slot_is_sent_only_while_worth_it_and_waits_for_a_slot_within_its_deadline(
) -> None:
    d = deployments()["b"]  # max_concurrency = 1
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    loop = asyncio.get_running_loop()
    slots = Slots(unit_settings(BACKOFF_TOML), loop.time, metrics)

    def dropped(reason: str) -> float | None:
        metrics.flush()
        return registry.get_sample_value("embedding_proxy_upstream_calls_dropped_total",
                                         {"model": "one", "upstream": "b", "reason": reason})

    await slots.take(d, loop.time() + 60)
    now = loop.time()
    assert slots.check(d, now + 60, lambda: False) >= now
    with pytest.raises(UpstreamTimeout):
        slots.check(d, loop.time() + MIN_ATTEMPT_S / 2, None)
    with pytest.raises(CallAbandoned):
        slots.check(d, loop.time() + 60, lambda: True)
    with pytest.raises(UpstreamTimeout):  # the one slot is held: the deadline passes while waiting
        await slots.take(d, loop.time() + 0.05)
    assert dropped("deadline") == 2.0 and dropped("abandoned") == 1.0
    waiting = asyncio.create_task(slots.take(d, loop.time() + 60))
    await asyncio.sleep(0)
    assert not waiting.done()
    slots.release(d)
    await asyncio.wait_for(waiting, 10)  # the released slot goes to the waiting call
    slots.release(d)
