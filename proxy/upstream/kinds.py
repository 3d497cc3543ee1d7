"""How each kind of upstream is called: where the POST goes, how the key travels, what the body names.

    openai  POST {base_url}/embeddings                                  Authorization: Bearer KEY; body names the model
    azure   POST {base_url}/openai/deployments/{upstream_model}/embeddings?api-version=V
                                                                        api-key: KEY; the path names the deployment

Both answer in OpenAI's shape, so one parser reads either. Self-hosted servers (TEI, Infinity, vLLM) are `openai`.
"""

from __future__ import annotations

from typing import Any

import orjson
import yarl

from ..config import UpstreamSettings
from .http import Target


def make_target(up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
    """Built once per deployment: a parsed URL saves aiohttp ~100 us of CPU per call."""
    headers = {"Content-Type": "application/json"}
    base = up.base_url.rstrip("/")
    if up.kind == "azure":
        url = (yarl.URL(base) / "openai" / "deployments" / upstream_model / "embeddings").with_query(
            {"api-version": up.api_version})
        if api_key:
            headers["api-key"] = api_key
    else:
        url = yarl.URL(base + "/embeddings")
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
    return url, headers, api_key


def make_body(up: UpstreamSettings, upstream_model: str, inputs: list[str] | list[list[int]], base64: bool,
              dimensions: int | None, user: str | None) -> bytes:
    body: dict[str, Any] = {"input": inputs}
    if up.kind != "azure":
        body["model"] = upstream_model
    if base64:
        body["encoding_format"] = "base64"
    if dimensions is not None:
        body["dimensions"] = dimensions
    if user is not None:
        body["user"] = user
    return orjson.dumps(body)
