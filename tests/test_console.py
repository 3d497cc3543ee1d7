"""The console in a real browser: Debian's headless Chromium driven by Playwright (never a downloaded browser),
against a real proxy process with a private redis-server and the mock upstream (tests/console_browser.py). Elements
are found by their accessible names, which are part of the contract. Every page must finish without a JavaScript
error, a failed request or a Content-Security-Policy violation (Chromium reports all of them as console errors).
Here: the flows (keys, limits, usage, cache, upstreams), the confirmation each action leaves in view, the addresses
of the screens, one vocabulary and one time convention, and each screen with the state store down. The layout at
1280 and 390 px wide and how money is shown: tests/test_console_layout.py.

Needs `apt-get install chromium` (`.ci/run` installs it; under CI=true this test must run). The README's
screenshots come from `python -m tests.console_screenshots docs/`."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.console_browser import (
    ADMIN,
    Console,
    chromium_browser,
    create_key,
    expect_ui,
    key_row,
    nav,
    proxy_stack,
    shown_usd,
    sign_in,
    team_row,
    wait_status,
)
from tests.console_data import LONG_TEAM, Seeded, seed
from tests.stack import MODEL, base_env, embed, http

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium_browser() as b:
        yield b


@pytest.fixture(scope="module")
def console_stack(browser: Any, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Console]:
    redis_server.flush()
    with proxy_stack(tmp_path_factory.mktemp("console"), redis_server.url) as url:
        yield Console(url, browser)


@pytest.fixture
def console(console_stack: Console) -> Iterator[Console]:
    console_stack.errors.clear()
    yield console_stack
    console_stack.check_errors()


@pytest.fixture(scope="module")
def real_data(console_stack: Console, redis_server: RedisServer) -> Seeded:
    """Five teams, long names, a rotated and a revoked key, two weeks of usage (tests/console_data.py)."""
    return seed(console_stack.url, ADMIN, redis_server.url)


def confirmed(page: Any, text: str | re.Pattern[str]) -> None:
    """The last action's confirmation says `text`, in view, and stays there while the page scrolls."""
    expect = expect_ui()
    note = page.locator("#notice")
    expect(note).to_have_text(text)
    expect(note).to_be_in_viewport()
    page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
    expect(note).to_be_in_viewport()
    expect(note).to_have_text(text)
    page.evaluate("window.scrollTo(0, 0)")


def test_a_wrong_admin_key_shows_an_error_and_no_data(console: Console) -> None:
    expect = expect_ui()
    page = console.page()
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Enter the admin key.")
    page.get_by_label("Admin key").fill("not-the-admin-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Incorrect admin key provided.")
    expect(page.get_by_role("navigation")).to_be_hidden()
    expect(page.get_by_role("table")).to_have_count(0)
    assert page.evaluate("sessionStorage.length") == 0
    console.check_errors("status of 401")  # the refused sign-in itself
    page.context.close()


def test_keys_from_creation_to_revocation(console: Console) -> None:
    expect = expect_ui()
    page = console.page()
    sign_in(page)
    key, key_id = create_key(page, "search", "ci")
    confirmed(page, f"Key {key_id} created for search.")
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
    expect(key_row(page, key_id).locator(".badge")).to_have_text("rotated")
    expect(key_row(page, key_id)).to_contain_text(re.compile(r"works until \d{4}-\d\d-\d\d \d\d:\d\d UTC"))
    confirmed(page, re.compile(rf"^{key_id} rotated: its replacement is {new_id.group(1)}; the old key works until "
                               r"\d{4}-\d\d-\d\d \d\d:\d\d UTC\.$"))

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
    confirmed(page, f"Limits of {new_id.group(1)} saved: tpm 5,000.")

    # revoke: refused at once
    key_row(page, new_id.group(1)).get_by_role("button", name="Revoke").click()
    page.get_by_role("dialog", name=f"Revoke {new_id.group(1)}?").get_by_role("button", name="Revoke").click()
    expect(key_row(page, new_id.group(1))).to_contain_text("revoked")
    confirmed(page, f"{new_id.group(1)} revoked: refused on every instance from its next request.")
    wait_status(console.url, new_key, 401, ["after revoke"])
    status, body = embed(console.url, new_key, ["after revoke"])
    assert status == 401 and body["error"]["code"] == "api_key_revoked"
    assert key not in page.url and new_key not in page.url and page.context.cookies() == []
    page.context.close()


def test_forms_refuse_what_the_admin_api_would(console: Console) -> None:
    expect = expect_ui()
    page = console.page()
    sign_in(page)
    nav(page, "Keys")
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
    console.check_errors("status of 400")  # the refused create
    page.context.close()


def test_team_limits_are_enforced_and_reset(console: Console) -> None:
    expect = expect_ui()
    page = console.page()
    sign_in(page)
    key, _ = create_key(page, "limited")
    nav(page, "Teams")
    page.get_by_role("button", name="Set team limits").click()
    dialog = page.get_by_role("dialog", name="Set limits")
    page.get_by_label("Team").fill("limited")
    dialog.get_by_label("Requests per minute").fill("1")
    dialog.get_by_role("button", name="Save").click()
    row = team_row(page, "limited")
    expect(row).to_contain_text("set at run time")
    confirmed(page, "Limits of limited saved: rpm 1.")
    answers = [embed(console.url, key, [f"limited {i}"]) for i in range(3)]  # a minute may end in between
    refused = [body for status, body in answers if status == 429]
    assert refused and refused[0]["error"]["code"] == "rate_limit_exceeded", answers

    row.get_by_role("button", name="Edit").click()
    edit = page.get_by_role("dialog", name="Limits of limited")
    expect(edit.get_by_label("Requests per minute")).to_have_value("1")
    edit.get_by_label("Requests per minute").fill("1000")
    edit.get_by_role("button", name="Save").click()
    expect(row).to_contain_text("rpm 1,000")
    confirmed(page, "Limits of limited saved: rpm 1,000.")
    wait_status(console.url, key, 200, ["limited later"])

    row.get_by_role("button", name="Reset").click()
    page.get_by_role("dialog", name="Reset the limits of limited?").get_by_role("button", name="Reset").click()
    expect(row).to_contain_text("unlimited")  # no configured limits: unlimited again (the CLI's word)
    confirmed(page, "Limits of limited reset: the configured limits (or none) apply again.")
    page.context.close()


def test_usage_after_traffic_with_chart_and_csv(console: Console) -> None:
    expect = expect_ui()
    page = console.page()
    sign_in(page)
    key, key_id = create_key(page, "usage-team", "reporting")
    for i in range(3):
        assert embed(console.url, key, ["same input", f"other {i}"])[0] == 200
    nav(page, "Usage")
    page.get_by_label("Scope").select_option("usage-team")
    page.get_by_label("Group by").select_option("model")
    asked: list[str] = []  # the screen asks for one report: its rows, and its rows by day for the chart (issue 18)
    page.on("request", lambda r: asked.append(r.url) if "/admin/usage?" in r.url else None)
    page.get_by_role("button", name="Show").click()  # the filters become the screen's address
    expect(page).to_have_url(re.compile(r"/admin/ui/#/usage\?team=usage-team&from=\d{4}-\d\d-\d\d&"
                                        r"to=\d{4}-\d\d-\d\d&by=model$"))
    row = team_row(page, "usage-team")
    expect(row).to_contain_text("text-embedding-3-small")
    assert len(asked) == 1 and "daily=1" in asked[0] and "by=model" in asked[0], asked
    cells = row.get_by_role("cell").all_inner_texts()
    assert cells[:2] == ["text-embedding-3-small", "3"], cells  # model, requests (team is the row header)
    assert page.locator("svg.chart rect.bar").count() >= 1
    _, report = http("GET", console.url + "/admin/usage?team=usage-team&by=model",
                     headers={"Authorization": f"Bearer {ADMIN}"})
    [ledger] = report["data"]
    assert cells[2:4] == [f"{ledger['upstream_tokens']:,}", f"{ledger['cached_tokens']:,}"]
    # money arrives as exact text with 6 decimals; people read two decimals (or "<$0.01"), the exact amount is in
    # the title: cost and saved, after the total tokens, and the same in the tiles (one team, one model: same sums)
    cost, saved = ledger["upstream_cost_usd"], ledger["saved_usd"]
    assert isinstance(cost, str) and isinstance(saved, str)
    assert cells[5:7] == [shown_usd(cost), shown_usd(saved)], cells
    assert [m.get_attribute("title") for m in row.locator(".money").all()] == [f"${cost}", f"${saved}"]
    tile = page.locator(".tile").filter(has_text="Cost upstream").locator(".money")
    expect(tile).to_have_text(shown_usd(cost))
    expect(tile).to_have_attribute("title", f"${cost}")

    with page.expect_download() as info:
        page.get_by_role("button", name="Download CSV").click()
    path = info.value.path()
    today = dt.datetime.now(dt.UTC).date()
    assert info.value.suggested_filename == f"usage-{today - dt.timedelta(days=13)}-{today}.csv"
    lines = Path(path).read_text().splitlines()
    assert lines[0] == ("team,model,requests,upstream_tokens,cached_tokens,total_tokens,upstream_cost_usd,saved_usd,"
                        "failed_tokens,unconfirmed_tokens")
    assert lines[1].startswith("usage-team,text-embedding-3-small,3,")

    # by key: the key's name beside its id (the team heads the row), on screen and as the CSV's last column
    page.get_by_label("Group by").select_option("key")
    page.get_by_role("button", name="Show").click()
    row = team_row(page, "usage-team")
    expect(row.get_by_role("cell").first).to_have_text(key_id)
    assert row.get_by_role("cell").all_inner_texts()[:3] == [key_id, "reporting", "3"]
    with page.expect_download() as info:
        page.get_by_role("button", name="Download CSV").click()
    lines = Path(info.value.path()).read_text().splitlines()
    assert lines[0].endswith(",failed_tokens,unconfirmed_tokens,key_name")
    assert lines[1].startswith(f"usage-team,{key_id},3,") and lines[1].endswith(",reporting")

    page.get_by_label("To", exact=True).fill(str(today - dt.timedelta(days=20)))
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("alert")).to_have_text("'To' is before 'From'.")
    page.context.close()


def cached_tokens(url: str, key: str, inputs: list[str]) -> int:
    status, body = embed(url, key, inputs)
    assert status == 200, body
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_cache_screen_purges_a_model(console: Console) -> None:
    expect = expect_ui()
    page = console.page()
    sign_in(page)
    key, _ = create_key(page, "cache-team")
    words = ["purged from the console"]
    deadline = time.monotonic() + 10
    while cached_tokens(console.url, key, words) == 0:  # once the first answer's cache write has landed
        assert time.monotonic() < deadline
        time.sleep(0.05)

    nav(page, "Cache")
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
    expect(cells.first).to_have_text("1")  # the screen drawn again, and the confirmation still in view
    confirmed(page, f"{MODEL} purged: generation 1.")
    assert cached_tokens(console.url, key, words) == 0  # asked of the upstream again
    page.context.close()


def test_upstreams_screen_shows_the_deployments(console: Console) -> None:
    expect = expect_ui()
    page = console.page()
    sign_in(page)
    nav(page, "Upstreams")
    pid = http("GET", console.url + "/admin/upstreams", None, {"Authorization": f"Bearer {ADMIN}"})[1]["pid"]
    expect(page.get_by_text(re.compile(r"^Answered by process \d+ "))).to_have_text(
        f"Answered by process {pid} (its own view: the fleet's shared state is below)")  # one worker: the same pid
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=MODEL, exact=True))
    expect(row.locator(".badge.healthy")).to_have_text("healthy")
    expect(row.get_by_role("cell")).to_have_text(["default", "openai", "1", "0", "healthy", "—", "0", "—",
                                                  re.compile(r"^[\d,]+$|^—$"), re.compile(r"^[\d,]+$|^—$")])
    # then the fleet's view of it, from Redis: health, cooldown, budget used and left, in flight, per instance
    expect(page.get_by_role("heading", name="Fleet")).to_be_visible()
    fleet = page.get_by_role("table").nth(1)
    expect(fleet.get_by_role("columnheader")).to_have_text([
        "Deployment", "Fleet health", "Cooldown until", "Failures in a row", "Requests used", "Tokens used",
        "Requests left", "Tokens left", "In flight", "Per instance"])
    shared = fleet.get_by_role("row").filter(has=page.get_by_role("rowheader", name=f"default {MODEL}"))
    expect(shared.get_by_role("cell")).to_have_text([
        "healthy", "—", "0", re.compile(r"^[\d,]+$"), re.compile(r"^[\d,]+$"), re.compile(r"^[\d,]+$|^—$"),
        re.compile(r"^[\d,]+$|^—$"), "0", re.compile(r"^—$|in flight")])
    page.reload()  # the key is kept for this tab: still signed in
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.context.close()


def test_upstreams_screen_without_the_endpoint_says_so(console: Console) -> None:
    """A proxy from before the upstream fleet answers 404: a note, not an error."""
    expect = expect_ui()
    page = console.page()
    page.route("**/admin/upstreams", lambda route: route.fulfill(
        status=404, content_type="application/json",
        body='{"error": {"message": "Unknown URL.", "type": "invalid_request_error", "param": null, '
             '"code": "unknown_url"}}'))
    sign_in(page)
    nav(page, "Upstreams")
    expect(page.get_by_text("this proxy has no GET /admin/upstreams yet")).to_be_visible()
    expect(page.get_by_role("table")).to_have_count(0)
    expect(page.get_by_role("status")).to_have_text("")
    console.check_errors("status of 404")  # the missing endpoint itself
    page.context.close()


def test_every_screen_and_its_filters_have_an_address(console: Console, real_data: Seeded) -> None:
    expect = expect_ui()
    today = dt.datetime.now(dt.UTC).date()
    since = today - dt.timedelta(days=6)
    page = console.page(at=f"#/usage?team=search&from={since}&to={today}&by=model&chart=money")  # a bookmark
    sign_in(page)  # then the bookmarked screen, with its filters

    def usage_as_bookmarked() -> None:
        expect(page.get_by_label("Scope")).to_have_value("search")
        expect(page.get_by_label("Group by")).to_have_value("model")
        expect(page.get_by_label("From")).to_have_value(str(since))
        expect(page.get_by_label("To", exact=True)).to_have_value(str(today))
        expect(page.get_by_label("Chart")).to_have_value("money")
        expect(page.get_by_role("navigation").get_by_role("link", name="Usage")).to_have_attribute("aria-current",
                                                                                                  "page")
        teams = page.locator("tbody").get_by_role("rowheader")
        expect(teams.first).to_have_text("search")
        assert set(teams.all_inner_texts()) == {"search"}  # the report of that team alone

    usage_as_bookmarked()
    page.reload()  # the key is kept for this tab: the same screen, the same filters
    usage_as_bookmarked()

    nav(page, "Keys")
    expect(page).to_have_url(re.compile(r"#/keys$"))
    page.get_by_label("Show keys of").select_option(LONG_TEAM)
    expect(page).to_have_url(re.compile(rf"#/keys\?team={LONG_TEAM}$"))
    expect(page.locator("tbody tr")).to_have_count(1)
    page.go_back()
    expect(page.get_by_label("Show keys of")).to_have_value("")
    every = http("GET", console.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"})[1]["data"]
    expect(page.locator("tbody tr")).to_have_count(len(every))
    page.go_back()
    usage_as_bookmarked()
    page.go_forward()
    page.go_forward()
    expect(page.get_by_label("Show keys of")).to_have_value(LONG_TEAM)
    expect(page.locator("tbody tr")).to_have_count(1)
    page.goto(console.url + "/admin/ui/#/no-such-screen")  # an address that is no screen: the start screen
    expect(page).to_have_url(re.compile(r"#/teams$"))
    expect(page.get_by_role("heading", name="Teams", level=1)).to_be_visible()
    page.context.close()


UTC_MINUTE = r"\d{4}-\d\d-\d\d \d\d:\d\d UTC"


def _cli(redis_url: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "proxy", *args], env=base_env(REDIS_URL=redis_url),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_one_vocabulary_and_utc_with_the_zone(console: Console, real_data: Seeded, redis_server: RedisServer
                                              ) -> None:
    expect = expect_ui()
    page = console.page(at="#/keys?team=search")
    sign_in(page)
    rotated, plain = key_row(page, real_data.rotated), key_row(page, real_data.ids["ranking"])
    # a key in its rotation grace is "rotated" (until when, in UTC), a key without limits "unlimited": as in the CLI
    expect(rotated.locator(".badge")).to_have_text("rotated")
    expect(rotated.get_by_role("cell").nth(2)).to_have_text(re.compile(rf"^rotatedworks until {UTC_MINUTE}$"))
    expect(plain.get_by_role("cell").nth(6)).to_have_text("unlimited")
    shown = _cli(redis_server.url, "keys", "show", real_data.rotated)
    assert re.search(rf"^{real_data.rotated}\s+search\s+rotated\s", shown, re.M), shown
    assert re.search(r"\sunlimited\s", _cli(redis_server.url, "keys", "show", real_data.ids["ranking"])), shown
    # every time on screen is UTC with its zone
    for cell in page.locator("tbody tr").get_by_role("cell").nth(3).all():  # Created
        expect(cell).to_have_text(re.compile(rf"^{UTC_MINUTE}$"))
    # dates are typed and shown as UTC days, YYYY-MM-DD, not in the browser's locale
    nav(page, "Usage")
    for label in ("From", "To"):
        field = page.get_by_label(label, exact=True)
        expect(field).to_have_attribute("type", "text")
        expect(field).to_have_value(re.compile(r"^\d{4}-\d\d-\d\d$"))
    # the Upstreams screen too (a deployment cooling down after an error, as the admin API would report it)
    cooling, failed = 1796000000.5, 1795999990.25  # 2026-11-30 00:53:20 UTC, ten seconds before
    page.route("**/admin/upstreams", lambda route: route.fulfill(json={"object": "list", "pid": 1, "data": [{
        "model": MODEL, "upstream": "default", "kind": "openai", "upstream_model": MODEL, "weight": 1,
        "priority": 0, "state": "cooling_down", "cooling_down_until": cooling, "paused_until": None,
        "consecutive_failures": 3, "cooldowns": 1, "last_error": "502 from the upstream", "last_error_at": failed,
        "remaining_requests": None, "remaining_tokens": None, "requests_reset_at": None, "tokens_reset_at": None,
        "fleet": {"state": "cooling_down", "cooling_down_until": cooling, "paused_until": None,
                  "consecutive_failures": 2, "last_event": {"op": "fail", "by": "host-b:42", "at": failed},
                  "limits": {"rpm": 100, "tpm": 50000, "max_in_flight": 8}, "requests_used": 40,
                  "tokens_used": 12345, "requests_left": 60, "tokens_left": 37655, "announced": None,
                  "in_flight": 3, "instances": [
                      {"instance": "host-a:41", "last_reserved_at": failed, "in_flight": 1, "in_flight_tokens": 9},
                      {"instance": "host-b:42", "last_reserved_at": failed, "in_flight": 2, "in_flight_tokens": 20}]},
    }]}))
    nav(page, "Upstreams")
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=MODEL, exact=True))
    cells = row.get_by_role("cell")  # upstream, kind, weight, priority, state, until, failures, last error, ...
    expect(cells.nth(4)).to_have_text("cooling down")
    expect(cells.nth(5)).to_have_text("2026-11-30 00:53:20 UTC")
    expect(cells.nth(7).locator("span[title]")).to_have_attribute("title", "At 2026-11-30 00:53:10 UTC")
    shared = page.get_by_role("table").nth(1).get_by_role("row").filter(
        has=page.get_by_role("rowheader", name=f"default {MODEL}"))
    expect(shared.get_by_role("cell")).to_have_text([
        "cooling down", "2026-11-30 00:53:20 UTC", "2", "40 of 100", "12,345 of 50,000", "60", "37,655", "3 of 8",
        "host-a:41: 1 in flighthost-b:42: 2 in flight"])
    expect(shared.get_by_role("cell").nth(2).locator("span[title]")).to_have_attribute(
        "title", "Last health event: fail by host-b:42 at 2026-11-30 00:53:10 UTC")
    expect(shared.locator(".instance").first).to_have_attribute("title", "Last reserved at 2026-11-30 00:53:10 UTC")
    page.context.close()


def test_every_action_confirms_in_view_on_a_long_page(console: Console, real_data: Seeded) -> None:
    """On a Keys screen taller than the window, the action's row far down: the confirmation is at the top, in view
    wherever the page is scrolled, after the screen is drawn again; the next action replaces it."""
    expect = expect_ui()
    page = console.page(viewport={"width": 1280, "height": 500})
    sign_in(page)
    nav(page, "Keys")
    last = page.locator("tbody tr").last
    last.scroll_into_view_if_needed()
    key_id = last.locator("code").inner_text()
    last.get_by_role("button", name="Limits").click()
    page.get_by_role("dialog", name=f"Limits of {key_id}").get_by_label("Requests per minute").fill("77")
    page.get_by_role("dialog", name=f"Limits of {key_id}").get_by_role("button", name="Save").click()
    expect(key_row(page, key_id)).to_contain_text("rpm 77")
    confirmed(page, f"Limits of {key_id} saved: rpm 77.")
    revoked = key_row(page, real_data.ids["scoring"])
    revoked.get_by_role("button", name="Revoke").click()
    dialog = page.get_by_role("dialog", name=f"Revoke {real_data.ids['scoring']}?")
    dialog.get_by_role("button", name="Revoke").click()
    expect(revoked.locator(".badge")).to_have_text("revoked")
    confirmed(page, f"{real_data.ids['scoring']} revoked: refused on every instance from its next request.")
    nav(page, "Teams")  # another screen: the confirmation belonged to the Keys screen
    expect(page.locator("#notice")).to_have_text("")
    page.context.close()


def test_with_the_state_store_down_each_screen_keeps_its_layout(browser: Any, own_redis: RedisServer,
                                                               tmp_path: Path) -> None:
    """The state store (REDIS_URL) stopped, the cache in a store of its own: each screen keeps its heading and its
    controls and shows, in place of its data, what is down and Retry; the Cache screen says the cache store answers.
    Retry once the store is back shows the data."""
    expect = expect_ui()
    cache = RedisServer(own_redis.binary)
    cache.start()
    try:
        with proxy_stack(tmp_path, own_redis.url, CACHE_REDIS_URL=cache.url) as url:
            console = Console(url, browser)
            status, _ = http("POST", url + "/admin/keys", {"team": "ads"}, {"Authorization": f"Bearer {ADMIN}"})
            assert status == 201
            page = console.page()
            sign_in(page)
            expect(team_row(page, "ads")).to_be_visible()
            own_redis.stop()
            panel = page.get_by_role("alert").filter(has_text="could not be loaded")
            for screen, what, control in [("Teams", "The teams", "Set team limits"), ("Keys", "The keys", "New key"),
                                          ("Usage", "The usage report", "Show"),
                                          ("Cache", "The cache report", "Refresh")]:
                nav(page, screen)
                expect(page.get_by_role("heading", name=screen, level=1)).to_be_visible()
                expect(page.get_by_role("button", name=control, exact=True)).to_be_visible()
                expect(panel).to_contain_text(f"{what} could not be loaded")
                expect(panel).to_contain_text(re.compile("The key and quota store .*is unreachable"))
                expect(panel).to_contain_text("The admin API answered 503")
                expect(panel.get_by_role("button", name="Retry")).to_be_visible()
            expect(panel).to_contain_text("The key and quota store (REDIS_URL): unreachable")
            expect(panel).to_contain_text("The cache store (CACHE_REDIS_URL): answers")
            nav(page, "Upstreams")  # each process's own state: shown without the store
            expect(page.get_by_role("row").filter(has_text="healthy").first).to_be_visible()
            expect(panel).to_have_count(0)

            page.goto(url + "/admin/ui/#/keys")
            page.reload()  # a reload while the store is down keeps the key and the screen
            expect(panel).to_contain_text("The keys could not be loaded")
            expect(page.get_by_label("Show keys of")).to_be_visible()
            own_redis.start()  # back, empty (no persistence in the test's server)
            deadline = time.monotonic() + 30
            while panel.count():
                assert time.monotonic() < deadline, "Retry did not show the keys once the store was back"
                panel.get_by_role("button", name="Retry").click()
                page.wait_for_timeout(200)
            expect(page.get_by_text("No keys yet: create one with New key.")).to_be_visible()
            page.context.close()
            console.check_errors("status of 503")  # the store's outage, as the admin API and /readyz answered
    finally:
        cache.stop()
