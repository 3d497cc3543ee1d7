"""Pacing by the upstream's own rate-limit headers.

OpenAI and Azure answer every call (429s included) with `x-ratelimit-remaining-requests/-tokens` and
`x-ratelimit-reset-requests/-tokens` (a duration such as `1s`, `6m0s`, `850ms`), and usually
`x-ratelimit-limit-requests/-tokens`. A `Budget` keeps the last of them for one deployment, minus what this process
has sent since, and says how long a call of N tokens has to wait before it fits. Until a deployment's headers are
known, every call fits: the upstream decides.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SCALE = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_MAX_RESET_S = 24 * 3600.0  # a reset further away than this is not believed (a bad header must not stall calls)


def parse_duration(text: str) -> float | None:
    """`6m0s`, `1s`, `850ms`, `1h2m3.5s`, or a plain number of seconds -> seconds; None if it is neither."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pos, value = 0, 0.0
        for m in _PART.finditer(text):
            if m.start() != pos:
                return None
            value += float(m.group(1)) * _SCALE[m.group(2)]
            pos = m.end()
        if pos != len(text):
            return None
    if not math.isfinite(value) or value < 0:
        return None
    return min(value, _MAX_RESET_S)


def header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n >= 0 else None


def rate_headers(headers: Mapping[str, str], name: str) -> tuple[int | None, float | None, int | None]:
    """Remaining, seconds to reset and limit of `name` (requests or tokens), as an answer's headers say (None: not)."""
    return (header_int(headers, f"x-ratelimit-remaining-{name}"),
            parse_duration(headers.get(f"x-ratelimit-reset-{name}", "")),
            header_int(headers, f"x-ratelimit-limit-{name}"))


class _Limit:
    """One dimension (requests or tokens) of one deployment's upstream rate limit."""

    __slots__ = ("limit", "remaining", "reset_at", "window")

    def __init__(self) -> None:
        self.limit: int | None = None
        self.remaining: int | None = None  # None: unknown, every call fits
        self.reset_at = 0.0
        self.window = 0.0  # the longest reset the upstream named: how long a full window lasts, at most

    def observe(self, headers: Mapping[str, str], name: str, now: float, in_flight: int) -> None:
        remaining, reset, limit = rate_headers(headers, name)
        if remaining is None:
            return
        self.limit = limit or self.limit
        # Calls still in flight were most likely not counted yet by the upstream when it answered this one.
        self.remaining = max(0, remaining - in_flight)
        self.reset_at = now + reset if reset is not None else now
        self.window = max(self.window, reset or 0.0)

    def current(self, now: float) -> int | None:
        if self.remaining is not None and now >= self.reset_at:
            # The window has reset: the whole limit again (unknown without one), once. What this process sends from
            # now on is taken from it until an answer's headers say more; the new window ends within `window`.
            self.remaining = self.limit
            self.reset_at = now + self.window
        return self.remaining

    def wait(self, amount: int, now: float) -> float:
        left = self.current(now)
        if left is None or amount <= left:
            return 0.0
        if self.limit is not None and amount > self.limit and left == self.limit:
            return 0.0  # can never fit: let the upstream decide rather than wait forever
        return max(0.0, self.reset_at - now)

    def take(self, amount: int, now: float) -> None:
        if self.current(now) is not None:
            self.remaining = max(0, (self.remaining or 0) - amount)


class Budget:
    """What one deployment's upstream still allows, by its last headers and the calls sent since."""

    def __init__(self) -> None:
        self.requests = _Limit()
        self.tokens = _Limit()
        self.in_flight = 0
        self.in_flight_tokens = 0

    def wait(self, tokens: int, now: float) -> float:
        """Seconds until a call of `tokens` fits (0: now)."""
        return max(self.requests.wait(1, now), self.tokens.wait(tokens, now))

    def take(self, tokens: int, now: float) -> None:
        self.requests.take(1, now)
        self.tokens.take(tokens, now)
        self.in_flight += 1
        self.in_flight_tokens += tokens

    def done(self, tokens: int) -> None:
        self.in_flight -= 1
        self.in_flight_tokens -= tokens

    def observe(self, headers: Mapping[str, str], now: float, tokens: int) -> None:
        """The headers of an answer to a call of `tokens`, which still counts as in flight."""
        self.requests.observe(headers, "requests", now, self.in_flight - 1)
        self.tokens.observe(headers, "tokens", now, self.in_flight_tokens - tokens)

    def reset_in(self, now: float) -> float | None:
        """Seconds until the later of the known resets, when a limit is exhausted (for a 429's pause)."""
        waits = [lim.reset_at - now for lim in (self.requests, self.tokens)
                 if lim.remaining is not None and lim.remaining <= 0 and lim.reset_at > now]
        return max(waits) if waits else None

    def remaining(self, now: float) -> tuple[int | None, int | None]:
        return self.requests.current(now), self.tokens.current(now)
