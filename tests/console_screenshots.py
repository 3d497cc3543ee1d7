"""Screenshots of the console for the README: `.venv/bin/python -m tests.console_screenshots docs/`.

Starts what the browser test starts (a private redis-server, the mock upstream, the proxy), fills it with what an
operator has after a week (tests/console_data.py: five teams, long names, a rotated and a revoked key, two weeks of
usage, real traffic), and saves each screen at 1280x800, three at 390x844 (a phone), and one with the Redis store
stopped. Needs Debian's chromium, like
tests/test_console.py."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from tests.conftest import RedisServer
from tests.console_browser import ADMIN, create_key, nav, sign_in
from tests.console_data import MODELS, seed
from tests.stack import start_mock, start_proxy

CONFIG = """
[teams.ads]
tokens_per_day = 50000000
"""


def desktop(page: Any, out: Path) -> None:
    page.get_by_label("Admin key").fill("correct-horse-battery")  # shown as dots
    page.screenshot(path=str(out / "console-sign-in.png"))
    page.get_by_label("Admin key").fill("")
    sign_in(page)
    page.get_by_role("row").nth(3).wait_for()
    page.screenshot(path=str(out / "console-teams.png"))
    create_key(page, "search", "offline-eval")  # one more key, and its confirmation
    page.get_by_label("Show keys of").select_option("search")  # #/keys?team=search: the rotated key in view
    page.get_by_text("works until").wait_for()
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
    nav(page, "Usage")
    page.get_by_label("Chart").select_option("money")
    page.locator("svg.chart rect.bar").first.wait_for()
    page.screenshot(path=str(out / "console-usage.png"))
    nav(page, "Cache")
    model = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=MODELS[0], exact=True))
    model.wait_for()
    page.screenshot(path=str(out / "console-cache.png"))
    model.get_by_role("button", name="Purge").click()
    dialog = page.get_by_role("dialog", name=f"Purge {MODELS[0]}?")
    dialog.wait_for()
    page.screenshot(path=str(out / "console-cache-purge.png"))
    dialog.get_by_role("button", name="Cancel").click()
    nav(page, "Upstreams")
    page.get_by_role("row").filter(has_text="healthy").first.wait_for()
    page.screenshot(path=str(out / "console-upstreams.png"))


def store_down(page: Any, url: str, redis: RedisServer, out: Path) -> None:
    """The Keys screen with the state store stopped: its layout, and what is down in place of its table."""
    redis.stop()
    page.goto(url + "/admin/ui/#/teams")
    page.goto(url + "/admin/ui/#/keys")
    page.get_by_role("button", name="Retry").wait_for()
    page.screenshot(path=str(out / "console-store-down.png"))


def phone(page: Any, url: str, out: Path) -> None:
    page.goto(url + "/admin/ui/#/keys")
    sign_in(page)
    page.get_by_role("row").nth(3).wait_for()
    page.screenshot(path=str(out / "console-phone-keys.png"))
    page.get_by_role("button", name="Menu").click()
    page.get_by_role("navigation").get_by_role("link", name="Usage").wait_for()
    page.screenshot(path=str(out / "console-phone-menu.png"))
    page.get_by_role("navigation").get_by_role("link", name="Usage").click()
    page.locator("svg.chart rect.bar").first.wait_for()
    page.evaluate("document.querySelector('.tiles').scrollIntoView()")  # the totals, the chart, the first rows
    page.screenshot(path=str(out / "console-phone-usage.png"))


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
        seed(url, ADMIN, redis.url)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url + "/admin/ui/")
            desktop(page, out)
            page.close()
            page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=1)
            phone(page, url, out)
            store_down(page, url, redis, out)
            browser.close()
    finally:
        for s in reversed(servers):
            s.stop()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
