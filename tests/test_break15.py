"""Issue 15, review: what a hostile user, a careless operator and a chaos engineer found in the change, each
reproduced against real servers (the mock upstream, a real redis-server, the proxy on a real socket). Every test
here failed on the code it was written against."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import tokenizers
from tokenizers import normalizers

from proxy.config import ConfigError, load
from proxy.config.limits import MAX_LIMIT
from proxy.mock.upstream import MockModel
from tests import test_fleet
from tests.conftest import ProxyFactory, Upstream, make_settings
from tests.helpers import assert_same_vectors, vectors
from tests.test_cli import cli
from tests.test_fleet import MODEL, Mocks, admin_upstreams, fleet_settings, settle
from tests.test_fleet_units import make_tokenizer_file
from tests.test_quota_http import ADMIN, QUICK, admin
from tests.test_upstream_probe import COOLDOWN_S, only

pytestmark = pytest.mark.redis
mocks = test_fleet.mocks  # the fixture: one real mock upstream per deployment


async def direct_keyless(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    """A keyless server's own answer to `body`."""
    async with aiohttp.ClientSession() as s, s.post(base_url + "/embeddings", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


TOO_LONG = "x" + " " * 2_000 + "y"  # over the Infinity-like mock's max_chars below: its 422, about the input


async def test_a_clients_refused_input_as_a_pauses_probe_does_not_keep_the_deployment_paused(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """A long 429 pause is probed every cooldown_s. When the probe happens to carry a client's input the upstream
    refuses (its 422, relayed as that client's 400), the upstream answered: it is not rate limiting. The probe
    says nothing against the deployment (point 10a), so the next ordinary request is served, not refused with
    "at its rate limit for 3598s more" for another cooldown_s (any key holder could keep a model down that way)."""
    up = await mocks(max_chars=1_000)
    proxy = await make_proxy(fleet_settings(redis_url, *only(up)))
    key = await proxy.new_key()
    up.state.fail_next("status", status=429, retry_after="1e309")
    assert (await proxy.embed(key, {"model": MODEL, "input": "first"})).status == 429
    await asyncio.sleep(COOLDOWN_S + 0.2)  # the pause's probe is due
    resp = await proxy.embed(key, {"model": MODEL, "input": TOO_LONG})
    assert resp.status == 400, await resp.text()  # the probe: the upstream's 422, the client's own
    assert up.state.requests == 2
    resp = await proxy.embed(key, {"model": MODEL, "input": "an ordinary request"})
    assert resp.status == 200, await resp.text()
    assert up.state.requests == 3
    assert (await admin_upstreams(proxy))[f"{MODEL}/a"]["state"] == "healthy"


HUGE = "99999999999999999999999999"  # a limit beyond 64 bits: a typo, or an operator's "unlimited"


async def test_a_limit_beyond_what_json_and_the_quota_scripts_hold_is_refused_everywhere_it_is_set(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str, tmp_path: Path
) -> None:
    """`teams set ads --tokens-per-day 99999999999999999999999999` was stored, and from then on GET /admin/teams
    (the console's Teams screen, every team) was a 500 with a traceback (orjson: "Integer exceeds 64-bit range").
    A limit beyond MAX_LIMIT is refused by the CLI (a usage error), the admin API (400) and the config loader (one
    line naming the key and its range); one stored before reads as MAX_LIMIT."""
    refused = cli(redis_url, "teams", "set", "ads", "--tokens-per-day", HUGE)
    assert refused.returncode == 2 and "too large" in refused.stderr and "Traceback" not in refused.stderr
    assert cli(redis_url, "teams", "set", "ads", "--tokens-per-day", str(MAX_LIMIT)).returncode == 0

    config = tmp_path / "proxy.toml"
    config.write_text(f"[teams.ads]\ntokens_per_day = {HUGE}\n")
    with pytest.raises(ConfigError, match=r"tokens_per_day.*9007199254740991"):
        load(str(config), {})

    p = await make_proxy(make_settings(upstream.base_url, redis_url, QUICK, PROXY_ADMIN_KEY=ADMIN))
    resp = await admin(p, "PUT", "/admin/teams/web", {"tpm": 2**64 - 1})  # within 64 bits, beyond MAX_LIMIT
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "tpm"
    redis.Redis.from_url(redis_url).hset("ep:team:old", mapping={"tpm": HUGE})  # stored by an earlier version
    redis.Redis.from_url(redis_url).sadd("ep:teams", "old")
    resp = await admin(p, "GET", "/admin/teams")
    assert resp.status == 200, await resp.text()
    limits = {t["team"]: t["limits"] for t in (await resp.json())["data"]}
    assert limits["ads"]["tokens_per_day"] == MAX_LIMIT and limits["old"]["tpm"] == MAX_LIMIT


def bert_tokenizer_file(directory: Path) -> Path:
    """A tiny WordPiece tokenizer with the normalizer of BERT-style uncased models (all-MiniLM-L6-v2, bge, e5):
    text cleaning drops U+FFFD, NUL and control characters, accent stripping drops combining marks."""
    path = make_tokenizer_file(directory)
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.save(str(path))
    return path


# Inputs such a server reduces to nothing (Infinity answers 200 with 0 tokens): replacement characters (mis-decoded
# text, common in real corpora), a lone combining mark, an emoji variation selector.
EMPTIED = ["\ufffd", "\ufffd\ufffd \ufffd", "\u0301", "\ufe0f"]


@pytest.mark.parametrize("text", EMPTIED)
async def test_an_input_the_servers_normalizer_empties_is_a_zero_token_200_not_a_deployment_failure(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, tmp_path: Path, text: str
) -> None:
    """Point 10a covered whitespace, control and format characters only. In front of an Infinity serving a
    BERT-style model, "\\ufffd" alone was "malformed" (0 tokens, expected 1 to 8): retried on both deployments,
    each counted against them, both cooled down for 30 s (every later request waited), and a 502."""
    path = bert_tokenizer_file(tmp_path)
    model = MockModel(16, False, str(path), special_tokens=False)
    a, b = await mocks(api_key=None, models={"mini": model}), await mocks(api_key=None, models={"mini": model})
    ups = "".join(f'[upstreams.{n}]\nbase_url = "{u.base_url}"\napi_key_env = ""\nallowed_fails = 1\n'
                  'cooldown_s = 30.0\nbackoff_base_s = 0.01\n' for n, u in (("a", a), ("b", b)))
    proxy = await make_proxy(fleet_settings(
        redis_url, ups, f'[models.mini]\ndimensions = 16\ntokenizer = "hf:{path}"\ncount_special_tokens = false\n'
                        'deployments = [{ upstream = "a" }, { upstream = "b" }]\n'))
    key = await proxy.new_key()
    truth = await direct_keyless(a.base_url, {"model": "mini", "input": [text]})
    assert truth["usage"]["prompt_tokens"] == 0  # the server's own answer: nothing left to count
    a.state.reset()
    resp = await proxy.embed(key, {"model": "mini", "input": text})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["usage"]["prompt_tokens"] == 0 and a.state.requests + b.state.requests == 1
    assert_same_vectors(vectors(body), vectors(truth))
    # beside a counted input, each keeps its own count (a cached "hello world" must not say 1 token later)
    resp = await proxy.embed(key, {"model": "mini", "input": [text, "hello world"]})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["usage"]["prompt_tokens"] == 2
    await settle(proxy)
    resp = await proxy.embed(key, {"model": "mini", "input": "hello world"})
    assert resp.headers["x-cache"] == "hit" and (await resp.json())["usage"]["prompt_tokens"] == 2
    for name, state in (await admin_upstreams(proxy)).items():
        assert (state["state"], state["consecutive_failures"]) == ("healthy", 0), name
