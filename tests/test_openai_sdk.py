"""The official `openai` SDK as the client: only base_url and api_key change."""

from __future__ import annotations

from typing import Any

import numpy as np
import openai
import pytest

from tests.conftest import Proxy, Upstream, settle
from tests.helpers import direct, vectors

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def sdk(proxy: Proxy, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(proxy.client.make_url("/v1")), api_key=key, max_retries=0)


@pytest.mark.parametrize(
    "inp",
    ["hello from the sdk", ["a", "b", "a"], [9906, 505, 279], [[9906], [505, 279]]],
    ids=["string", "strings", "token_ids", "token_id_lists"],
)
@pytest.mark.parametrize("fmt", [None, "float", "base64"])  # None: the SDK asks for base64 and decodes it
@pytest.mark.parametrize("dims", [None, 64])
async def test_sdk_embeddings_match_upstream(
    proxy: Proxy, upstream: Upstream, inp: Any, fmt: str | None, dims: int | None
) -> None:
    client = sdk(proxy, await proxy.new_key())
    kwargs: dict[str, Any] = {"model": MODEL, "input": inp}
    if fmt:
        kwargs["encoding_format"] = fmt
    if dims:
        kwargs["dimensions"] = dims
    raw: dict[str, Any] = {k: v for k, v in kwargs.items() if k != "encoding_format"}
    expected = vectors(await direct(upstream.base_url, {**raw, "encoding_format": "base64"}))
    for _ in range(2):  # miss, then hit
        result = await client.embeddings.create(**kwargs)
        assert [d.index for d in result.data] == list(range(len(expected)))
        for d, want in zip(result.data, expected, strict=True):
            if fmt == "base64":
                got = np.frombuffer(__import__("base64").b64decode(d.embedding), dtype="<f4")
            else:
                got = np.asarray(d.embedding, dtype=np.float64).astype(np.float32)
            assert np.array_equal(got, want)
        assert result.usage.prompt_tokens == result.usage.total_tokens > 0
        await settle(proxy)
    await client.close()


async def test_sdk_sees_openai_errors(proxy: Proxy) -> None:
    client = sdk(proxy, await proxy.new_key())
    with pytest.raises(openai.BadRequestError) as bad:
        await client.embeddings.create(model=MODEL, input="")
    assert bad.value.status_code == 400 and bad.value.param == "input"
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="no-such-model", input="x")
    bad_key = sdk(proxy, "sk-gateway-" + "B" * 43)
    with pytest.raises(openai.AuthenticationError):
        await bad_key.embeddings.create(model=MODEL, input="x")
    models = await client.models.list()
    assert {m.id for m in models.data} == {"text-embedding-3-small", "text-embedding-3-large",
                                           "text-embedding-ada-002"}
    await client.close()
    await bad_key.close()
