"""What a new operator has after a week, for the console's browser test and its screenshots: five teams (one with a
63-character name), keys with long names, every model and every limit, one key rotated (in its grace period) and one
revoked, two weeks of usage written through the usage ledger with a moved clock, and some real traffic."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from proxy.accounts.usage import UsageLedger
from proxy.config import RedisSettings
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.stack import embed, http

LONG_TEAM = "recommendations-and-personalisation-platform-europe-west-4-prod"  # 63: the longest team name
LONG_NAME = ("nightly backfill of the product catalogue embeddings for every storefront in the EU region "
             "(owner: data platform, ticket DATA-4412)")
MODELS = ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002")
# (team, requests per day, tokens per request, share served from the cache)
HISTORY = [("search", 900, 180, 0.62), ("ads", 420, 350, 0.35), ("support-bot", 260, 90, 0.8),
           (LONG_TEAM, 120, 500, 0.5), ("fraud-detection", 3, 12, 0.0)]

HISTORY_KEYS = {"search": "ranking", "ads": LONG_NAME, "support-bot": "answers", LONG_TEAM: "feature-store-embedder",
                "fraud-detection": "scoring"}  # team -> the name of the key its history is written under


@dataclass
class Seeded:
    keys: dict[str, str] = field(default_factory=dict)  # key name -> key
    ids: dict[str, str] = field(default_factory=dict)  # key name -> key id
    rotated: str = ""  # the id of the key in its rotation grace
    revoked: str = ""


def seed_history(redis_url: str, key_ids: dict[str, str], days: int = 14) -> None:
    """Past days' usage (team -> key id), recorded and flushed by UsageLedger itself with its clock moved back."""

    async def go() -> None:
        settings = RedisSettings(url=redis_url, socket_timeout_s=5.0)
        client, _ = connect(settings)
        store = Store(client, settings)
        now = time.time()
        clock = [now]
        ledger = UsageLedger(store, RedisKeys("ep"), clock=lambda: clock[0])
        for back in range(days, -1, -1):  # today too, as far as it has gone
            clock[0] = now - back * 86400
            wave = 1.0 + 0.35 * ((back * 7) % 5 - 2) / 2 - (0.45 if (back % 7) in (1, 2) else 0)  # weekends quieter
            wave *= (now % 86400) / 86400 if back == 0 else 1
            for n, (team, per_day, tokens, cached) in enumerate(HISTORY):
                for i in range(max(1, int(per_day * wave / 20))):  # each record stands for 20 requests
                    model = MODELS[1 if (i + n) % 3 == 0 else 0]
                    upstream = int(tokens * 20 * (1 - cached))
                    ledger.record(team, key_ids[team], model, tokens * 20, upstream)
            await ledger.flush()
        await store.close()

    # in a thread of its own: Playwright's sync API runs an event loop in the caller's thread
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, go()).result()


def seed(url: str, admin: str, redis_url: str) -> Seeded:
    """Through the admin API (as an operator would), then the ledger's history, then real traffic."""
    auth = {"Authorization": f"Bearer {admin}"}
    out = Seeded()

    def call(method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, answer = http(method, url + "/admin/" + path, body, auth)
        assert got == status, (path, got, answer)
        return answer

    call("PUT", "teams/search", {"rpm": 600, "tpm": 1_000_000, "tokens_per_day": 50_000_000,
                                 "tokens_per_month": 1_000_000_000})
    call("PUT", f"teams/{LONG_TEAM}", {"tpm": 2_000_000, "tokens_per_month": 500_000_000})
    for team, name, extra in [
        ("search", "ranking", {}),
        ("search", "indexer", {}),
        ("ads", LONG_NAME, {"models": list(MODELS), "expires_in_s": 90 * 86400, "rpm": 1200, "tpm": 200_000,
                            "tokens_per_day": 20_000_000, "tokens_per_month": 400_000_000}),
        ("support-bot", "answers", {"models": [MODELS[0]]}),
        ("support-bot", "legacy-widget", {}),
        (LONG_TEAM, "feature-store-embedder", {"tpm": 500_000}),
        ("fraud-detection", "scoring", {"expires_in_s": 30 * 86400}),
    ]:
        created = call("POST", "keys", {"team": team, "name": name, **extra}, status=201)
        out.keys[name], out.ids[name] = created["key"], created["id"]
    rotated = call("POST", f"keys/{out.ids['indexer']}/rotate", {"grace_s": 48 * 3600}, status=201)
    out.rotated = out.ids["indexer"]
    out.keys["indexer"], out.ids["indexer"] = rotated["key"], rotated["id"]
    call("POST", f"keys/{out.ids['legacy-widget']}/revoke")
    out.revoked = out.ids["legacy-widget"]
    seed_history(redis_url, {team: out.ids[name] for team, name in HISTORY_KEYS.items()})
    for i in range(6):
        for name in ("ranking", "indexer", "answers", "feature-store-embedder"):
            status, body = embed(url, out.keys[name], [f"{name} question {i % 3}", f"{name} doc {i}"])
            assert status == 200, body
    return out
