"""The fleet client: what the service calls for a model's misses.

One call: micro-batched with concurrent ones (batching.py), then attempts inside the deadline of the model's
deployments. Each attempt goes to the deployment the router picks (router.py); a failed attempt goes next to a
deployment not tried yet when one can take the call now, else it is a retry of the same ones with backoff
(`max_retries`). When none can take the call now (cooling down, paused by a 429, or out of room by its rate-limit
headers), the call waits for the first that can, if that is within the deadline (and within `max_queue_wait_s` for
a rate limit); otherwise the proxy answers 429 or 503 with Retry-After, without an upstream call. An upstream 400
is the client's input: relayed, and no failure of the deployment.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ..config import Settings
from ..errors import InvalidRequest, ProxyError, RateLimited, ServiceUnavailable, UpstreamTimeout
from ..metrics import Metrics, upstream_error_kind
from ..tracing import NO_TRACING, Span, Tracing
from .batching import MicroBatcher, Served
from .http import RetryableError, UpstreamClient, UpstreamResult, answer_limit, parse_answer, usage_tokens
from .kinds import make_body
from .router import Choice, Deployment, Router

log = logging.getLogger("proxy.upstream")
_MAX_BACKOFF_S = 5.0

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
        self._tracing = tracing
        self._http = UpstreamClient(settings)  # the connection pool and the per-attempt POST
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._on_retry = on_retry
        self._metrics = metrics
        self.router = Router(settings, self._rng)
        self._permits = {name: asyncio.Semaphore(u.max_concurrency) for name, u in settings.upstreams.items()}
        self._batcher = MicroBatcher(self._call, self._limits, self._observe_call, tracing) if batching else None
        if metrics is not None:
            metrics.register_fleet([(d.model, d.upstream) for d in self.router.deployments()], self.refresh_gauges)

    async def start(self) -> None:
        await self._http.start()

    async def close(self) -> None:
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
    ) -> UpstreamResult:
        """`team`: the requesting key's team; calls merge only within a team (their usage is shared by counts)."""
        asked = self._clock()
        if self._batcher is not None and self._settings.models[model].micro_batching:
            result, served = await self._batcher.submit(model, inputs, local_counts, dimensions, user, team=team,
                                                        asked=asked)
        else:
            self._observe_call(model, 1, len(inputs))
            result, served = await self._call(model, inputs, list(local_counts), dimensions, user, asked)
        names = SERVED_BY.get()
        if names is not None and served not in names:
            names.append(served)
        return result

    def _limits(self, model: str) -> tuple[int, int]:
        """What one merged call may carry: the model's batch limits, and no more tokens than the largest tokens
        per window any of its deployments allows by its headers (a larger call could never fit anywhere: sent, it
        would only be answered 429). Without a known limit on some deployment, the upstream decides."""
        spec = self._settings.models[model]
        allowed = max((d.budget.tokens.limit or math.inf for d in self.router.models[model]), default=math.inf)
        tokens = spec.max_batch_tokens if math.isinf(allowed) else min(spec.max_batch_tokens, int(allowed))
        return spec.max_batch_items, max(tokens, 1)

    def _observe_call(self, model: str, callers: int, inputs: int) -> None:
        if self._metrics is not None:
            self._metrics.observe_merged_call(model, callers, inputs)

    async def _call(
        self, model: str, inputs: list[str] | list[list[int]], counts: list[int], dimensions: int | None,
        user: str | None, asked: float,
    ) -> Served:
        """One upstream call for requests the earliest of which asked at `asked` (its deadline counts from then)."""
        spec = self._settings.models[model]
        deployments = self.router.models[model]
        deadline = asked + max(d.settings.deadline_s for d in deployments)
        retries = max(d.settings.max_retries for d in deployments)
        tokens = sum(counts)
        dims = dimensions or spec.dimensions
        tried: dict[str, int] = {}  # upstream -> attempts in this call
        refused: set[str] = set()  # deployments that refused this call for good (credentials)
        payloads: dict[tuple[str, str], bytes] = {}  # one body per kind and upstream model name
        error: ProxyError | None = None
        retry_after: float | None = None
        previous: Deployment | None = None
        # After any sleep the deployment is chosen again (cooldowns and budgets change meanwhile). A wait for a
        # deployment to come back (or for a rate limit's reset) is followed by an attempt, retries left or not: a
        # wait that ends without a call would be for nothing. A backoff's retry was counted before its sleep.
        waited = backed_off = False
        rate_waited = 0.0  # max_queue_wait_s bounds this call's waits for rate limits in all, not each
        while True:
            now = self._clock()
            if now >= deadline:
                raise UpstreamTimeout("The upstream did not answer within the proxy's deadline.")
            choice = self.router.choose(model, tokens, now, tried, refused)
            d = choice.deployment
            if d is None:
                max_wait = choice.max_wait - rate_waited if choice.rate_limited else choice.max_wait
                if choice.wait > max_wait or choice.wait >= deadline - now:
                    raise self._refusal(model, choice, error)
                await self._queue(model, choice.wait)
                if choice.rate_limited:
                    rate_waited += choice.wait
                waited = True
                continue
            if error is not None and not backed_off:
                assert previous is not None
                if d.upstream not in tried:  # a failover, at once
                    self._retrying(model, sum(tried.values()), error, 0.0)
                    if self._metrics is not None:
                        self._metrics.add(self._metrics.upstream_failovers, model, previous.upstream)
                elif waited:  # it came back: try it
                    retries = max(retries - 1, 0)
                    self._retrying(model, sum(tried.values()), error, 0.0)
                else:  # every deployment that can take the call has failed it: a retry, after a backoff
                    if retries == 0:
                        raise error
                    retries -= 1
                    used = max(d.settings.max_retries - retries - 1, 0)
                    wait = retry_after if retry_after is not None else self._rng.uniform(
                        0, min(_MAX_BACKOFF_S, d.settings.backoff_base_s * 2**used))
                    if wait >= deadline - now:  # no use waiting past the deadline: fail now
                        raise error
                    self._retrying(model, sum(tried.values()), error, wait)
                    await self._sleep(wait)
                    backed_off = True
                    continue
            waited = backed_off = False
            tried[d.upstream] = tried.get(d.upstream, 0) + 1
            shape = (d.settings.kind, d.upstream_model)
            if shape not in payloads:
                payloads[shape] = make_body(d.settings, d.upstream_model, inputs, spec.upstream_base64, dimensions,
                                            user)
            outcome = await self._attempt(d, payloads[shape], tokens, counts, dims,
                                          min(d.settings.attempt_timeout_s, deadline - self._clock()))
            if isinstance(outcome, UpstreamResult):
                return outcome, d.upstream
            previous, error, retry_after = d, outcome.error, outcome.retry_after
            if outcome.final:
                if isinstance(outcome.error, InvalidRequest) or d.solo:
                    raise outcome.error
                refused.add(d.upstream)

    async def _attempt(
        self, d: Deployment, payload: bytes, tokens: int, counts: Sequence[int], dims: int, limit_s: float,
    ) -> UpstreamResult | _Failure:
        """The checked answer (vectors, per-input tokens within the usage bounds), or what went wrong."""
        with self._tracing.upstream_span(d, len(counts)) as span:  # a CLIENT span, sent upstream as traceparent
            outcome = await self._attempt_in(d, payload, tokens, counts, dims, limit_s, span)
            if span.is_recording():
                if isinstance(outcome, UpstreamResult):
                    span.set_attribute("gen_ai.usage.input_tokens", sum(outcome.tokens))
                else:
                    span.fail(upstream_error_kind(outcome.error))
            return outcome

    async def _attempt_in(
        self, d: Deployment, payload: bytes, tokens: int, counts: Sequence[int], dims: int, limit_s: float,
        span: Span,
    ) -> UpstreamResult | _Failure:
        budget = d.budget
        budget.take(tokens, self._clock())

        def on_headers(status: int, headers: Mapping[str, str]) -> None:
            budget.observe(headers, self._clock(), tokens)
            span.set_attribute("http.response.status_code", status)

        m = self._metrics
        started = time.perf_counter()
        try:
            async with self._permits[d.upstream]:
                target = d.target if not self._tracing.enabled else (
                    d.target[0], self._tracing.upstream_headers(d.target[1]), d.target[2])
                raw = await self._http.post(target, payload, limit_s, answer_limit(len(counts), dims), on_headers)
            vectors, usage = parse_answer(raw, len(counts), dims)
            answer = UpstreamResult(vectors, usage_tokens(usage, counts))
        except RetryableError as exc:
            failure = _Failure(exc.error, exc.retry_after, final=False)
        except ProxyError as exc:  # 400 (relayed), refused credentials, other statuses: not worth a retry here
            failure = _Failure(exc, None, final=True)
        else:
            self.router.succeeded(d)
            if m is not None:
                m.observe_deployment(d.model, d.upstream, "ok", time.perf_counter() - started)
            return answer
        finally:
            budget.done(tokens)
        kind = upstream_error_kind(failure.error)
        if kind != "invalid_request" and self.router.failed(d, kind, self._clock(), failure.retry_after):
            log.warning("upstream %s (model %s) is cooling down for %gs after %d failed calls in a row (%s)",
                        d.upstream, d.model, d.settings.cooldown_s, d.settings.allowed_fails, kind)
        if m is not None:
            m.observe_deployment(d.model, d.upstream, kind, time.perf_counter() - started)
        return failure

    def _retrying(self, model: str, attempts: int, error: ProxyError, wait: float) -> None:
        if self._on_retry is not None:
            self._on_retry(model, error.code or "error")
        log.info("upstream attempt %d failed (%s); retrying in %.3fs", attempts, error.code, wait)

    async def _queue(self, model: str, wait: float) -> None:
        if self._metrics is not None:
            self._metrics.child(self._metrics.upstream_queue_wait, model).observe(wait)
        await self._sleep(wait)

    @staticmethod
    def _refusal(model: str, choice: Choice, error: ProxyError | None) -> ProxyError:
        if math.isinf(choice.wait):
            return error or ServiceUnavailable(f"No upstream deployment of '{model}' can take the call.")
        if choice.rate_limited:
            return RateLimited(
                f"Every upstream deployment of '{model}' is at its rate limit for {choice.wait:.1f}s more; "
                "please retry after that.", retry_after=choice.wait)
        return ServiceUnavailable(
            f"Every upstream deployment of '{model}' is cooling down after failures for {choice.wait:.1f}s more; "
            "please retry after that.", retry_after=choice.wait)

    def refresh_gauges(self) -> None:
        """Cooldown and remaining-capacity gauges, as of now (before every scrape and every second)."""
        m = self._metrics
        if m is None:
            return
        now = self._clock()
        for d in self.router.deployments():
            m.child(m.upstream_cooldown, d.model, d.upstream).set(1 if d.cooling(now) else 0)
            requests, tokens = d.budget.remaining(now)
            if requests is not None:
                m.child(m.upstream_remaining, d.model, d.upstream, "requests").set(requests)
            if tokens is not None:
                m.child(m.upstream_remaining, d.model, d.upstream, "tokens").set(tokens)

    def snapshot(self) -> list[dict[str, Any]]:
        """Each deployment's state, for GET /admin/upstreams and `embedding-proxy upstreams`."""
        now, wall = self._clock(), time.time()

        def at(t: float) -> float | None:
            return round(wall + (t - now), 3) if t > now else None

        out = []
        for d in self.router.deployments():
            requests, tokens = d.budget.remaining(now)
            state = "cooling_down" if d.cooling(now) else ("paused" if d.paused_until > now else "healthy")
            out.append({
                "model": d.model, "upstream": d.upstream, "kind": d.settings.kind,
                "upstream_model": d.upstream_model, "weight": d.weight, "priority": d.priority, "state": state,
                "cooling_down_until": at(d.cool_until), "paused_until": at(d.paused_until),
                "consecutive_failures": d.fails, "cooldowns": d.cooldowns,
                "last_error": d.last_error or None, "last_error_at": round(wall - (now - d.last_error_at), 3)
                if d.last_error else None,
                "remaining_requests": requests, "remaining_tokens": tokens,
                "requests_reset_at": at(d.budget.requests.reset_at), "tokens_reset_at": at(d.budget.tokens.reset_at),
            })
        return out


class _Failure:
    __slots__ = ("error", "final", "retry_after")

    def __init__(self, error: ProxyError, retry_after: float | None, *, final: bool) -> None:
        self.error, self.retry_after, self.final = error, retry_after, final
