"""The console's browser harness: Debian's headless Chromium driven by Playwright (never a downloaded browser), a
proxy with the admin API on, and the steps the tests share (sign in, go to a screen, create a key). Used by
tests/test_console.py, tests/test_console_layout.py and tests/console_screenshots.py."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.stack import Server, embed, start_mock, start_proxy

ADMIN = "console-test-admin-key-0123456789"
# Quick retries; team limits changed at run time are seen at once (one process, which the change itself updates).
CONFIG = """
[upstreams.default]
backoff_base_s = 0.01
deadline_s = 5.0
max_retries = 1
"""
TIMEOUT_MS = 15_000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed; under CI the console's browser test must run")
    pytest.skip("chromium is not installed (apt-get install chromium): the console's browser test needs it")


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("playwright is not installed (pip install -e '.[dev]')")
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return sync_playwright


@contextmanager
def chromium_browser() -> Iterator[Any]:
    """Debian's Chromium, headless, for the time of the block (skipped, or failed under CI, without it)."""
    chromium = _chromium()
    sync_playwright = _playwright()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def proxy_stack(workdir: Path, redis_url: str, **env: str) -> Iterator[str]:
    """The mock upstream and one proxy process on `redis_url` with the admin key ADMIN; yields the proxy's URL."""
    servers: list[Server] = []
    try:
        mock, mock_url = start_mock(workdir)
        servers.append(mock)
        proxy, url = start_proxy(workdir, mock_url, redis_url, CONFIG, workers=1, env={"PROXY_ADMIN_KEY": ADMIN, **env})
        servers.append(proxy)
        yield url
    finally:
        for server in reversed(servers):
            server.stop()


PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


@dataclass
class Console:
    url: str  # the proxy's base URL
    browser: Any
    errors: list[str] = field(default_factory=list)

    def page(self, viewport: dict[str, int] | None = None, at: str = "") -> Any:
        """A fresh tab (own sessionStorage) at the console's address `at` ("#/usage?team=ads"), whose JavaScript
        errors, console errors and CSP reports are kept."""
        context = self.browser.new_context(viewport=viewport or DESKTOP, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: self.errors.append(f"console {msg.type}: {msg.text}")
                if msg.type in ("error", "warning") else None)
        page.goto(self.url + "/admin/ui/" + at)
        return page

    def check_errors(self, *expected: str) -> None:
        """No JavaScript error, failed request or CSP report, but those naming one of `expected` (a refusal the
        test asked for, such as "status of 503")."""
        left = [e for e in self.errors if not any(x in e for x in expected)]
        self.errors.clear()
        assert left == [], "JavaScript errors, failed requests or CSP violations in the console"


def expect_ui() -> Any:
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    return expect


def sign_in(page: Any) -> None:
    page.get_by_label("Admin key").fill(ADMIN)
    page.get_by_role("button", name="Sign in").click()
    # Sign out is in the header, or in the menu on a phone
    signed_in = page.get_by_role("button", name="Sign out").or_(page.get_by_role("button", name="Menu"))
    expect_ui()(signed_in).to_be_visible()


def nav(page: Any, screen: str) -> None:
    """To a screen by the navigation's link (each screen has an address: the links are links)."""
    page.get_by_role("navigation").get_by_role("link", name=screen).click()


def create_key(page: Any, team: str, name: str = "", **fields: str) -> tuple[str, str]:
    """Through the New key dialog; returns (key, key id) from the once-only dialog, and closes it."""
    expect = expect_ui()
    nav(page, "Keys")
    page.get_by_role("button", name="New key").click()
    dialog = page.get_by_role("dialog", name="New key")
    page.get_by_label("Team").fill(team)
    dialog.get_by_label("Name").fill(name)
    for label, value in fields.items():
        dialog.get_by_label(label).fill(value)
    dialog.get_by_role("button", name="Create").click()
    shown = page.get_by_role("dialog", name=f"Key created for {team}")
    expect(shown).to_be_visible()
    key = shown.get_by_label("Key").input_value()
    key_id = re.search(r"Key (key_[0-9a-f]+) of team", shown.inner_text())
    assert key.startswith("sk-gateway-") and key_id is not None
    shown.get_by_role("button", name="Copy").click()
    expect(shown.get_by_role("status")).to_contain_text(re.compile("Copied|Ctrl\\+C"))
    shown.get_by_role("button", name="Done").click()
    expect(shown).to_have_count(0)
    return key, key_id.group(1)


def shown_usd(amount: str) -> str:
    """How the console shows an amount of the admin API ("0.004999"): two decimals rounded half up, "<$0.01" for
    what rounds to zero (not zero itself), thousands separated ("$1,234.57")."""
    micros = round(Decimal(amount) * 1_000_000)
    cents = (micros + 5_000) // 10_000
    if micros and not cents:
        return "<$0.01"
    return f"${cents // 100:,}.{cents % 100:02d}"


def key_row(page: Any, key_id: str) -> Any:
    return page.get_by_role("row").filter(has_text=key_id)


def team_row(page: Any, team: str) -> Any:
    return page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=team, exact=True))


def wait_status(url: str, key: str, status: int, inputs: list[str]) -> None:
    """Key changes reach the proxy's key cache over pub/sub: at once, but not inside the admin call's answer."""
    deadline = time.monotonic() + 10
    while (got := embed(url, key, inputs)[0]) != status:
        assert time.monotonic() < deadline, f"expected {status}, still {got}"
        time.sleep(0.05)




def show(page: Any, url: str, at: str, ready: str = ".table-wrap, .empty, .panel-error") -> None:
    """The console's address `at` ("#/keys?team=ads") in a signed-in tab, once its screen shows `ready`."""
    page.goto(url + "/admin/ui/" + at)
    page.locator(f'section.view[data-address="{at}"]').locator(ready).first.wait_for()
