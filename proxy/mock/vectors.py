"""The mock upstream's vectors: deterministic, from a hash of the model and the input's token ids (so a string and
its ids embed alike), unit length, truncated and renormalised for `dimensions`; and how one is written in an
answer (base64 of little-endian float32, or a float array).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import xxhash


def vector_for(model: str, token_ids: Sequence[int] | npt.NDArray[Any], native_dims: int,
               dimensions: int | None) -> npt.NDArray[np.float32]:
    seed = xxhash.xxh64_intdigest(model.encode() + b"\0" + np.asarray(token_ids, dtype="<u4").tobytes())
    v = np.random.default_rng(seed).standard_normal(native_dims, dtype=np.float32)
    v /= np.linalg.norm(v)
    if dimensions:
        v = v[:dimensions]
        v /= np.linalg.norm(v)
    return v


def embedding_item(index: int, vec: npt.NDArray[np.float32], b64: bool) -> dict[str, Any]:
    emb: Any
    if b64:
        emb = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    elif vec.size and np.isnan(vec[0]):  # JSON has no NaN: write it as Python json does
        emb = orjson.Fragment(b"[NaN" + orjson.dumps(vec, option=orjson.OPT_SERIALIZE_NUMPY)[len(b"[null"):])
    else:
        emb = vec
    return {"object": "embedding", "index": index, "embedding": emb}
