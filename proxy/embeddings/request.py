"""The client's embeddings request: parsed and checked before anything touches the cache or the upstream.

Checks here need nothing but the body and the model table; token limits on text inputs are checked once the
cache has said which inputs need counting (see counting.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ..config import ModelSettings
from ..errors import InvalidRequest, NotFound

MAX_ITEMS = 2048  # strings or token-id lists per request; one flat token-id array is one item
MAX_TOKEN_ID = 2**32 - 1  # cache keys hash ids as uint32; larger ids are in no tokenizer's vocabulary
_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user", "input_type"})
INPUT_TYPES = ("query", "document", "classification", "clustering")  # the portable vocabulary (README "Providers")


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    kind: Literal["s", "t"]  # s: strings, t: token-id lists
    inputs: list[str] | list[list[int]]
    encoding_format: Literal["float", "base64"]
    dimensions: int | None
    user: str | None
    # The portable input type the inputs are embedded as: the request's, or the model's default (None: none).
    # Part of every cache key.
    input_type: str | None = None


def _input_error(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="input", code="invalid_input")


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is a subclass of int and is refused


def parse_inputs(value: Any, max_input_tokens: int) -> tuple[Literal["s", "t"], list[str] | list[list[int]]]:
    if isinstance(value, str):
        if not value:
            raise _input_error("'input' cannot be an empty string.")
        return "s", [value]
    if not isinstance(value, list):
        raise _input_error("'input' must be a string, an array of strings, or an array of token arrays.")
    if not value:
        raise _input_error("'input' cannot be an empty array.")
    first = value[0]
    if _is_int(first):  # one flat array of token ids is one input: only the per-input token limit applies
        return "t", [_token_ids(value, "input", max_input_tokens)]
    if len(value) > MAX_ITEMS:
        raise _input_error(f"'input' has {len(value)} items; at most {MAX_ITEMS} are allowed.")
    if isinstance(first, str):
        if all(type(item) is str for item in value) and all(value):  # the common case, checked without a loop
            return "s", value
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _input_error(f"'input[{i}]' must be a string like the other items.")
            if not item:
                raise _input_error(f"'input[{i}]' cannot be an empty string.")
        return "s", value
    if isinstance(first, list):
        out: list[list[int]] = []
        for i, item in enumerate(value):
            if not isinstance(item, list):
                raise _input_error(f"'input[{i}]' must be an array of token ids like the other items.")
            out.append(_token_ids(item, f"input[{i}]", max_input_tokens))
        return "t", out
    raise _input_error("'input' must be a string, an array of strings, or an array of token arrays.")


def _token_ids(ids: list[Any], where: str, max_input_tokens: int) -> list[int]:
    if not ids:
        raise _input_error(f"'{where}' cannot be an empty array of tokens.")
    if not all(type(t) is int for t in ids) or min(ids) < 0:  # bool is refused: its type is not int
        raise _input_error(f"'{where}' must contain only non-negative integer token ids.")
    if (top := max(ids)) > MAX_TOKEN_ID:  # ids within uint32 are checked against the vocabulary once counted
        raise _input_error(f"'{where}' contains token id {top}, outside any model's vocabulary.")
    if len(ids) > max_input_tokens:
        raise _input_error(
            f"'{where}' has {len(ids)} tokens; this model's maximum input length is {max_input_tokens} tokens."
        )
    return ids


def parse_request(body: bytes, models: Mapping[str, ModelSettings]) -> EmbeddingRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}.") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model = data.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string.", param="model")
    spec = models.get(model)
    if spec is None:
        raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
    if "input_type" in data and spec.openai_only:  # as OpenAI refuses any argument it does not know
        raise InvalidRequest("Unrecognized request argument supplied: input_type", param="input_type")
    if "input" not in data:
        raise InvalidRequest("You must provide an input parameter.", param="input")
    kind, inputs = parse_inputs(data["input"], spec.max_input_tokens)
    if kind == "t" and (spec.tokenizer.startswith("hf:") or not spec.openai_only):
        raise _input_error(
            f"'{model}' takes text only: token ids are cl100k's and mean nothing to this model's vocabulary. "
            "Send the text itself (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))."
        )
    fmt = data.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    dims = _dimensions(data.get("dimensions"), spec, model)
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string.", param="user")
    return EmbeddingRequest(model, kind, inputs, "base64" if fmt == "base64" else "float", dims, user,
                            input_type(data, spec, model))


def _dimensions(dims: Any, spec: ModelSettings, model: str) -> int | None:
    """The request's `dimensions`, checked against the sizes the model allows (its `allowed_dimensions`, else 1 to
    its native size)."""
    if dims is None:
        return None
    if not spec.takes_dimensions:
        raise InvalidRequest(f"This model does not support specifying dimensions: '{model}'.", param="dimensions")
    if spec.allowed_dimensions:
        if not _is_int(dims) or dims not in spec.allowed_dimensions:
            sizes = ", ".join(map(str, spec.allowed_dimensions))
            raise InvalidRequest(f"'dimensions' must be one of {sizes} for '{model}'.", param="dimensions")
    elif not _is_int(dims) or not 1 <= dims <= spec.dimensions:
        raise InvalidRequest(
            f"'dimensions' must be an integer from 1 to {spec.dimensions} for '{model}'.", param="dimensions"
        )
    return int(dims)


def input_type(data: Mapping[str, Any], spec: ModelSettings, model: str) -> str | None:
    """The portable input type the request's inputs are embedded as, by the model's `input_type` setting.

    An OpenAI-API model knows no such argument and refuses it as OpenAI does; a model set to "none" refuses it
    naming the parameter; "required" without a default refuses a request that sends none."""
    value = data.get("input_type")
    if value is not None and spec.input_type == "none":
        raise InvalidRequest(f"'{model}' does not take 'input_type'.", param="input_type")
    if value is not None and value not in INPUT_TYPES:
        raise InvalidRequest(f"'input_type' must be one of {', '.join(INPUT_TYPES)}.", param="input_type",
                             code="invalid_value")
    if value is None:
        value = spec.default_input_type or None
        if value is None and spec.input_type == "required":
            raise InvalidRequest(f"'{model}' requires 'input_type': one of {', '.join(INPUT_TYPES)}.",
                                 param="input_type", code="missing_required_parameter")
    return value
