"""What the mock upstream accepts, as OpenAI does: the request's fields, its input forms (strings, token ids,
arrays of either) and its limits, each refusal an `Invalid` with OpenAI's message; and as Infinity does, the
blank inputs it counts as 0 tokens (`strip_empty`) and the long strings it refuses with FastAPI's 422
(`max_chars`).
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Any

import orjson
import tokenizers
from aiohttp import web

from ..tokens import get_encoding
from .state import MockModel

ENCODING = "cl100k_base"
MAX_INPUTS = 2048  # inputs per request, as OpenAI
MAX_INPUT_TOKENS = 8192  # tokens per input
MAX_REQUEST_TOKENS = 300_000  # tokens summed over a request's inputs
FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})  # anything else is refused
MALFORMED = object()  # stands for a body that is not JSON
_JSON = "application/json"


class Invalid(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def count_items(raw: Any) -> int:
    if isinstance(raw, list) and raw:
        return len(raw) if isinstance(raw[0], str | list) else 1
    return int(isinstance(raw, str))


def _parse_input(raw: Any) -> list[list[int]]:
    """Token ids per input; raises Invalid for anything OpenAI refuses."""
    enc = get_encoding(ENCODING)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise Invalid("'input' must be a non-empty string or array.", "input")
    if len(raw) > MAX_INPUTS and type(raw[0]) is not int:  # one array of token ids is one input
        raise Invalid(f"Invalid 'input': maximum array size is {MAX_INPUTS}, got {len(raw)}.", "input")
    if all(isinstance(s, str) for s in raw):
        if not all(raw):
            raise Invalid("Invalid 'input': strings must not be empty.", "input")
        ids: list[list[int]] = [enc.encode_ordinary(s) for s in raw]  # encode_ordinary_batch: slower here
    elif type(raw[0]) is int or all(isinstance(t, list) for t in raw):
        ids = [raw] if type(raw[0]) is int else raw
        for i, t in enumerate(ids):
            if not t or not all(type(x) is int and 0 <= x < enc.n_vocab for x in t):
                raise Invalid(f"Invalid 'input[{i}]': a token array must be non-empty integers in [0, {enc.n_vocab}).",
                              "input")
    else:
        raise Invalid("'input' must be a string, an array of strings, of integers or of integer arrays.", "input")
    if (longest := max(map(len, ids))) > MAX_INPUT_TOKENS:
        raise Invalid(f"Invalid 'input': maximum input length is {MAX_INPUT_TOKENS} tokens, got {longest}.", "input")
    if (total := sum(map(len, ids))) > MAX_REQUEST_TOKENS:
        raise Invalid(f"Requested {total} tokens, max {MAX_REQUEST_TOKENS} tokens per request.", "input")
    return ids


def parse_request(body: Any, models: dict[str, MockModel]) -> tuple[str, list[list[int]], bool, int | None]:
    if body is MALFORMED:
        raise Invalid("We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        raise Invalid("The request body must be a JSON object.")
    if unknown := sorted(set(body) - FIELDS):
        raise Invalid(f"Unrecognized request argument supplied: {unknown[0]}")
    model, fmt, dims = body.get("model"), body.get("encoding_format"), body.get("dimensions")
    if not isinstance(model, str) or not model:
        raise Invalid("You must provide a model parameter (a string).", "model")
    if "input" not in body:
        raise Invalid("Missing required parameter: 'input'.", "input")
    if model not in models:
        raise Invalid(f"The model `{model}` does not exist.", None, 404, "model_not_found")
    spec = models[model]
    if fmt not in (None, "float", "base64"):
        raise Invalid("Invalid 'encoding_format': must be 'float' or 'base64'.", "encoding_format")
    if dims is not None:
        if type(dims) is not int or not 1 <= dims <= spec.dimensions:
            raise Invalid(f"Invalid 'dimensions': must be an integer in [1, {spec.dimensions}].", "dimensions")
        if not spec.supports_dimensions:
            raise Invalid(f"The model `{model}` does not support specifying dimensions.", "dimensions")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise Invalid("Invalid 'user': must be a string.", "user")
    ids = _parse_input(body["input"])
    if spec.tokenizer is not None:
        raw = body["input"]
        texts = [raw] if isinstance(raw, str) else raw
        if not all(isinstance(t, str) for t in texts):
            raise Invalid(f"The model `{model}` takes text only.", "input")
        ids = [e.ids for e in _hf(spec.tokenizer).encode_batch(texts, add_special_tokens=spec.special_tokens)]
    return model, ids, fmt == "base64", dims


@functools.cache
def _hf(path: str) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(path)


def blank(text: str) -> bool:
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)  # BERT's text cleaning drops them


def too_long_answer(body: Any, limit: int) -> web.Response | None:
    """FastAPI's 422 for an input string over `limit` characters (Infinity's max_length) as Infinity 0.0.78 answers
    it: one error for each type `input` may have (a list of strings, a string), each echoing the input, so the
    answer is about twice the request."""
    raw = body.get("input") if isinstance(body, dict) else None
    for i, text in enumerate([raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []):
        if isinstance(text, str) and len(text) > limit:
            as_list, as_str = ["body", "text", "input", "list[constrained-str]"], ["body", "text", "input",
                                                                                  "constrained-str"]
            too_long = f"String should have at most {limit} characters"
            if isinstance(raw, str):
                errors = [{"type": "list_type", "loc": as_list, "msg": "Input should be a valid list", "input": raw},
                          {"type": "string_too_long", "loc": as_str, "msg": too_long, "input": text,
                           "ctx": {"max_length": limit}}]
            else:
                errors = [{"type": "string_too_long", "loc": [*as_list, i], "msg": too_long, "input": text,
                           "ctx": {"max_length": limit}},
                          {"type": "string_type", "loc": as_str, "msg": "Input should be a valid string", "input": raw}]
            return web.Response(status=422, body=orjson.dumps({"detail": errors}), content_type=_JSON)
    return None
