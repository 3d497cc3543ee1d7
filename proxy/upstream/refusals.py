"""What the proxy reads from upstream answers it does not pass on as they are.

An error answer's reason, relayed to the client when the upstream refused the client's input (cleaned: never the
proxy's credentials, no control characters, bounded), and which inputs an upstream may treat as empty.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

RELAYED_CHARS = 500  # of an upstream's reason for refusing a request, relayed to the client


@dataclass(frozen=True, slots=True)
class Refusal:
    """A provider's error answer as a kind reads it: its reason, the client's parameter it names (when it can be
    told), the wait it asks for, and the status it stands for when the provider's own differs (Bedrock's
    ThrottlingException is a 429 whatever its status)."""

    message: str
    param: str | None = None
    retry_after: float | None = None
    status: int | None = None


Refuse = Callable[[int, bytes, Mapping[str, str]], Refusal]


def is_blank(text: str) -> bool:
    """Whether an upstream may see `text` as empty: only whitespace, control and format characters (`" "`, `"\\n"`,
    `"\\u200b"`), which servers such as Infinity strip (BERT's text cleaning) and count as 0 tokens. Stops at the
    first visible character, so ordinary text costs one look."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


# One of FastAPI's validation errors as it begins, `"loc":[...],"msg":"..."` (the echo of the input comes after)
_JSON_STR = rb'"(?:[^"\\]|\\.)*"'
_VALIDATION_ERROR = re.compile(rb'"loc":(\[(?:' + _JSON_STR + rb'|-?\d+|,)*\]),"msg":(' + _JSON_STR + rb')')


def upstream_message(body: bytes) -> str:
    """The reason in an error answer: OpenAI's `error.message`, a bare `error` string (TEI), or FastAPI's `detail`
    (a string, or validation errors whose `msg` and `loc` are kept and whose echo of the `input` is not; from the
    beginning of an answer cut short too, since each error echoes the input after its message)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _cut_validation_errors(body)
    if not isinstance(doc, dict):
        return ""
    error, detail = doc.get("error"), doc.get("detail")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    for value in (error, detail, doc.get("message")):
        if isinstance(value, str):
            return value
    if isinstance(detail, list):
        return "; ".join(_validation_error(d) for d in detail[:5]
                         if isinstance(d, dict) and isinstance(d.get("msg"), str))
    return ""


def _cut_validation_errors(body: bytes) -> str:
    """FastAPI's validation errors from the first part of an answer too large to keep whole (an echo of a long
    input, Infinity's twice). A quote inside an echoed input is escaped, so the echo cannot pass for an error."""
    if not body.startswith(b'{"detail":['):
        return ""
    found = []
    for m in _VALIDATION_ERROR.finditer(body):
        try:
            found.append({"loc": orjson.loads(m.group(1)), "msg": orjson.loads(m.group(2))})
        except orjson.JSONDecodeError:
            continue
        if len(found) == 5:
            break
    return "; ".join(_validation_error(e) for e in found if isinstance(e["msg"], str))


def _validation_error(error: dict[str, Any]) -> str:
    """`input: String should have at most 122880 characters` from one of FastAPI's validation errors. Positions
    in `loc` are left out: they count the inputs of the upstream call, not of the client's request (which may hold
    cached inputs, or share the call with others)."""
    loc = error.get("loc")
    where = ".".join(str(p) for p in loc if p != "body" and type(p) is not int) if isinstance(loc, list) else ""
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def clean_message(message: str, secret: str) -> str:
    """An upstream's message as relayed: the proxy's upstream key cut out (should an upstream or a gateway in
    between echo the request's credentials), control characters made spaces, at most RELAYED_CHARS."""
    if secret:
        message = message.replace(secret, "[redacted]")
    message = "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in message[:RELAYED_CHARS * 2])
    message = " ".join(message.split())
    return message if len(message) <= RELAYED_CHARS else message[:RELAYED_CHARS - 3] + "..."
