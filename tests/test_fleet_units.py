"""The fleet's parts alone, with pinned clocks and fakes: router, pacing, micro-batcher, configuration."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors, trainers

from proxy import config
from proxy.cli.main import main
from proxy.embeddings.request import parse_request
from proxy.errors import InvalidRequest, UpstreamBadGateway
from proxy.tokens import make_tokenizer
from proxy.upstream import parse_duration
from proxy.upstream.batching import Lost, MicroBatcher
from proxy.upstream.http import UpstreamResult
from proxy.upstream.pacing import Budget
from proxy.upstream.router import Router

FLEET_TOML = """
[upstreams.a]
base_url = "http://a/v1"
api_key_env = "KEY_A"
allowed_fails = 2
cooldown_s = 30
[upstreams.b]
base_url = "http://b/v1"
api_key_env = "KEY_B"
[upstreams.az]
kind = "azure"
base_url = "https://east.example.com"
api_key_env = "KEY_AZ"
api_version = "2024-10-21"
[upstreams.c]
base_url = "http://c/v1"
api_key_env = ""

[models.m]
dimensions = 4
deployments = [
  { upstream = "a", weight = 2 },
  { upstream = "az", upstream_model = "emb-m", weight = 1 },
  { upstream = "c", priority = 1 },
]
[models.one]
dimensions = 4
upstream = "b"
"""


def make_tokenizer_file(directory: Path) -> Path:
    """A tiny WordPiece tokenizer trained on the spot, with BERT's [CLS] ... [SEP] template."""
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = ["hello world", "the quick brown fox", "jumps over the lazy dog", "embedding proxy tests"]
    tok.train_from_iterator(words * 20, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def settings(text: str = FLEET_TOML) -> config.Settings:
    return config.parse(text, "/etc/proxy.toml", {"KEY_A": "ka", "KEY_B": "kb", "KEY_AZ": "kaz"})


# --- configuration ----------------------------------------------------------------------------------------


def test_deployments_are_read_and_upstream_name_stays_valid() -> None:
    s = settings()
    m = s.models["m"]
    assert [(d.upstream, d.upstream_model, d.weight, d.priority) for d in m.deployments] == [
        ("a", "", 2.0, 0), ("az", "emb-m", 1.0, 0), ("c", "", 1.0, 1)]
    assert s.upstreams["az"].kind == "azure" and s.upstreams["az"].api_version == "2024-10-21"
    assert s.upstreams["a"].allowed_fails == 2 and s.upstreams["a"].cooldown_s == 30.0
    assert s.upstreams["b"].max_queue_wait_s == 10.0 and s.upstreams["b"].allowed_fails == 3
    one = s.models["one"]
    assert one.deployments == () and [(d.upstream, d.upstream_model) for d in config.deployments_of(one)] == [
        ("b", "")]
    assert s.upstream_for("m").base_url == "http://a/v1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models.m]\ndimensions = 4\ndeployments = [{ upstream = 'nope' }]\n",
         "models.m.deployments[0].upstream names unknown upstream 'nope'"),
        ("[models.m]\ndimensions = 4\ndeployments = [{ upstream = 'default', weight = 0 }]\n",
         "models.m.deployments[0].weight must be above 0, not 0"),
        ("[models.m]\ndimensions = 4\ndeployments = [{ upstream = 'default', weight = -1 }]\n",
         "models.m.deployments[0].weight must be above 0, not -1"),
        ("[models.m]\ndimensions = 4\ndeployments = [{ upstream = 'default', colour = 1 }]\n",
         "unknown key models.m.deployments[0].colour"),
        ("[models.m]\ndimensions = 4\ndeployments = []\n", "models.m.deployments must be a non-empty array"),
        ("[models.m]\ndimensions = 4\nupstream = 'default'\ndeployments = [{ upstream = 'default' }]\n",
         "models.m: give either upstream or deployments"),
        ("[upstreams.x]\nkind = 'sagemaker'\n", "upstreams.x.kind must be one of ('openai', 'azure', 'cohere', "
         "'voyage', 'gemini', 'vertex', 'bedrock', 'jina')"),
        ("[upstreams.x]\nkind = 'bedrock'\n", 'upstreams.x.region is required with kind = "bedrock"'),
        ("[upstreams.x]\nkind = 'azure'\n", "upstreams.x.api_version is required"),
        ("[models.m]\ndimensions = 4\ntokenizer = 'hf:/no/such/tokenizer.json'\n",
         "models.m.tokenizer: cannot load the tokenizer file /no/such/tokenizer.json"),
        ("[models.m]\ndimensions = 4\ntokenizer = 'o200k'\n", "models.m.tokenizer must be one of"),
        ("[models.m]\ndimensions = 4\ndeployments = [{ weight = 2 }]\n",
         "models.m.deployments[0].upstream is required"),
        ("[cache]\nlocal_ttl_s = inf\n", "cache.local_ttl_s must be a finite number, not inf"),
        ("[keys]\ncache_s = nan\n", "keys.cache_s must be a finite number, not nan"),
        ("[upstreams.az]\nkind = 'azure'\napi_version = 'v'\n[models.m]\ndimensions = 4\n"
         "deployments = [{ upstream = 'az', upstream_model = '../../admin' }]\n",
         "models.m.deployments[0].upstream_model: the Azure deployment name '../../admin' must be"),
        ("[upstreams.az]\nkind = 'azure'\napi_version = 'v'\n[models.m]\ndimensions = 4\n"
         "deployments = [{ upstream = 'az', upstream_model = '..' }]\n",
         "models.m.deployments[0].upstream_model: the Azure deployment name '..' must be"),
        ("[upstreams.az]\nkind = 'azure'\napi_version = 'v'\n[models.'org/m']\ndimensions = 4\nupstream = 'az'\n",
         "models.org/m.upstream_model: the Azure deployment name 'org/m' must be"),
    ],
)
def test_bad_fleet_config_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(text, "/etc/proxy.toml", {})
    assert str(err.value).startswith("/etc/proxy.toml: ")
    assert message in str(err.value)


def test_check_config_names_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text("[models.m]\ndimensions = 4\ndeployments = [{ upstream = 'gone' }]\n")
    assert main(["--config", str(path), "check-config"]) == 2
    assert f"{path}: models.m.deployments[0].upstream names unknown upstream 'gone'" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    path.write_text("[models.m]\ndimensions = 4\ntokenizer = 'hf:bad.json'\n")  # relative to the config file
    assert main(["--config", str(path), "check-config"]) == 2
    assert f"models.m.tokenizer: cannot load the tokenizer file {tmp_path / 'bad.json'}" in capsys.readouterr().err


def test_hf_tokenizer_counts_special_tokens_and_refuses_token_ids(tmp_path: Path) -> None:
    path = make_tokenizer_file(tmp_path)
    s = config.parse(f"[models.bge]\ndimensions = 4\ntokenizer = 'hf:{path}'\n", "/etc/proxy.toml", {})
    tok = make_tokenizer(s.models["bge"].tokenizer)
    assert tok.count_many(["hello world", "the quick brown fox"]) == [4, 6]  # [CLS] ... [SEP]
    assert tok.count("hello") == 3
    with pytest.raises(InvalidRequest) as err:
        parse_request(b'{"model": "bge", "input": [[1, 2, 3]]}', s.models)
    assert "check_embedding_ctx_length=False" in err.value.message and err.value.param == "input"
    assert parse_request(b'{"model": "bge", "input": "hello"}', s.models).inputs == ["hello"]


# --- durations and pacing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("850ms", 0.85), ("1h2m3.5s", 3723.5), ("0s", 0.0), ("20", 20.0),
     ("2.5", 2.5), ("", None), ("soon", None), ("5x", None), ("-1", None), ("1s junk", None)],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_budget_waits_for_the_reset_the_headers_named() -> None:
    b = Budget()
    assert b.wait(1000, now=100.0) == 0.0  # nothing known: the upstream decides
    b.take(10, 100.0)
    b.observe({"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "1",
               "x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-tokens": "500",
               "x-ratelimit-reset-tokens": "500ms"}, 100.0, 10)
    b.done(10)
    assert b.remaining(100.0) == (1, 500)
    assert b.wait(100, 100.0) == 0.0
    b.take(100, 100.0)  # sent: one request and 100 tokens less until the next headers
    assert b.remaining(100.0) == (0, 400)
    assert b.wait(1, 100.5) == 1.5  # no request left until the requests reset at 102
    assert b.remaining(102.0) == (3, None)  # reset: the whole request limit again; tokens unknown
    assert b.wait(10**6, 102.0) == 0.0


def test_budget_counts_calls_in_flight_when_headers_arrive() -> None:
    b = Budget()
    b.take(5, 0.0)
    b.take(7, 0.0)  # a second call in flight when the first's headers arrive
    b.observe({"x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "1s",
               "x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "1s"}, 0.0, 5)
    assert b.remaining(0.5) == (9, 93)


def test_after_a_reset_the_limit_is_there_once() -> None:
    b = Budget()
    b.take(1, 100.0)
    b.observe({"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": "2s"}, 100.0, 1)
    b.done(1)
    assert b.wait(1, 101.0) == 1.0
    for _ in range(3):  # after the reset at 102: the whole limit, once
        assert b.wait(1, 102.5) == 0.0
        b.take(1, 102.5)
    assert b.remaining(102.5) == (0, None)  # this process's sends since the reset are taken from it
    assert b.wait(1, 102.5) == 2.0  # until the next reset: within the longest window the upstream named (2 s)


# --- router ---------------------------------------------------------------------------------------------------


def test_weighted_choice_among_the_lowest_priority() -> None:
    router = Router(settings(), random.Random(7))
    picks = [router.choose("m", 1, 0.0).deployment for _ in range(3000)]
    counts = {name: sum(1 for d in picks if d is not None and d.upstream == name) for name in ("a", "az", "c")}
    assert counts["c"] == 0  # priority 1: only when no priority-0 deployment can take the call
    assert 1850 <= counts["a"] <= 2150 and counts["a"] + counts["az"] == 3000


def test_cooldown_priority_fallback_and_return() -> None:
    router = Router(settings(), random.Random(1))
    a, az, c = router.models["m"]
    assert not Router.failed(a, "bad_gateway", 10.0)
    assert Router.failed(a, "bad_gateway", 10.0)  # allowed_fails = 2: out for cooldown_s = 30
    assert {router.choose("m", 1, 11.0).deployment.upstream for _ in range(50)} == {"az"}  # type: ignore[union-attr]
    for _ in range(3):
        Router.failed(az, "timeout", 12.0)  # default allowed_fails = 3
    assert router.choose("m", 1, 13.0).deployment is c  # every priority-0 one cooling down: priority 1
    Router.failed(c, "connect", 13.0)
    Router.failed(c, "connect", 13.0)
    Router.failed(c, "connect", 13.0)
    choice = router.choose("m", 1, 14.0)
    assert choice.deployment is None and choice.wait == 26.0 and not choice.rate_limited  # a is back at 40
    assert router.choose("m", 1, 40.0).deployment is a
    assert Router.failed(a, "bad_gateway", 40.0)  # its first call after the cooldown decides: out again
    assert a.cool_until == 70.0
    Router.succeeded(a)
    assert a.fails == 0


def test_a_models_only_deployment_is_never_cooled_down_and_429_pauses() -> None:
    router = Router(settings(), random.Random(1))
    (b,) = router.models["one"]
    for _ in range(10):
        assert not Router.failed(b, "unavailable", 5.0)
    assert router.choose("one", 1, 5.0).deployment is b
    Router.failed(b, "rate_limited", 5.0, retry_after=2.0)
    assert b.fails == 10  # a 429 is not a failure
    choice = router.choose("one", 1, 6.0)
    assert choice.deployment is None and choice.wait == 1.0 and choice.rate_limited and choice.max_wait == 10.0
    assert router.choose("one", 1, 7.0).deployment is b


def test_azure_target_and_body() -> None:
    router = Router(settings(), random.Random(1))
    a, az, _ = router.models["m"]
    url, headers, key = az.target
    assert str(url) == "https://east.example.com/openai/deployments/emb-m/embeddings?api-version=2024-10-21"
    assert headers == {"Content-Type": "application/json", "api-key": "kaz"} and key == "kaz"
    url, headers, _ = a.target
    assert str(url) == "http://a/v1/embeddings" and headers["Authorization"] == "Bearer ka"
    assert "api-key" not in headers


# --- micro-batcher -------------------------------------------------------------------------------------------


async def test_batcher_merges_while_a_call_is_in_flight_and_splits_exactly() -> None:
    calls: list[list[str]] = []
    gate = asyncio.Event()

    async def call(model: str, inputs: list[str] | list[list[int]], counts: list[int], dims: int | None,
                   user: str | None, asked: float, lost: Lost | None = None,
                   gave_up: object = None, input_type: str | None = None) -> tuple[UpstreamResult, str]:
        calls.append(list(inputs))  # type: ignore[arg-type]
        if len(calls) == 1:
            await gate.wait()
        vectors = np.array([[float(s[1:]), 0.0] for s in inputs], dtype="<f4")  # type: ignore[index]
        total = sum(counts) + len(counts)  # the upstream counts one more token per input than we did
        from proxy.upstream.http import split_usage
        return UpstreamResult(vectors, split_usage(total, counts)), "a"

    batcher = MicroBatcher(call, lambda model: (4, 1000))
    first = asyncio.create_task(batcher.submit("m", ["x0"], [3], None, None))
    await asyncio.sleep(0)
    assert calls == [["x0"]]  # an idle lane: the lone call went at once
    rest = [asyncio.create_task(batcher.submit("m", [f"x{i}", f"x{i + 10}"], [2, 4], None, None))
            for i in (1, 2, 3)]
    other_user = asyncio.create_task(batcher.submit("m", ["x9"], [1], None, "u2"))
    await asyncio.sleep(0)
    assert calls == [["x0"], ["x9"]]  # another user is another lane
    gate.set()
    results = await asyncio.gather(first, *rest, other_user)
    # two waiting calls fill the next (4 items): it went at once; the third followed after the join window
    assert calls[2:] == [["x1", "x11", "x2", "x12"], ["x3", "x13"]]
    for (result, served), expected, tokens in zip(results[1:4], ([1, 11], [2, 12], [3, 13]),
                                                  ([2, 4], [2, 4], [3, 5]), strict=True):
        assert served == "a"
        assert result.vectors[:, 0].tolist() == expected
        # merged with another caller, whose inputs the upstream's extra tokens may belong to: its local counts;
        # alone in its call: the upstream's own count (2 + 1 and 4 + 1)
        assert result.tokens == tokens
    assert results[0][0].tokens == [4]


async def test_batcher_fails_every_caller_and_retries_a_400_alone() -> None:
    refuse = {"bad"}
    calls: list[list[str]] = []
    gate = asyncio.Event()

    async def call(model: str, inputs: list[str] | list[list[int]], counts: list[int], dims: int | None,
                   user: str | None, asked: float, lost: Lost | None = None,
                   gave_up: object = None, input_type: str | None = None) -> tuple[UpstreamResult, str]:
        calls.append(list(inputs))  # type: ignore[arg-type]
        if len(calls) == 1:
            await gate.wait()
            raise UpstreamBadGateway("down")
        if refuse & set(inputs):  # type: ignore[arg-type]
            raise InvalidRequest("Upstream: bad input")
        return UpstreamResult(np.zeros((len(inputs), 2), dtype="<f4"), list(counts)), "a"

    batcher = MicroBatcher(call, lambda model: (100, 1000))
    first = asyncio.create_task(batcher.submit("m", ["a"], [1], None, None))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(batcher.submit("m", [s], [1], None, None)) for s in ("ok1", "bad", "ok2")]
    await asyncio.sleep(0)
    gate.set()
    with pytest.raises(UpstreamBadGateway):
        await first
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert calls[1] == ["ok1", "bad", "ok2"]  # merged, refused with a 400 ...
    assert sorted(map(tuple, calls[2:])) == [("bad",), ("ok1",), ("ok2",)]  # ... then each caller alone
    assert isinstance(outcomes[1], InvalidRequest)
    assert not isinstance(outcomes[0], BaseException) and not isinstance(outcomes[2], BaseException)


def test_readiness_needs_no_key_for_a_keyless_upstream() -> None:
    from proxy.http.readiness import upstream_problems

    s = config.parse('[upstreams.tei]\nbase_url = "http://tei:8080/v1"\napi_key_env = ""\n'
                     '[upstreams.oa]\nbase_url = "https://api.example.com/v1"\napi_key_env = "OA_KEY"\n'
                     '[models.m]\ndimensions = 4\ndeployments = [{ upstream = "tei" }, { upstream = "oa" }]\n',
                     "/etc/proxy.toml", {"UPSTREAM_API_KEY": "k"})
    assert list(upstream_problems(s)) == ["oa"]  # only upstreams a model uses are checked (not "default")
    assert upstream_problems(s)["oa"].startswith("upstream oa: $OA_KEY is not set")


async def test_batcher_a_merged_call_leaves_while_another_is_in_flight_with_the_earliest_deadline() -> None:
    calls: list[tuple[list[str], float]] = []
    gate = asyncio.Event()

    async def call(model: str, inputs: list[str] | list[list[int]], counts: list[int], dims: int | None,
                   user: str | None, asked: float, lost: Lost | None = None,
                   gave_up: object = None, input_type: str | None = None) -> tuple[UpstreamResult, str]:
        calls.append((list(inputs), asked))  # type: ignore[arg-type]
        if len(calls) == 1:
            await gate.wait()  # the first call stalls
        return UpstreamResult(np.zeros((len(inputs), 2), dtype="<f4"), list(counts)), "a"

    batcher = MicroBatcher(call, lambda model: (100, 1000))
    stalled = asyncio.create_task(batcher.submit("m", ["s"], [1], None, None, asked=1.0))
    await asyncio.sleep(0)
    joined = [asyncio.create_task(batcher.submit("m", [x], [1], None, None, asked=t))
              for x, t in (("x", 3.1), ("y", 3.0))]  # within ASKED_SPREAD_S: they share a call
    done, _ = await asyncio.wait(joined, timeout=5.0)
    assert done == set(joined)  # the stalled call held no one up
    assert calls == [(["s"], 1.0), (["x", "y"], 3.0)]  # its deadline counts from when its earliest request asked
    gate.set()
    await stalled


async def test_batcher_merges_within_a_team_only() -> None:
    calls: list[list[str]] = []
    gate = asyncio.Event()

    async def call(model: str, inputs: list[str] | list[list[int]], counts: list[int], dims: int | None,
                   user: str | None, asked: float, lost: Lost | None = None,
                   gave_up: object = None, input_type: str | None = None) -> tuple[UpstreamResult, str]:
        calls.append(list(inputs))  # type: ignore[arg-type]
        if inputs[0] in ("r0", "b0"):
            await gate.wait()
        return UpstreamResult(np.zeros((len(inputs), 2), dtype="<f4"), list(counts)), "a"

    def submit(x: str) -> asyncio.Task[tuple[UpstreamResult, str]]:
        return asyncio.create_task(batcher.submit("m", [x], [1], None, None, team={"r": "red", "b": "blue"}[x[0]]))

    batcher = MicroBatcher(call, lambda model: (100, 1000))
    first = [submit("r0"), submit("b0")]
    await asyncio.sleep(0)
    rest = [submit(x) for x in ("r1", "b1", "r2", "b2")]
    await asyncio.wait(rest, timeout=5.0)
    gate.set()
    await asyncio.gather(*first, *rest)
    assert sorted(calls) == [["b0"], ["b1", "b2"], ["r0"], ["r1", "r2"]]
