"""Voyage AI's embeddings API (voyage-3.5, voyage-3-large, voyage-code-3, ...).

    POST {base_url}/embeddings     Authorization: Bearer KEY
    {"model", "input", "input_type": "query"|"document"?, "output_dimension"?, "truncation", "encoding_format"?}
    -> {"object": "list", "data": [{"embedding", "index"}], "model", "usage": {"total_tokens": N}}

Voyage has no classification or clustering type: those portable values send no `input_type` (its docs' advice for
other uses). At most 1,000 inputs and 120K tokens per call (voyage-3, -3-large; the loader caps the model's batch
limits). Usage is the billed total, shared among the inputs by their local counts. `truncation` is false (over-long
inputs refused) unless the model sets provider_truncation. Vectors come as base64 float32 when the model asks for
base64 (upstream_base64), else as floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
import yarl

from ...config import UpstreamSettings
from ..http import Target, Usage
from .base import (
    Outgoing,
    Translator,
    bearer,
    dig,
    in_index_order,
    int_or_none,
    json_target,
    load_object,
    texts,
    vectors_of,
)


class Voyage(Translator):
    name = "voyage"
    params: Mapping[str, str] = {"output_dimension": "dimensions", "input_type": "input_type", "input": "input",
              "context length": "input", "encoding_format": "encoding_format"}

    def target(self, up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
        return json_target(yarl.URL(up.base_url.rstrip("/") + "/embeddings"), bearer(api_key), api_key)

    def body(self, up: UpstreamSettings, upstream_model: str, out: Outgoing) -> bytes:
        body: dict[str, Any] = {"model": upstream_model, "input": texts(out), "truncation": out.truncate}
        if (input_type := self.input_type(upstream_model, out.input_type)) is not None:
            body["input_type"] = input_type
        if out.dimensions is not None:
            body["output_dimension"] = out.dimensions
        if out.base64:
            body["encoding_format"] = "base64"
        return orjson.dumps(body)

    def parse(self, raw: bytes, headers: Mapping[str, str], count: int, dims: int) -> tuple[np.ndarray, Usage]:
        doc = load_object(raw)
        total = int_or_none(dig(doc, "usage", "total_tokens"), "usage")
        return vectors_of(in_index_order(doc.get("data"), count), count, dims), total
