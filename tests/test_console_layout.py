"""The console with real data (tests/console_data.py: five teams, a 63-character team name, long key names, every
model and limit, a rotated and a revoked key, two weeks of usage) in Debian's headless Chromium: at 1280x800 no
table's actions are out of view; at 390x844 (a phone) no screen is wider than the viewport, the navigation is a menu,
dialogs fit and the chart's labels keep their size; money reads one way in tiles, tables and chart axes."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.console_browser import (
    ADMIN,
    DESKTOP,
    PHONE,
    Console,
    chromium_browser,
    expect_ui,
    nav,
    proxy_stack,
    show,
    shown_usd,
    sign_in,
)
from tests.console_data import LONG_TEAM, Seeded, seed
from tests.stack import http

pytestmark = pytest.mark.redis

SCREENS = ["#/teams", "#/keys", f"#/keys?team={LONG_TEAM}", "#/usage", "#/usage?by=key", "#/usage?by=model&chart=money",
           "#/usage?by=day&chart=requests", "#/cache", "#/upstreams"]
MONEY = re.compile(r"^(<\$0\.01|\$(0|[1-9]\d{0,2}(,\d{3})*)\.\d{2})$")  # "$0.00", "<$0.01", "$1,234.57"
EXACT = re.compile(r"^\$\d+\.\d{6}$")  # the API's exact amount, in the title

# Each table's box and scroll width, and where each button or link of its actions column sits.
TABLES = """() => [...document.querySelectorAll('#view .table-wrap')].map((w) => {
  const box = w.getBoundingClientRect();
  return {scroll: w.scrollWidth, client: w.clientWidth, left: box.left, right: box.right,
          actions: [...w.querySelectorAll('tbody .actions-col button, tbody .actions-col a')].map((b) => {
            const r = b.getBoundingClientRect();
            return [b.textContent, r.left, r.right];
          })};
})"""
# Every button, link and field of the screen that sits (even partly) outside the viewport's width.
OUTSIDE = """() => [...document.querySelectorAll('#view button, #view a, #view input, #view select, #view svg')]
  .map((e) => [e.textContent || e.tagName, e.getBoundingClientRect()])
  .filter(([, r]) => r.width && (r.left < 0 || r.right > document.documentElement.clientWidth))
  .map(([name, r]) => [name, r.left, r.right])"""


@pytest.fixture(scope="module")
def console(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    redis_server.flush()
    with chromium_browser() as browser, proxy_stack(tmp_path_factory.mktemp("layout"), redis_server.url) as url:
        c = Console(url, browser)
        yield c
        c.check_errors()


@pytest.fixture(scope="module")
def real_data(console: Console, redis_server: RedisServer) -> Seeded:
    return seed(console.url, ADMIN, redis_server.url)


def test_at_1280_every_table_keeps_its_actions_in_view(console: Console, real_data: Seeded) -> None:
    page = console.page(DESKTOP)
    sign_in(page)
    seen = {}
    for at in SCREENS:
        show(page, console.url, at)
        tables = page.evaluate(TABLES)
        assert tables, at
        for t in tables:
            assert t["scroll"] <= t["client"], (at, "the table scrolls sideways", t)
            for name, left, right in t["actions"]:
                assert t["left"] <= left and right <= min(t["right"], DESKTOP["width"]), (at, name, left, right, t)
        seen[at] = sum(len(t["actions"]) for t in tables)
    assert seen["#/teams"] >= 10 and seen["#/keys"] >= 20 and seen["#/cache"] == 3, seen  # with real rows
    page.context.close()


def test_at_390_no_screen_is_wider_than_a_phone(console: Console, real_data: Seeded) -> None:
    expect = expect_ui()
    page = console.page(PHONE)
    width = "document.documentElement.scrollWidth"
    assert page.evaluate(width) <= PHONE["width"]  # the sign-in screen
    sign_in(page)
    for at in SCREENS:
        show(page, console.url, at)
        assert page.evaluate(width) <= PHONE["width"], (at, page.evaluate(width))
        assert page.evaluate(OUTSIDE) == [], at
        if at.startswith("#/usage"):  # drawn at the phone's width: its labels keep their size (11 px)
            heights = page.locator("svg.chart text").evaluate_all("ts => ts.map((t) => t.getBBox().height)")
            rendered = page.locator("svg.chart").evaluate(
                "s => s.getBoundingClientRect().width / s.viewBox.baseVal.width")
            assert heights and min(heights) * rendered >= 10, (at, min(heights), rendered)

    # the navigation folds into a menu that opens, fits, and closes on a choice
    navigation = page.get_by_role("navigation")
    expect(navigation).to_be_hidden()
    page.get_by_role("button", name="Menu").click()
    expect(page.get_by_role("button", name="Menu")).to_have_attribute("aria-expanded", "true")
    for link in ("Teams", "Keys", "Usage", "Cache", "Upstreams"):
        expect(navigation.get_by_role("link", name=link)).to_be_in_viewport()
    expect(page.get_by_role("button", name="Sign out")).to_be_in_viewport()
    assert page.evaluate(width) <= PHONE["width"]
    nav(page, "Keys")
    expect(navigation).to_be_hidden()

    # a dialog fits the phone, and its backdrop covers all of it
    page.get_by_role("button", name="New key").click()
    dialog = page.get_by_role("dialog", name="New key")
    box = dialog.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    assert page.evaluate(width) <= PHONE["width"]
    dialog.get_by_role("button", name="Cancel").click()
    page.context.close()


def _amounts(page: Any) -> list[tuple[str, str]]:
    texts: list[tuple[str, str]] = page.locator("#view .money").evaluate_all(
        "ms => ms.map((m) => [m.textContent, m.title])")
    return texts


def test_money_reads_one_way_in_tiles_tables_and_charts(console: Console, real_data: Seeded) -> None:
    page = console.page()
    sign_in(page)
    shown: set[str] = set()
    for at in ["#/teams", "#/usage?chart=money", "#/usage?by=key&chart=money", "#/usage?by=day&chart=money",
               "#/usage?team=fraud-detection&by=model&chart=money"]:
        show(page, console.url, at)
        amounts = _amounts(page)
        assert amounts, at
        for text, title in amounts:
            assert MONEY.match(text) and EXACT.match(title), (at, text, title)
            assert text == shown_usd(title[1:]), (at, text, title)  # rounded from the exact amount
            shown.add(text)
        if "chart=money" in at:  # the chart's scale: whole cents, written the same way
            scale = page.locator("svg.chart text.axis[text-anchor=end]").evaluate_all(
                "ts => ts.map((t) => t.textContent)")
            assert len(scale) == 5 and all(MONEY.match(s) and s != "<$0.01" for s in scale), (at, scale)
    assert "<$0.01" in shown and any(s not in ("<$0.01", "$0.00") for s in shown), shown

    # the Teams screen shows what the admin API sends, rounded for people, exact in the title
    today = dt.datetime.now(dt.UTC).date()
    _, usage = http("GET", f"{console.url}/admin/usage?since={today.replace(day=1)}&until={today}",
                    headers={"Authorization": f"Bearer {ADMIN}"})
    show(page, console.url, "#/teams")
    for u in usage["data"]:
        row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=u["team"], exact=True))
        cost = row.locator(".money").first
        expect_ui()(cost).to_have_text(shown_usd(u["upstream_cost_usd"]))
        expect_ui()(cost).to_have_attribute("title", f"${u['upstream_cost_usd']}")
    page.context.close()
