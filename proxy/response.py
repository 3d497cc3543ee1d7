"""The client's answer, built from stored float32 bytes: base64 straight from the bytes, `float` through
orjson's native float32 writer (shortest text that parses back to the same float32).

The answer is assembled as bytes: each distinct vector is encoded once (SIMD pybase64, or orjson for `float`;
repeats in a batch reuse it) and joined with the JSON around it in one copy, so the text is never decoded to
`str` nor scanned again. The result is byte for byte what orjson writes for the whole document. A `float` text
of an entry held in the in-process cache tier is kept there, so a hot input is formatted once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pybase64

from .request import EmbeddingRequest
from .service import Outcome
from .stores.cache import Entry
from .stores.localcache import LocalCache

_LIST_OPEN = b'{"object":"list","data":['
_ITEM_OPEN = {
    "base64": b'{"object":"embedding","index":%d,"embedding":"',
    "float": b'{"object":"embedding","index":%d,"embedding":',
}
_ITEM_CLOSE = {"base64": b'"},', "float": b"},"}


def _usage(outcome: Outcome) -> dict[str, Any]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "total_tokens": outcome.prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def _float_text(entry: Entry) -> bytes:
    return orjson.dumps(np.frombuffer(entry.vector, dtype="<f4"), option=orjson.OPT_SERIALIZE_NUMPY)


def _float_texts(outcome: Outcome, local: LocalCache | None) -> list[bytes]:
    if local is None or not outcome.keys:
        return [_float_text(e) for e in outcome.entries]
    out = []
    for key, entry in zip(outcome.keys, outcome.entries, strict=True):
        text = local.rendered(key)
        if text is None:
            text = _float_text(entry)
            local.keep_rendered(key, text)
        out.append(text)
    return out


def render(req: EmbeddingRequest, outcome: Outcome, local: LocalCache | None = None) -> bytes:
    fmt = req.encoding_format
    if fmt == "base64":
        encoded = [pybase64.b64encode(e.vector) for e in outcome.entries]
    else:
        encoded = _float_texts(outcome, local)
    item_open, item_close = _ITEM_OPEN[fmt], _ITEM_CLOSE[fmt]
    parts = [_LIST_OPEN]
    append = parts.append
    for i, u in enumerate(outcome.positions):
        append(item_open % i)
        append(encoded[u])
        append(item_close)
    parts[-1] = item_close[:-1]
    append(b'],"model":' + orjson.dumps(req.model) + b',"usage":' + orjson.dumps(_usage(outcome)) + b"}")
    return b"".join(parts)
