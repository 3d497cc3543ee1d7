"""The upstream client: one embeddings call with retries inside a deadline, and a strict check of the answer.

This is the only module that sees aiohttp client errors; they leave it as the proxy's own errors. The upstream's
key is sent in the Authorization header and never appears in an error message or a log line.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson
import pybase64
import yarl

from .config import Settings
from .errors import (
    InvalidRequest,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UpstreamBadGateway,
    UpstreamTimeout,
)

log = logging.getLogger("proxy.upstream")
_RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 5.0


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    vectors: np.ndarray  # (n, d) little-endian float32, in input order
    tokens: list[int]  # per input; sums to the upstream's reported usage


def split_usage(total: int, local: Sequence[int]) -> list[int]:
    """Per-input counts that add up to the upstream's `total`, proportional to the local counts.

    Exact local counts are kept as they are; otherwise largest-remainder apportionment.
    """
    local_sum = sum(local)
    if local_sum == total:
        return list(local)
    if local_sum == 0:
        local, local_sum = [1] * len(local), len(local)
    shares = [total * c // local_sum for c in local]
    order = sorted(range(len(local)), key=lambda i: (-(total * local[i] % local_sum), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("Retry-After", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


Target = tuple[yarl.URL, dict[str, str], str]  # URL, request headers, the key (cut out of relayed messages)


class _Retryable(Exception):
    def __init__(self, error: ProxyError, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


class UpstreamClient:
    def __init__(
        self,
        settings: Settings,
        *,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_retry: Callable[[str, str], None] | None = None,
    ) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._settings = settings
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._on_retry = on_retry
        self._permits = {name: asyncio.Semaphore(u.max_concurrency) for name, u in settings.upstreams.items()}
        # Built once: a parsed URL saves aiohttp ~100 us of CPU per call against parsing a string every time.
        self._targets: dict[str, Target] = {}
        for name, u in settings.upstreams.items():
            api_key = settings.upstream_api_keys.get(name, "")
            headers = {"Content-Type": "application/json"}
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            self._targets[name] = (yarl.URL(u.base_url.rstrip("/") + "/embeddings"), headers, api_key)

    async def start(self) -> None:
        """One keep-alive connection pool per process, opened with the app."""
        pool = max(u.pool_size for u in self._settings.upstreams.values())
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool, limit_per_host=pool, ttl_dns_cache=300),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def embed(
        self,
        model: str,
        inputs: list[str] | list[list[int]],
        local_counts: Sequence[int],
        dimensions: int | None,
        user: str | None,
    ) -> UpstreamResult:
        spec = self._settings.models[model]
        up = self._settings.upstream_for(model)
        body: dict[str, Any] = {"model": self._settings.upstream_model(model), "input": inputs}
        if spec.upstream_base64:
            body["encoding_format"] = "base64"
        if dimensions is not None:
            body["dimensions"] = dimensions
        if user is not None:
            body["user"] = user
        payload = orjson.dumps(body)
        dims = dimensions or spec.dimensions
        deadline = self._clock() + up.deadline_s
        attempt = 0
        async with self._permits[spec.upstream]:
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise UpstreamTimeout("The upstream did not answer within the proxy's deadline.")
                try:
                    raw = await self._attempt(spec.upstream, payload, min(up.attempt_timeout_s, remaining))
                    vectors, usage = parse_answer(raw, len(inputs), dims)
                    return UpstreamResult(vectors, split_usage(usage, local_counts) if usage else list(local_counts))
                except _Retryable as exc:
                    if attempt >= up.max_retries:
                        raise exc.error from None
                    wait = exc.retry_after
                    if wait is None:  # full jitter: uniform in [0, base * 2**attempt], capped
                        wait = self._rng.uniform(0, min(_MAX_BACKOFF_S, up.backoff_base_s * 2**attempt))
                    if wait >= deadline - self._clock():  # no use waiting past the deadline: fail now
                        raise exc.error from None
                    attempt += 1
                    if self._on_retry is not None:
                        self._on_retry(model, exc.error.code or "error")
                    log.info("upstream attempt %d failed (%s); retrying in %.3fs", attempt, exc.error.code, wait)
                    await self._sleep(wait)

    async def _attempt(
        self, name: str, payload: bytes, limit_s: float, target: Target | None = None,
        on_headers: Callable[[int, Mapping[str, str]], None] | None = None,
    ) -> bytes:
        """One POST to upstream `name` (or to `target`: a fleet deployment); `on_headers` sees every answer's
        status and headers (rate-limit pacing)."""
        if self._session is None:
            raise ServiceUnavailable("The upstream client is not running.")
        url, headers, api_key = target or self._targets[name]
        try:
            async with self._session.post(
                url, data=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=limit_s)
            ) as resp:
                if on_headers is not None:
                    on_headers(resp.status, resp.headers)
                body = await resp.read()
                if resp.status == 200:
                    return body
                raise upstream_status_error(resp.status, body, parse_retry_after(resp.headers), secret=api_key)
        except TimeoutError:
            raise _Retryable(UpstreamTimeout("The upstream timed out.")) from None
        except aiohttp.ClientConnectionError as exc:  # refused, reset, dropped mid-answer, DNS, TLS
            raise _Retryable(UpstreamBadGateway(f"Could not reach the upstream ({type(exc).__name__}).",
                                                kind="connect")) from None
        except aiohttp.ClientError as exc:  # e.g. a malformed HTTP answer
            raise _Retryable(UpstreamBadGateway(f"Could not reach the upstream ({type(exc).__name__}).")) from None


def _upstream_message(body: bytes) -> str:
    try:
        message = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""
    return message if isinstance(message, str) else ""


def upstream_status_error(status: int, body: bytes, retry_after: float | None, *, secret: str = "") -> Exception:
    """The proxy error for a non-200 upstream answer, wrapped in _Retryable when another try may help.

    Only a 400's message reaches the client; `secret` (the upstream key) is cut out of it, should an upstream
    or a gateway in between echo the request's credentials."""
    if status == 429:
        return _Retryable(RateLimited("The upstream is rate limiting requests.", retry_after=retry_after or 1.0),
                          retry_after)
    if status == 503:
        return _Retryable(ServiceUnavailable("The upstream is unavailable."), retry_after)
    if status in _RETRYABLE:
        return _Retryable(UpstreamBadGateway(f"The upstream answered with status {status}."), retry_after)
    if status in (401, 403):
        return UpstreamBadGateway("The upstream refused the proxy's credentials.", kind="auth")
    if status == 400:
        message = _upstream_message(body) or "The upstream refused the request."
        if secret:
            message = message.replace(secret, "[redacted]")
        return InvalidRequest(f"Upstream: {message}"[:500])
    return UpstreamBadGateway(f"The upstream answered with status {status}.")


def parse_answer(raw: bytes, count: int, dims: int) -> tuple[np.ndarray, int | None]:
    """Vectors in input order and the reported prompt tokens; anything malformed raises (never cached)."""
    try:
        doc = orjson.loads(raw)
        items = doc["data"]
        usage = doc.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise _Retryable(UpstreamBadGateway("The upstream's answer is not valid JSON.")) from None
    if not isinstance(items, list) or len(items) != count:
        raise _bad(f"The upstream returned {len(items) if isinstance(items, list) else 'no'} vectors for {count}"
                   " inputs.")
    out = np.empty((count, dims), dtype="<f4")
    seen = np.zeros(count, dtype=bool)
    for item in items:
        try:
            index, emb = item["index"], item["embedding"]
        except (KeyError, TypeError):
            raise _bad("The upstream's answer lacks index or embedding.") from None
        if type(index) is not int or not 0 <= index < count or seen[index]:
            raise _bad("The upstream's answer has a bad or repeated index.")
        seen[index] = True
        out[index] = _vector(emb, dims)
    if not np.isfinite(out).all():
        raise _bad("The upstream returned non-finite values.")
    if prompt_tokens is not None and (type(prompt_tokens) is not int or prompt_tokens < 0):
        raise _bad("The upstream's usage is malformed.")
    return out, prompt_tokens


def _vector(emb: Any, dims: int) -> np.ndarray:
    if isinstance(emb, str):
        try:
            data = pybase64.b64decode(emb, validate=True)  # SIMD; refuses anything outside the alphabet
        except ValueError:
            raise _bad("The upstream's base64 vector does not decode.") from None
        if len(data) != 4 * dims:
            raise _bad(f"The upstream returned a vector of {len(data) / 4:g} dimensions, expected {dims}.")
        return np.frombuffer(data, dtype="<f4")
    if not isinstance(emb, list) or len(emb) != dims:
        raise _bad(f"The upstream returned a vector that is not {dims} numbers.")
    try:
        return np.asarray(emb, dtype=np.float64).astype("<f4")
    except (ValueError, TypeError):
        raise _bad("The upstream returned a vector with non-numbers.") from None


def _bad(message: str) -> _Retryable:
    # A malformed answer may be a one-off (a proxy in between, a bad node): worth one more try, never cached.
    return _Retryable(UpstreamBadGateway(message))


RetryableError = _Retryable  # for the fleet (proxy/fleet), which runs its own attempts through `_attempt`
