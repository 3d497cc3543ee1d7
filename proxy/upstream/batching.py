"""Micro-batching: misses of concurrent requests for the same model travel upstream together.

Calls are grouped in lanes by (model, dimensions, user, team, text or token ids, input type): what one upstream body
can carry, and within one team only, so a merged call's usage (shared among its requests by their local counts) is never
shared between teams. Dynamic batching, as in Triton and TEI: a lane has at most LANE_CALLS calls in flight, and
the misses that arrive meanwhile are collected for its next call. A call on an idle lane goes at once (a lone request
never waits). A call arriving while fewer than LANE_CALLS of its lane are in flight waits at most JOIN_WINDOW_S for
others to join it, then leaves beside them; one arriving while LANE_CALLS are in flight waits for one of them to end,
at most LANE_HOLD_S (a stalled call holds the lane up no longer: then it leaves beside them, the upstream's
`max_concurrency` bounding the calls in flight). A call leaves at once when full (the model's `max_batch_items` /
`max_batch_tokens`, the latter capped by what the deployments' rate limits allow, see FleetClient). So a burst costs
at most about LANE_CALLS calls per upstream latency it lasts (64 misses over 100 ms against a 30 ms upstream: 10 in
the bench), not one per join window; 3 keeps sustained load as fast as before (2 halved it: BENCHMARKS.md).

A merged call's deadline counts from the moment the earliest request it carries asked (`asked`), so joining never
extends a request's wait beyond its deadline; requests that asked more than ASKED_SPREAD_S apart do not share a
call, so joining never cuts one's deadline short by more than that either. It is not sent once every request it
carries gave up (`gave_up`).

Each caller gets exactly its own rows of the merged answer, and token counts that do not depend on who else the call
carried: when the upstream counts each input (Vertex, Titan: `UpstreamResult.exact`), each input's own count; when
the upstream's usage matches the local counts, each input's count is its local count (as a call of its own would
have had); when it does not, the upstream's total cannot be divided among the callers without making each one's
usage depend on the others, so each input keeps its local count and the difference is reported to
`on_mismatch(model, tokens)`. What the upstream counted beyond the local counts is still billed: each caller's
share (by local counts) is its failed tokens (`on_lost("failed", ...)`: in its quota and the ledger, told to no
client). A call that carried one caller only gets the upstream's count (shared among that caller's inputs by
`usage_tokens`). A merged call that fails fails every caller it carried, except
an upstream 400: one caller's input may be what the upstream refused, so each caller is then tried alone. What the
call's failed attempts may have cost is shared by input (`Lost`).

Traces: a call that waited runs in whichever task dispatched it, so it takes the trace context of the first
(sampled) caller it carries: its upstream spans are children of that request's span and link to the others'.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ..errors import InvalidRequest
from ..telemetry.tracing import NO_TRACING, Tracing
from .http import UpstreamResult

# How long a miss that arrives while its lane has a call in flight waits for others to join it. Issue 11 allows at
# most 2 ms: short against any upstream call, long enough for the misses of a burst of requests (handled in the same
# turns of the event loop) to meet.
JOIN_WINDOW_S = 0.002
# Calls of one lane in flight at once, beyond which misses are collected for the lane's next call (a full call goes
# anyway), and how long a collected miss waits at most for one of them to end.
LANE_CALLS = 3
LANE_HOLD_S = 0.05
# How far apart the times its requests asked may be in one call (its deadline is its earliest request's): misses
# collected together asked within about LANE_HOLD_S of each other; a request sending inputs again after a shared
# call failed keeps its first deadline (embeddings/misses.py), and merged with fresh ones it would cut theirs short.
ASKED_SPREAD_S = 0.25

Served = tuple[UpstreamResult, str]  # the vectors and counts, and the upstream that answered
# lost(column, tokens per input): what a failed attempt may have cost, "failed" or "unconfirmed" (see client.py)
Lost = Callable[[str, Sequence[int]], None]
GaveUp = Callable[[], bool]
# call(model, inputs, counts, dimensions, user, asked, lost, gave_up, input_type): one upstream call; `asked` is
# when its earliest request asked; `gave_up()` whether every request it carries gave up
Call = Callable[[str, list[str] | list[list[int]], list[int], int | None, str | None, float, Lost | None,
                 GaveUp | None, str | None],
                Awaitable[Served]]
LaneKey = tuple[str, int | None, str | None, str | None, bool, str | None]


@dataclass(slots=True)
class _Part:
    inputs: list[str] | list[list[int]]
    counts: Sequence[int]
    asked: float
    future: asyncio.Future[Served]
    origin: object = None  # the caller's trace context, when the call is made in another task
    on_lost: Callable[[str, int], None] | None = None  # the caller's share of what failed attempts may have cost
    gave_up: GaveUp | None = None  # None: it never gives up while it waits


@dataclass(slots=True)
class _Lane:
    in_flight: int = 0
    pending: list[_Part] = field(default_factory=list)
    items: int = 0
    tokens: int = 0
    asked: tuple[float, float] = (0.0, 0.0)  # the earliest and latest `asked` of `pending`
    timer: asyncio.TimerHandle | None = None  # ends the join window of `pending`


class MicroBatcher:
    def __init__(
        self, call: Call, limits: Callable[[str], tuple[int, int]],
        on_call: Callable[[str, int, int], None] | None = None, tracing: Tracing = NO_TRACING,
        on_mismatch: Callable[[str, int], None] | None = None,
    ) -> None:
        """`call` makes one upstream call; `limits(model)` is (max items, max tokens) per call; `on_call(model,
        callers, inputs)` sees every call made; `on_mismatch(model, upstream total - local total)` every merged
        call whose usage differed from its local counts."""
        self._call = call
        self._on_mismatch = on_mismatch
        self._limits = limits
        self._on_call = on_call
        self._tracing = tracing
        self._lanes: dict[LaneKey, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(
        self, model: str, inputs: list[str] | list[list[int]], counts: Sequence[int], dimensions: int | None,
        user: str | None, *, team: str | None = None, asked: float | None = None,
        on_lost: Callable[[str, int], None] | None = None, gave_up: GaveUp | None = None,
        input_type: str | None = None,
    ) -> Served:
        """`asked`: when the request asked (time.monotonic()), from which its deadline counts; default now.
        `on_lost(column, tokens)`: this caller's share of what the call's failed attempts may have cost.
        `gave_up()`: whether the request gave up waiting."""
        key = (model, dimensions, user, team, isinstance(inputs[0], str), input_type)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        loop = asyncio.get_running_loop()
        part = _Part(inputs, counts, time.monotonic() if asked is None else asked, loop.create_future(),
                     on_lost=on_lost, gave_up=gave_up)
        if not lane.in_flight and not lane.pending:  # idle lane: go now, in the caller's own task
            lane.in_flight += 1
            await self._run(key, lane, [part])
            return part.future.result()
        max_items, max_tokens = self._limits(model)
        tokens = sum(counts)
        if lane.pending and (lane.items + len(inputs) > max_items or lane.tokens + tokens > max_tokens
                             or _spread(lane.asked, part.asked) > ASKED_SPREAD_S):
            self._dispatch(key, lane)  # the waiting call is full, or asked too far apart from this: it goes now
        part.origin = self._tracing.origin()
        lane.asked = _bounds(lane.asked, part.asked) if lane.pending else (part.asked, part.asked)
        lane.pending.append(part)
        lane.items += len(inputs)
        lane.tokens += tokens
        if lane.items >= max_items or lane.tokens >= max_tokens:
            self._dispatch(key, lane)
        elif lane.in_flight < LANE_CALLS:  # room beside the calls in flight: a join window, then it goes
            if lane.timer is None:
                lane.timer = loop.call_later(JOIN_WINDOW_S, self._dispatch, key, lane)
        elif lane.timer is None:  # the lane is at LANE_CALLS: collected for its next call
            lane.timer = loop.call_later(LANE_HOLD_S, self._dispatch, key, lane)
        return await part.future

    def _dispatch(self, key: LaneKey, lane: _Lane) -> None:
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        if not lane.pending:
            return
        parts, lane.pending, lane.items, lane.tokens = lane.pending, [], 0, 0
        lane.in_flight += 1
        task = asyncio.create_task(self._run(key, lane, parts))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: LaneKey, lane: _Lane, parts: list[_Part]) -> None:
        try:
            await self._serve(key, parts)
        finally:
            lane.in_flight -= 1
            if lane.pending and lane.in_flight < LANE_CALLS:
                self._dispatch(key, lane)  # the lane has room: what was collected goes now
            elif not lane.in_flight and not lane.pending and self._lanes.get(key) is lane:
                del self._lanes[key]  # lanes are keyed by user strings too: keep only busy ones

    async def _serve(self, key: LaneKey, parts: list[_Part]) -> None:
        model, dimensions, user, _, _, input_type = key
        if len(parts) == 1:
            inputs, counts = parts[0].inputs, list(parts[0].counts)
        else:
            inputs = [item for p in parts for item in p.inputs]  # type: ignore[assignment]
            counts = [n for p in parts for n in p.counts]
        if self._on_call is not None:
            self._on_call(model, len(parts), len(inputs))
        try:
            with self._tracing.merged_call([p.origin for p in parts]):
                result, served = await self._call(model, inputs, counts, dimensions, user,
                                                  min(p.asked for p in parts), _share(parts), _all_gave_up(parts),
                                                  input_type)
        except InvalidRequest as exc:
            if len(parts) > 1:
                await asyncio.gather(*(self._serve(key, [p]) for p in parts))
                return
            _fail(parts, exc)
            return
        except asyncio.CancelledError:
            for p in parts:
                p.future.cancel()
            raise
        except Exception as exc:
            _fail(parts, exc)
            return
        # merged, with a total not counted as locally: local counts (the upstream's own per input are kept)
        local = len(parts) > 1 and not result.exact and result.tokens != counts
        if local and (difference := sum(result.tokens) - sum(counts)):
            if self._on_mismatch is not None:
                self._on_mismatch(model, difference)
            if difference > 0:
                _bill_difference(parts, difference)
        start = 0
        for p in parts:
            end = start + len(p.inputs)
            if not p.future.done():
                tokens = list(p.counts) if local else result.tokens[start:end]
                p.future.set_result((UpstreamResult(result.vectors[start:end], tokens), served))
            start = end


def _bounds(asked: tuple[float, float], t: float) -> tuple[float, float]:
    return min(asked[0], t), max(asked[1], t)


def _spread(asked: tuple[float, float], t: float) -> float:
    """How far apart the pending call's requests asked, with one asking at `t` too."""
    low, high = _bounds(asked, t)
    return high - low


def _share(parts: list[_Part]) -> Lost | None:
    """Each caller's slice of a failed attempt's per-input cost."""
    if all(p.on_lost is None for p in parts):
        return None

    def lost(column: str, tokens: Sequence[int]) -> None:
        start = 0
        for p in parts:
            end = start + len(p.inputs)
            if p.on_lost is not None and (mine := sum(tokens[start:end])):
                p.on_lost(column, mine)
            start = end

    return lost


def _bill_difference(parts: list[_Part], difference: int) -> None:
    """What a merged call billed beyond its local counts, told to no caller: their failed tokens (billed, served to
    nobody), shared by their local counts (largest remainders), so that the ledger and the quotas hold it."""
    weights = [sum(p.counts) for p in parts]
    total = sum(weights)
    if not total:
        weights, total = [len(p.inputs) for p in parts], sum(len(p.inputs) for p in parts)
    shares = [difference * w // total for w in weights]
    order = sorted(range(len(parts)), key=lambda i: (-(difference * weights[i] % total), i))
    for i in order[: difference - sum(shares)]:
        shares[i] += 1
    for p, share in zip(parts, shares, strict=True):
        if share and p.on_lost is not None:
            p.on_lost("failed", share)


def _all_gave_up(parts: list[_Part]) -> GaveUp | None:
    if len(parts) == 1:
        return parts[0].gave_up
    if any(p.gave_up is None for p in parts):
        return None
    return lambda: all(p.gave_up() for p in parts if p.gave_up is not None)


def _fail(parts: list[_Part], exc: Exception) -> None:
    for p in parts:
        if not p.future.done():
            p.future.set_exception(exc)
