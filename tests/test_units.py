"""Unit tests of the pure pieces: key formats, usage split, batching, request parsing, config, tokenizer."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
import xxhash

from proxy import config
from proxy.accounts.keys import KeyRecord, bearer_key, generate_key, hash_key
from proxy.embeddings.calls import chunk
from proxy.embeddings.request import parse_request
from proxy.errors import InvalidRequest, NotFound
from proxy.stores.cache import Entry, decode_entry, encode_entry
from proxy.stores.rediskeys import DigestBuilder, RedisKeys, seed_from_secret
from proxy.tokens import PUBLISHED_SHA256, Tokenizer, TokenizerError, parse_ranks
from proxy.upstream.http import parse_retry_after, split_usage


def test_redis_key_formats_are_literal() -> None:
    k = RedisKeys("ep")
    assert k.cache_namespace(None) == "ep:emb:v2:s:"
    assert k.cache_namespace("search") == "ep:emb:v2:t:search:"
    assert k.key_record("ab12") == "ep:key:ab12"
    assert k.key_id("key_0011") == "ep:keyid:key_0011"
    assert k.key_index() == "ep:keys"
    assert k.cache_secret() == "ep:meta:cache-secret"


def test_digest_is_seeded_xxh3_128_of_documented_layout() -> None:
    seed = seed_from_secret("test-secret")
    assert seed == 4794575993629603450
    text = DigestBuilder(seed, "text-embedding-3-small", None, "s").text("hello")
    assert text == "a9b9138e57bf16bf615016107413b625"
    assert text == xxhash.xxh3_128_hexdigest(b"text-embedding-3-small\x000\x00s\x00hello", seed=seed)
    ids = DigestBuilder(seed, "text-embedding-3-small", 256, "t").tokens([15339])
    assert ids == "6ebf02f136fd92834a6201a1b442160c"
    assert ids == xxhash.xxh3_128_hexdigest(b"text-embedding-3-small\x00256\x00t\x00" + (15339).to_bytes(4, "little"),
                                            seed=seed)
    other_secret = DigestBuilder(seed_from_secret("other"), "text-embedding-3-small", None, "s").text("hello")
    assert other_secret != text


def test_cache_entry_layout() -> None:
    vec = np.array([0.5, -1.25, 3.0], dtype="<f4").tobytes()
    raw = encode_entry(Entry(vec, 7))
    assert raw == b"\xb2\x07\x00\x00\x00" + vec  # under 64 floats: the raw form
    assert decode_entry(raw, 3) == Entry(vec, 7)
    assert decode_entry(raw, 4) is None  # wrong size: treated as a miss
    assert decode_entry(raw[:-1], 3) is None


@pytest.mark.parametrize(
    ("total", "local", "expected"),
    [
        (10, [3, 3, 4], [3, 3, 4]),
        (13, [3, 3, 4], [4, 4, 5]),  # +3: one each
        (7, [1, 1, 1], [3, 2, 2]),
        (4, [5, 5, 5], [2, 1, 1]),  # fewer than local: still at least 1 each
        (3, [5, 5, 5], [1, 1, 1]),
        (5, [1, 1, 8], [1, 1, 3]),
        (100, [1, 99], [1, 99]),
        (4, [0, 0], [2, 2]),
    ],
)
def test_split_usage_adds_up_to_upstream_total(total: int, local: list[int], expected: list[int]) -> None:
    assert split_usage(total, local) == expected
    assert sum(split_usage(total, local)) == total


def test_chunk_respects_items_and_tokens() -> None:
    counts = [5, 5, 5, 5, 5]
    assert chunk(range(5), counts, max_items=2, max_tokens=100) == [[0, 1], [2, 3], [4]]
    assert chunk(range(5), counts, max_items=10, max_tokens=12) == [[0, 1], [2, 3], [4]]
    assert chunk(range(5), counts, max_items=10, max_tokens=100) == [[0, 1, 2, 3, 4]]
    assert chunk([], counts, max_items=10, max_tokens=100) == []


def test_retry_after_headers() -> None:
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert parse_retry_after({}) is None


MODELS = config.load(env={}).models


def test_parse_request_forms() -> None:
    r = parse_request(b'{"model":"text-embedding-3-small","input":"hi"}', MODELS)
    assert (r.kind, r.inputs, r.encoding_format, r.dimensions) == ("s", ["hi"], "float", None)
    r = parse_request(b'{"model":"text-embedding-3-small","input":[1,2,3],"encoding_format":"base64"}', MODELS)
    assert (r.kind, r.inputs, r.encoding_format) == ("t", [[1, 2, 3]], "base64")
    r = parse_request(b'{"model":"text-embedding-3-large","input":[[1],[2,3]],"dimensions":3072}', MODELS)
    assert (r.kind, r.inputs, r.dimensions) == ("t", [[1], [2, 3]], 3072)
    r = parse_request(b'{"model":"text-embedding-3-small","input":[' + b",".join([b"1820"] * 3000) + b"]}", MODELS)
    assert (r.kind, len(r.inputs), len(r.inputs[0])) == ("t", 1, 3000)  # one flat array is one input
    r = parse_request(b'{"model":"text-embedding-3-small","input":[4294967295]}', MODELS)
    assert r.inputs == [[2**32 - 1]]  # within uint32: the vocabulary check comes once the cache has been asked


@pytest.mark.parametrize(
    ("ids", "says"),
    [("[" + ",".join(["1"] * 8193) + "]", "'input' has 8193 tokens"),
     ("[" + ",".join(["[1]"] * 2049) + "]", "'input' has 2049 items"),
     ("[4294967296]", "token id 4294967296"),
     ("[[1],[0,18446744073709551615]]", "'input[1]' contains token id 18446744073709551615")],
)
def test_parse_request_limits_items_tokens_and_id_range(ids: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_request(b'{"model":"text-embedding-3-small","input":' + ids.encode() + b"}", MODELS)
    assert says in exc.value.message and exc.value.code == "invalid_input"


@pytest.mark.parametrize(
    "body",
    [b"", b"nul", b'"str"', b'{"model":"text-embedding-3-small","input":null}',
     b'{"model":"text-embedding-3-small","input":[["a"]]}', b'{"model":"text-embedding-3-small","input":[[1,"a"]]}'],
)
def test_parse_request_refuses(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_request(body, MODELS)


def test_parse_request_unknown_model() -> None:
    with pytest.raises(NotFound):
        parse_request(b'{"model":"nope","input":"x"}', MODELS)


def test_config_defaults_and_env() -> None:
    s = config.load(env={"REDIS_URL": "redis://r:6379/0", "UPSTREAM_BASE_URL": "http://u/v1",
                         "UPSTREAM_API_KEY": "k", "PROXY_ADMIN_KEY": "a"})
    assert dict(s.models) == {
        "text-embedding-3-small": config.ModelSettings(1536, True, price_per_million_tokens=0.02),
        "text-embedding-3-large": config.ModelSettings(3072, True, price_per_million_tokens=0.13),
        "text-embedding-ada-002": config.ModelSettings(1536, False, price_per_million_tokens=0.10),
    }
    assert s.redis.url == "redis://r:6379/0" and s.upstreams["default"].base_url == "http://u/v1"
    assert s.upstream_api_keys["default"] == "k" and s.admin_key == "a"
    assert "upstream_api_keys" not in repr(s)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cache]\nscope = 'everyone'\n", "cache.scope"),
        ("[server]\nport = 'x'\n", "server.port"),
        ("[nope]\n", "unknown section [nope]"),
        ("[models.m]\ndimensions = 8\nupstream = 'missing'\n", "models.m.upstream"),
        ("[models.m]\nsize = 8\n", "models.m.size"),
        ("[redis]\nsocket_timeout_s = -1\n", "redis.socket_timeout_s"),
        ("not toml =", "f.toml"),
    ],
)
def test_config_errors_name_file_and_key(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as exc:
        config.parse(text, "f.toml", {})
    assert "f.toml" in str(exc.value) and message in str(exc.value)


def test_tokenizer_is_exact_and_hash_checked() -> None:
    t = Tokenizer("cl100k_base")
    assert t.count("The quick brown fox jumped over the lazy dog") == 9
    assert t.count("<|endoftext|>") == 7  # special-token text is counted as ordinary text
    assert t.count_many(["a b c"] * 10) == [3] * 10
    assert t.vocab_size == 100277
    with pytest.raises(TokenizerError):
        parse_ranks(b"YQ== 0\n", PUBLISHED_SHA256["cl100k_base"])
    good = b"YQ== 0\nYg== 1\n"
    assert parse_ranks(good, hashlib.sha256(good).hexdigest()) == {b"a": 0, b"b": 1}


def test_keys_format_and_hash() -> None:
    key = generate_key()
    assert key.startswith("sk-gateway-") and len(key) == len("sk-gateway-") + 43
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert generate_key() != key
    rec = KeyRecord("key_1", "search", "n", 1.0, None, False, ("a", "b"))
    raw: dict[bytes, bytes] = {k.encode(): v.encode() for k, v in rec.to_redis().items()}
    assert KeyRecord.from_redis(raw) == rec
    assert "hash" not in rec.public() and set(rec.public()) >= {"id", "team", "name"}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer sk-gateway-x"}, "sk-gateway-x"),
        ({"Authorization": "bearer  sk-gateway-x "}, "sk-gateway-x"),
        ({"Authorization": "Basic xyz"}, None),
        ({"api-key": "sk-gateway-y"}, "sk-gateway-y"),
        ({}, None),
    ],
)
def test_bearer_key(headers: dict[str, Any], expected: str | None) -> None:
    assert bearer_key(headers) == expected


def test_example_config_is_valid_and_complete() -> None:
    from pathlib import Path

    path = Path(__file__).parent.parent / "config" / "proxy.example.toml"
    s = config.load(str(path), env={})
    default = config.load(env={})
    # the example spells out the defaults: loading it changes nothing
    assert s.server == default.server and s.redis == default.redis and s.cache == default.cache
    assert s.cache_redis == default.cache_redis
    assert dict(s.models) == dict(default.models) and dict(s.upstreams) == dict(default.upstreams)
    assert s.keys == default.keys and s.quotas == default.quotas and s.usage == default.usage
    assert s.connections == default.connections
    assert s.admission == default.admission
