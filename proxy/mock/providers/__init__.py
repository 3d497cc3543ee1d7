"""Strict mocks of the embeddings providers' own APIs, one module each, for tests and demos: each refuses what its
provider refuses (credentials, unknown and missing fields, values outside the documented set) and records what it
was sent and what it billed (common.py). Bedrock's verifies SigV4 signatures with botocore; Vertex's accepts only
tokens its token endpoint (googletoken.py) issued after verifying a service account's signed assertion.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from . import bedrock, cohere, gemini, jina, vertex, voyage
from .common import PROVIDER_SETTINGS, PROVIDER_STATE, ProviderMockSettings, ProviderModel, ProviderState

__all__ = ["PROVIDER_SETTINGS", "PROVIDER_STATE", "ProviderMockSettings", "ProviderModel", "ProviderState",
           "create_provider_app"]

_APPS: dict[str, Callable[[ProviderMockSettings], web.Application]] = {
    "cohere": cohere.create_app, "voyage": voyage.create_app, "jina": jina.create_app, "gemini": gemini.create_app,
    "vertex": vertex.create_app, "bedrock": bedrock.create_app,
}


def create_provider_app(kind: str, settings: ProviderMockSettings) -> web.Application:
    return _APPS[kind](settings)
