"""The embeddings path: cache lookup, token limits, miss-only forwarding with de-duplication and coalescing.

Per request: hash every input (model, dimensions, kind and the model's purge generation are part of the key), look
the unique keys up in the in-process tier and read the rest with one MGET, count tokens only for misses, reserve the
tokens of what this request will send, claim the misses in the in-flight table, send the ones this request owns
upstream in as few calls as the model's batch limits allow, and write new entries back in the background (batched,
after the answer).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .coalesce import InFlight
from .config import ModelSettings, Settings
from .errors import InvalidRequest, ProxyError, ServiceUnavailable, UpstreamBadGateway
from .keys import KeyRecord
from .metrics import Metrics
from .quota import REPLY_LOST, Ticket
from .request import EmbeddingRequest
from .stores.cache import EmbeddingCache, Entry, ReadFailed
from .stores.generations import CacheGenerations
from .stores.guard import StoreUnavailable
from .stores.localcache import LocalCache
from .stores.rediskeys import DigestBuilder, RedisKeys, seed_from_secret
from .tokens import Tokenizer
from .tracing import NO_TRACING, Tracing
from .upstream import FleetClient
from .usage import UsageLedger

log = logging.getLogger("proxy.service")
# Above this many characters of uncached text, token counting moves off the event loop.
_INLINE_COUNT_CHARS = 64 * 1024
# New entries are written this long after their upstream answer, all together: the answer goes out first, and
# under load one pipeline carries the entries of many requests.
_WRITE_DELAY_S = 0.001


_SHUTTING_DOWN = ServiceUnavailable("The proxy is shutting down.")


class _CallFailed(Exception):
    """What the requests waiting on a failed upstream call get: its `error`, the cache `keys` it carried, and
    whether a request that shared it may send its inputs again itself (`retryable`)."""

    def __init__(self, error: ProxyError, keys: frozenset[str], retryable: bool) -> None:
        super().__init__(error.message)
        self.error, self.keys, self.retryable = error, keys, retryable

    def worth_retrying(self, mine: set[str]) -> bool:
        """For a request asking for `mine` that shared this call: an upstream 400 is about its own inputs when the
        call carried nothing else (relayed as it is); otherwise it may be about another request's input, and its
        message must not reach this one."""
        if isinstance(self.error, InvalidRequest):
            return not self.keys <= mine
        return self.retryable


@dataclass(frozen=True, slots=True)
class Outcome:
    entries: list[Entry]  # one per unique input
    positions: list[int]  # input position -> index into entries
    prompt_tokens: int  # every input, as the upstream would count them
    billed_tokens: int  # tokens this request itself sent upstream
    cache: Literal["hit", "miss", "partial"]
    ticket: Ticket | None = None  # the quota reservation, when the key or its team has limits
    keys: Sequence[str] = ()  # the cache key of each entry

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.billed_tokens


@dataclass(slots=True)
class Trace:
    """What one request did, for its access line and metrics; filled in as it goes, so a failed request has it
    too. (Outcome holds what the answer needs.)"""

    inputs: int = 0
    cache_hits: int = 0  # unique inputs found in the cache (either tier)
    upstream_inputs: int = 0  # unique inputs this request sent upstream
    upstream_s: float = 0.0  # time it waited for upstream answers (its own calls or shared ones)
    prompt_tokens: int = 0
    cached_tokens: int = 0


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
        upstream: FleetClient,
        metrics: Metrics,
        tokenizers: Mapping[str, Tokenizer],
        ledger: UsageLedger,
        clock: Callable[[], float] = time.time,
        *,
        generations: CacheGenerations,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._settings = settings
        self._generations = generations
        self._tracing = tracing
        self._ledger = ledger
        self._clock = clock
        self._cache = cache
        self._upstream = upstream
        self._metrics = metrics
        self._tokenizers = tokenizers
        self._keys = RedisKeys(settings.cache.key_prefix)
        self._inflight = InFlight()
        mb = settings.cache.local_max_mb
        self._local = LocalCache(mb * 1024 * 1024, settings.cache.local_ttl_s) if mb > 0 else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writes: list[tuple[str, Entry]] = []  # fetched entries waiting for the next cache write
        self._write_timer: asyncio.TimerHandle | None = None
        # Used only while the shared cache secret is unknown (Redis down at start): dedup and coalescing still
        # work, and nothing hashed with it is ever written.
        self._fallback_seed = seed_from_secret(secrets.token_urlsafe(32))

    @property
    def local_cache(self) -> LocalCache | None:
        return self._local

    async def embed(
        self, req: EmbeddingRequest, key: KeyRecord, ticket: Ticket | None = None, trace: Trace | None = None
    ) -> Outcome:
        """The answer's vectors and counts. With a quota `ticket`, the request is charged in the cache read's
        round trip and its tokens once they are known, before anything goes upstream; either may refuse (429).

        It is recorded in the usage ledger here, under the time it started (its ticket's, so quotas and ledger
        agree on the day). Whatever happens (answered, failed, refused, cancelled), the tokens the upstream billed
        for this request's own calls stay in its quota and go to the ledger; only the tokens of inputs that were
        not billed are given back."""
        trace = trace if trace is not None else Trace()
        at = ticket.now if ticket is not None else self._clock()
        team = key.team
        spec = self._settings.models[req.model]
        dims = req.dimensions or spec.dimensions
        scope_team = team if self._settings.cache.scope == "team" else None
        try:
            seed, cacheable = await self._cache.seed(), True
            # in memory: a Redis read only until the generations have been read once
            generation = self._generations.token(req.model, scope_team)
            if generation is None:
                generation = await self._generations.token_now(req.model, scope_team)
        except StoreUnavailable:
            seed, cacheable, generation = self._fallback_seed, False, ""
        builder = DigestBuilder(seed, req.model, req.dimensions, req.kind, spec.cache_revision, generation)
        digest = builder.text if req.kind == "s" else builder.tokens
        ns = self._keys.cache_namespace(scope_team)

        unique: dict[str, int] = {}
        positions: list[int] = []
        items: list[str | list[int]] = []
        for item in req.inputs:
            cache_key = ns + digest(item)  # type: ignore[arg-type]
            idx = unique.setdefault(cache_key, len(unique))
            if idx == len(items):
                items.append(item)
            positions.append(idx)
        keys = list(unique)
        trace.inputs = len(positions)

        m = self._metrics
        found: list[Entry | None] = [None] * len(keys)
        if self._local is not None and cacheable:
            get = self._local.get
            local_hits = 0
            for i, k in enumerate(keys):
                found[i] = e = get(k)
                if e is not None:
                    local_hits += 1
            if local_hits:
                m.add(m.cache_lookups, "hit", amount=local_hits)
                m.add(m.local_hits, amount=local_hits)
        inflight = self._inflight
        epoch = inflight.epoch()  # before the cache read: what is released after it may need a second look
        lookup = [i for i, e in enumerate(found) if e is None and keys[i] not in inflight]
        readable = cacheable  # false once Redis fails this request: no second read
        quota_reply: Any = None
        charging: asyncio.Future[None] | None = None
        if cacheable and lookup:
            carried = ticket is not None and self._cache.carries_quota
            if ticket is not None and not carried:  # counters in another store or slot: charge during the read
                charging = asyncio.ensure_future(ticket.charge_request())
            try:
                also = ticket.queue if ticket is not None and carried else None
                with self._tracing.span("cache read") as span:
                    if span.is_recording():
                        span.set_attribute("db.system.name", "redis")
                        span.set_attribute("embedding_proxy.cache.lookups", len(lookup))
                        span.set_attribute("embedding_proxy.quota.in_cache_read", also is not None)
                    quota_reply = await self._read(keys, lookup, found, dims, also)
                    if span.is_recording():
                        span.set_attribute("embedding_proxy.cache.hits", sum(found[i] is not None for i in lookup))
            except StoreUnavailable as exc:
                readable = False
                m.add(m.cache_lookups, "error", amount=len(lookup))
                if isinstance(exc, ReadFailed):  # the quota script shared the pipeline: it may have run anyway
                    quota_reply = exc.extra[0] if exc.extra else (REPLY_LOST if exc.sent else None)
            finally:
                if charging is not None:
                    await charging
        misses = [i for i, e in enumerate(found) if e is None]

        if ticket is not None and charging is None:
            await ticket.charge_request(quota_reply)
        own: dict[str, asyncio.Future[Entry]] = {}  # this request's own upstream calls: what is billed to it
        try:
            counts = [e.tokens if e is not None else 0 for e in found]
            try:
                if misses:
                    for i, n in zip(misses, await self._count(spec, req.kind, [items[i] for i in misses]),
                                    strict=True):
                        counts[i] = n
                self._check_limits(spec, counts, positions)
            except InvalidRequest:
                if ticket is not None:
                    await ticket.release_request()
                raise
            if ticket is not None and ticket.counts_all:
                await ticket.charge_tokens(sum(counts[p] for p in positions))
            if misses:
                misses = await self._settle_misses(keys, misses, found, counts, epoch, dims, readable, ticket)
            trace.cache_hits = len(keys) - len(misses)
            await self._fetch_misses(req, team, keys, items, counts, misses, found, own, ticket, trace,
                                     epoch=epoch, dims=dims, readable=readable, cacheable=cacheable)
        except asyncio.CancelledError:  # shutdown: its own upstream calls go on (others share them)
            self._spawn(self._close_unanswered(req, key, ticket, own, at))
            raise
        except BaseException:
            await self._close_unanswered(req, key, ticket, own, at)
            raise
        entries: list[Entry] = found  # type: ignore[assignment]

        billed = sum(entries[unique[k]].tokens for k in own)
        prompt = sum(entries[p].tokens for p in positions)
        if ticket is not None:
            await ticket.settle(prompt if ticket.counts_all else billed)
        self._ledger.record(key.team, key.id, req.model, prompt, billed, at=at)
        trace.prompt_tokens, trace.cached_tokens = prompt, prompt - billed
        hits = trace.cache_hits
        state: Literal["hit", "miss", "partial"] = "hit" if not misses else ("miss" if not hits else "partial")
        return Outcome(entries, positions, prompt, billed, state, ticket, keys)

    async def _fetch_misses(
        self, req: EmbeddingRequest, team: str, keys: list[str], items: list[str | list[int]], counts: list[int],
        misses: list[int], found: list[Entry | None], own: dict[str, asyncio.Future[Entry]], ticket: Ticket | None,
        trace: Trace, *, epoch: int, dims: int, readable: bool, cacheable: bool,
    ) -> None:
        """Fill `found` at `misses`: claim them, send the ones this request owns (noted in `own`), wait for all.

        An input shared with another request whose call failed is sent again by this request, once, as its own
        call (reserved and charged to it), unless the failure is about this request's own inputs (an upstream
        400 for a call that carried only inputs it asked for: relayed) or cannot be helped by trying again. Raises
        the first failure that remains, once every call it waited for is over."""
        spec = self._settings.models[req.model]
        mine = set(keys)
        failure: BaseException | None = None
        retried = False
        while misses:
            futures, owned = self._inflight.claim(keys[i] for i in misses)
            owned_idx = [i for i in misses if keys[i] in owned]
            own.update((k, futures[k]) for k in owned)
            trace.upstream_inputs += len(owned_idx)
            for part in chunk(owned_idx, counts, spec.max_batch_items, spec.max_batch_tokens):
                self._spawn(self._fetch(req, team, [keys[i] for i in part], [items[i] for i in part],
                                        [counts[i] for i in part], cacheable))
            started = time.perf_counter()
            waited = [futures[keys[i]] for i in misses]
            if pending := [f for f in waited if not f.done()]:
                await asyncio.wait(pending)  # never cancels them: other requests may share them
            trace.upstream_s += time.perf_counter() - started
            again = []
            for i, fut in zip(misses, waited, strict=True):
                exc = fut.exception() if not fut.cancelled() else _CallFailed(_SHUTTING_DOWN, frozenset(), False)
                if exc is None:
                    found[i] = fut.result()
                elif (not retried and keys[i] not in own and isinstance(exc, _CallFailed)
                      and exc.worth_retrying(mine)):
                    again.append(i)
                elif failure is None:
                    failure = exc
            if failure is not None or not again:
                break
            retried = True
            misses = await self._settle_misses(keys, again, found, counts, epoch, dims, readable, ticket,
                                               give_back=False)
        if failure is not None:
            raise failure.error if isinstance(failure, _CallFailed) else failure

    async def _close_unanswered(
        self, req: EmbeddingRequest, key: KeyRecord, ticket: Ticket | None, own: dict[str, asyncio.Future[Entry]],
        at: float,
    ) -> None:
        """A request not answered 200 (failed, refused, or cancelled): once its own upstream calls are over, the
        tokens the upstream billed for them stay in its quota and go to the ledger; the rest is given back."""
        if pending := [f for f in own.values() if not f.done()]:
            await asyncio.wait(pending)
        billed = sum(f.result().tokens for f in own.values() if not f.cancelled() and f.exception() is None)
        if ticket is not None:
            await ticket.settle(billed)
        if billed:
            self._ledger.record_failed(key.team, key.id, req.model, billed, at=at)
            self._metrics.observe_unanswered(key.team, req.model, billed,
                                             self._settings.models[req.model].price_per_million_tokens)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(
        self, keys: list[str], lookup: list[int], found: list[Entry | None], dims: int,
        also: Callable[[Any], None] | None = None,
    ) -> Any:
        """Fill `found` at `lookup` from Redis (admitting hits to the local tier); returns `also`'s reply."""
        got, extra = await self._cache.get_many([keys[i] for i in lookup], dims, also)
        local = self._local
        hits = 0
        for i, entry in zip(lookup, got, strict=True):
            if entry is not None:
                hits += 1
                found[i] = entry
                if local is not None:
                    local.put(keys[i], entry)
        m = self._metrics
        if hits:
            m.add(m.cache_lookups, "hit", amount=hits)
        if hits < len(lookup):
            m.add(m.cache_lookups, "miss", amount=len(lookup) - hits)
        return extra[0] if extra else None

    async def _settle_misses(
        self, keys: list[str], misses: list[int], found: list[Entry | None], counts: list[int], epoch: int,
        dims: int, readable: bool, ticket: Ticket | None, *, give_back: bool = True,
    ) -> list[int]:
        """The misses to claim, once the ones that landed in the cache meanwhile are read and the tokens of the
        ones this request will send upstream are reserved. Returns with nothing to await between its last check
        and the caller's claim, so the reservation covers exactly what the request will own."""
        inflight = self._inflight
        reserved: set[int] = set()
        reread = False
        while True:
            landed = [i for i in misses if keys[i] not in inflight and inflight.released_since(keys[i], epoch)]
            if landed and readable and not reread:
                reread, epoch = True, inflight.epoch()
                try:
                    await self._read(keys, landed, found, dims)
                except StoreUnavailable:
                    readable = False
                    self._metrics.add(self._metrics.cache_lookups, "error", amount=len(landed))
                misses = [i for i in misses if found[i] is None]
                continue
            if ticket is not None and not ticket.counts_all:
                extra = [i for i in misses if keys[i] not in inflight and i not in reserved]
                if extra:
                    await ticket.charge_tokens(sum(counts[i] for i in extra), give_back=give_back)
                    reserved.update(extra)
                    continue
            return misses

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
        self, req: EmbeddingRequest, team: str, keys: list[str], items: list[str | list[int]], counts: list[int],
        cacheable: bool,
    ) -> None:
        m = self._metrics
        m.upstream_batch_size.labels(req.model).observe(len(items))
        try:
            with m.upstream_latency.labels(req.model).time():
                result = await self._upstream.embed(
                    req.model, items, counts, req.dimensions, req.user, team=team)  # type: ignore[arg-type]
        except ProxyError as exc:
            m.observe_upstream_error(req.model, exc)
            helpless = isinstance(exc, UpstreamBadGateway) and exc.kind == "auth"  # the proxy's credentials
            self._inflight.fail(keys, _CallFailed(exc, frozenset(keys), not helpless))
            return
        except asyncio.CancelledError:
            self._inflight.fail(keys, _CallFailed(_SHUTTING_DOWN, frozenset(keys), False))
            raise
        except Exception as exc:  # a bug must not leave other requests waiting forever
            log.exception("upstream call failed unexpectedly")
            m.observe_upstream_error(req.model, None)
            error = UpstreamBadGateway(f"Upstream call failed ({type(exc).__name__}).")
            self._inflight.fail(keys, _CallFailed(error, frozenset(keys), False))
            return
        m.upstream_requests.labels(req.model, "ok").inc()
        # views into the one array the upstream answer was decoded to: no copy per vector
        rows = np.ascontiguousarray(result.vectors, dtype="<f4").data.cast("B")
        width = result.vectors.shape[1] * 4
        entries = [Entry(rows[i * width:(i + 1) * width], tok) for i, tok in enumerate(result.tokens)]
        for key, entry in zip(keys, entries, strict=True):
            self._inflight.resolve(key, entry)
        if not cacheable:
            self._inflight.release(keys, written=False)
            return
        self._writes.extend(zip(keys, entries, strict=True))
        if self._write_timer is None:
            self._write_timer = asyncio.get_running_loop().call_later(_WRITE_DELAY_S, self._start_write)

    def _start_write(self) -> None:
        self._write_timer = None
        batch, self._writes = self._writes, []
        if batch:
            self._spawn(self._write(batch))

    async def _write(self, batch: list[tuple[str, Entry]]) -> None:
        """One pipeline for every entry fetched since the last write; the keys stay claimed until it is done."""
        written = False
        try:
            await self._cache.set_many(batch)
            written = True
        except StoreUnavailable:
            self._metrics.cache_write_errors.inc()
        finally:
            self._inflight.release((key for key, _ in batch), written)

    async def drain(self) -> None:
        """Wait for background upstream calls and cache writes (at shutdown)."""
        while self._tasks or self._writes:
            if self._write_timer is not None:
                self._write_timer.cancel()
            self._start_write()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
