"""The embeddings path: cache lookup, token limits, miss-only forwarding with de-duplication and coalescing.

Per request: hash every input (model, dimensions and kind are part of the key), read all unique keys with one
MGET, count tokens only for misses, claim the misses in the in-flight table, send the ones this request owns
upstream in as few calls as the model's batch limits allow, and write new entries back in the background.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .cache import EmbeddingCache, Entry
from .coalesce import InFlight
from .config import ModelSettings, Settings
from .errors import InvalidRequest, ProxyError, ServiceUnavailable, UpstreamBadGateway
from .metrics import Metrics
from .quota import Ticket
from .rediskeys import DigestBuilder, RedisKeys, seed_from_secret
from .request import EmbeddingRequest
from .store import StoreUnavailable
from .tokens import Tokenizer
from .upstream import UpstreamClient

log = logging.getLogger("proxy.service")
# Above this many characters of uncached text, token counting moves off the event loop.
_INLINE_COUNT_CHARS = 64 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    entries: list[Entry]  # one per unique input
    positions: list[int]  # input position -> index into entries
    prompt_tokens: int  # every input, as the upstream would count them
    billed_tokens: int  # tokens this request itself sent upstream
    cache: Literal["hit", "miss", "partial"]
    cache_hits: int  # unique inputs found in the cache
    upstream_inputs: int  # unique inputs this request sent upstream
    cache_bypassed: bool
    ticket: Ticket | None = None  # the quota reservation, when the key or its team has limits
    upstream_s: float = 0.0  # time this request waited for upstream answers (its own calls or shared ones)

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.billed_tokens


def chunk(indices: Sequence[int], counts: Sequence[int], max_items: int, max_tokens: int) -> list[list[int]]:
    """Greedy split into as few upstream requests as the item and token limits allow, in order."""
    chunks: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in indices:
        if current and (len(current) >= max_items or tokens + counts[i] > max_tokens):
            chunks.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += counts[i]
    if current:
        chunks.append(current)
    return chunks


class EmbeddingService:
    def __init__(
        self,
        settings: Settings,
        cache: EmbeddingCache,
        upstream: UpstreamClient,
        metrics: Metrics,
        tokenizers: Mapping[str, Tokenizer],
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._upstream = upstream
        self._metrics = metrics
        self._tokenizers = tokenizers
        self._keys = RedisKeys(settings.cache.key_prefix)
        self._inflight = InFlight()
        self._tasks: set[asyncio.Task[None]] = set()
        # Used only while the shared cache secret is unknown (Redis down at start): dedup and coalescing still
        # work, and nothing hashed with it is ever written.
        self._fallback_seed = seed_from_secret(secrets.token_urlsafe(32))

    async def embed(self, req: EmbeddingRequest, team: str, ticket: Ticket | None = None) -> Outcome:
        """The answer's vectors and counts. With a quota `ticket`, the request is charged in the cache read's
        round trip and its tokens once they are known, before anything goes upstream; either may refuse (429)."""
        spec = self._settings.models[req.model]
        dims = req.dimensions or spec.dimensions
        try:
            seed, cacheable = await self._cache.seed(), True
        except StoreUnavailable:
            seed, cacheable = self._fallback_seed, False
        builder = DigestBuilder(seed, req.model, req.dimensions, req.kind)
        digest = builder.text if req.kind == "s" else builder.tokens
        ns = self._keys.cache_namespace(team if self._settings.cache.scope == "team" else None)

        unique: dict[str, int] = {}
        positions: list[int] = []
        items: list[str | list[int]] = []
        for item in req.inputs:
            key = ns + digest(item)  # type: ignore[arg-type]
            idx = unique.setdefault(key, len(unique))
            if idx == len(items):
                items.append(item)
            positions.append(idx)
        keys = list(unique)

        found: list[Entry | None] = [None] * len(keys)
        pending = self._inflight.pending(keys)
        lookup = [i for i, k in enumerate(keys) if k not in pending] if pending else list(range(len(keys)))
        bypassed = not cacheable
        quota_reply: Any = None
        if cacheable and lookup:
            try:
                also = ticket.queue if ticket is not None else None
                got, extra = await self._cache.get_many([keys[i] for i in lookup], dims, also)
                for i, entry in zip(lookup, got, strict=True):
                    found[i] = entry
                quota_reply = extra[0] if extra else None
            except StoreUnavailable:
                bypassed = True
        misses = [i for i, e in enumerate(found) if e is None]
        hits = len(keys) - len(misses)
        if bypassed:
            self._metrics.child(self._metrics.cache_lookups, "error").inc(len(lookup))
        else:
            self._metrics.child(self._metrics.cache_lookups, "hit").inc(hits)
            self._metrics.child(self._metrics.cache_lookups, "miss").inc(len(lookup) - hits)

        if ticket is not None:
            await ticket.charge_request(quota_reply)
        counts = [e.tokens if e is not None else 0 for e in found]
        try:
            for i, n in zip(misses, await self._count(spec, req.kind, [items[i] for i in misses]), strict=True):
                counts[i] = n
            self._check_limits(spec, counts, positions)
        except InvalidRequest:
            if ticket is not None:
                await ticket.release_request()
            raise
        if ticket is not None:
            fetching = [i for i in misses if keys[i] not in pending]
            await ticket.charge_tokens(sum(counts[i] for i in fetching), sum(counts[p] for p in positions))

        futures, owned = self._inflight.claim(keys[i] for i in misses) if misses else ({}, [])
        owned_idx = [unique[k] for k in owned]
        for part in chunk(owned_idx, counts, spec.max_batch_items, spec.max_batch_tokens):
            task = asyncio.create_task(
                self._fetch(req, [keys[i] for i in part], [items[i] for i in part], [counts[i] for i in part],
                            cacheable)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        upstream_s = 0.0
        if futures:
            started = time.perf_counter()
            try:
                results = await asyncio.gather(*(asyncio.shield(futures[keys[i]]) for i in misses))
            except Exception:
                if ticket is not None:
                    await ticket.refund()
                raise
            upstream_s = time.perf_counter() - started
            for i, entry in zip(misses, results, strict=True):
                found[i] = entry
        entries: list[Entry] = found  # type: ignore[assignment]

        billed = sum(entries[i].tokens for i in owned_idx)
        prompt = sum(entries[p].tokens for p in positions)
        if ticket is not None:
            await ticket.settle(prompt if ticket.counts_all else billed)
        state: Literal["hit", "miss", "partial"] = "hit" if not misses else ("miss" if not hits else "partial")
        return Outcome(entries, positions, prompt, billed, state, hits, len(owned_idx), bypassed, ticket,
                       upstream_s)

    async def _count(self, spec: ModelSettings, kind: str, items: list[str | list[int]]) -> list[int]:
        tokenizer = self._tokenizers[spec.tokenizer]
        if kind == "t":
            for n, ids in enumerate(items):
                if max(ids) >= tokenizer.vocab_size:  # type: ignore[operator]
                    raise InvalidRequest(
                        f"A token id in input {n} is outside the model's vocabulary of {tokenizer.vocab_size}.",
                        param="input", code="invalid_input",
                    )
            return [len(ids) for ids in items]
        texts: list[str] = items  # type: ignore[assignment]
        if sum(map(len, texts)) <= _INLINE_COUNT_CHARS:
            return tokenizer.count_many(texts)
        return await asyncio.get_running_loop().run_in_executor(None, tokenizer.count_many, texts)

    @staticmethod
    def _check_limits(spec: ModelSettings, counts: list[int], positions: list[int]) -> None:
        for p, idx in enumerate(positions):
            if counts[idx] > spec.max_input_tokens:
                raise InvalidRequest(
                    f"Input {p} has {counts[idx]} tokens; this model's maximum input length is "
                    f"{spec.max_input_tokens} tokens.", param="input", code="invalid_input",
                )
        total = sum(counts[idx] for idx in positions)
        if total > spec.max_request_tokens:
            raise InvalidRequest(
                f"The request has {total} tokens; at most {spec.max_request_tokens} are allowed per request.",
                param="input", code="invalid_input",
            )

    async def _fetch(
        self, req: EmbeddingRequest, keys: list[str], items: list[str | list[int]], counts: list[int],
        cacheable: bool,
    ) -> None:
        m = self._metrics
        m.upstream_batch_size.labels(req.model).observe(len(items))
        try:
            with m.upstream_latency.labels(req.model).time():
                result = await self._upstream.embed(req.model, items, counts, req.dimensions, req.user)  # type: ignore[arg-type]
        except ProxyError as exc:
            m.observe_upstream_error(req.model, exc.code, exc.status)
            self._inflight.fail(keys, exc)
            return
        except asyncio.CancelledError:
            self._inflight.fail(keys, ServiceUnavailable("The proxy is shutting down."))
            raise
        except Exception as exc:  # a bug must not leave other requests waiting forever
            log.exception("upstream call failed unexpectedly")
            m.observe_upstream_error(req.model, None, 0)
            self._inflight.fail(keys, UpstreamBadGateway(f"Upstream call failed ({type(exc).__name__})."))
            return
        m.upstream_requests.labels(req.model, "ok").inc()
        # views into the one array the upstream answer was decoded to: no copy per vector
        rows = np.ascontiguousarray(result.vectors, dtype="<f4").data.cast("B")
        width = result.vectors.shape[1] * 4
        entries = [Entry(rows[i * width:(i + 1) * width], tok) for i, tok in enumerate(result.tokens)]
        for key, entry in zip(keys, entries, strict=True):
            self._inflight.resolve(key, entry)
        try:
            if cacheable:
                await asyncio.sleep(0)  # let the waiting requests answer before this task sends the write
                await self._cache.set_many(list(zip(keys, entries, strict=True)))
        except StoreUnavailable:
            m.cache_write_errors.inc()
        finally:
            self._inflight.release(keys)

    async def drain(self) -> None:
        """Wait for background upstream calls and cache writes (at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
