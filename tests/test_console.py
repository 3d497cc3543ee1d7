"""The console in a real browser: Debian's headless Chromium driven by Playwright (never a downloaded browser),
against a real proxy process with a private redis-server and the mock upstream. Elements are found by their
accessible names, which are part of the contract. Every page must finish without a JavaScript error, a failed
request or a Content-Security-Policy violation (Chromium reports all of them as console errors).

Needs `apt-get install chromium` (`.ci/run` installs it; under CI=true this test must run). With
CONSOLE_SCREENSHOTS=DIR the screenshot test writes each screen as a PNG into DIR (see README, "Console")."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.stack import MODEL, Server, embed, http, start_mock, start_proxy

pytestmark = pytest.mark.redis

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


@dataclass
class Console:
    url: str  # the proxy's base URL
    browser: Any
    errors: list[str] = field(default_factory=list)

    def page(self) -> Any:
        """A fresh tab (own sessionStorage) whose JavaScript errors, console errors and CSP reports are kept."""
        context = self.browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: self.errors.append(f"console {msg.type}: {msg.text}")
                if msg.type in ("error", "warning") else None)
        page.goto(self.url + "/admin/ui/")
        return page


@pytest.fixture(scope="module")
def console_stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    chromium = _chromium()
    sync_playwright = _playwright()
    workdir = tmp_path_factory.mktemp("console")
    redis_server.flush()
    servers: list[Server] = []
    try:
        mock, mock_url = start_mock(workdir)
        servers.append(mock)
        proxy, url = start_proxy(workdir, mock_url, redis_server.url, CONFIG, workers=1,
                                 env={"PROXY_ADMIN_KEY": ADMIN})
        servers.append(proxy)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            try:
                yield Console(url, browser)
            finally:
                browser.close()
    finally:
        for server in reversed(servers):
            server.stop()


@pytest.fixture
def console(console_stack: Console) -> Iterator[Console]:
    console_stack.errors.clear()
    yield console_stack
    assert console_stack.errors == [], "JavaScript errors, failed requests or CSP violations in the console"


def _expect() -> Any:
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    return expect


def sign_in(page: Any) -> None:
    page.get_by_label("Admin key").fill(ADMIN)
    page.get_by_role("button", name="Sign in").click()
    _expect()(page.get_by_role("button", name="Sign out")).to_be_visible()


def create_key(page: Any, team: str, name: str = "", **fields: str) -> tuple[str, str]:
    """Through the New key dialog; returns (key, key id) from the once-only dialog, and closes it."""
    expect = _expect()
    page.get_by_role("navigation").get_by_role("button", name="Keys").click()
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


def test_a_wrong_admin_key_shows_an_error_and_no_data(console: Console) -> None:
    expect = _expect()
    page = console.page()
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Enter the admin key.")
    page.get_by_label("Admin key").fill("not-the-admin-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Incorrect admin key provided.")
    expect(page.get_by_role("navigation")).to_be_hidden()
    expect(page.get_by_role("table")).to_have_count(0)
    assert page.evaluate("sessionStorage.length") == 0
    console.errors[:] = [e for e in console.errors if "status of 401" not in e]  # the refused sign-in itself
    page.context.close()


def test_keys_from_creation_to_revocation(console: Console) -> None:
    expect = _expect()
    page = console.page()
    sign_in(page)
    key, key_id = create_key(page, "search", "ci")
    assert embed(console.url, key, ["hello console"])[0] == 200
    row = key_row(page, key_id)
    expect(row).to_contain_text("active")
    expect(row).to_contain_text("search")

    # rotate: the new key works at once, the old one for the grace period
    row.get_by_role("button", name="Rotate").click()
    rotate = page.get_by_role("dialog", name=f"Rotate {key_id}")
    rotate.get_by_label("Grace period (hours)").fill("0")
    rotate.get_by_role("button", name="Rotate").click()
    expect(rotate.get_by_role("alert")).to_contain_text("above 0")  # refused before the admin API is asked
    rotate.get_by_label("Grace period (hours)").fill("2")
    rotate.get_by_role("button", name="Rotate").click()
    shown = page.get_by_role("dialog", name=f"{key_id} rotated")
    new_key = shown.get_by_label("Key").input_value()
    new_id = re.search(r"Key (key_[0-9a-f]+) of team", shown.inner_text())
    assert new_key.startswith("sk-gateway-") and new_key != key and new_id is not None
    shown.get_by_role("button", name="Done").click()
    assert embed(console.url, new_key, ["rotated"])[0] == 200
    assert embed(console.url, key, ["still in grace"])[0] == 200
    expect(key_row(page, key_id)).to_contain_text("rotated: works until")

    # a key's own limits
    key_row(page, new_id.group(1)).get_by_role("button", name="Limits").click()
    limits = page.get_by_role("dialog", name=f"Limits of {new_id.group(1)}")
    limits.get_by_label("Tokens per minute").fill("-5")
    limits.get_by_role("button", name="Save").click()
    expect(limits.get_by_role("alert")).to_have_text(
        "Tokens per minute must be a whole number, 0 or more (0 or empty: unlimited).")
    limits.get_by_label("Tokens per minute").fill("5000")
    limits.get_by_role("button", name="Save").click()
    expect(key_row(page, new_id.group(1))).to_contain_text("tpm 5,000")

    # revoke: refused at once
    key_row(page, new_id.group(1)).get_by_role("button", name="Revoke").click()
    page.get_by_role("dialog", name=f"Revoke {new_id.group(1)}?").get_by_role("button", name="Revoke").click()
    expect(key_row(page, new_id.group(1))).to_contain_text("revoked")
    wait_status(console.url, new_key, 401, ["after revoke"])
    status, body = embed(console.url, new_key, ["after revoke"])
    assert status == 401 and body["error"]["code"] == "api_key_revoked"
    assert key not in page.url and new_key not in page.url and page.context.cookies() == []
    page.context.close()


def test_forms_refuse_what_the_admin_api_would(console: Console) -> None:
    expect = _expect()
    page = console.page()
    sign_in(page)
    page.get_by_role("navigation").get_by_role("button", name="Keys").click()
    page.get_by_role("button", name="New key").click()
    dialog = page.get_by_role("dialog", name="New key")
    alert = dialog.get_by_role("alert")
    for team, expiry, message in [
        ("Bad Team", "", "Team names are 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit."),
        ("-search", "", "Team names are"),
        ("search", "0", "Expires in must be a number of days above 0 and at most 3650."),
        ("search", "99999", "Expires in must be a number of days above 0 and at most 3650."),
    ]:
        page.get_by_label("Team").fill(team)
        dialog.get_by_label("Expires in (days)").fill(expiry)
        dialog.get_by_role("button", name="Create").click()
        expect(alert).to_contain_text(message)
    dialog.get_by_label("Expires in (days)").fill("30")
    dialog.get_by_label("Requests per minute").fill("1.5")
    dialog.get_by_role("button", name="Create").click()
    expect(alert).to_have_text("Requests per minute must be a whole number, 0 or more (0 or empty: unlimited).")
    dialog.get_by_label("Requests per minute").fill("")
    dialog.get_by_label("Name").fill("é" * 200 + "😀")  # 201 characters (202 UTF-16 units)
    dialog.get_by_role("button", name="Create").click()
    expect(alert).to_have_text("Key names are at most 200 characters (this one has 201).")
    dialog.get_by_label("Name").fill("")
    dialog.get_by_label("Models").fill("no-such-model")
    dialog.get_by_role("button", name="Create").click()
    expect(alert).to_have_text("Unknown model 'no-such-model'.")  # the admin API's own message
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_have_count(0)
    console.errors[:] = [e for e in console.errors if "status of 400" not in e]  # the refused create
    page.context.close()


def test_team_limits_are_enforced_and_reset(console: Console) -> None:
    expect = _expect()
    page = console.page()
    sign_in(page)
    key, _ = create_key(page, "limited")
    page.get_by_role("navigation").get_by_role("button", name="Teams").click()
    page.get_by_role("button", name="Set team limits").click()
    dialog = page.get_by_role("dialog", name="Set limits")
    page.get_by_label("Team").fill("limited")
    dialog.get_by_label("Requests per minute").fill("1")
    dialog.get_by_role("button", name="Save").click()
    row = team_row(page, "limited")
    expect(row).to_contain_text("run time")
    answers = [embed(console.url, key, [f"limited {i}"]) for i in range(3)]  # a minute may end in between
    refused = [body for status, body in answers if status == 429]
    assert refused and refused[0]["error"]["code"] == "rate_limit_exceeded", answers

    row.get_by_role("button", name="Edit").click()
    edit = page.get_by_role("dialog", name="Limits of limited")
    expect(edit.get_by_label("Requests per minute")).to_have_value("1")
    edit.get_by_label("Requests per minute").fill("1000")
    edit.get_by_role("button", name="Save").click()
    expect(row).to_contain_text("1,000")
    wait_status(console.url, key, 200, ["limited later"])

    row.get_by_role("button", name="Reset").click()
    page.get_by_role("dialog", name="Reset the limits of limited?").get_by_role("button", name="Reset").click()
    expect(row).to_contain_text("none")  # no configured limits: unlimited again
    page.context.close()


def test_usage_after_traffic_with_chart_and_csv(console: Console) -> None:
    expect = _expect()
    page = console.page()
    sign_in(page)
    key, _ = create_key(page, "usage-team", "reporting")
    for i in range(3):
        assert embed(console.url, key, ["same input", f"other {i}"])[0] == 200
    page.get_by_role("navigation").get_by_role("button", name="Usage").click()
    page.get_by_label("Group by").select_option("model")
    page.get_by_role("button", name="Show").click()
    row = team_row(page, "usage-team")
    expect(row).to_contain_text("text-embedding-3-small")
    cells = row.get_by_role("cell").all_inner_texts()
    assert cells[:2] == ["text-embedding-3-small", "3"], cells  # model, requests (team is the row header)
    assert page.locator("svg.chart rect.bar").count() >= 1
    _, report = http("GET", console.url + "/admin/usage?team=usage-team&by=model",
                     headers={"Authorization": f"Bearer {ADMIN}"})
    [ledger] = report["data"]
    assert cells[2:4] == [f"{ledger['upstream_tokens']:,}", f"{ledger['cached_tokens']:,}"]

    page.get_by_label("Scope").select_option("usage-team")
    with page.expect_download() as info:
        page.get_by_role("button", name="Download CSV").click()
    path = info.value.path()
    today = dt.datetime.now(dt.UTC).date()
    assert info.value.suggested_filename == f"usage-{today - dt.timedelta(days=13)}-{today}.csv"
    lines = Path(path).read_text().splitlines()
    assert lines[0] == ("team,model,requests,upstream_tokens,cached_tokens,total_tokens,upstream_cost_usd,saved_usd,"
                        "failed_tokens")
    assert lines[1].startswith("usage-team,text-embedding-3-small,3,")

    page.get_by_label("To", exact=True).fill(str(today - dt.timedelta(days=20)))
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("alert")).to_have_text("'To' is before 'From'.")
    page.context.close()


def cached_tokens(url: str, key: str, inputs: list[str]) -> int:
    status, body = embed(url, key, inputs)
    assert status == 200, body
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_cache_screen_purges_a_model(console: Console) -> None:
    expect = _expect()
    page = console.page()
    sign_in(page)
    key, _ = create_key(page, "cache-team")
    words = ["purged from the console"]
    deadline = time.monotonic() + 10
    while cached_tokens(console.url, key, words) == 0:  # once the first answer's cache write has landed
        assert time.monotonic() < deadline
        time.sleep(0.05)

    page.get_by_role("navigation").get_by_role("button", name="Cache").click()
    model = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=MODEL, exact=True))
    cells = model.get_by_role("cell")
    expect(cells.first).to_have_text("0")  # its generation: never purged
    tiles = page.locator(".tiles")
    expect(tiles).to_contain_text("Entries")
    expect(tiles).to_contain_text("Hit ratio today")
    expect(page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="state and cache"))).to_be_visible()

    model.get_by_role("button", name="Purge").click()
    dialog = page.get_by_role("dialog", name=f"Purge {MODEL}?")
    expect(dialog).to_contain_text("shared by every team")
    dialog.get_by_role("button", name="Cancel").click()  # asked first: nothing purged yet
    expect(dialog).to_have_count(0)
    assert cached_tokens(console.url, key, words) > 0

    model.get_by_role("button", name="Purge").click()
    dialog.get_by_role("button", name="Purge").click()
    expect(page.get_by_role("status")).to_have_text(f"{MODEL} purged: generation 1.")
    expect(cells.first).to_have_text("1")
    assert cached_tokens(console.url, key, words) == 0  # asked of the upstream again
    page.context.close()


def test_upstreams_screen_shows_the_deployments(console: Console) -> None:
    expect = _expect()
    page = console.page()
    sign_in(page)
    page.get_by_role("navigation").get_by_role("button", name="Upstreams").click()
    pid = http("GET", console.url + "/admin/upstreams", None, {"Authorization": f"Bearer {ADMIN}"})[1]["pid"]
    expect(page.get_by_text(re.compile(r"^Answered by process \d+ "))).to_have_text(
        f"Answered by process {pid} (each worker keeps its own deployment state)")  # one worker: the same pid
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=MODEL, exact=True))
    expect(row.locator(".badge.healthy")).to_have_text("healthy")
    expect(row.get_by_role("cell")).to_have_text(["default", "openai", "1", "0", "healthy", "—", "0", "—",
                                                  re.compile(r"^[\d,]+$|^—$"), re.compile(r"^[\d,]+$|^—$")])
    page.reload()  # the key is kept for this tab: still signed in
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.context.close()


def test_upstreams_screen_without_the_endpoint_says_so(console: Console) -> None:
    """A proxy from before the upstream fleet answers 404: a note, not an error."""
    expect = _expect()
    page = console.page()
    page.route("**/admin/upstreams", lambda route: route.fulfill(
        status=404, content_type="application/json",
        body='{"error": {"message": "Unknown URL.", "type": "invalid_request_error", "param": null, '
             '"code": "unknown_url"}}'))
    sign_in(page)
    page.get_by_role("navigation").get_by_role("button", name="Upstreams").click()
    expect(page.get_by_text("this proxy has no GET /admin/upstreams yet")).to_be_visible()
    expect(page.get_by_role("table")).to_have_count(0)
    expect(page.get_by_role("status")).to_have_text("")
    console.errors[:] = [e for e in console.errors if "status of 404" not in e]  # the missing endpoint itself
    page.context.close()
