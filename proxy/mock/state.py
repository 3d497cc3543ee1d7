"""What the mock upstream is told (`MockSettings`, its models) and what it counts (`MockState`: requests,
bodies, what it billed, pending failures, the rate-limit window), both hung off the app by `web.AppKey`.

The rate limit lives here too: it is a window over this state, and the headers it sends are OpenAI's
x-ratelimit-* ones, so a client's pacing can be tested against them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from typing import Any

from aiohttp import web

from .faults import FAIL_MODES, Failure


@dataclasses.dataclass(frozen=True)
class MockModel:
    dimensions: int
    supports_dimensions: bool
    tokenizer: str | None = None  # a Hugging Face tokenizer.json: text is counted and embedded by its ids
    special_tokens: bool = True  # whether those ids include the special tokens it adds (TEI: yes; Infinity: no)


def _default_models() -> dict[str, MockModel]:
    small, large, ada = MockModel(1536, True), MockModel(3072, True), MockModel(1536, False)
    return {"text-embedding-3-small": small, "text-embedding-3-large": large, "text-embedding-ada-002": ada}


@dataclasses.dataclass
class MockSettings:
    api_key: str | None = None  # when set, /v1 requests need `Authorization: Bearer <api_key>`
    latency_ms: float = 0.0  # added sleep per embeddings request
    latency_per_input_ms: float = 0.0  # and per input in it (a large batch takes longer, as on a real server)
    token_skew: int = 0  # extra tokens reported in `usage` per input
    shuffle: bool = False  # return `data` in reversed order (indexes stay correct)
    floats_only: bool = False  # answer float arrays even when asked for base64, as some compatible servers do
    models: dict[str, MockModel] = dataclasses.field(default_factory=_default_models)
    # Azure route: deployment name -> model (a deployment named like a model serves that model).
    azure_deployments: dict[str, str] = dataclasses.field(default_factory=dict)
    # Rate limits per window (0: none), counted over requests that were answered (429s are not counted).
    rpm: int = 0
    tpm: int = 0
    rate_window_s: float = 60.0
    max_in_flight: int = 0  # calls in flight at once beyond which it answers 429 (0: none)
    # False: the limits above are enforced without x-ratelimit-* headers (and their 429s carry no Retry-After), as
    # upstreams that enforce limits they do not announce (the proxy's own rpm / tpm / max_in_flight are for them).
    announce_limits: bool = True
    # As Infinity: an input string of only whitespace, control and format characters (" ", "\n", "\u200b") is 0
    # tokens, answered 200; a string over `max_chars` characters is refused with FastAPI's 422 (0: no limit).
    strip_empty: bool = False
    max_chars: int = 0


class MockState:
    """Counters and pending failures of one mock app."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()  # set on app shutdown, so a "timeout" stall does not hold it up
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.inputs = 0
        # What it billed: the true token count of every 200 answer it sent, in all and per request `user`.
        self.billed_tokens = 0
        self.billed: collections.Counter[str] = collections.Counter()
        self.last_authorization: str | None = None
        self.bodies: list[dict[str, Any]] = []
        self.pending: collections.deque[Failure] = collections.deque()
        self.huge_body_sent = 0  # bytes of "huge_body" answers the client took before it hung up
        self.last_path: str | None = None  # path and query of the last embeddings request
        self.last_api_key: str | None = None  # its `api-key` header (Azure)
        self.last_traceparent: str | None = None  # its W3C `traceparent` header (tracing tests)
        self.last_tracestate: str | None = None
        self.rate_limited = 0  # 429s sent for the rpm/tpm limit
        self.window_start = -math.inf
        self.in_flight = 0
        self.peak_in_flight = 0  # the most calls in flight at once it saw
        self.answered: list[tuple[float, int]] = []  # (monotonic time, tokens) of every call answered 200
        self.window_requests = 0
        self.window_tokens = 0

    def fail_next(self, mode: str, times: int = 1, status: int = 500, retry_after: float | str | None = None,
                  retry_after_ms: str | None = None) -> None:
        """Queue `times` failures. The "status" mode's `retry_after` in seconds is sent as both `Retry-After` and
        `retry-after-ms`; a string (`"1e309"`, `"soon"`, a date) as `Retry-After` alone, verbatim, and
        `retry_after_ms` as `retry-after-ms`, verbatim."""
        if mode not in FAIL_MODES:
            raise ValueError(f"unknown failure mode {mode!r}; known: {sorted(FAIL_MODES)}")
        if times < 1 or not 100 <= status <= 599:
            raise ValueError("times must be >= 1 and status a valid HTTP status")
        self.pending.extend([Failure(mode, status, retry_after, retry_after_ms)] * times)


MOCK_STATE = web.AppKey("mock_state", MockState)
MOCK_SETTINGS = web.AppKey("mock_settings", MockSettings)


def _duration(seconds: float) -> str:
    """OpenAI's reset format (`1s`, `6m0s`, `850ms`), rounded up so a client that trusts it is never early."""
    ms = math.ceil(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms / 1000, 60)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


def busiest_window(state: MockState, window_s: float) -> tuple[int, int]:
    """The most calls and the most tokens answered 200 within any `window_s` seconds."""
    calls = tokens = 0
    times, start, held = state.answered, 0, 0
    for end, (at, amount) in enumerate(times):
        held += amount
        while at - times[start][0] >= window_s:
            held -= times[start][1]
            start += 1
        calls, tokens = max(calls, end - start + 1), max(tokens, held)
    return calls, tokens


def rate_limit(state: MockState, settings: MockSettings, tokens: int) -> tuple[bool, dict[str, str]]:
    """Whether a call of `tokens` fits the current window (and is counted), and the headers to send (none when the
    limits are not announced)."""
    if not settings.rpm and not settings.tpm:
        return True, {}
    now = time.monotonic()
    if now >= state.window_start + settings.rate_window_s:
        state.window_start, state.window_requests, state.window_tokens = now, 0, 0
    fits = (not settings.rpm or state.window_requests + 1 <= settings.rpm) and (
        not settings.tpm or state.window_tokens + tokens <= settings.tpm)
    if fits:
        state.window_requests += 1
        state.window_tokens += tokens
    reset = _duration(state.window_start + settings.rate_window_s - now)
    headers: dict[str, str] = {}
    if not settings.announce_limits:
        return fits, headers
    for name, limit, used in (("requests", settings.rpm, state.window_requests),
                              ("tokens", settings.tpm, state.window_tokens)):
        if limit:
            headers[f"x-ratelimit-limit-{name}"] = str(limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - used))
            headers[f"x-ratelimit-reset-{name}"] = reset
    return fits, headers
