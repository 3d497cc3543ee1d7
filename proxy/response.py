"""The client's answer, built from stored float32 bytes: base64 straight from the bytes, `float` through
orjson's native float32 writer (shortest text that parses back to the same float32)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

from .request import EmbeddingRequest
from .service import Outcome


def render(req: EmbeddingRequest, outcome: Outcome) -> bytes:
    vectors: list[Any]
    if req.encoding_format == "base64":
        vectors = [base64.b64encode(e.vector).decode("ascii") for e in outcome.entries]
    else:
        vectors = [np.frombuffer(e.vector, dtype="<f4") for e in outcome.entries]
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vectors[u]} for i, u in enumerate(outcome.positions)
        ],
        "model": req.model,
        "usage": {
            "prompt_tokens": outcome.prompt_tokens,
            "total_tokens": outcome.prompt_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
        },
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
