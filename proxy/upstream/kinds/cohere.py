"""Cohere's v2 embed API (embed-v4.0, embed-english-v3.0, ...).

    POST {base_url}/v2/embed     Authorization: Bearer KEY
    {"model", "texts", "input_type", "embedding_types": ["float"], "output_dimension"?, "truncate"}
    -> {"id", "embeddings": {"float": [[...], ...]}, "texts", "meta": {"billed_units": {"input_tokens": N}}, ...}

`input_type` is required by v3 models and later (the loader refuses a model without one): search_query,
search_document, classification, clustering. At most 96 texts per call (the loader caps the model's
max_batch_items). Usage is the billed total, shared among the inputs by their local counts (http.usage_tokens).
`truncate` is NONE (over-long inputs refused) unless the model sets provider_truncation (END).
Cohere answers an invalid or revoked key with its own status 498 (its SDK's InvalidTokenError): the proxy's
credentials, read as a 401 (failover, never the client's 400).
Bedrock's Cohere models take the same body without `model` (bedrock.py uses `cohere_body` and `cohere_vectors`).
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
from .base import Outgoing, Translator, bearer, dig, int_or_none, json_target, load_object, texts, vectors_of

INVALID_TOKEN = 498  # Cohere's status for an invalid API key
COHERE_PARAMS = {"output_dimension": "dimensions", "input_type": "input_type", "texts": "input",
                 "too long": "input", "embedding_types": "encoding_format"}


def cohere_body(out: Outgoing, input_type: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"texts": texts(out), "embedding_types": ["float"],
                            "truncate": "END" if out.truncate else "NONE"}
    if input_type is not None:
        body["input_type"] = input_type
    if out.dimensions is not None:
        body["output_dimension"] = out.dimensions
    return body


def cohere_vectors(doc: dict[str, Any], count: int, dims: int) -> np.ndarray:
    """The float vectors of an answer asked for `embedding_types: ["float"]`."""
    return vectors_of(dig(doc, "embeddings", "float"), count, dims)


class Cohere(Translator):
    name = "cohere"
    params = COHERE_PARAMS

    def target(self, up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
        return json_target(yarl.URL(up.base_url.rstrip("/") + "/v2/embed"), bearer(api_key), api_key)

    def body(self, up: UpstreamSettings, upstream_model: str, out: Outgoing) -> bytes:
        return orjson.dumps({"model": upstream_model,
                             **cohere_body(out, self.input_type(upstream_model, out.input_type))})

    def parse(self, raw: bytes, headers: Mapping[str, str], count: int, dims: int) -> tuple[np.ndarray, Usage]:
        doc = load_object(raw)
        billed = int_or_none(dig(doc, "meta", "billed_units", "input_tokens"), "billed_units")
        return cohere_vectors(doc, count, dims), billed

    def refusal(self, status: int, body: bytes, headers: Mapping[str, str]) -> Refusal:
        why = super().refusal(status, body, headers)
        return Refusal(why.message, None, why.retry_after, 401) if status == INVALID_TOKEN else why
