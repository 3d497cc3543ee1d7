"""Screenshots of the console for the README: `.venv/bin/python -m tests.console_screenshots docs/`.

Starts what the browser test starts (a private redis-server, the mock upstream, the proxy), writes two weeks of
usage through the ledger's own code with a moved clock, sends some real traffic, and saves each screen at 1280x800.
Needs Debian's chromium, like tests/test_console.py."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from proxy.config import RedisSettings
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from proxy.usage import UsageLedger
from tests.conftest import RedisServer
from tests.stack import embed, http, start_mock, start_proxy
from tests.test_console import ADMIN, create_key, sign_in

CONFIG = """
[teams.search]
rpm = 600
tpm = 1000000

[teams.ads]
tokens_per_day = 50000000
"""
MODELS = ("text-embedding-3-small", "text-embedding-3-large")
# (team, requests per day, tokens per request, share served from the cache)
HISTORY = [("search", 900, 180, 0.62), ("ads", 420, 350, 0.35), ("support-bot", 260, 90, 0.8)]


def seed_history(redis_url: str, key_ids: dict[str, str], days: int = 14) -> None:
    """Past days' usage, recorded and flushed by UsageLedger itself with its clock moved back."""

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
                for i in range(int(per_day * wave / 20)):  # each record stands for 20 requests
                    model = MODELS[1 if (i + n) % 3 == 0 else 0]
                    upstream = int(tokens * 20 * (1 - cached))
                    ledger.record(team, key_ids[team], model, tokens * 20, upstream)
            await ledger.flush()
        await store.close()

    asyncio.run(go())


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="console-shots-"))
    redis = RedisServer(shutil.which("redis-server") or "redis-server")
    redis.start()
    servers: list[Any] = []
    try:
        mock, mock_url = start_mock(workdir)
        servers.append(mock)
        proxy, url = start_proxy(workdir, mock_url, redis.url, CONFIG, workers=1, env={"PROXY_ADMIN_KEY": ADMIN})
        servers.append(proxy)
        auth = {"Authorization": f"Bearer {ADMIN}"}
        keys: dict[str, str] = {}
        ids: dict[str, str] = {}
        for team, name, models in [("search", "ranking", []), ("ads", "batch-embed", ["text-embedding-3-small"]),
                                   ("support-bot", "answers", []), ("search", "indexer", [])]:
            body: dict[str, Any] = {"team": team, "name": name, "models": models}
            if name == "batch-embed":
                body |= {"expires_in_s": 90 * 86400, "tpm": 200000}
            status, created = http("POST", url + "/admin/keys", body, auth)
            assert status == 201, created
            keys.setdefault(team, created["key"])
            ids.setdefault(team, created["id"])
        http("PUT", url + "/admin/teams/support-bot", {"rpm": 120, "tokens_per_month": 20000000}, auth)
        seed_history(redis.url, ids)
        for i in range(12):
            for team, key in keys.items():
                embed(url, key, [f"{team} question {i % 5}", f"{team} doc {i}"])

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url + "/admin/ui/")
            page.get_by_label("Admin key").fill("correct-horse-battery")  # shown as dots
            page.screenshot(path=str(out / "console-sign-in.png"))
            page.get_by_label("Admin key").fill("")
            sign_in(page)
            page.get_by_role("row").nth(3).wait_for()
            page.screenshot(path=str(out / "console-teams.png"))
            create_key(page, "search", "offline-eval")  # one more key in the list
            page.screenshot(path=str(out / "console-keys.png"))
            page.get_by_role("button", name="New key").click()
            page.get_by_label("Team").fill("ads")
            dialog = page.get_by_role("dialog", name="New key")
            dialog.get_by_label("Name").fill("nightly-backfill")
            dialog.get_by_label("Models").fill("text-embedding-3-small")
            dialog.get_by_label("Expires in (days)").fill("30")
            dialog.get_by_label("Tokens per minute").fill("100000")
            page.screenshot(path=str(out / "console-keys-new.png"))
            dialog.get_by_role("button", name="Cancel").click()
            page.get_by_role("navigation").get_by_role("button", name="Usage").click()
            page.locator("svg.chart rect.bar").first.wait_for()
            page.screenshot(path=str(out / "console-usage.png"))
            page.get_by_role("navigation").get_by_role("button", name="Cache").click()
            model = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=MODELS[0], exact=True))
            model.wait_for()
            page.screenshot(path=str(out / "console-cache.png"))
            model.get_by_role("button", name="Purge").click()
            dialog = page.get_by_role("dialog", name=f"Purge {MODELS[0]}?")
            dialog.wait_for()
            page.screenshot(path=str(out / "console-cache-purge.png"))
            dialog.get_by_role("button", name="Cancel").click()
            page.get_by_role("navigation").get_by_role("button", name="Upstreams").click()
            page.get_by_role("row").filter(has_text="healthy").first.wait_for()
            page.screenshot(path=str(out / "console-upstreams.png"))
            browser.close()
    finally:
        for s in reversed(servers):
            s.stop()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
