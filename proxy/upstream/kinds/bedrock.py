"""Amazon Bedrock's InvokeModel for Titan Text Embeddings v2 and Cohere Embed.

    POST {base_url}/model/{modelId}/invoke     AWS SigV4 (service "bedrock"; awsauth.py)
    amazon.titan-embed-text-v2:0   {"inputText", "dimensions"?}  -> {"embedding", "inputTextTokenCount"}
    cohere.embed-*                 Cohere's body without `model`  -> {"embeddings": {"float": [...]}, ...}

Titan embeds one text per call (the loader sets the model's max_batch_items to 1) and counts its tokens exactly;
Titan v2 takes dimensions 256, 512 or 1024 and has no input type. Cohere on Bedrock takes 96 texts per call; its
tokens are Bedrock's `X-Amzn-Bedrock-Input-Token-Count` header, shared among the inputs by their local counts.
Errors: the `x-amzn-ErrorType` header names the exception; a throttling or quota one is a 429, a model error a 502.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
import yarl

from ...config import UpstreamSettings
from ...config.providers import family
from ..http import Target, Usage, parse_retry_after
from ..refusals import Refusal, upstream_message
from .awsauth import SigV4
from .base import Auth, Outgoing, Translator, int_or_none, load_object, param_named, texts, vectors_of
from .cohere import COHERE_PARAMS, cohere_body, cohere_vectors

TOKEN_COUNT_HEADER = "X-Amzn-Bedrock-Input-Token-Count"
_STATUS_BY_ERROR = {"ThrottlingException": 429, "ServiceQuotaExceededException": 429, "ModelNotReadyException": 429,
                    "ModelErrorException": 502, "ModelTimeoutException": 504, "ServiceUnavailableException": 503,
                    "InternalServerException": 500, "AccessDeniedException": 403,
                    "UnrecognizedClientException": 403, "ResourceNotFoundException": 404}


class Bedrock(Translator):
    name = "bedrock"
    params: Mapping[str, str] = {**COHERE_PARAMS, "inputtext": "input", "dimensions": "dimensions"}

    def target(self, up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
        # The model id percent-encoded as botocore encodes it (`:` is %3A), and signed as sent.
        url = yarl.URL(f"{up.base_url.rstrip('/')}/model/{quote(upstream_model, safe='-._~')}/invoke", encoded=True)
        return url, {"Content-Type": "application/json", "Accept": "application/json"}, ""

    def body(self, up: UpstreamSettings, upstream_model: str, out: Outgoing) -> bytes:
        if family(self.name, upstream_model) == "bedrock-cohere":
            return orjson.dumps(cohere_body(out, self.input_type(upstream_model, out.input_type)))
        if len(out.inputs) != 1:  # the loader sets a Titan model's max_batch_items to 1: never more
            raise ValueError(f"a Titan call carries one text, not {len(out.inputs)}")
        body: dict[str, Any] = {"inputText": texts(out)[0]}
        if out.dimensions is not None:
            body["dimensions"] = out.dimensions
        return orjson.dumps(body)

    def parse(self, raw: bytes, headers: Mapping[str, str], count: int, dims: int) -> tuple[np.ndarray, Usage]:
        doc = load_object(raw)
        header = headers.get(TOKEN_COUNT_HEADER)
        counted = int(header) if header is not None and header.isdigit() else None
        if "embeddings" in doc:  # Cohere: the billed total is Bedrock's header
            return cohere_vectors(doc, count, dims), counted
        tokens = int_or_none(doc.get("inputTextTokenCount"), "inputTextTokenCount")
        tokens = counted if tokens is None else tokens
        return vectors_of([doc.get("embedding")], count, dims), None if tokens is None else [tokens]

    def refusal(self, status: int, body: bytes, headers: Mapping[str, str]) -> Refusal:
        error = (headers.get("x-amzn-ErrorType") or "").split(":")[0]
        if not error:
            try:
                doc = orjson.loads(body)
                error = str(doc.get("__type", "")).rsplit("#", 1)[-1] if isinstance(doc, dict) else ""
            except orjson.JSONDecodeError:
                error = ""
        message = upstream_message(body)
        return Refusal(message, param_named(message, self.params), parse_retry_after(headers),
                       _STATUS_BY_ERROR.get(error))

    def auth(self, up: UpstreamSettings) -> Auth | None:
        return SigV4(up.region)
