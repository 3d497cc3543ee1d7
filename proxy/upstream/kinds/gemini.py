"""The Gemini API's batchEmbedContents (gemini-embedding-001, text-embedding-004).

    POST {base_url}/models/{model}:batchEmbedContents     x-goog-api-key: KEY
    {"requests": [{"model": "models/{model}", "content": {"parts": [{"text"}]}, "taskType"?,
                   "outputDimensionality"?}]}
    -> {"embeddings": [{"values": [...]}]}   (in request order)

The portable input type maps to `taskType` (RETRIEVAL_QUERY, RETRIEVAL_DOCUMENT, CLASSIFICATION, CLUSTERING). At
most 100 requests per call. The answer counts no tokens: usage, the ledger and quotas take the model's configured
tokenizer's counts, an estimate of what Google bills (README "Providers").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
import yarl

from ...config import UpstreamSettings
from ..http import Target, Usage
from ..refusals import Refusal
from .base import Outgoing, Translator, json_target, load_object, texts, vectors_of
from .google import google_refusal

GOOGLE_PARAMS = {"outputdimensionality": "dimensions", "output_dimensionality": "dimensions",
                 "task_type": "input_type", "tasktype": "input_type", "content": "input", "instances": "input",
                 "input token": "input", "too long": "input"}


class Gemini(Translator):
    name = "gemini"
    params = GOOGLE_PARAMS

    def target(self, up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
        url = yarl.URL(up.base_url.rstrip("/")) / "models" / f"{upstream_model}:batchEmbedContents"
        return json_target(url, {"x-goog-api-key": api_key} if api_key else {}, api_key)

    def body(self, up: UpstreamSettings, upstream_model: str, out: Outgoing) -> bytes:
        one: dict[str, Any] = {"model": f"models/{upstream_model}"}
        if (task := self.input_type(upstream_model, out.input_type)) is not None:
            one["taskType"] = task
        if out.dimensions is not None:
            one["outputDimensionality"] = out.dimensions
        return orjson.dumps({"requests": [{**one, "content": {"parts": [{"text": t}]}} for t in texts(out)]})

    def parse(self, raw: bytes, headers: Mapping[str, str], count: int, dims: int) -> tuple[np.ndarray, Usage]:
        rows = load_object(raw).get("embeddings")
        values = [r.get("values") if isinstance(r, dict) else None for r in rows] if isinstance(rows, list) else rows
        return vectors_of(values, count, dims), None  # no token counts: the local ones (an estimate)

    def refusal(self, status: int, body: bytes, headers: Mapping[str, str]) -> Refusal:
        return google_refusal(body, headers, self.params)
