"""The console with 5,000 keys, in a real browser (tests/console_browser.py): the Keys screen shows a page of them
(never all), loads the next on demand and searches on the server; the Teams screen counts each team's working keys
from the server's answer, never by fetching the keys. Issue 18, point 13."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from proxy.accounts.keyrecord import KeyRecord
from proxy.accounts.keys import KeyStore
from proxy.config import RedisSettings
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import RedisServer
from tests.console_browser import Console, chromium_browser, expect_ui, key_row, nav, proxy_stack, sign_in, team_row
from tests.test_key_pages import TEAMS, create_many

pytestmark = pytest.mark.redis
KEYS = 5000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium_browser() as b:
        yield b


@pytest.fixture
def many(browser: Any, own_redis: RedisServer, tmp_path: Any) -> Iterator[tuple[Console, list[KeyRecord]]]:
    async def seed() -> list[KeyRecord]:
        settings = RedisSettings(url=own_redis.url)
        store = Store(connect(settings)[0], settings)
        try:
            ks = KeyStore(store, RedisKeys("ep"))
            made = await create_many(ks, KEYS)
            await ks.revoke(made[0].id)
            return made
        finally:
            await store.close()

    with ThreadPoolExecutor(1) as pool:  # Playwright's loop runs in this thread
        made = pool.submit(asyncio.run, seed()).result()
    with proxy_stack(tmp_path, own_redis.url) as url:
        console = Console(url, browser)
        yield console, made
        console.check_errors()


def test_keys_screen_pages_and_searches_5000_keys(many: tuple[Console, list[KeyRecord]]) -> None:
    console, made = many
    expect = expect_ui()
    page = console.page()
    sign_in(page)
    started = time.monotonic()
    nav(page, "Keys")
    rows = page.locator("tbody tr")
    expect(key_row(page, made[-1].id)).to_be_visible()  # newest first
    print(f"keys screen: first page of {KEYS} keys shown in {time.monotonic() - started:.2f} s")
    expect(rows).to_have_count(100)
    assert page.locator("tbody tr").count() < 200
    expect(page.get_by_text("100 keys shown; more after them.")).to_be_visible()
    page.get_by_role("button", name="Load more").click()
    expect(rows).to_have_count(200)
    expect(key_row(page, made[-200].id)).to_be_visible()

    page.get_by_label("Search keys").fill("SVC 4321")
    page.get_by_role("button", name="Search").click()
    expect(page).to_have_url(re.compile(r"#/keys\?q=SVC(\+|%20)4321$"))
    expect(rows).to_have_count(1)
    expect(key_row(page, made[4321].id)).to_contain_text("svc 4321")
    page.get_by_label("Show keys of").select_option("ops")
    expect(page).to_have_url(re.compile(r"#/keys\?team=ops&q=SVC(\+|%20)4321$"))
    expect(page.get_by_text("No key matches “SVC 4321”.")).to_be_visible()  # 4321 % 5 == 1: a key of search
    expect(rows).to_have_count(0)

    nav(page, "Teams")  # each team's keys that work, as the server counts them: 1,000 each, one revoked in ads
    for n, team in enumerate(TEAMS):
        expect(team_row(page, team).locator(f'a[href="#/keys?team={team}"]')).to_have_text(
            "999" if n == 0 else "1,000")
    page.context.close()
