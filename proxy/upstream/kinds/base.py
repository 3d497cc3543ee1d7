"""What every provider kind does, and the pieces they share.

A kind only translates: the target of a deployment (URL, headers, key), the body of one call (`Outgoing`, in the
proxy's portable terms), the vectors and usage of its answer, and the reason, parameter and wait of its error
answers. Where, when and how often to call is the fleet's (client.py); the answer's checks (`vector_of`, the usage
bounds) are the ones OpenAI answers get (http.py). Kinds whose requests are signed or carry short-lived tokens
(bedrock, vertex) add an `Auth` that sets each call's headers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson
import yarl

from ...config import UpstreamSettings
from ...config.providers import family, provider_input_type
from ..http import Target, Usage, malformed, parse_retry_after, vector_of
from ..refusals import Refusal, upstream_message


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One upstream call in portable terms: what the kinds translate."""

    inputs: list[str] | list[list[int]]
    base64: bool  # ask for base64 where the kind can (OpenAI's encoding_format)
    dimensions: int | None  # None: the model's native size
    user: str | None
    input_type: str | None = None  # portable: query, document, classification, clustering
    truncate: bool = False  # let the provider truncate over-long inputs (the model's provider_truncation)


class Auth(Protocol):
    """Sets the headers of one call that depend on it: a signature over the body (SigV4), a fresh token."""

    async def headers(self, url: yarl.URL, payload: bytes, headers: dict[str, str]) -> dict[str, str]: ...

    def rejected(self, sent: dict[str, str]) -> bool:
        """The upstream refused the credentials of a call that carried `sent`: drop them if cached; True when
        another try may succeed with new ones."""
        ...


class Translator:
    """One provider kind. Subclasses set `name` and the methods their API differs in."""

    name = "openai"
    openai_shaped = False
    # The provider's field names for the client's parameters, as its error messages name them: an upstream 400
    # that names one is relayed with OpenAI's `param`.
    params: Mapping[str, str] = {}

    def target(self, up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
        raise NotImplementedError

    def body(self, up: UpstreamSettings, upstream_model: str, out: Outgoing) -> bytes:
        raise NotImplementedError

    def parse(self, raw: bytes, headers: Mapping[str, str], count: int, dims: int) -> tuple[np.ndarray, Usage]:
        raise NotImplementedError

    def refusal(self, status: int, body: bytes, headers: Mapping[str, str]) -> Refusal:
        """An error answer: its message (OpenAI's, Cohere's and Bedrock's `message`, Google's `error.message`),
        the parameter it names, and the provider's Retry-After."""
        message = upstream_message(body)
        return Refusal(message, param_named(message, self.params), parse_retry_after(headers))

    def auth(self, up: UpstreamSettings) -> Auth | None:
        return None

    def input_type(self, upstream_model: str, portable: str | None) -> str | None:
        """The provider's word for the portable input type (config/providers.py: the one mapping)."""
        return provider_input_type(family(self.name, upstream_model), portable)


def param_named(message: str, params: Mapping[str, str]) -> str | None:
    """The client's parameter a provider's message names by the provider's field name (first one found)."""
    lowered = message.lower()
    for field, param in params.items():
        if field.lower() in lowered:
            return param
    return None


def json_target(url: yarl.URL, headers: Mapping[str, str], api_key: str) -> Target:
    return url, {"Content-Type": "application/json", **headers}, api_key


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def load_object(raw: bytes) -> dict[str, Any]:
    """The answer as a JSON object, or a malformed answer."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise malformed("The upstream's answer is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise malformed("The upstream's answer is not a JSON object.")
    return doc


def vectors_of(rows: Any, count: int, dims: int) -> np.ndarray:
    """`count` float-list (or base64) vectors in input order, each checked as OpenAI's are (http.vector_of)."""
    if not isinstance(rows, list) or len(rows) != count:
        got = len(rows) if isinstance(rows, list) else "no"
        raise malformed(f"The upstream returned {got} vectors for {count} inputs.")
    out = np.empty((count, dims), dtype="<f4")
    with np.errstate(over="ignore"):  # beyond float32's range: inf, refused below
        for i, row in enumerate(rows):
            out[i] = vector_of(row, dims)
            # a JSON true or false became 1.0 or 0.0: only rows holding those are looked at element by element
            if isinstance(row, list) and ((out[i] == 0) | (out[i] == 1)).any() and any(type(x) is bool for x in row):
                raise malformed("The upstream returned a vector with non-numbers.")
    if not np.isfinite(out).all():
        raise malformed("The upstream returned non-finite values.")
    return out


def int_or_none(value: Any, what: str) -> int | None:
    """A token count the provider reported (None: it reported none); anything but a whole number is malformed
    (a JSON 6.0 is 6: Google's and Cohere's schemas type counts as numbers)."""
    if value is None:
        return None
    if type(value) is float and value.is_integer() and value >= 0:
        return int(value)
    if type(value) is not int:
        raise malformed(f"The upstream's {what} is malformed.")
    return value


def in_index_order(items: Any, count: int) -> list[Any]:
    """The `embedding` of each of OpenAI-shaped `data` items (Voyage, Jina), in `index` order: every index of
    0..count-1 once."""
    if not isinstance(items, list) or len(items) != count:
        got = len(items) if isinstance(items, list) else "no"
        raise malformed(f"The upstream returned {got} vectors for {count} inputs.")
    out: list[Any] = [None] * count
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < count or out[index] is not None:
            raise malformed("The upstream's answer has a bad or repeated index.")
        out[index] = item.get("embedding")
    return out


def dig(doc: Any, *path: str) -> Any:
    """doc[path[0]][path[1]]..., or None where a step is missing or not an object."""
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def texts(out: Outgoing) -> Sequence[str]:
    """The inputs as text: the kinds other than openai take text only (token ids are refused before)."""
    return out.inputs  # type: ignore[return-value]
