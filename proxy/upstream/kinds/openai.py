"""OpenAI's API, and Azure OpenAI's: where the POST goes, how the key travels, what the body names.

    openai  POST {base_url}/embeddings                                  Authorization: Bearer KEY; body names the model
    azure   POST {base_url}/openai/deployments/{upstream_model}/embeddings?api-version=V
                                                                        api-key: KEY; the path names the deployment

Both answer in OpenAI's shape, so one parser reads either (http.parse_answer). Self-hosted servers (TEI, Infinity,
vLLM) and providers that speak OpenAI's API (Mistral) are `openai`. Neither takes `input_type`: the request parser
refuses it for such a model as OpenAI refuses any argument it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
import yarl

from ...config import UpstreamSettings
from ..http import Target, Usage, parse_answer
from ..refusals import Refusal, upstream_message
from .base import Outgoing, Translator


class OpenAI(Translator):
    name = "openai"
    openai_shaped = True  # its answers and errors take the proxy's own OpenAI path (http.py), as before kinds

    def target(self, up: UpstreamSettings, upstream_model: str, api_key: str) -> Target:
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

    def body(self, up: UpstreamSettings, upstream_model: str, out: Outgoing) -> bytes:
        body: dict[str, Any] = {"input": out.inputs}
        if up.kind != "azure":
            body["model"] = upstream_model
        if out.base64:
            body["encoding_format"] = "base64"
        if out.dimensions is not None:
            body["dimensions"] = out.dimensions
        if out.user is not None:
            body["user"] = out.user
        return orjson.dumps(body)

    def parse(self, raw: bytes, headers: Mapping[str, str], count: int, dims: int) -> tuple[np.ndarray, Usage]:
        return parse_answer(raw, count, dims)

    def refusal(self, status: int, body: bytes, headers: Mapping[str, str]) -> Refusal:
        return Refusal(upstream_message(body))


class Azure(OpenAI):
    name = "azure"
