"""Issue 15 (points 3, 10 and 11) as pure functions and small fakes: which upstream refusals are the client's, the
reason relayed, zero-token answers for inputs the upstream treats as empty, and what a failed attempt may have cost
(billed by a refused answer, or unconfirmed) and how a merged call shares it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import yarl

from proxy import config
from proxy.errors import InvalidRequest, RateLimited, UpstreamBadGateway, UpstreamTimeout
from proxy.upstream.batching import Lost, MicroBatcher
from proxy.upstream.http import (
    UpstreamClient,
    UpstreamResult,
    _Retryable,
    read_answer,
    upstream_status_error,
    usage_tokens,
)
from proxy.upstream.refusals import RELAYED_CHARS, clean_message, is_blank, upstream_message

SECRET = "sk-upstream-secret-0123456789"


# --- point 10: an answer about the request is the client's ---------------------------------------------------


@pytest.mark.parametrize("status", [400, 405, 413, 415, 422, 451])
def test_a_4xx_about_the_request_is_the_clients_400_and_final(status: int) -> None:
    body = orjson.dumps({"error": {"message": f"bad input (status {status})"}})
    error = upstream_status_error(status, body, None, secret=SECRET)
    assert isinstance(error, InvalidRequest)  # not _Retryable: never tried on another deployment
    assert (error.status, error.type, error.message) == (400, "invalid_request_error",
                                                         f"Upstream: bad input (status {status})")


@pytest.mark.parametrize(("status", "kind"), [(401, "auth"), (403, "auth"), (404, "bad_gateway")])
def test_credentials_and_a_missing_route_or_model_are_the_deployments(status: int, kind: str) -> None:
    error = upstream_status_error(status, b'{"error": {"message": "no"}}', None)
    assert isinstance(error, UpstreamBadGateway) and error.kind == kind


@pytest.mark.parametrize(("status", "error_type"), [(408, UpstreamBadGateway), (409, UpstreamBadGateway),
                                                    (429, RateLimited)])
def test_timeouts_conflicts_and_rate_limits_stay_retryable(status: int, error_type: type) -> None:
    error = upstream_status_error(status, b"", None)
    assert isinstance(error, _Retryable) and isinstance(error.error, error_type)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "OpenAI says no", "type": "invalid_request_error"}}', "OpenAI says no"),
        (b'{"error": "Input validation error: inputs cannot be empty", "error_type": "Validation"}',  # TEI
         "Input validation error: inputs cannot be empty"),
        (b'{"detail": "Not a valid model"}', "Not a valid model"),
        (orjson.dumps({"detail": [{"type": "string_too_long", "loc": ["body", "input", 3],
                                   "msg": "String should have at most 122880 characters", "input": "x" * 200_000}]}),
         "input: String should have at most 122880 characters"),  # FastAPI: no echo, no call-local position
        (b'{"detail": [{"msg": "a"}, {"loc": "odd", "msg": "b"}, {"loc": ["body"], "msg": 5}]}', "a; b"),
        (b"<html>nginx</html>", ""),
        (b'["a list"]', ""),
        (b'{"error": {"message": 5}}', ""),
    ],
)
def test_the_reason_is_read_from_the_usual_error_shapes(body: bytes, message: str) -> None:
    assert upstream_message(body) == message


def test_the_reasons_are_read_from_the_beginning_of_a_fastapi_answer_cut_short() -> None:
    """Infinity echoes a long input once per type `input` may have: the proxy keeps only the first part of such an
    answer (not JSON any more) and reads the messages that precede each echo. An echoed input that looks like an
    error is escaped inside its string, so a client cannot pass its own text off as the upstream's reason."""
    fake = '"loc":["body"],"msg":"not the upstream\'s"'
    body = orjson.dumps({"detail": [
        {"type": "string_too_long", "loc": ["body", "text", "input", "list[constrained-str]", 0],
         "msg": "String should have \"at most\" 122880 characters", "input": fake + " " * 200_000},
        {"type": "string_type", "loc": ["body", "text", "input", "constrained-str"],
         "msg": "Input should be a valid string", "input": [fake + " " * 200_000]}]})
    both = ('text.input.list[constrained-str]: String should have \"at most\" 122880 characters; '
            "text.input.constrained-str: Input should be a valid string")
    assert upstream_message(body) == both  # whole: parsed as JSON
    assert upstream_message(body[:300_000]) == both
    assert upstream_message(body[:150_000]) == both.split("; ")[0]
    assert upstream_message(body[:120]) == ""  # cut inside the first message
    assert upstream_message(b'<html>"loc":["body"],"msg":"x"') == ""  # not FastAPI's answer


def test_a_relayed_reason_holds_no_credential_no_control_characters_and_is_bounded() -> None:
    raw = f"key {SECRET} refused\n\x1b[31mred\u200b\x00 " + "y" * 5000
    cleaned = clean_message(raw, SECRET)
    assert SECRET not in cleaned and "[redacted]" in cleaned
    assert cleaned.startswith("key [redacted] refused [31mred y")
    assert all(c.isprintable() for c in cleaned) and len(cleaned) == RELAYED_CHARS and cleaned.endswith("...")
    error = upstream_status_error(422, orjson.dumps({"detail": raw}), None, secret=SECRET)
    assert isinstance(error, InvalidRequest) and SECRET not in error.message
    assert upstream_status_error(422, b"", None).message == "Upstream: It refused the request (status 422)."


@pytest.mark.parametrize("text", [" ", "\n", "\t \r\n", "\u200b", "\ufeff", " \u200b\u2060 ", "\x00"])
def test_blank_inputs(text: str) -> None:
    assert is_blank(text)


@pytest.mark.parametrize("text", ["x", " x ", "\u200bx", ".", "\u00e9"])
def test_visible_inputs(text: str) -> None:
    assert not is_blank(text)


def test_zero_tokens_are_valid_only_for_inputs_the_upstream_treats_as_empty() -> None:
    assert usage_tokens(0, [1], [" "]) == [0]
    assert usage_tokens(0, [1, 2], ["\n", "\u200b\u200b"]) == [0, 0]
    assert usage_tokens(2, [1, 2, 1], ["hello", " ", "x"]) == [1, 0, 1]  # less than one each: not the blank one
    assert usage_tokens(5, [3, 1, 1], ["hello", " ", "x"]) == [3, 1, 1]  # one each or more: as before
    for reported, local, inputs in ((0, [1], ["x"]), (0, [1, 1], [" ", "x y"]), (0, [1], [[220]])):
        with pytest.raises(_Retryable) as exc:  # token ids are never empty to the upstream
            usage_tokens(reported, local, inputs)
        assert "tokens for" in exc.value.error.message


# --- point 3 and 11: what a refused or unread attempt may have cost ---------------------------------------------


def answer(vectors: list[list[float]], usage: Any = 5) -> bytes:
    doc: dict[str, Any] = {"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}
    if usage is not None:
        doc["usage"] = usage if isinstance(usage, dict) else {"prompt_tokens": usage, "total_tokens": usage}
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "billed", "unconfirmed"),
    [
        (answer([[1.0] * 8, [2.0] * 8]), [2, 3], ""),  # wrong size, plausible usage: billed
        (answer([[1.0] * 4]), [2, 3], ""),  # wrong count
        (answer([[1.0] * 8, [2.0] * 8], usage=None), [2, 3], ""),  # no usage: the local counts, as when valid
        (answer([[1.0] * 8, [2.0] * 8], usage=2**63 - 1), None, "unread"),  # a usage to distrust: unconfirmed
        (answer([[1.0] * 8, [2.0] * 8], usage={"prompt_tokens": 5.0}), None, "unread"),
        (answer([[1.0] * 8, [2.0] * 8], usage=[5]), None, "unread"),
        (b"<html>502 Bad Gateway</html>", None, ""),  # not an upstream's answer: nothing billed
        (b"[1, 2]", None, ""),
    ],
)
def test_a_refused_answer_carries_what_it_billed(raw: bytes, billed: list[int] | None, unconfirmed: str) -> None:
    with pytest.raises(_Retryable) as exc:
        read_answer(raw, ["ab", "cde"], [2, 3], 4)
    assert (exc.value.billed, exc.value.unconfirmed) == (billed, unconfirmed)


def test_a_well_formed_answer_with_a_usage_out_of_bounds_is_unconfirmed() -> None:
    with pytest.raises(_Retryable) as exc:
        read_answer(answer([[1.0] * 4, [2.0] * 4], usage=10**6), ["ab", "cde"], [2, 3], 4)
    assert (exc.value.billed, exc.value.unconfirmed) == (None, "unread")
    result = read_answer(answer([[1.0] * 4, [2.0] * 4], usage=7), ["ab", "cde"], [2, 3], 4)
    assert result.tokens == [3, 4]


class _RaisingSession:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def post(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


def _connector_error() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)  # as aiohttp builds it
    return aiohttp.ClientConnectorError(key, OSError(111, "refused"))


@pytest.mark.parametrize(
    ("exc", "error_type", "unconfirmed"),
    [
        (aiohttp.ConnectionTimeoutError("no connection in time"), UpstreamBadGateway, ""),  # never sent
        (_connector_error(), UpstreamBadGateway, ""),  # refused: never sent
        (TimeoutError(), UpstreamTimeout, "timeout"),  # sent, no answer in time
        (aiohttp.SocketTimeoutError("read"), UpstreamTimeout, "timeout"),
        (aiohttp.ServerDisconnectedError(), UpstreamBadGateway, "cut"),  # cut after sending
        (aiohttp.ClientPayloadError("cut short"), UpstreamBadGateway, "unread"),
    ],
)
async def test_an_attempt_is_unconfirmed_when_it_may_have_reached_the_upstream(
    exc: BaseException, error_type: type, unconfirmed: str
) -> None:
    client = UpstreamClient(config.parse("", "/x.toml", {"UPSTREAM_API_KEY": "k"}))
    client._session = _RaisingSession(exc)  # type: ignore[assignment]
    with pytest.raises(_Retryable) as raised:
        await client.post((yarl.URL("http://127.0.0.1:9/v1/embeddings"), {}, "k"), b"{}", 1.0, 1024)
    assert isinstance(raised.value.error, error_type) and raised.value.unconfirmed == unconfirmed


async def test_a_merged_calls_failed_attempts_are_shared_by_input() -> None:
    gate = asyncio.Event()
    calls = 0

    async def call(model: str, inputs: list[str] | list[list[int]], counts: list[int], dims: int | None,
                   user: str | None, asked: float, lost: Lost | None = None,
                   gave_up: object = None, input_type: str | None = None) -> tuple[UpstreamResult, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        elif lost is not None:  # the merged call: a refused answer, then an attempt that timed out
            lost("failed", [2 * n for n in counts])
            lost("unconfirmed", counts)
        return UpstreamResult(np.zeros((len(inputs), 2), dtype="<f4"), list(counts)), "a"

    seen: dict[str, list[tuple[str, int]]] = {"x": [], "y": [], "z": []}

    def on_lost(name: str) -> Any:
        return lambda column, tokens: seen[name].append((column, tokens))

    batcher = MicroBatcher(call, lambda model: (100, 1000))
    first = asyncio.create_task(batcher.submit("m", ["s"], [1], None, None, on_lost=on_lost("z")))
    await asyncio.sleep(0)
    merged = [asyncio.create_task(batcher.submit("m", inputs, counts, None, None, on_lost=on_lost(name)))
              for name, inputs, counts in (("x", ["a", "b"], [1, 2]), ("y", ["c"], [4]))]
    done, _ = await asyncio.wait(merged, timeout=5.0)
    assert done == set(merged) and calls == 2
    assert seen == {"x": [("failed", 6), ("unconfirmed", 3)], "y": [("failed", 8), ("unconfirmed", 4)], "z": []}
    gate.set()
    await first

