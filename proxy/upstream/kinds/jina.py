"""Jina AI's embeddings API (jina-embeddings-v3, -v4, -v2-*).

    POST {base_url}/embeddings     Authorization: Bearer KEY
    {"model", "input", "task"?, "dimensions"?, "embedding_type": "float", "truncate"}
    -> {"object": "list", "data": [{"embedding", "index"}], "model", "usage": {"total_tokens", "prompt_tokens"}}

The portable input type maps to `task` (retrieval.query, retrieval.passage, classification, separation); v2 models
have none (set the model's input_type = "none"). Usage is the billed total (`total_tokens`), shared among the inputs
by their local counts. `truncate` is false (over-long inputs refused) unless the model sets provider_truncation.
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


class Jina(Translator):
    name = "jina"
    params: Mapping[str, str] = {"dimensions": "dimensions", "task": "input_type", "input": "input",
                                 "token limit": "input"}

    def target(self, up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
        return json_target(yarl.URL(up.base_url.rstrip("/") + "/embeddings"), bearer(api_key), api_key)

    def body(self, up: UpstreamSettings, upstream_model: str, out: Outgoing) -> bytes:
        body: dict[str, Any] = {"model": upstream_model, "input": texts(out), "embedding_type": "float",
                                "truncate": out.truncate}
        if (task := self.input_type(upstream_model, out.input_type)) is not None:
            body["task"] = task
        if out.dimensions is not None:
            body["dimensions"] = out.dimensions
        return orjson.dumps(body)

    def parse(self, raw: bytes, headers: Mapping[str, str], count: int, dims: int) -> tuple[np.ndarray, Usage]:
        doc = load_object(raw)
        usage = dig(doc, "usage", "total_tokens")
        if usage is None:
            usage = dig(doc, "usage", "prompt_tokens")
        return vectors_of(in_index_order(doc.get("data"), count), count, dims), int_or_none(usage, "usage")
