"""The upstream's answer and headers, checked as pure functions: what counts as malformed, the usage bound and its
split, Retry-After. A malformed answer must raise the client's retryable error, never a bare exception."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import orjson
import pytest

from proxy.errors import UpstreamBadGateway
from proxy.upstream.http import (
    MAX_RETRY_AFTER_S,
    _Retryable,
    answer_limit,
    parse_answer,
    parse_retry_after,
    usage_tokens,
)

V0 = [0.5, -0.25, 1.5, 2.0]
V1 = [0.125, 0.75, -3.0, 4.0]


def b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def answer(data: Any = None, usage: Any = "default", **extra: Any) -> bytes:
    doc: dict[str, Any] = {"object": "list", "model": "m", **extra}
    doc["data"] = [{"object": "embedding", "index": 0, "embedding": V0},
                   {"object": "embedding", "index": 1, "embedding": V1}] if data is None else data
    if usage != "default":
        doc["usage"] = usage
    else:
        doc["usage"] = {"prompt_tokens": 5, "total_tokens": 5}
    return json.dumps(doc).encode()  # not orjson: it refuses ints beyond 64 bits


def items(*embeddings: Any) -> list[dict[str, Any]]:
    return [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)]


def test_well_formed_answers() -> None:
    vectors, tokens = parse_answer(answer(), 2, 4)
    assert vectors.dtype == np.dtype("<f4") and vectors.tolist() == [V0, V1] and tokens == 5
    vectors, _ = parse_answer(answer(items(b64(V0), b64(V1))), 2, 4)
    assert vectors.tolist() == [V0, V1]
    reverse = [{"index": 1, "embedding": V1}, {"index": 0, "embedding": b64(V0)}]  # order and encodings mixed
    assert parse_answer(answer(reverse), 2, 4)[0].tolist() == [V0, V1]
    ints = items([1, 0, -1, 2], [0, 0, 0, 1])  # JSON integers are numbers
    assert parse_answer(answer(ints), 2, 4)[0].tolist() == [[1.0, 0.0, -1.0, 2.0], [0.0, 0.0, 0.0, 1.0]]
    assert parse_answer(answer(items([1.0], [-1.0])), 2, 1)[0].tolist() == [[1.0], [-1.0]]  # dimensions = 1
    for usage in (None, {}, {"total_tokens": 5}, {"prompt_tokens": None}):
        assert parse_answer(answer(usage=usage), 2, 4)[1] is None  # no usage: local counts apply
    assert parse_answer(answer(usage="default")[:-1] + b"}   \n", 2, 4)[1] == 5  # whitespace after the JSON


MALFORMED = {
    "strings": items(["0.5", "-0.25", "1.5", "2.0"], V1),
    "booleans": items([True, False, True, True], V1),
    "one boolean": items([0.5, True, 1.5, 2.0], V1),
    "false among floats": items(V0, [0.125, False, -3.0, 4.0]),
    "nested": items([[0.5], [-0.25], [1.5], [2.0]], V1),
    "nested ragged": items([[0.5, 1.0], [-0.25], [1.5], [2.0]], V1),
    "a null value": items([0.5, None, 1.5, 2.0], V1),
    "an object value": items([0.5, {"x": 1}, 1.5, 2.0], V1),
    "null embedding": items(None, V1),
    "number embedding": items(0.5, V1),
    "object embedding": items({"0": 0.5}, V1),
    "three floats": items(V0[:3], V1),
    "five floats": items([*V0, 0.0], V1),
    "empty list": items([], V1),
    "short base64": items(base64.b64encode(np.asarray(V0, dtype="<f4").tobytes()[:-2]).decode(), V1),
    "base64 of 3 floats": items(b64(V0[:3]), V1),
    "base64 with a newline": items(b64(V0) + "\n", V1),
    "base64 not ASCII": items("AAAAAAAAAAAAAAAAAAAAAA\u00e9=", V1),
    "beyond float32": items([0.5, 1e39, 1.5, 2.0], V1),
    "NaN in base64": items(b64([0.5, float("nan"), 1.5, 2.0]), V1),
    "float index": [{"index": 0.0, "embedding": V0}, {"index": 1, "embedding": V1}],
    "boolean index": [{"index": False, "embedding": V0}, {"index": 1, "embedding": V1}],
    "string index": [{"index": "0", "embedding": V0}, {"index": 1, "embedding": V1}],
    "negative index": [{"index": -1, "embedding": V0}, {"index": 1, "embedding": V1}],
    "index past the end": [{"index": 0, "embedding": V0}, {"index": 2, "embedding": V1}],
    "index beyond 64 bits": [{"index": 2**64, "embedding": V0}, {"index": 1, "embedding": V1}],
    "repeated index": [{"index": 0, "embedding": V0}, {"index": 0, "embedding": V1}],
    "no index": [{"embedding": V0}, {"index": 1, "embedding": V1}],
    "no embedding": [{"index": 0}, {"index": 1, "embedding": V1}],
    "item a list": [[0, V0], {"index": 1, "embedding": V1}],
    "item a string": ["x", {"index": 1, "embedding": V1}],
    "item null": [None, {"index": 1, "embedding": V1}],
    "one item": items(V0),
    "three items": items(V0, V1, V1),
    "data an object": {"0": V0, "1": V1},
    "data null": None,
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_vectors_are_refused_as_retryable(data: Any) -> None:
    raw = answer(data) if data is not None else orjson.dumps({"data": None})
    with pytest.raises(_Retryable) as exc:
        parse_answer(raw, 2, 4)
    assert isinstance(exc.value.error, UpstreamBadGateway) and exc.value.error.code == "upstream_error"


@pytest.mark.parametrize(
    "raw",
    [b"", b"<html>", b"[1, 2]", b'"data"', b"null", b"{}", b'{"data": [}', answer(usage=[5]), answer(usage="5"),
     answer(usage=5), answer(usage={"prompt_tokens": 5.0}), answer(usage={"prompt_tokens": True}),
     answer(usage={"prompt_tokens": "5"}), answer(usage={"prompt_tokens": 2**64})],
)
def test_malformed_documents_and_usage_are_refused_as_retryable(raw: bytes) -> None:
    with pytest.raises(_Retryable) as exc:
        parse_answer(raw, 2, 4)
    assert isinstance(exc.value.error, UpstreamBadGateway)


def test_usage_within_bounds_is_split_at_least_one_token_each() -> None:
    assert usage_tokens(None, [3, 4]) == [3, 4]
    assert usage_tokens(7, [3, 4]) == [3, 4]
    assert usage_tokens(2, [3, 4]) == [1, 1]  # as few as the inputs: one each, never 0
    assert usage_tokens(3, [1, 1, 30]) == [1, 1, 1]
    assert usage_tokens(4, [1, 1, 30]) == [1, 1, 2]
    assert usage_tokens(44, [3, 4]) == [19, 25]  # the bound: 4 x 7 + 8 per input


@pytest.mark.parametrize("reported", [1, 0, -5, 45, 2**63 - 1])
def test_usage_out_of_bounds_is_a_malformed_answer(reported: int) -> None:
    with pytest.raises(_Retryable) as exc:
        usage_tokens(reported, [3, 4])
    assert isinstance(exc.value.error, UpstreamBadGateway)
    assert f"reported {reported} tokens for 2 inputs (expected 2 to 44)" in exc.value.error.message


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"Retry-After": "0"}, 0.0),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": "3600"}, 3600.0),
        ({"Retry-After": "3601"}, 3600.0),
        ({"Retry-After": "1e300"}, 3600.0),
        ({"Retry-After": "1e309"}, 3600.0),  # infinite as a float
        ({"Retry-After": "inf"}, 3600.0),
        ({"retry-after-ms": "1e309"}, 3600.0),
        ({"retry-after-ms": "-1", "Retry-After": "2"}, 2.0),  # a bad finer header: the other one counts
        ({"retry-after-ms": "nan", "Retry-After": "2"}, 2.0),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
        ({"Retry-After": ""}, None),
        ({}, None),
    ],
)
def test_retry_after_is_a_bounded_non_negative_number_or_absent(headers: dict[str, str],
                                                                seconds: float | None) -> None:
    assert MAX_RETRY_AFTER_S == 3600.0
    assert parse_retry_after(headers) == seconds


def test_answer_limit_allows_64_bytes_a_float() -> None:
    assert answer_limit(1, 4) == 4 * 64 + 512 + 65536
    assert answer_limit(2048, 3072) == 2048 * (3072 * 64 + 512) + 65536  # 404 MB: a bound, not an allowance
    doc = orjson.dumps({"data": items(*([[-2.2250738585072014e-308] * 1536] * 8)),
                        "usage": {"prompt_tokens": 8, "total_tokens": 8}}, option=orjson.OPT_INDENT_2)
    assert len(doc) < answer_limit(8, 1536)  # the longest floats, pretty-printed, fit
