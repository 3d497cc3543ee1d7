"""The client's answer, built from stored float32 bytes: base64 straight from the bytes, `float` through
orjson's native float32 writer (shortest text that parses back to the same float32).

The base64 answer is assembled as bytes: each vector is encoded once (SIMD pybase64; repeats in a batch reuse
it) and joined with the JSON around it in one copy, so the text is never decoded to `str` nor scanned again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pybase64

from .request import EmbeddingRequest
from .service import Outcome

_LIST_OPEN = b'{"object":"list","data":['
_ITEM_OPEN = b'{"object":"embedding","index":%d,"embedding":"'


def _usage(outcome: Outcome) -> dict[str, Any]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "total_tokens": outcome.prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def _render_base64(req: EmbeddingRequest, outcome: Outcome) -> bytes:
    encoded = [pybase64.b64encode(e.vector) for e in outcome.entries]
    parts = [_LIST_OPEN]
    append = parts.append
    for i, u in enumerate(outcome.positions):
        append(_ITEM_OPEN % i)
        append(encoded[u])
        append(b'"},')
    parts[-1] = b'"}'
    append(b'],"model":' + orjson.dumps(req.model) + b',"usage":' + orjson.dumps(_usage(outcome)) + b"}")
    return b"".join(parts)


def render(req: EmbeddingRequest, outcome: Outcome) -> bytes:
    if req.encoding_format == "base64":
        return _render_base64(req, outcome)
    vectors = [np.frombuffer(e.vector, dtype="<f4") for e in outcome.entries]
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vectors[u]} for i, u in enumerate(outcome.positions)
        ],
        "model": req.model,
        "usage": _usage(outcome),
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
