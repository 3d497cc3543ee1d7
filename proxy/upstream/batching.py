"""Micro-batching: misses of concurrent requests for the same model travel upstream together.

Calls are grouped in lanes by (model, dimensions, user, team, text or token ids): what one upstream body can carry,
and within one team only, so a merged call's usage (shared among its requests by their local counts) is never
shared between teams. A call on an idle lane goes at once (a lone request never waits). A call arriving while one
of its lane is in flight waits at most JOIN_WINDOW_S for others to join it, then leaves, whatever the call in flight
is doing (a stalled call holds no one up; several calls of a lane may be in flight, bounded by the upstream's
`max_concurrency`); it leaves at once when full (the model's `max_batch_items` / `max_batch_tokens`, the latter
capped by what the deployments' rate limits allow, see FleetClient) or when the lane's last call in flight ends.
Under load this turns N concurrent single-input misses into a handful of upstream calls.

A merged call's deadline counts from the moment the earliest request it carries asked (`asked`), so joining never
extends a request's wait beyond its deadline.

Each caller gets exactly its own rows of the merged answer and its own slice of the per-input token counts (which
add up to the upstream's usage for the merged call). A merged call that fails fails every caller it carried, except
an upstream 400: one caller's input may be what the upstream refused, so each caller is then tried alone.

Traces: a call that waited runs in whichever task dispatched it, so it takes the trace context of the first
(sampled) caller it carries: its upstream spans are children of that request's span and link to the others'.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from ..errors import InvalidRequest
from ..tracing import NO_TRACING, Tracing
from .http import UpstreamResult

# How long a miss that arrives while its lane has a call in flight waits for others to join it. Issue 11 allows at
# most 2 ms: short against any upstream call, long enough for the misses of a burst of requests (handled in the same
# turns of the event loop) to meet.
JOIN_WINDOW_S = 0.002

Served = tuple[UpstreamResult, str]  # the vectors and counts, and the upstream that answered
# call(model, inputs, counts, dimensions, user, asked): one upstream call; `asked` is when its earliest request asked
Call = Callable[[str, list[str] | list[list[int]], list[int], int | None, str | None, float], Awaitable[Served]]
LaneKey = tuple[str, int | None, str | None, str | None, bool]


@dataclass(slots=True)
class _Part:
    inputs: list[str] | list[list[int]]
    counts: Sequence[int]
    asked: float
    future: asyncio.Future[Served]
    origin: object = None  # the caller's trace context, when the call is made in another task


@dataclass(slots=True)
class _Lane:
    in_flight: int = 0
    pending: list[_Part] = field(default_factory=list)
    items: int = 0
    tokens: int = 0
    timer: asyncio.TimerHandle | None = None  # ends the join window of `pending`


class MicroBatcher:
    def __init__(
        self, call: Call, limits: Callable[[str], tuple[int, int]],
        on_call: Callable[[str, int, int], None] | None = None, tracing: Tracing = NO_TRACING,
    ) -> None:
        """`call` makes one upstream call; `limits(model)` is (max items, max tokens) per call; `on_call(model,
        callers, inputs)` sees every call made."""
        self._call = call
        self._limits = limits
        self._on_call = on_call
        self._tracing = tracing
        self._lanes: dict[LaneKey, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(
        self, model: str, inputs: list[str] | list[list[int]], counts: Sequence[int], dimensions: int | None,
        user: str | None, *, team: str | None = None, asked: float | None = None,
    ) -> Served:
        """`asked`: when the request asked (time.monotonic()), from which its deadline counts; default now."""
        key = (model, dimensions, user, team, isinstance(inputs[0], str))
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        loop = asyncio.get_running_loop()
        part = _Part(inputs, counts, time.monotonic() if asked is None else asked, loop.create_future())
        if not lane.in_flight and not lane.pending:  # idle lane: go now, in the caller's own task
            lane.in_flight += 1
            await self._run(key, lane, [part])
            return part.future.result()
        max_items, max_tokens = self._limits(model)
        tokens = sum(counts)
        if lane.pending and (lane.items + len(inputs) > max_items or lane.tokens + tokens > max_tokens):
            self._dispatch(key, lane)  # the waiting call is full: it goes now
        part.origin = self._tracing.origin()
        lane.pending.append(part)
        lane.items += len(inputs)
        lane.tokens += tokens
        if lane.items >= max_items or lane.tokens >= max_tokens:
            self._dispatch(key, lane)
        elif lane.timer is None:
            lane.timer = loop.call_later(JOIN_WINDOW_S, self._dispatch, key, lane)
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
            if lane.pending and not lane.in_flight:
                self._dispatch(key, lane)  # the lane is idle: no reason to wait out the window
            elif not lane.in_flight and not lane.pending and self._lanes.get(key) is lane:
                del self._lanes[key]  # lanes are keyed by user strings too: keep only busy ones

    async def _serve(self, key: LaneKey, parts: list[_Part]) -> None:
        model, dimensions, user, _, _ = key
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
                                                  min(p.asked for p in parts))
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
        start = 0
        for p in parts:
            end = start + len(p.inputs)
            if not p.future.done():
                p.future.set_result((UpstreamResult(result.vectors[start:end], result.tokens[start:end]), served))
            start = end


def _fail(parts: list[_Part], exc: Exception) -> None:
    for p in parts:
        if not p.future.done():
            p.future.set_exception(exc)
