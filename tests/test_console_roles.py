"""The console follows the role (issue 17): a team admin sees only its teams' keys and usage and no control it
cannot use, a viewer reads and changes nothing, the header says who is signed in and how, and the Admins and Audit
screens work; in Debian's headless Chromium (Playwright) against a real proxy, redis-server and mock upstream.
Any JavaScript error, failed request or CSP violation fails a test (refusals the test provokes aside)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.stack import Server, embed, http, start_mock, start_proxy

pytestmark = pytest.mark.redis

ROOT = "console-roles-root-key-0123456789"
CONFIG = "[upstreams.default]\nbackoff_base_s = 0.01\ndeadline_s = 5.0\nmax_retries = 1\n[teams.ads]\nrpm = 500\n"
TIMEOUT_MS = 15_000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed; under CI the console's browser tests must run")
    pytest.skip("chromium is not installed (apt-get install chromium)")


@dataclass
class Stack:
    url: str
    browser: Any
    errors: list[str] = field(default_factory=list)

    def admin(self, method: str, path: str, body: Any = None, key: str = ROOT) -> Any:
        status, doc = http(method, self.url + path, body, {"Authorization": f"Bearer {key}"})
        assert status < 300, (path, doc)
        return doc

    def page(self, credential: str) -> Any:
        context = self.browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: self.errors.append(f"console {msg.type}: {msg.text}")
                if msg.type in ("error", "warning") else None)
        page.goto(self.url + "/admin/ui/")
        page.get_by_label("Admin key").fill(credential)
        page.get_by_role("button", name="Sign in").click()
        expect()(page.get_by_role("button", name="Sign out")).to_be_visible()
        return page


def expect() -> Any:
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=TIMEOUT_MS)
    return playwright_expect


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("playwright is not installed (pip install -e '.[dev]')")
        pytest.skip("playwright is not installed")
    workdir = tmp_path_factory.mktemp("console-roles")
    redis_server.flush()
    servers: list[Server] = []
    try:
        mock, mock_url = start_mock(workdir)
        servers.append(mock)
        proxy, url = start_proxy(workdir, mock_url, redis_server.url, CONFIG, workers=1,
                                 env={"PROXY_ADMIN_KEY": ROOT})
        servers.append(proxy)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            try:
                yield Stack(url, browser)
            finally:
                browser.close()
    finally:
        for server in reversed(servers):
            server.stop()


@pytest.fixture
def console(stack: Stack) -> Iterator[Stack]:
    stack.errors.clear()
    yield stack
    assert stack.errors == [], "JavaScript errors, failed requests or CSP violations in the console"


def nav(page: Any) -> list[str]:
    return [a for a in page.get_by_role("navigation").get_by_role("link").all_inner_texts()]


def test_a_team_admin_sees_its_team_only_and_no_control_it_cannot_use(console: Stack) -> None:
    e = expect()
    lead = console.admin("POST", "/admin/admins", {"name": "ads-lead", "role": "team", "teams": ["ads"]})["credential"]
    other = console.admin("POST", "/admin/keys", {"team": "search", "name": "not-yours"})
    page = console.page(lead)
    e(page.locator("#who")).to_have_text("ads-lead · team admin of ads · admin credential")
    assert nav(page) == ["Teams", "Keys", "Usage", "Audit"]
    e(page.get_by_role("row").filter(has_text="ads")).to_have_count(1)  # Teams: its own team alone
    assert page.get_by_role("button", name="Set team limits").count() == 0
    assert page.get_by_role("button", name="Edit").count() == 0

    page.get_by_role("navigation").get_by_role("link", name="Keys").click()
    page.get_by_role("button", name="New key").click()
    dialog = page.get_by_role("dialog", name="New key")
    page.get_by_label("Team").fill("search")
    dialog.get_by_role("button", name="Create").click()
    e(dialog.get_by_role("alert")).to_contain_text("may not create keys of team 'search'")
    page.get_by_label("Team").fill("ads")
    dialog.get_by_role("button", name="Create").click()
    shown = page.get_by_role("dialog", name="Key created for ads")
    key = shown.get_by_label("Key").input_value()
    key_id = re.search(r"Key (key_[0-9a-f]+) of team", shown.inner_text())
    assert key_id is not None and embed(console.url, key, ["team admin's key"])[0] == 200
    shown.get_by_role("button", name="Done").click()
    row = page.get_by_role("row").filter(has_text=key_id.group(1))
    e(row.get_by_role("button", name="Rotate")).to_be_visible()
    row.get_by_role("button", name="Revoke").click()
    page.get_by_role("dialog", name=f"Revoke {key_id.group(1)}?").get_by_role("button", name="Revoke").click()
    e(row).to_contain_text("revoked")
    assert page.get_by_text(other["id"]).count() == 0  # another team's key never shows

    page.get_by_role("navigation").get_by_role("link", name="Audit").click()
    audit = page.get_by_role("row").filter(has_text="keys.revoke")
    e(audit).to_contain_text("ads-lead")
    e(audit).to_contain_text("console")
    assert page.get_by_role("row").filter(has_text="search").count() == 0  # another team's entries never show
    refused = console.admin("GET", "/admin/audit?actor=ads-lead&team=search")["data"]
    assert [(x["action"], x["outcome"], x["how"]) for x in refused] == [("keys.create", "refused", "console")]
    console.errors[:] = [x for x in console.errors if "status of 403" not in x]  # the refused create itself
    page.context.close()


def test_a_viewer_reads_every_screen_and_is_offered_no_change(console: Stack) -> None:
    e = expect()
    viewer = console.admin("POST", "/admin/admins", {"name": "finance", "role": "viewer"})["credential"]
    console.admin("POST", "/admin/keys", {"team": "ads", "name": "seen"})
    page = console.page(viewer)
    e(page.locator("#who")).to_have_text("finance · viewer · admin credential")
    assert nav(page) == ["Teams", "Keys", "Usage", "Cache", "Upstreams", "Audit", "Admins"]
    for screen in nav(page):
        page.get_by_role("navigation").get_by_role("link", name=screen).click()
        e(page.get_by_role("heading", level=1)).to_have_text(screen)
        for control in ("New key", "Revoke", "Rotate", "Limits", "Set team limits", "Edit", "Reset", "Purge",
                        "New admin"):
            assert page.get_by_role("button", name=control, exact=True).count() == 0, (screen, control)
    page.context.close()


def test_root_makes_and_revokes_an_admin_from_the_console(console: Stack) -> None:
    e = expect()
    page = console.page(ROOT)
    e(page.locator("#who")).to_have_text("root · platform admin · admin key")
    page.get_by_role("navigation").get_by_role("link", name="Admins").click()
    page.get_by_role("button", name="New admin").click()
    dialog = page.get_by_role("dialog", name="New admin")
    dialog.get_by_label("Admin name").fill("helper")
    dialog.get_by_label("Role").select_option("team")
    dialog.get_by_label("Teams").fill("ads, search")
    dialog.get_by_role("button", name="Create").click()
    shown = page.get_by_role("dialog", name="Admin helper created")
    credential = shown.get_by_label("Credential").input_value()
    assert credential.startswith("sk-admin-")
    shown.get_by_role("button", name="Done").click()
    assert http("GET", console.url + "/admin/keys", None, {"Authorization": f"Bearer {credential}"})[0] == 200
    row = page.get_by_role("row").filter(has_text="helper")
    e(row).to_contain_text("ads, search")
    row.get_by_role("button", name="Revoke").click()
    page.get_by_role("dialog", name="Revoke helper?").get_by_role("button", name="Revoke").click()
    e(row).to_contain_text("revoked")
    assert http("GET", console.url + "/admin/keys", None, {"Authorization": f"Bearer {credential}"})[0] == 401
    page.get_by_role("navigation").get_by_role("link", name="Audit").click()
    made = page.get_by_role("row").filter(has_text="admins.create").filter(has_text="helper")
    e(made).to_contain_text("console")  # made from the console: its `how`
    e(page.get_by_role("row").filter(has_text="admins.revoke")).to_contain_text("helper")
    assert credential not in page.content()
    page.context.close()



