"""The fleet client: what the service calls for a model's misses.

One call: micro-batched with concurrent ones (batching.py), then attempts inside the deadline of the model's
deployments. Each attempt goes to the deployment the router picks (router.py); a failed attempt goes next to a
deployment not tried yet when one can take the call now, else it is a retry of the same ones with backoff
(`max_retries`). When none can take the call now (cooling down, paused by a 429, or out of room by its rate-limit
headers), the call waits for the first that can, if that is within the deadline (and within `max_queue_wait_s` for
a rate limit); otherwise the proxy answers 429 or 503 with Retry-After, without an upstream call. An upstream 4xx
about the request (400, 422, ...) is the client's input: relayed, and no failure of the deployment.

What a failed attempt may have cost is reported to the caller (`on_lost`): the usage of an answer the checks
refused ("failed"), or the local counts of an attempt sent and never answered, or answered unreadably
("unconfirmed").

Each attempt first takes one of its upstream's `max_concurrency` slots, waiting for one within the deadline (504
at the deadline, nothing sent); its time limit and pacing budget count from when it holds the slot, and a call
whose requests all gave up meanwhile (their tasks cancelled), or with less than 50 ms of its deadline left, is not
sent.

This module is the loop of one call, in named steps (`_choose`, `_after_failure`, `_send`); the pieces it runs
live beside it: the slots (permits.py), one attempt (attempt.py), what the call remembers between attempts and the
retry, failover and backoff decisions (callstate.py), a failed attempt and its cost (failures.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..config import Settings
from ..errors import InvalidRequest, ProxyError, UpstreamTimeout
from ..telemetry.metrics import Metrics
from ..telemetry.tracing import NO_TRACING, Tracing
from . import status
from .attempt import Attempts
from .batching import Lost, MicroBatcher, Served
from .callstate import CallState, refusal
from .failures import Failure, report_lost
from .http import UpstreamClient, UpstreamResult
from .kinds import Outgoing, make_body
from .limiting import Limiter, SharedLimits, Ticket
from .permits import PAST_DEADLINE, CallAbandoned, Slots
from .router import Deployment, Router
from .sharing import PROBE_HOLD_MARGIN_S, SharedHealth

__all__ = ["SERVED_BY", "CallAbandoned", "FleetClient"]

log = logging.getLogger("proxy.upstream")

# The upstreams that answered for the current request (its access line names them): set per request by the
# handler, appended to by each of its upstream calls (their tasks inherit the request's context).
SERVED_BY: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("served_by", default=None)


class FleetClient:
    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_retry: Callable[[str, str], None] | None = None,
        batching: bool = True,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._settings = settings
        self._http = UpstreamClient(settings)  # the connection pool and the per-attempt POST
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._on_retry = on_retry
        self._metrics = metrics
        self.router = Router(settings, self._rng)
        self._slots = Slots(settings, clock, metrics)  # each upstream's max_concurrency
        self.limiter = Limiter()  # fleet-wide limits per deployment (limiting.py)
        self._attempts = Attempts(self._http, self.router, clock, metrics, tracing)
        self._batcher = MicroBatcher(self._call, self._limits, self._observe_call, tracing,
                                     on_mismatch=self._observe_mismatch) if batching else None
        self._mismatched: set[str] = set()  # models whose usage mismatch was logged
        if metrics is not None:
            metrics.register_fleet([(d.model, d.upstream) for d in self.router.deployments()], self.refresh_gauges)
            self.router.on_steered = lambda d: metrics.add(metrics.upstream_silent_steered, d.model, d.upstream)

    async def start(self) -> None:
        await self._http.start()

    def now(self) -> float:
        """The clock deadlines are counted on (`embed`'s `asked`)."""
        return self._clock()

    async def close(self) -> None:
        await self.router.share.settle()  # health bookings under way land before the stores close
        await self.limiter.settle(final=True)  # and the leases given back
        await self._http.close()

    async def embed(
        self,
        model: str,
        inputs: list[str] | list[list[int]],
        local_counts: Sequence[int],
        dimensions: int | None,
        user: str | None,
        *,
        team: str | None = None,
        on_lost: Callable[[str, int], None] | None = None,
        asked: float | None = None,
        gave_up: Callable[[], bool] | None = None,
        input_type: str | None = None,
    ) -> UpstreamResult:
        """`team`: the requesting key's team; calls merge only within a team (their usage is shared by counts).
        `on_lost(column, tokens)`: what failed attempts carrying these inputs may have cost ("failed" or
        "unconfirmed", see the module's doc), as they happen.
        `asked`: when the request first asked (`now()`; default: now), from which its deadline counts, also when it
        sends inputs again; `gave_up()`: whether the request gave up (a call nobody waits for is not sent);
        `input_type`: the portable input type the inputs are embedded as (mapped per provider by kinds/)."""
        asked = self._clock() if asked is None else asked
        if self._batcher is not None and self._settings.models[model].micro_batching:
            result, served = await self._batcher.submit(model, inputs, local_counts, dimensions, user, team=team,
                                                        asked=asked, on_lost=on_lost, gave_up=gave_up,
                                                        input_type=input_type)
        else:
            self._observe_call(model, 1, len(inputs))
            lost = None if on_lost is None else (lambda column, tokens: on_lost(column, sum(tokens)))
            result, served = await self._call(model, inputs, list(local_counts), dimensions, user, asked, lost,
                                              gave_up, input_type)
        if (difference := sum(result.tokens) - sum(local_counts)) and model not in self._mismatched:
            self._warn_mismatch(model, difference)  # a call of this request alone: the upstream's count is billed
        names = SERVED_BY.get()
        if names is not None and served not in names:
            names.append(served)
        return result

    def _limits(self, model: str) -> tuple[int, int]:
        """What one merged call may carry: the model's batch limits, and no more tokens than the largest tokens
        per window any of its deployments allows by its headers (a larger call could never fit anywhere: sent, it
        would only be answered 429). Without a known limit on some deployment, the upstream decides."""
        spec = self._settings.models[model]
        allowed = max((min(d.budget.tokens.limit or math.inf, d.limits[1] or math.inf)
                       for d in self.router.models[model]), default=math.inf)
        tokens = spec.max_batch_tokens if math.isinf(allowed) else min(spec.max_batch_tokens, int(allowed))
        return spec.max_batch_items, max(tokens, 1)

    def _observe_call(self, model: str, callers: int, inputs: int) -> None:
        if self._metrics is not None:
            self._metrics.observe_merged_call(model, callers, inputs)

    def _observe_mismatch(self, model: str, difference: int) -> None:
        """A merged call's usage differed from its local counts by `difference` tokens, told to no client (more:
        the callers' failed tokens, batching.py)."""
        if self._metrics is not None:
            self._metrics.add(self._metrics.usage_mismatch_tokens, model, "over" if difference > 0 else "under",
                              amount=abs(difference))
        if model not in self._mismatched:
            self._warn_mismatch(model, difference)

    def _warn_mismatch(self, model: str, difference: int) -> None:
        """Once per model and process: its server does not count tokens as its tokenizer setting says."""
        self._mismatched.add(model)
        log.warning("model %s: the upstream's usage differs from the local token counts (by %+d tokens in one "
                    "call): check the model's tokenizer and count_special_tokens, and how its server counts "
                    "(README, self-hosted models)", model, difference)

    async def _call(
        self, model: str, inputs: list[str] | list[list[int]], counts: list[int], dimensions: int | None,
        user: str | None, asked: float, lost: Lost | None = None, gave_up: Callable[[], bool] | None = None,
        input_type: str | None = None,
    ) -> Served:
        """One upstream call for requests the earliest of which asked at `asked` (its deadline counts from then);
        `lost` sees, per input, what each failed attempt may have cost; `gave_up()` says whether every one of them
        gave up (then it is not sent). Its steps: choose a deployment (or wait for one), decide what follows a
        failed attempt, attempt holding a slot, remember the failure."""
        spec = self._settings.models[model]
        deployments = self.router.models[model]
        call = CallState(deadline=asked + max(d.settings.deadline_s for d in deployments),
                         retries=max(d.settings.max_retries for d in deployments))
        tokens = sum(counts)
        dims = dimensions or spec.dimensions
        payloads: dict[tuple[str, str], bytes] = {}  # one body per kind and upstream model name
        # After any sleep the deployment is chosen again (cooldowns and budgets change meanwhile).
        while True:
            chosen = await self._choose(model, tokens, call)
            if chosen is None:
                continue  # it waited for a deployment to be able to take the call
            d, now = chosen
            if call.error is not None and not call.backed_off and await self._after_failure(model, d, now, call):
                continue  # it backed off
            call.waited = call.backed_off = False
            shape = (d.settings.kind, d.upstream_model)
            if shape not in payloads:
                payloads[shape] = make_body(d.settings, d.upstream_model, Outgoing(
                    inputs, spec.upstream_base64, dimensions, user, input_type, spec.provider_truncation))
            outcome = await self._send(d, payloads[shape], tokens, inputs, counts, dims, call, gave_up)
            if outcome is None:
                call.backed_off = True  # paused or out of room while this call waited: choose again (a retry was
                continue  # counted already)
            if isinstance(outcome, UpstreamResult):
                return outcome, d.upstream
            report_lost(self._metrics, d, outcome, counts, lost)
            call.failed(d, outcome)

    async def _choose(self, model: str, tokens: int, call: CallState) -> tuple[Deployment, float] | None:
        """The deployment for the next attempt and the time now; None after waiting for one to be able to take the
        call (it is chosen again then). UpstreamTimeout past the deadline; the refusal when none can take the call
        within the deadline (and `max_queue_wait_s`, for a rate limit), without an upstream call."""
        now = self._clock()
        if now >= call.deadline:
            raise UpstreamTimeout(PAST_DEADLINE)
        choice = self.router.choose(model, tokens, now, call.tried, call.refused)
        if choice.deployment is not None:
            return choice.deployment, now
        if not call.may_wait(choice, now):
            raise refusal(model, choice, call.error)
        await self._queue(model, choice.wait)
        call.waited_for(choice)
        return None

    async def _after_failure(self, model: str, d: Deployment, now: float, call: CallState) -> bool:
        """The last attempt failed and `d` is chosen next: a failover (counted), a retry, or a backoff's sleep
        (True: choose again after it); raises the last error when the call gives up (callstate.py)."""
        step, wait = call.after_failure(d, now, self._rng)
        assert call.error is not None and call.previous is not None
        self._retrying(model, call.attempts, call.error, wait)
        if step == "failover" and self._metrics is not None:
            self._metrics.add(self._metrics.upstream_failovers, model, call.previous.upstream)
        if step != "backoff":
            return False
        await self._sleep(wait)
        call.backed_off = True
        return True

    async def _send(
        self, d: Deployment, payload: bytes, tokens: int, inputs: Sequence[str | list[int]], counts: Sequence[int],
        dims: int, call: CallState, gave_up: Callable[[], bool] | None,
    ) -> UpstreamResult | Failure | None:
        """The attempt at `d`, holding one of its upstream's slots, sent only while still worth it (permits.py);
        it goes as the pause's probe when one is due (router.py). None: `d` was paused or ran out of room while the
        call waited for the slot (nothing sent)."""
        probe, answered = False, None  # answered: whether the probe was answered (None: no outcome, cancelled)
        ticket: Ticket | None = None
        outcome: UpstreamResult | Failure | None = None
        sent = False  # the attempt went out: cancelled before its outcome, the upstream may have counted it
        await self._slots.take(d, call.deadline)
        try:
            now = self._slots.check(d, call.deadline, gave_up)
            probe = d.probe_due(now)  # paused or past a cooldown: this call goes as its probe (router.py)
            if not probe and (d.down_for(now) > 0 or d.rate_wait(tokens, now) > 0):
                return None
            if self.limiter.wanted(d):  # reserved fleet-wide first (limiting.py): no room, choose again
                ticket = await self.limiter.reserve(d, tokens, now)
                if ticket is None:
                    return None
            if probe:  # claimed fleet-wide first (sharing.py): a claim refused, another process probes it
                probe = False
                if not await self.router.share.claim_probe(d, d.settings.attempt_timeout_s):
                    return None
                probe = True
                self.router.probe_started(d, now + d.settings.attempt_timeout_s + PROBE_HOLD_MARGIN_S)
            call.tried[d.upstream] = call.tried.get(d.upstream, 0) + 1
            sent = True
            outcome = await self._attempts.run(d, payload, tokens, inputs, counts, dims,
                                               min(d.settings.attempt_timeout_s, call.deadline - now),
                                               None if ticket is None else ticket.hear)
            # A 4xx about the request is an answer, not a 429: the upstream takes calls again (the client's
            # input says nothing against the deployment, and must not keep it paused for everyone).
            answered = isinstance(outcome, UpstreamResult) or isinstance(outcome.error, InvalidRequest)
            return outcome
        finally:
            self._slots.release(d)
            if ticket is not None:
                self.limiter.done(d, ticket, tokens if sent and outcome is None else billed(outcome, tokens))
            if probe:
                self.router.share.tell(d, "probed", -1.0 if answered is None else float(answered))
            if probe and self.router.probe_done(d, answered, self._clock()):
                log.warning("upstream %s (model %s) answered its probe: it is back", d.upstream, d.model)

    def _retrying(self, model: str, attempts: int, error: ProxyError, wait: float) -> None:
        if self._on_retry is not None:
            self._on_retry(model, error.code or "error")
        log.info("upstream attempt %d failed (%s); retrying in %.3fs", attempts, error.code, wait)

    async def _queue(self, model: str, wait: float) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.upstream_queue_wait, model).observe(wait)
        await self._sleep(wait)

    def share_limits(self, shared: SharedLimits) -> None:
        """Reserve limited deployments' calls in the fleet's store (limiting.py)."""
        self.limiter.shared = shared

    def share_health(self, shared: SharedHealth) -> list[tuple[str, str]]:
        """Book health in the fleet's store too (sharing.py); the (model, upstream) pairs it serves."""
        self.router.share.shared = shared
        return [(d.model, d.upstream) for d in self.router.deployments()]

    def apply_health(self, model: str, upstream: str, fails: int, cool_in: float, paused_in: float, probe_in: float,
                     held_in: float, silent: bool = False) -> None:
        """The fleet's state of a deployment (seconds from now: cooldown, pause, probe due, probe held; whether it
        is silent)."""
        self.router.apply(model, upstream, fails, cool_in, paused_in, probe_in, held_in, self._clock(), silent)

    def refresh_gauges(self) -> None:
        """Cooldown and remaining-capacity gauges, as of now (before every scrape and every second)."""
        if self._metrics is not None:
            status.refresh_gauges(self._metrics, self.router.deployments(), self._clock(), self.limiter.fleet)

    def snapshot(self) -> list[dict[str, Any]]:
        """Each deployment's state, for GET /admin/upstreams and `embedding-proxy upstreams`."""
        return status.snapshot(self.router.deployments(), self._clock(), time.time())


def billed(outcome: UpstreamResult | Failure | None, tokens: int) -> int:
    """What an attempt of `tokens` cost by the upstream's account: an answer's usage, a refused answer's, the local
    counts when it may have been billed unseen, else nothing (never sent, or refused: a 429, a 5xx)."""
    if isinstance(outcome, UpstreamResult):
        return sum(outcome.tokens)
    if outcome is None:
        return 0
    if outcome.billed is not None:
        return sum(outcome.billed)
    return tokens if outcome.unconfirmed else 0
