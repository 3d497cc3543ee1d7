"""The client's answer, built from stored float32 bytes: base64 straight from the bytes, `float` through
orjson's native float32 writer (shortest text that parses back to the same float32).

The answer is assembled as bytes: each distinct vector is encoded once (SIMD pybase64, or orjson for `float`;
repeats in a batch reuse it) and joined with the JSON around it in one copy, so the text is never decoded to
`str` nor scanned again. The result is byte for byte what orjson writes for the whole document. A `float` text
of an entry held in the in-process cache tier is kept there, so a hot input is formatted once.

A large answer is not built whole: `chunks` yields the same bytes in pieces of about `chunk_bytes`, each encoded
when it is asked for, so the sender (stream.py) holds one piece at a time, not a 38 MB document and its copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pybase64

from ..embeddings.request import EmbeddingRequest
from ..embeddings.service import Outcome
from ..stores.cache import Entry
from ..stores.localcache import LocalCache

CHUNK_BYTES = 1 << 20  # one piece of a streamed answer (stream.py)
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
    append(_tail(req, outcome))
    return b"".join(parts)


def _tail(req: EmbeddingRequest, outcome: Outcome) -> bytes:
    return b'],"model":' + orjson.dumps(req.model) + b',"usage":' + orjson.dumps(_usage(outcome)) + b"}"


def chunks(req: EmbeddingRequest, outcome: Outcome, local: LocalCache | None = None,
           chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """`render`'s bytes in pieces of about `chunk_bytes` (one vector's text more at most), each encoded when it
    is asked for; a vector repeated in the batch is encoded again where it repeats."""
    fmt = req.encoding_format
    item_open, item_close = _ITEM_OPEN[fmt], _ITEM_CLOSE[fmt]
    last = len(outcome.positions) - 1
    keys = outcome.keys if local is not None and outcome.keys else None
    parts = [_LIST_OPEN]
    size = 0
    for i, u in enumerate(outcome.positions):
        entry = outcome.entries[u]
        if fmt == "base64":
            text = pybase64.b64encode(entry.vector)
        elif keys is None or local is None:
            text = _float_text(entry)
        else:
            text = local.rendered(keys[u]) or _kept_text(local, keys[u], entry)
        parts += (item_open % i, text, item_close if i < last else item_close[:-1])
        size += len(text)
        if size >= chunk_bytes:
            yield b"".join(parts)
            parts, size = [], 0
    parts.append(_tail(req, outcome))
    yield b"".join(parts)


def _kept_text(local: LocalCache, key: str, entry: Entry) -> bytes:
    text = _float_text(entry)
    local.keep_rendered(key, text)
    return text
