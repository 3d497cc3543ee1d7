"""The upstream connection pool: one POST per attempt, and a strict check of the answer.

Where, when and how often to call is the fleet's (client.py). This is the only module that sees aiohttp client
errors; they leave it as the proxy's own errors. The upstream's key is sent in a request header and never appears
in an error message or a log line.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson
import pybase64
import yarl

from ..config import Settings
from ..errors import (
    InvalidRequest,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UpstreamBadGateway,
    UpstreamTimeout,
)
from .refusals import Refuse, clean_message, is_blank, upstream_message

_RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 3600.0  # an upstream's Retry-After beyond this is cut to it (see parse_retry_after)
# Plausible usage: no tokenizer counts more than 4x cl100k_base, plus a few special tokens per input.
_USAGE_FACTOR = 4
_USAGE_SLACK_PER_INPUT = 8
# An answer larger than this is refused unread: 64 bytes per float (JSON, even pretty-printed, needs about 25),
# per item and per answer slack for the other fields. Applies to the decoded body (a gzip bomb stops there too).
_BYTES_PER_FLOAT = 64
_BYTES_PER_ITEM = 512
_BYTES_PER_ANSWER = 64 * 1024
_ERROR_BODY_BYTES = 64 * 1024  # of an error answer only the message is read


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    vectors: np.ndarray  # (n, d) little-endian float32, in input order
    tokens: list[int]  # per input; sums to the upstream's reported usage
    exact: bool = False  # counted by the upstream per input (not a total shared by the local counts)


def split_usage(total: int, local: Sequence[int]) -> list[int]:
    """Per-input counts that add up to the upstream's `total`, proportional to the local counts, at least 1 each.

    Exact local counts are kept as they are, an input counted 0 locally included (the model's own tokenizer left
    nothing of it, and the upstream agrees: served, never cached, see `usage_tokens`). Otherwise each input gets 1
    token and `total - len(local)` is shared by largest-remainder apportionment: a cached entry never carries 0
    tokens, which would make its hits free. `total` must be at least `len(local)` (`usage_tokens` refuses any other
    answer).
    """
    if total < len(local):
        raise ValueError(f"cannot give {len(local)} inputs at least one of {total} tokens")
    local_sum = sum(local)
    if local_sum == total:
        return list(local)
    if local_sum == 0:
        local, local_sum = [1] * len(local), len(local)
    rest = total - len(local)
    shares = [rest * c // local_sum for c in local]
    order = sorted(range(len(local)), key=lambda i: (-(rest * local[i] % local_sum), i))
    for i in order[: rest - sum(shares)]:
        shares[i] += 1
    return [s + 1 for s in shares]


def usage_tokens(reported: int | None, local: Sequence[int], inputs: Sequence[str | list[int]] = ()) -> list[int]:
    """Per-input tokens of an answer whose usage said `reported`; an implausible figure is a malformed answer.

    The upstream's count is the authority (it bills by it), within bounds: every input is at least one token (but
    one the upstream may treat as empty: 0 is then valid; that is one `is_blank` says so of, or one the model's own
    tokenizer counts as 0, such as "\ufffd" for a BERT-style model), and no tokenizer counts more than
    `_USAGE_FACTOR` times cl100k_base plus a few special tokens per input. Outside them the answer is refused
    (retried, never cached): one figure that lies cannot be trusted for the vectors either, and an unbounded count
    would reach clients, quotas and the ledger (HINCRBY overflows at 2**63). When the figure is below one per
    input, the blank inputs get 0 and the others share it; otherwise every input gets at least one.
    """
    if reported is None:
        return list(local)
    bound = _USAGE_FACTOR * sum(local) + _USAGE_SLACK_PER_INPUT * len(local)
    texts: Sequence[str | list[int] | None] = inputs or [None] * len(local)
    blank = [n == 0 or (isinstance(x, str) and is_blank(x)) for n, x in zip(local, texts, strict=True)] \
        if reported < len(local) else []
    least = len(local) - sum(blank)
    if not least <= reported <= bound:
        raise _bad(f"The upstream reported {reported} tokens for {len(local)} inputs (expected {least} to "
                   f"{bound}): it does not count tokens as the model's tokenizer does. An Infinity server counts "
                   "characters unless started with --lengths-via-tokenize; otherwise check the model's tokenizer "
                   "and count_special_tokens (README: self-hosted models).")
    if reported >= len(local):
        return split_usage(reported, local)
    shares = iter(split_usage(reported, [n for n, b in zip(local, blank, strict=True) if not b]))
    return [0 if b else next(shares) for b in blank]


Usage = int | list[int] | None  # what an answer says it billed: a total, a count per input, or nothing
# parse(raw, headers, count, dims) -> (vectors in input order, usage): one provider kind's answer (kinds/)
Parse = Callable[[bytes, Mapping[str, str], int, int], tuple[np.ndarray, Usage]]


def read_answer(raw: bytes, inputs: Sequence[str | list[int]], local: Sequence[int], dims: int,
                parse: Parse | None = None, headers: Mapping[str, str] | None = None) -> UpstreamResult:
    """The checked 200 answer (`parse_answer`, or the provider kind's `parse`; `usage_tokens`). A refused one
    raises _Retryable carrying what the upstream billed for it: its usage when plausible (`billed`, per input; the
    local counts when it reports none, as for a valid answer), or `unconfirmed` when its usage is there but cannot
    be trusted (a provider kind's refused answer: always, its usage is not read)."""
    try:
        usage: Usage
        if parse is None:
            vectors, usage = parse_answer(raw, len(local), dims)
        else:
            vectors, usage = parse(raw, headers or {}, len(local), dims)
    except _Retryable as exc:
        exc.billed, exc.unconfirmed = _refused_usage(raw, inputs, local) if parse is None else (None, "unread")
        raise
    try:
        if isinstance(usage, list):
            return UpstreamResult(vectors, exact_tokens(usage, local, inputs), exact=True)
        return UpstreamResult(vectors, usage_tokens(usage, local, inputs))
    except _Retryable as exc:
        exc.unconfirmed = "unread"
        raise


def exact_tokens(counts: list[int], local: Sequence[int], inputs: Sequence[str | list[int]]) -> list[int]:
    """A provider's count per input (Titan's inputTextTokenCount, Vertex's statistics.token_count), kept as it is
    once its total passes `usage_tokens`' bounds."""
    if len(counts) != len(local) or any(type(n) is not int or n < 0 for n in counts):
        raise _bad("The upstream's token counts are malformed.")
    usage_tokens(sum(counts), local, inputs)
    return counts


def _refused_usage(raw: bytes, inputs: Sequence[str | list[int]], local: Sequence[int]) -> tuple[list[int] | None,
                                                                                                  str]:
    """(billed per input, unconfirmed) for an answer that `parse_answer` refused."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, ""  # not an upstream's answer (an error page of a gateway in between): nothing billed
    if not isinstance(doc, dict):
        return None, ""
    usage = doc.get("usage")
    reported = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if (usage is not None and not isinstance(usage, dict)) or (reported is not None and type(reported) is not int):
        return None, "unread"  # a usage that says nothing to trust
    try:
        return usage_tokens(reported, local, inputs), ""
    except _Retryable:
        return None, "unread"


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the upstream asks us to wait, from `retry-after-ms` (OpenAI's) or else `Retry-After`.

    Defensive, since the value reaches sleeps and clients: anything but a non-negative number (`soon`, `-5`, `nan`,
    an HTTP date: OpenAI and Azure send seconds, and a date would trust the upstream's clock) counts as absent, and
    a longer wait than MAX_RETRY_AFTER_S (`1e300`; `1e309`, infinite as a float) is cut to it.
    """
    for name, scale in (("retry-after-ms", 0.001), ("Retry-After", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) * scale
            except ValueError:
                continue
            if seconds >= 0:  # false for NaN too
                return min(seconds, MAX_RETRY_AFTER_S)
    return None


Target = tuple[yarl.URL, dict[str, str], str]  # URL, request headers, the key (cut out of relayed messages)


class _Retryable(Exception):
    """`billed`: per input, what the upstream billed for an answer the proxy refused (read, plausible usage).
    `unconfirmed`, when the attempt may have been billed by an amount the proxy never read, says why: `timeout`
    (sent, then timed out), `cut` (the connection dropped after sending), `unread` (a 200 too large to read, broken
    off, or whose usage cannot be trusted). `silent`: nothing came back from the upstream (a timeout); a refused or
    reset connection is an answer of a kind (silence.py)."""

    def __init__(self, error: ProxyError, retry_after: float | None = None, *, unconfirmed: str = "",
                 silent: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after
        self.billed: list[int] | None = None
        self.unconfirmed = unconfirmed
        self.silent = silent


class UpstreamClient:
    """The keep-alive connection pool and one POST per attempt; retries, failover and deadlines are the fleet's."""

    def __init__(self, settings: Settings) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._settings = settings

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

    async def post(
        self, target: Target, payload: bytes, limit_s: float, limit_bytes: int,
        on_headers: Callable[[int, Mapping[str, str]], None] | None = None, refuse: Refuse | None = None,
    ) -> bytes:
        """One POST to `target` (a deployment), reading at most `limit_bytes` of a 200; `on_headers` sees every
        answer's status and headers (rate-limit pacing, a provider's token-count headers). A failure worth another
        try raises _Retryable. `refuse` reads a provider kind's error answer (default: OpenAI's)."""
        if self._session is None:
            raise ServiceUnavailable("The upstream client is not running.")
        url, headers, api_key = target
        try:
            async with self._session.post(
                url, data=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=limit_s),
                allow_redirects=False,  # a redirect is an upstream failure: the key never goes where it names
            ) as resp:
                if on_headers is not None:
                    on_headers(resp.status, resp.headers)
                if resp.status == 200:
                    body = await _read_at_most(resp, limit_bytes)
                    if body is None:
                        raise _Retryable(UpstreamBadGateway(
                            f"The upstream's answer is larger than {limit_bytes} bytes."), unconfirmed="unread")
                    return body
                # an error may echo the request (FastAPI's validation errors do, once per type a field may
                # have: Infinity's twice): room for one echo, then only the beginning is kept (its first messages)
                body = await _read_at_most(resp, _ERROR_BODY_BYTES + len(payload), keep=True) or b""
                if refuse is None:
                    raise upstream_status_error(resp.status, body, parse_retry_after(resp.headers), secret=api_key)
                why = refuse(resp.status, body, resp.headers)
                raise upstream_status_error(why.status or resp.status, body, why.retry_after, secret=api_key,
                                            message=why.message, param=why.param)
        # Sent or not: an attempt that may have reached the upstream may have been billed without an answer read
        # (`unconfirmed`); one that never had a connection (refused, DNS, TLS, no connection in time) was not.
        except aiohttp.ConnectionTimeoutError:
            raise _Retryable(UpstreamBadGateway("Could not connect to the upstream in time.", kind="connect"),
                             silent=True) from None
        except TimeoutError:
            raise _Retryable(UpstreamTimeout("The upstream timed out."), unconfirmed="timeout", silent=True) from None
        except aiohttp.ClientConnectorError as exc:
            raise _Retryable(UpstreamBadGateway(f"Could not reach the upstream ({type(exc).__name__}).",
                                                kind="connect")) from None
        except aiohttp.ClientConnectionError as exc:  # reset, dropped mid-answer
            raise _Retryable(UpstreamBadGateway(f"Could not reach the upstream ({type(exc).__name__}).",
                                                kind="connect"), unconfirmed="cut") from None
        except aiohttp.ClientError as exc:  # e.g. a malformed HTTP answer, a body cut short
            raise _Retryable(UpstreamBadGateway(f"Could not reach the upstream ({type(exc).__name__})."),
                             unconfirmed="unread") from None


def answer_limit(count: int, dims: int) -> int:
    """The most bytes a plausible answer of `count` vectors of `dims` floats takes, as JSON floats or base64."""
    return count * (dims * _BYTES_PER_FLOAT + _BYTES_PER_ITEM) + _BYTES_PER_ANSWER


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int, keep: bool = False) -> bytes | None:
    """The body, or as soon as it is known to exceed `limit` bytes (the connection is then closed) None, or with
    `keep` its first `limit` bytes."""
    if not keep and resp.content_length is not None and resp.content_length > limit:
        resp.close()
        return None
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            resp.close()  # not reused: the rest of the body is never read
            return b"".join(chunks)[:limit] if keep else None
    return b"".join(chunks)


def upstream_status_error(status: int, body: bytes, retry_after: float | None, *, secret: str = "",
                          message: str | None = None, param: str | None = None) -> Exception:
    """The proxy error for a non-200 upstream answer, wrapped in _Retryable when another try may help.

    A 4xx about the request (any but 401, 402, 403, 404, 408, 409 and 429: 400, 413, 422, ...) is the client's: a 400
    with the upstream's reason (see `clean_message`; `message` when a provider kind read it), naming `param` when
    the kind could tell it, never retried elsewhere and no failure of the deployment."""
    if status == 429:
        return _Retryable(RateLimited("The upstream is rate limiting requests.", retry_after=retry_after or 1.0),
                          retry_after)
    if status == 503:
        return _Retryable(ServiceUnavailable("The upstream is unavailable."), retry_after)
    if status in _RETRYABLE:
        return _Retryable(UpstreamBadGateway(f"The upstream answered with status {status}."), retry_after)
    if status in (401, 403):
        return UpstreamBadGateway("The upstream refused the proxy's credentials.", kind="auth")
    if status == 402:  # the proxy's account is out of credit (Jina, Voyage): never the client's input
        return UpstreamBadGateway("The upstream refused the proxy's account (payment required).", kind="auth")
    if 400 <= status < 500 and status != 404:
        reason = upstream_message(body) if message is None else message
        reason = clean_message(reason, secret) or f"It refused the request (status {status})."
        return InvalidRequest(f"Upstream: {reason}", param=param)
    return UpstreamBadGateway(f"The upstream answered with status {status}.")


def parse_answer(raw: bytes, count: int, dims: int) -> tuple[np.ndarray, int | None]:
    """Vectors in input order and the reported prompt tokens; anything malformed raises _Retryable (never cached).

    Well-formed: a JSON object whose `data` holds exactly `count` objects, each with an int `index` (every one of
    0..count-1 once) and an `embedding` that is `dims` JSON numbers (not booleans, strings, nulls or lists) or the
    base64 of `dims` little-endian float32, every value finite as float32; `usage`, when present, an object whose
    `prompt_tokens`, when present, is an int.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _bad("The upstream's answer is not valid JSON.") from None
    items = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(items) != count:
        raise _bad(f"The upstream returned {len(items) if isinstance(items, list) else 'no'} vectors for {count}"
                   " inputs.")
    usage = doc.get("usage")
    prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if (usage is not None and not isinstance(usage, dict)) or (
            prompt_tokens is not None and type(prompt_tokens) is not int):
        raise _bad("The upstream's usage is malformed.")
    out = np.empty((count, dims), dtype="<f4")
    seen = np.zeros(count, dtype=bool)
    lists: list[tuple[int, list[Any]]] = []  # float-list vectors, for the boolean check below
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused below
        for item in items:
            if not isinstance(item, dict):
                raise _bad("The upstream's answer lacks index or embedding.")
            index, emb = item.get("index"), item.get("embedding")
            if type(index) is not int or not 0 <= index < count or seen[index]:
                raise _bad("The upstream's answer has a bad or repeated index.")
            seen[index] = True
            out[index] = _vector(emb, dims)
            if isinstance(emb, list):
                lists.append((index, emb))
    if not np.isfinite(out).all():
        raise _bad("The upstream returned non-finite values.")
    if lists and _has_booleans(out, lists):
        raise _bad("The upstream returned a vector with non-numbers.")
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
        # array('d') takes only what has __float__ or __index__: strings, nulls, lists and objects raise, where
        # numpy would parse "0.001" and broadcast a nested list; as fast as np.asarray. Booleans pass: see below.
        return np.frombuffer(array.array("d", emb), dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise _bad("The upstream returned a vector with non-numbers.") from None


def _has_booleans(out: np.ndarray, lists: list[tuple[int, list[Any]]]) -> bool:
    """Whether a float-list vector holds a JSON true or false.

    A boolean became exactly 0.0 or 1.0, which real embeddings almost never hold: only the rows that do are
    looked at element by element, so the common answer pays one vectorised pass, not a Python loop per float.
    """
    suspect = ((out == 0) | (out == 1)).any(axis=1)
    return any(suspect[i] and any(type(x) is bool for x in emb) for i, emb in lists)


def _bad(message: str) -> _Retryable:
    # A malformed answer may be a one-off (a proxy in between, a bad node): worth one more try, never cached.
    return _Retryable(UpstreamBadGateway(message))


vector_of = _vector  # for the provider kinds (kinds/): one vector, checked as OpenAI's are
malformed = _bad  # for the provider kinds: a malformed answer (retried, never cached)
RetryableError = _Retryable  # for client.py (the fleet): what `post` and the answer checks raise when a retry may help
