"""Issue 20, the portable `input_type` (query, document, classification, clustering) and checked `dimensions`:
parsed and checked before anything goes upstream, by the model's `input_type`, `default_input_type` and
`allowed_dimensions`; part of the cache key; an OpenAI-kind model refuses it as OpenAI refuses an unknown argument.
The configuration is checked against the providers that serve each model (config/providers.py: the one mapping).
End to end against each provider's mock: tests/test_providers_*.py.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import xxhash

from proxy.config import ConfigError, parse
from proxy.config.providers import INPUT_TYPE_MAP, INPUT_TYPES, provider_input_type
from proxy.embeddings.request import parse_request
from proxy.errors import InvalidRequest
from proxy.stores.rediskeys import DigestBuilder, seed_from_secret

SOURCE = "/etc/proxy.toml"
PROVIDERS = """
[upstreams.cohere]
kind = "cohere"
api_key_env = "COHERE_API_KEY"
[upstreams.bedrock]
kind = "bedrock"
region = "us-east-1"
[upstreams.voyage]
kind = "voyage"
"""
CONFIG = PROVIDERS + """
[models."embed-v4.0"]
dimensions = 1536
allowed_dimensions = [256, 512, 1024, 1536]
input_type = "required"
deployments = [{ upstream = "cohere" }, { upstream = "bedrock", upstream_model = "cohere.embed-v4:0" }]

[models."embed-doc"]
dimensions = 1024
input_type = "required"
default_input_type = "document"
upstream = "cohere"

[models."voyage-3.5"]
dimensions = 1024
supports_dimensions = true
input_type = "optional"
upstream = "voyage"

[models."amazon.titan-embed-text-v2:0"]
dimensions = 1024
allowed_dimensions = [256, 512, 1024]
deployments = [{ upstream = "bedrock" }]

[models."text-embedding-3-small"]
dimensions = 1536
supports_dimensions = true
"""
MODELS = parse(CONFIG, SOURCE, {}).models


def request(model: str, **fields: Any) -> bytes:
    return orjson.dumps({"model": model, "input": "hello", **fields})


def refusal(body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as err:
        parse_request(body, MODELS)
    return err.value


def test_the_request_carries_the_input_type_it_is_embedded_as() -> None:
    for value in INPUT_TYPES:
        assert parse_request(request("embed-v4.0", input_type=value), MODELS).input_type == value
        assert parse_request(request("voyage-3.5", input_type=value), MODELS).input_type == value
    assert parse_request(request("voyage-3.5"), MODELS).input_type is None  # optional, no default: none
    assert parse_request(request("embed-doc"), MODELS).input_type == "document"  # the model's default
    assert parse_request(request("embed-doc", input_type="query"), MODELS).input_type == "query"
    assert parse_request(request("embed-doc", input_type=None), MODELS).input_type == "document"


def test_an_openai_kind_model_refuses_input_type_as_openai_refuses_an_unknown_argument() -> None:
    for value in ("query", None, 3):
        error = refusal(request("text-embedding-3-small", input_type=value))
        assert (error.status, error.message, error.param) == (
            400, "Unrecognized request argument supplied: input_type", "input_type")
    # before any other check, as OpenAI's unknown arguments are
    error = refusal(orjson.dumps({"model": "text-embedding-3-small", "input": "", "input_type": "query"}))
    assert error.message == "Unrecognized request argument supplied: input_type"


def test_bad_input_types_are_refused_naming_the_parameter() -> None:
    error = refusal(request("amazon.titan-embed-text-v2:0", input_type="query"))  # a model with no such notion
    assert (error.message, error.param) == ("'amazon.titan-embed-text-v2:0' does not take 'input_type'.",
                                            "input_type")
    error = refusal(request("embed-v4.0", input_type="search_query"))  # the provider's word, not the portable one
    assert error.param == "input_type" and "query, document, classification, clustering" in error.message
    error = refusal(request("embed-v4.0"))  # required, and no default
    assert (error.param, error.code) == ("input_type", "missing_required_parameter")
    assert refusal(request("embed-v4.0", input_type=["query"])).param == "input_type"


def test_dimensions_must_be_a_size_the_model_allows() -> None:
    assert parse_request(request("embed-v4.0", input_type="query", dimensions=512), MODELS).dimensions == 512
    assert parse_request(request("amazon.titan-embed-text-v2:0", dimensions=256), MODELS).dimensions == 256
    for dims in (300, 2048, 0, True, "256"):
        error = refusal(request("amazon.titan-embed-text-v2:0", dimensions=dims))
        assert (error.param, error.message) == (
            "dimensions", "'dimensions' must be one of 256, 512, 1024 for 'amazon.titan-embed-text-v2:0'.")
    assert refusal(request("embed-doc", dimensions=256)).param == "dimensions"  # no sizes: none taken
    assert parse_request(request("voyage-3.5", dimensions=300), MODELS).dimensions == 300  # 1..native


def test_a_provider_model_takes_text_only() -> None:
    error = refusal(orjson.dumps({"model": "embed-doc", "input": [[1, 2, 3]]}))
    assert error.param == "input" and "takes text only" in error.message
    assert parse_request(orjson.dumps({"model": "text-embedding-3-small", "input": [[1, 2]]}), MODELS).kind == "t"


def test_the_input_type_is_part_of_the_cache_key_and_keys_without_one_are_unchanged() -> None:
    seed = seed_from_secret("test-secret")
    plain = DigestBuilder(seed, "m", None, "s").text("hello")
    assert plain == xxhash.xxh3_128_hexdigest(b"m\x000\x00s\x00hello", seed=seed)  # as before issue 20
    assert DigestBuilder(seed, "m", None, "s", input_type=None).text("hello") == plain
    query = DigestBuilder(seed, "m", None, "s", input_type="query").text("hello")
    document = DigestBuilder(seed, "m", None, "s", input_type="document").text("hello")
    assert query == xxhash.xxh3_128_hexdigest(b"m\x000\x00s:query\x00hello", seed=seed)
    assert len({plain, query, document}) == 3
    # the kind field ends at its NUL: no input text can make a plain key collide with a typed one
    assert DigestBuilder(seed, "m", None, "s").text(":query\x00hello") != query


def test_the_mapping_lives_in_one_table() -> None:
    assert provider_input_type("cohere", "query") == "search_query"
    assert provider_input_type("bedrock-cohere", "document") == "search_document"
    assert provider_input_type("voyage", "classification") is None  # Voyage has no such type: none sent
    assert provider_input_type("jina", "clustering") == "separation"
    assert provider_input_type("gemini", "query") == provider_input_type("vertex", "query") == "RETRIEVAL_QUERY"
    assert all(set(m) == set(INPUT_TYPES) for m in INPUT_TYPE_MAP.values())


@pytest.mark.parametrize(("toml", "message"), [
    ('[models.m]\ndimensions = 8\ninput_type = "required"\n',
     'models.m.input_type must be "none": its openai deployment has no input type'),
    (PROVIDERS + '[models.m]\ndimensions = 8\ninput_type = "optional"\n'
     'deployments = [{ upstream = "bedrock", upstream_model = "amazon.titan-embed-text-v2:0" }]\n',
     'models.m.input_type must be "none": its bedrock-titan deployment has no input type'),
    (PROVIDERS + '[models.m]\ndimensions = 8\nupstream = "cohere"\n',
     "models.m.input_type: cohere needs an input type on every call"),
    (PROVIDERS + '[models.m]\ndimensions = 8\ninput_type = "optional"\nupstream = "cohere"\n',
     "models.m.input_type: cohere needs an input type on every call"),
    (PROVIDERS + '[models.m]\ndimensions = 8\ndefault_input_type = "query"\nupstream = "voyage"\n',
     'models.m.default_input_type needs input_type = "required" or "optional"'),
    (PROVIDERS + '[models.m]\ndimensions = 8\ninput_type = "optional"\ndefault_input_type = "search_query"\n'
     'upstream = "voyage"\n', "models.m.default_input_type must be one of"),
    ('[models.m]\ndimensions = 8\nallowed_dimensions = [4, 4]\n', "models.m.allowed_dimensions lists a size twice"),
    (PROVIDERS + '[models.m]\ndimensions = 8\ninput_type = "required"\nmax_batch_items = 200\nupstream = "cohere"\n',
     "models.m.max_batch_items must be at most 96: one cohere call carries no more"),
    ('[upstreams.v]\nkind = "vertex"\nproject = "p"\n', 'upstreams.v.location is required with kind = "vertex"'),
    ('[upstreams.b]\nkind = "bedrock"\nregion = "us-east-1.evil.example/x"\n',
     "upstreams.b.region must be lower-case letters, digits and dashes"),
    ('[upstreams.b]\nkind = "bedrock"\nregion = "us-east-1"\napi_key_env = "K"\n',
     'upstreams.b.api_key_env: kind = "bedrock" takes no API key'),
    ('[models.m]\ndimensions = 8\nfamilies = ["cohere"]\n', "unknown key models.m.families"),
])
def test_a_model_its_providers_cannot_serve_is_refused_at_load(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(toml, SOURCE, {})
    assert str(err.value).startswith(f"{SOURCE}: {message}")


def test_the_providers_per_call_limits_cap_the_models_batches() -> None:
    assert MODELS["embed-v4.0"].max_batch_items == 96  # Cohere, directly and on Bedrock
    assert MODELS["amazon.titan-embed-text-v2:0"].max_batch_items == 1  # one text per InvokeModel call
    assert (MODELS["voyage-3.5"].max_batch_items, MODELS["voyage-3.5"].max_batch_tokens) == (1000, 120_000)
    assert MODELS["text-embedding-3-small"].max_batch_items == 2048
    lower = parse(PROVIDERS + '[models.m]\ndimensions = 8\ninput_type = "required"\nmax_batch_items = 10\n'
                  'upstream = "cohere"\n', SOURCE, {})
    assert lower.models["m"].max_batch_items == 10
    assert lower.upstreams["cohere"].base_url == "https://api.cohere.com"  # the provider's own by default
    assert lower.upstreams["bedrock"].base_url == "https://bedrock-runtime.us-east-1.amazonaws.com"  # its region's
    assert lower.upstreams["bedrock"].api_key_env == ""  # AWS credentials, no key: /readyz needs none
    vertex = parse('[upstreams.v]\nkind = "vertex"\nproject = "p"\nlocation = "europe-west4"\n', SOURCE, {})
    assert vertex.upstreams["v"].base_url == "https://europe-west4-aiplatform.googleapis.com/v1"


def test_bedrock_and_vertex_upstreams_need_no_api_key_to_be_ready() -> None:
    from proxy.http.readiness import upstream_problems

    settings = parse(PROVIDERS + '[upstreams.v]\nkind = "vertex"\nproject = "p"\nlocation = "us-central1"\n'
                     '[models.t]\ndimensions = 8\nupstream = "bedrock"\n'
                     '[models.g]\ndimensions = 8\ninput_type = "optional"\nupstream = "v"\n', SOURCE, {})
    assert upstream_problems(settings) == {}  # before: "$UPSTREAM_API_KEY is not set" for both


async def test_micro_batching_never_merges_calls_of_different_input_types() -> None:
    import asyncio

    import numpy as np

    from proxy.upstream.batching import MicroBatcher
    from proxy.upstream.http import UpstreamResult

    calls: list[tuple[list[str], str | None]] = []
    gate = asyncio.Event()

    async def call(model: str, inputs: Any, counts: list[int], dims: Any, user: Any, asked: float, lost: Any = None,
                   gave_up: Any = None, input_type: str | None = None) -> tuple[UpstreamResult, str]:
        calls.append((list(inputs), input_type))
        if len(calls) == 1:
            await gate.wait()
        return UpstreamResult(np.zeros((len(inputs), 2), dtype="<f4"), list(counts)), "u"

    batcher = MicroBatcher(call, lambda model: (100, 10_000))
    first = asyncio.create_task(batcher.submit("m", ["a"], [1], None, None, input_type="query"))
    await asyncio.sleep(0)  # in flight: the next ones of its lane wait to join
    rest = [asyncio.create_task(batcher.submit("m", [x], [1], None, None, input_type=t))
            for x, t in (("b", "query"), ("c", "document"), ("d", "query"))]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(first, *rest)
    assert sorted(calls) == [(["a"], "query"), (["b", "d"], "query"), (["c"], "document")]
