"""The embeddings path's phases, each called on its own (proxy/embeddings/): digest and de-duplicate, the tier read
with the quota charge, count and check, settle and record. Real components on the embedded in-process store, a
pinned clock; no upstream (nothing here goes upstream)."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest

from proxy.accounts.keys import KeyRecord
from proxy.accounts.quota import Quotas
from proxy.accounts.teams import TeamStore
from proxy.accounts.usage import UsageLedger
from proxy.config import Settings
from proxy.embeddings.coalesce import InFlight
from proxy.embeddings.counting import TokenCheck
from proxy.embeddings.digest import Digester, dedupe
from proxy.embeddings.job import Job
from proxy.embeddings.outcome import Trace
from proxy.embeddings.request import parse_request
from proxy.embeddings.settlement import Settlement
from proxy.embeddings.tiers import Tiers
from proxy.errors import InvalidRequest
from proxy.stores.cache import EmbeddingCache, Entry
from proxy.stores.generations import CacheGenerations
from proxy.stores.guard import Store, connect
from proxy.stores.localcache import LocalCache
from proxy.stores.rediskeys import DigestBuilder, RedisKeys, seed_from_secret
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.tracing import NO_TRACING
from proxy.tokens import Tokenizer, make_tokenizer
from tests.conftest import free_port, make_settings

MODEL = "text-embedding-3-small"
SECRET = "phase-test-secret"
NOW = 1_800_000_000.0  # minute window m30000000
NOWHERE = "http://127.0.0.1:9/v1"  # no phase here calls the upstream
ALPHA = KeyRecord("key_phase", "alpha")


@dataclass
class Parts:
    """What the phases are built from, on the embedded store (or a Redis URL nobody answers on)."""

    settings: Settings
    store: Store
    cache: EmbeddingCache
    digester: Digester
    quotas: Quotas
    metrics: Metrics
    ledger: UsageLedger

    async def job(self, body: dict[str, Any], key: KeyRecord, ticket: Any = None) -> Job:
        """Phase 1 alone: the request digested, as the record the other phases take."""
        req = parse_request(orjson.dumps({"model": MODEL, **body}), self.settings.models)
        inputs, cacheable = await self.digester.digest(req, key.team)
        return Job(req, key, self.settings.models[MODEL], ticket, Trace(), NOW, inputs, cacheable)

    def counter(self, team: str, metric: str) -> str:
        return RedisKeys().quota_counter(team, None, metric, "m30000000")


def parts(config: str = "", redis_url: str = "", **env: str) -> Parts:
    settings = make_settings(NOWHERE, redis_url, config, **{"PROXY_CACHE_SECRET": SECRET, **env})
    client, embedded = connect(settings.redis)
    store = Store(client, settings.redis, embedded=embedded)
    rkeys = RedisKeys(settings.cache.key_prefix)
    cache = EmbeddingCache(store, rkeys, ttl_s=settings.cache.ttl_s, secret=settings.cache_secret, state=store)
    generations = CacheGenerations(store, rkeys, settings.models, settings.cache.scope, cache_store=store)
    metrics = Metrics(models=settings.models)
    teams = TeamStore(store, rkeys, settings.teams, wall_clock=lambda: NOW)
    quotas = Quotas(store, rkeys, teams, settings.quotas, metrics, clock=lambda: NOW)
    ledger = UsageLedger(store, rkeys, clock=lambda: NOW)
    return Parts(settings, store, cache, Digester(settings, cache, generations), quotas, metrics, ledger)


def text_key(namespace: str, text: str) -> str:
    return namespace + DigestBuilder(seed_from_secret(SECRET), MODEL, None, "s").text(text)


# --- phase 1: digest and de-duplicate ---------------------------------------------------------------------------


def test_dedupe_keys_each_distinct_input_once_in_the_order_first_seen() -> None:
    unique = dedupe(["b", "a", "b", "c", "a"], "ep:emb:v2:s:", lambda s: f"h({s})")
    assert unique.keys == ["ep:emb:v2:s:h(b)", "ep:emb:v2:s:h(a)", "ep:emb:v2:s:h(c)"]
    assert unique.items == ["b", "a", "c"]
    assert unique.positions == [0, 1, 0, 2, 1]
    assert unique.index == {"ep:emb:v2:s:h(b)": 0, "ep:emb:v2:s:h(a)": 1, "ep:emb:v2:s:h(c)": 2}


def test_dedupe_of_token_id_lists_compares_their_digests() -> None:
    unique = dedupe([[1, 2], [3], [1, 2]], "ns:", lambda ids: "-".join(map(str, ids)))
    assert (unique.keys, unique.items, unique.positions) == (["ns:1-2", "ns:3"], [[1, 2], [3]], [0, 1, 0])


async def test_digest_keys_under_the_shared_namespace_with_the_deployment_secret() -> None:
    job = await parts().job({"input": ["hello", "world", "hello"]}, ALPHA)
    assert job.cacheable
    assert job.keys == [text_key("ep:emb:v2:s:", "hello"), text_key("ep:emb:v2:s:", "world")]
    assert job.inputs.positions == [0, 1, 0] and job.found == [None, None]


async def test_digest_keys_under_the_teams_namespace_when_the_cache_is_scoped_by_team() -> None:
    job = await parts("[cache]\nscope = \"team\"\n").job({"input": "hello"}, ALPHA)
    assert job.keys == [text_key("ep:emb:v2:t:alpha:", "hello")]


async def test_digest_while_redis_is_unreachable_still_dedupes_but_caches_nothing() -> None:
    p = parts(redis_url=f"redis://127.0.0.1:{free_port()}", PROXY_CACHE_SECRET="")  # the secret is in Redis
    job = await p.job({"input": ["x", "y", "x"]}, ALPHA)
    assert not job.cacheable
    assert job.inputs.positions == [0, 1, 0] and len(set(job.keys)) == 2
    assert job.keys[0] != text_key("ep:emb:v2:s:", "x")  # keyed with this process's own secret


# --- phase 2: read the tiers with the quota charge ------------------------------------------------------------


def entry(tokens: int, value: float) -> Entry:
    return Entry(np.full(1536, value, dtype="<f4").tobytes(), tokens)


async def test_tier_read_takes_the_local_tier_then_redis_and_charges_the_request_once() -> None:
    p = parts("[teams.alpha]\nrpm = 10\n")
    job = await p.job({"input": ["in local", "in redis", "nowhere", "in local"]}, ALPHA, await p.quotas.ticket(ALPHA))
    local = LocalCache(1 << 20, 60.0)
    local.put(job.keys[0], entry(2, 0.25))
    await p.cache.set_many([(job.keys[1], entry(3, 0.5))])
    await Tiers(p.cache, local, InFlight(), p.metrics, NO_TRACING).read_with_charge(job)
    assert [e.tokens if e is not None else None for e in job.found] == [2, 3, None]
    assert job.misses == [2] and job.readable
    admitted = local.get(job.keys[1])  # a Redis hit joins the local tier
    assert admitted is not None and bytes(admitted.vector) == entry(3, 0.5).vector
    assert await p.store.client.get(p.counter("alpha", "req")) == b"1"  # in the read's pipeline, not twice


async def test_tier_read_leaves_an_input_in_flight_to_the_call_fetching_it() -> None:
    p = parts()
    job = await p.job({"input": ["cached", "being fetched"]}, ALPHA)
    await p.cache.set_many([(job.keys[0], entry(1, 0.5)), (job.keys[1], entry(2, 0.5))])
    inflight = InFlight()
    inflight.claim([job.keys[1]])  # another request's call
    await Tiers(p.cache, None, inflight, p.metrics, NO_TRACING).read_with_charge(job)
    assert job.found[0] is not None and job.found[1] is None and job.misses == [1]


# --- phase 3: count and check ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {"cl100k_base": make_tokenizer("cl100k_base")}


def limits(**values: int) -> str:
    return f'[models."{MODEL}"]\ndimensions = 1536\n' + "".join(f"{k} = {v}\n" for k, v in values.items())


async def test_count_and_check_refuses_an_input_over_the_limit_and_gives_the_request_slot_back(
    tokenizers: dict[str, Tokenizer],
) -> None:
    p = parts("[teams.alpha]\nrpm = 10\n" + limits(max_input_tokens=5))
    job = await p.job({"input": ["one", "one two three four five six"]}, ALPHA, await p.quotas.ticket(ALPHA))
    await Tiers(p.cache, None, InFlight(), p.metrics, NO_TRACING).read_with_charge(job)
    assert await p.store.client.get(p.counter("alpha", "req")) == b"1"
    with pytest.raises(InvalidRequest) as refused:
        await TokenCheck(tokenizers).count_and_check(job)
    assert refused.value.status == 400
    assert refused.value.body() == {"error": {
        "message": "Input 1 has 6 tokens; this model's maximum input length is 5 tokens.",
        "type": "invalid_request_error", "param": "input", "code": "invalid_input"}}
    assert await p.store.client.get(p.counter("alpha", "req")) == b"0"


async def test_count_and_check_counts_every_position_against_the_request_limit(
    tokenizers: dict[str, Tokenizer],
) -> None:
    p = parts(limits(max_request_tokens=8))
    job = await p.job({"input": ["one two three", "four five six", "one two three"]}, ALPHA)
    job.misses = [0, 1]
    with pytest.raises(InvalidRequest) as refused:
        await TokenCheck(tokenizers).count_and_check(job)
    assert job.counts == [3, 3]  # two unique inputs, the first one sent twice: 9 tokens
    assert refused.value.message == "The request has 9 tokens; at most 8 are allowed per request."


async def test_count_and_check_counts_only_the_misses(tokenizers: dict[str, Tokenizer]) -> None:
    p = parts()
    job = await p.job({"input": ["cached one", "one two three"]}, ALPHA)
    job.found[0], job.misses = entry(7, 0.5), [1]  # an entry carries its input's tokens
    await TokenCheck(tokenizers).count_and_check(job)
    assert job.counts == [7, 3]


async def test_count_and_check_refuses_a_token_id_outside_the_vocabulary(tokenizers: dict[str, Tokenizer]) -> None:
    p = parts()
    job = await p.job({"input": [[1, 2], [100_277]]}, ALPHA)
    job.misses = [0, 1]
    with pytest.raises(InvalidRequest) as refused:
        await TokenCheck(tokenizers).count_and_check(job)
    assert (refused.value.message, refused.value.code) == (
        "A token id in input 1 is outside the model's vocabulary of 100277.", "invalid_input")


# --- phase 5: settle the ticket and record --------------------------------------------------------------------


async def test_settle_and_record_bills_only_its_own_call_and_records_it_under_its_day() -> None:
    p = parts("[teams.alpha]\ntpm = 1000\n")
    ticket = await p.quotas.ticket(ALPHA)
    assert ticket is not None
    job = await p.job({"input": ["from the cache", "fetched", "from the cache"]}, ALPHA, ticket)
    await ticket.charge_request()
    await ticket.charge_tokens(6)  # what it reserved for "fetched" before the upstream said 5
    job.found = [entry(2, 0.25), entry(5, 0.5)]
    fetched: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
    fetched.set_result(entry(5, 0.5))
    job.own[job.keys[1]] = fetched
    outcome = await Settlement(p.settings, p.ledger, p.metrics).settle_and_record(job)
    assert (outcome.prompt_tokens, outcome.billed_tokens, outcome.cached_tokens, outcome.cache) == (9, 5, 4, "partial")
    assert outcome.positions == [0, 1, 0] and outcome.keys == job.keys
    assert (job.trace.prompt_tokens, job.trace.cached_tokens, job.trace.cache_hits) == (9, 4, 1)
    assert await p.store.client.get(p.counter("alpha", "tok")) == b"5"
    await p.ledger.flush()
    day = dt.datetime.fromtimestamp(NOW, dt.UTC).date()
    [row] = await p.ledger.report("alpha", day, day, None, {})
    assert (row["requests"], row["upstream_tokens"], row["cached_tokens"], row["failed_tokens"]) == (1, 5, 4, 0)
