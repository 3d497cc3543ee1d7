"""The mock upstream's injected faults: what `MockState.fail_next` queues, and the malformed 200 answers.

Error answers, disconnects and stalls are made in upstream.py; a malformed answer is a correct one changed
here, so a test knows exactly what the proxy was sent.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt

# Malformed 200 answers (a correct answer, changed): vectors of number strings, of booleans, of one-number lists;
# base64 two bytes short; float lists one number long; an index repeated; an index missing (one past the end
# instead); usage of 2**63-1, -5, 0, a float, or one less than the inputs; a correct answer padded with 64 MiB of
# whitespace (HUGE_BODY_BYTES, streamed).
MALFORMED_MODES = frozenset({"strings", "booleans", "nested", "short_base64", "extra_float", "repeated_index",
                             "missing_index", "usage_huge", "usage_negative", "usage_zero", "usage_float",
                             "usage_few", "huge_body"})
FAIL_MODES = frozenset({"status", "disconnect", "timeout", "wrong_count", "wrong_dims", "nan", "garbage"}
                       | MALFORMED_MODES)


@dataclasses.dataclass(frozen=True)
class Failure:
    mode: str
    status: int
    retry_after: float | str | None
    retry_after_ms: str | None

    def headers(self) -> dict[str, str]:
        out = {}
        if isinstance(self.retry_after, str):
            out["Retry-After"] = self.retry_after
        elif self.retry_after is not None:
            out = {"Retry-After": f"{self.retry_after:g}", "retry-after-ms": f"{self.retry_after * 1000:.0f}"}
        if self.retry_after_ms is not None:
            out["retry-after-ms"] = self.retry_after_ms
        return out


def malform(mode: str, doc: dict[str, Any], vectors: list[npt.NDArray[np.float32]]) -> None:
    """Turn a correct answer into the malformed 200 that `mode` names (item i keeps vector i)."""
    data, usage = doc["data"], doc["usage"]
    for item, v in zip(data, vectors, strict=True):
        if mode == "strings":  # numbers as JSON strings: "0.0123"
            item["embedding"] = [repr(float(x)) for x in v]
        elif mode == "booleans":
            item["embedding"] = [bool(x > 0) for x in v]
        elif mode == "nested":  # as many items as dimensions, each a list
            item["embedding"] = [[float(x)] for x in v]
        elif mode == "short_base64":  # two bytes short: not a whole number of float32
            item["embedding"] = base64.b64encode(v.astype("<f4").tobytes()[:-2]).decode("ascii")
        elif mode == "extra_float":  # floats, one more than asked
            item["embedding"] = [*map(float, v), 0.5]
    if mode == "repeated_index":  # the last item takes the first one's index (or is listed twice)
        if len(data) == 1:
            data.append(dict(data[0]))
        else:
            data[-1]["index"] = data[0]["index"]
    elif mode == "missing_index":  # the last item's index is one past the end: that index is missing
        data[-1]["index"] = len(data)
    elif mode.startswith("usage_"):
        tokens = {"usage_huge": 2**63 - 1, "usage_negative": -5, "usage_zero": 0,
                  "usage_float": float(usage["prompt_tokens"]), "usage_few": len(data) - 1}[mode]
        usage["prompt_tokens"] = usage["total_tokens"] = tokens


