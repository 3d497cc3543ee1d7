"""Vertex AI's predict for Google's text-embedding and gemini-embedding models.

    POST {base_url}/projects/{project}/locations/{location}/publishers/google/models/{model}:predict
         Authorization: Bearer TOKEN (google-auth: a service-account file or Application Default Credentials)
    {"instances": [{"content", "task_type"?}], "parameters": {"autoTruncate", "outputDimensionality"?}}
    -> {"predictions": [{"embeddings": {"values", "statistics": {"token_count", "truncated"}}}], "metadata"}

The portable input type maps to `task_type`. Each prediction counts its own input's tokens: the ledger takes them
exactly, per input. At most 250 instances and 20K tokens per call (text-embedding-005; gemini-embedding-001 takes
one instance per call: set its max_batch_items = 1). `autoTruncate` is false (over-long inputs refused) unless the
model sets provider_truncation. Tokens come from google-auth (googleauth.py), refreshed before they expire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
import yarl

from ...config import UpstreamSettings
from ..http import Target, Usage, malformed
from ..refusals import Refusal
from .base import Auth, Outgoing, Translator, dig, int_or_none, json_target, load_object, texts, vectors_of
from .gemini import GOOGLE_PARAMS
from .google import google_refusal
from .googleauth import GoogleToken


class Vertex(Translator):
    name = "vertex"
    params = GOOGLE_PARAMS

    def target(self, up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
        url = (yarl.URL(up.base_url.rstrip("/")) / "projects" / up.project / "locations" / up.location / "publishers"
               / "google" / "models" / f"{upstream_model}:predict")
        return json_target(url, {}, "")

    def body(self, up: UpstreamSettings, upstream_model: str, out: Outgoing) -> bytes:
        task = self.input_type(upstream_model, out.input_type)
        instances = [{"content": t, "task_type": task} if task else {"content": t} for t in texts(out)]
        parameters: dict[str, Any] = {"autoTruncate": out.truncate}
        if out.dimensions is not None:
            parameters["outputDimensionality"] = out.dimensions
        return orjson.dumps({"instances": instances, "parameters": parameters})

    def parse(self, raw: bytes, headers: Mapping[str, str], count: int, dims: int) -> tuple[np.ndarray, Usage]:
        predictions = load_object(raw).get("predictions")
        if not isinstance(predictions, list):
            raise malformed("The upstream's answer has no predictions.")
        values = [dig(p, "embeddings", "values") for p in predictions]
        vectors = vectors_of(values, count, dims)
        counts = [int_or_none(dig(p, "embeddings", "statistics", "token_count"), "token_count") for p in predictions]
        if all(n is None for n in counts):
            return vectors, None
        if any(n is None for n in counts):
            raise malformed("The upstream's token counts are malformed.")
        return vectors, [int(n or 0) for n in counts]

    def refusal(self, status: int, body: bytes, headers: Mapping[str, str]) -> Refusal:
        return google_refusal(body, headers, self.params)

    def auth(self, up: UpstreamSettings) -> Auth | None:
        return GoogleToken(up.credentials_file)
