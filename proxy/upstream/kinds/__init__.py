"""Provider kinds: one module each, that only translates (request out, answer in, errors mapped).

    openai.py   openai, azure: OpenAI's API (self-hosted TEI, Infinity, vLLM; Mistral)
    cohere.py   cohere: POST {base_url}/v2/embed                             Authorization: Bearer KEY
    voyage.py   voyage: POST {base_url}/embeddings                           Authorization: Bearer KEY
    jina.py     jina: POST {base_url}/embeddings                             Authorization: Bearer KEY
    gemini.py   gemini: POST {base_url}/models/{model}:batchEmbedContents    x-goog-api-key: KEY
    vertex.py   vertex: POST .../publishers/google/models/{model}:predict    Authorization: Bearer (google-auth)
    bedrock.py  bedrock: POST {base_url}/model/{modelId}/invoke              AWS SigV4 (botocore)

The interface (base.py) is the one the OpenAI kind has; the portable `input_type` is mapped in one table
(config/providers.py), the per-call input limits folded into the model's batch limits by the loader.
"""

from __future__ import annotations

from ...config import UpstreamSettings
from ..http import Target
from .base import Auth, Outgoing, Translator
from .bedrock import Bedrock
from .cohere import Cohere
from .gemini import Gemini
from .jina import Jina
from .openai import Azure, OpenAI
from .vertex import Vertex
from .voyage import Voyage

__all__ = ["Auth", "Outgoing", "Translator", "make_body", "make_target", "translator"]

_KINDS: dict[str, Translator] = {t.name: t for t in (OpenAI(), Azure(), Cohere(), Voyage(), Jina(), Gemini(),
                                                     Vertex(), Bedrock())}


def translator(kind: str) -> Translator:
    return _KINDS[kind]


def make_target(up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
    """Built once per deployment."""
    return translator(up.kind).target(up, upstream_model, api_key)


def make_body(up: UpstreamSettings, upstream_model: str, out: Outgoing) -> bytes:
    return translator(up.kind).body(up, upstream_model, out)
