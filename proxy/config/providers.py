"""What the proxy knows of each provider kind, in one place: the kinds, their default URLs, how many inputs one call
may carry, and the portable `input_type` vocabulary with its mapping to each provider's own word.

The upstream side (proxy/upstream/kinds/) translates requests with this table; the loader checks a model's
`input_type`, `default_input_type` and batch limits against it, so a configuration that could only send what a
provider refuses is refused at start-up. A portable value a provider has no word for maps to None: the field is then
left out of the call (Voyage has no classification or clustering: its `input_type` is null, as its docs advise).
"""

from __future__ import annotations

import re
from typing import Literal

Kind = Literal["openai", "azure", "cohere", "voyage", "gemini", "vertex", "bedrock", "jina"]
KINDS: tuple[str, ...] = ("openai", "azure", "cohere", "voyage", "gemini", "vertex", "bedrock", "jina")
OPENAI_KINDS = frozenset({"openai", "azure"})  # they speak OpenAI's API: token ids pass, no input_type

InputType = Literal["query", "document", "classification", "clustering"]
INPUT_TYPES: tuple[str, ...] = ("query", "document", "classification", "clustering")

DEFAULT_BASE_URLS = {
    "cohere": "https://api.cohere.com",
    "voyage": "https://api.voyageai.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta",
    "vertex": "",  # https://{location}-aiplatform.googleapis.com/v1 (modelchecks.provider_upstream)
    "bedrock": "",  # https://bedrock-runtime.{region}.amazonaws.com
    "jina": "https://api.jina.ai/v1",
}

_GOOGLE_TASKS: dict[str, str | None] = {
    "query": "RETRIEVAL_QUERY", "document": "RETRIEVAL_DOCUMENT", "classification": "CLASSIFICATION",
    "clustering": "CLUSTERING"}
_COHERE_TYPES: dict[str, str | None] = {
    "query": "search_query", "document": "search_document", "classification": "classification",
    "clustering": "clustering"}
# kind (or "bedrock-cohere" / "bedrock-titan", by the model's family) -> portable value -> the provider's value
INPUT_TYPE_MAP: dict[str, dict[str, str | None]] = {
    "cohere": _COHERE_TYPES,
    "bedrock-cohere": _COHERE_TYPES,
    "voyage": {"query": "query", "document": "document", "classification": None, "clustering": None},
    "jina": {"query": "retrieval.query", "document": "retrieval.passage", "classification": "classification",
             "clustering": "separation"},
    "gemini": _GOOGLE_TASKS,
    "vertex": _GOOGLE_TASKS,
}
# Families whose provider requires an input type on every call (Cohere v3 and later, directly or on Bedrock).
NEEDS_INPUT_TYPE = frozenset({"cohere", "bedrock-cohere"})

# Inputs one call may carry, by family (documented limits; Titan embeds one text per InvokeModel call).
MAX_INPUTS = {"cohere": 96, "bedrock-cohere": 96, "bedrock-titan": 1, "gemini": 100, "vertex": 250,
              "voyage": 1000, "jina": 2048}
# Tokens one call may carry: Voyage's smallest per-request total (voyage-3 and voyage-3-large: 120K), Vertex's 20K.
MAX_TOKENS = {"voyage": 120_000, "vertex": 20_000}


_BEDROCK_COHERE = re.compile(r"(?:[a-z]{2,4}\.)?cohere\.")  # cohere.embed-v4:0, or an inference profile: us.cohere...


def family(kind: str, upstream_model: str) -> str:
    """The kind, told apart by model on Bedrock: `bedrock-titan` (amazon.titan-embed-*) or `bedrock-cohere`."""
    if kind != "bedrock":
        return kind
    return "bedrock-cohere" if _BEDROCK_COHERE.match(upstream_model) else "bedrock-titan"


def provider_input_type(fam: str, portable: str | None) -> str | None:
    """The provider's word for a portable input type (None: the call carries none)."""
    if portable is None:
        return None
    return INPUT_TYPE_MAP.get(fam, {}).get(portable)


def takes_input_type(fam: str) -> bool:
    return fam in INPUT_TYPE_MAP
