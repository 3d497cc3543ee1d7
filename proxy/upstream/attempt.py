"""One attempt at one deployment: the POST, the checked answer, and what the attempt tells of the deployment.

The caller holds one of the upstream's slots (permits.py). The attempt takes its tokens from the deployment's
pacing budget for as long as it runs, learns the rate-limit headers of the answer, and books the outcome: a success
resets the deployment's failure count, a failure (other than the client's own invalid input) counts towards its
cooldown or, a 429, pauses it (router.py). Any answer (its headers, or a refused or reset connection) is heard by
the deployment's silence (silence.py) and ends a silence; an attempt that timed out with nothing heard since it was
sent may make the deployment silent. Each attempt is a CLIENT span whose context goes upstream as
traceparent, and one observation of `upstream_deployment_seconds` by outcome.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

from ..errors import ProxyError, UpstreamBadGateway, UpstreamTimeout
from ..telemetry.metrics import Metrics, upstream_error_kind
from ..telemetry.tracing import Span, Tracing
from .failures import Failure
from .http import RetryableError, Target, UpstreamClient, UpstreamResult, answer_limit, read_answer
from .permits import MIN_ATTEMPT_S
from .router import Deployment, Router

log = logging.getLogger("proxy.upstream")
LATE_S = 0.05  # a silence watch that runs this late: the loop stalled; it looks again once what came meanwhile is read


class Attempts:
    def __init__(self, http: UpstreamClient, router: Router, clock: Callable[[], float], metrics: Metrics | None,
                 tracing: Tracing) -> None:
        self._http = http
        self._router = router
        self._clock = clock
        self._metrics = metrics
        self._tracing = tracing

    async def run(
        self, d: Deployment, payload: bytes, tokens: int, inputs: Sequence[str | list[int]], counts: Sequence[int],
        dims: int, limit_s: float, hear: Callable[[Mapping[str, str]], None] | None = None,
    ) -> UpstreamResult | Failure:
        """The checked answer (vectors, per-input tokens within the usage bounds), or what went wrong; `hear` gets
        the answer's headers (the fleet's limits, limiting.py)."""
        with self._tracing.upstream_span(d, len(counts)) as span:  # a CLIENT span, sent upstream as traceparent
            outcome = await self._post(d, payload, tokens, inputs, counts, dims, limit_s, span, hear)
            if span.is_recording():
                if isinstance(outcome, UpstreamResult):
                    span.set_attribute("gen_ai.usage.input_tokens", sum(outcome.tokens))
                else:
                    span.fail(upstream_error_kind(outcome.error))
            return outcome

    @staticmethod
    async def _signed(d: Deployment, target: Target, payload: bytes, limit_s: float) -> tuple[Target, float]:
        """`target` with the headers `d.auth` sets, and what is left of `limit_s` after getting them: credentials
        that cannot be had in the attempt's time (a stalled token endpoint) fail the attempt, nothing sent."""
        assert d.auth is not None
        begun = time.monotonic()
        try:
            async with asyncio.timeout(limit_s):
                headers = await d.auth.headers(target[0], payload, target[1])
            left = limit_s - (time.monotonic() - begun)
            if left < MIN_ATTEMPT_S:  # too little to read an answer that would still be billed
                raise TimeoutError
        except TimeoutError:
            raise RetryableError(UpstreamTimeout("Could not get the provider's credentials in time.")) from None
        return (target[0], headers, target[2]), left

    async def _post(
        self, d: Deployment, payload: bytes, tokens: int, inputs: Sequence[str | list[int]], counts: Sequence[int],
        dims: int, limit_s: float, span: Span, hear: Callable[[Mapping[str, str]], None] | None,
    ) -> UpstreamResult | Failure:
        budget = d.budget
        budget.take(tokens, sent_at := self._clock())
        size = d.silence.factor(tokens)  # a call larger than usual is given longer before it is silence
        token = d.silence.sent(sent_at, size)
        watch = self._watch(d, size)
        answered: list[Mapping[str, str]] = []  # the answer's headers (Bedrock counts tokens in them)
        heard = False  # the deployment answered (headers, or a refused or reset connection)

        def on_headers(status: int, headers: Mapping[str, str]) -> None:
            now = self._clock()
            if not answered:
                d.silence.heard(now - sent_at, size, tokens)
            budget.observe(headers, now, tokens)
            if hear is not None:
                hear(headers)
            span.set_attribute("http.response.status_code", status)
            answered.append(headers)

        m = self._metrics
        started = time.perf_counter()
        try:  # the caller holds one of the upstream's slots
            target = d.target if not self._tracing.enabled else (
                d.target[0], self._tracing.upstream_headers(d.target[1]), d.target[2])
            if d.auth is not None:  # a signature over this body, or a fresh token: inside the attempt's time
                target, limit_s = await self._signed(d, target, payload, limit_s)
            provider = None if d.kind is None or d.kind.openai_shaped else d.kind
            # Cohere's answers echo the texts: a provider's answer may also be as large as the call's body
            limit = answer_limit(len(counts), dims) + (0 if provider is None else len(payload))
            raw = await self._http.post(target, payload, limit_s, limit, on_headers,
                                        refuse=None if provider is None else provider.refusal)
            answer = read_answer(raw, inputs, counts, dims, None if provider is None else provider.parse,
                                 answered[-1] if answered else None)
        except RetryableError as exc:
            failure = Failure(exc.error, exc.retry_after, final=False, billed=exc.billed,
                              unconfirmed=exc.unconfirmed)
            heard = bool(answered) or not exc.silent
            if heard and not answered:  # a refused or reset connection: an answer of a kind
                d.silence.heard(self._clock() - sent_at, size)
        except ProxyError as exc:  # 400 (relayed), refused credentials, other statuses: not worth a retry here
            # ... unless the refused credentials were a cached token the kind dropped (Vertex): a new one may pass
            again = (d.auth is not None and isinstance(exc, UpstreamBadGateway) and exc.kind == "auth"
                     and d.auth.rejected(target[1]))
            failure = Failure(exc, None, final=not again)
            heard = bool(answered)  # else no call went out (a token or signature that could not be made)
        else:
            if d.fails or d.half_open or d.silent:  # a streak, a cooldown's trial or a silence ends: fleet-wide too
                self._router.share.tell(d, "ok")
            self._router.succeeded(d, self._clock())
            if m is not None:
                m.observe_deployment(d.model, d.upstream, "ok", time.perf_counter() - started)
            return answer
        finally:
            budget.done(tokens)
            unheard = d.silence.ended(token)
            for handle in watch:
                handle.cancel()
        kind = self._failed(d, failure, heard)
        if unheard and not heard:  # nothing from it since this call went out: silent, if that was long enough
            self._router.notice(d, self._clock(), sent_at, size)
        if m is not None:
            m.observe_deployment(d.model, d.upstream, kind, time.perf_counter() - started)
        return failure

    def _watch(self, d: Deployment, size: float) -> list[asyncio.TimerHandle]:
        """A call to `d` goes out now: look again when, unanswered, it would make `d` silent (the fleet hears of it
        then, not at this process's next call to the model); the timers to cancel when it ends. A look that runs
        late (the event loop stalled: a large input tokenized, a GC pause) looks once more a moment later: an answer
        that came during the stall is read first, which a timer run in the same loop pass would not see."""
        handles: list[asyncio.TimerHandle] = []
        after = d.silence.threshold(d.settings, size)
        if d.silent or d.solo or math.isinf(after):
            return handles
        loop = asyncio.get_running_loop()
        due = loop.time() + after + 0.001

        def look() -> None:
            if len(handles) == 1 and loop.time() - due > LATE_S:
                handles.append(loop.call_later(LATE_S, look))
            else:
                self._router.notice(d, self._clock())

        handles.append(loop.call_at(due, look))
        return handles

    def _failed(self, d: Deployment, failure: Failure, heard: bool) -> str:
        """Book a failed attempt (`heard`: the deployment answered it) here and in the fleet; its error kind."""
        kind = upstream_error_kind(failure.error)
        now = self._clock()
        if kind == "invalid_request":  # the client's input: no failure of the deployment, but an answer
            if heard and d.silent:
                self._router.share.tell(d, "heard")
                self._router.heard(d)
            return kind
        cooled = self._router.failed(d, kind, now, failure.retry_after, heard)
        if kind == "rate_limited":
            self._router.share.tell(d, "pause", max(d.paused_until - now, 0.0))
        else:
            self._router.share.tell(d, "fail", 1.0 if heard else 0.0)
        if cooled:
            log.warning("upstream %s (model %s) is cooling down for %gs after %d failed calls in a row (%s)",
                        d.upstream, d.model, d.settings.cooldown_s, d.settings.allowed_fails, kind)
        return kind
