"""CSV exports open as text in a spreadsheet, never as formulas (OWASP "CSV Injection"): a key named
`=cmd|' /C calc'!A0` is in the usage CSV by key (admin API and CLI) as `'=cmd|' /C calc'!A0`, and an audit CSV
cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return gets the same `'`; numbers are as they were."""

from __future__ import annotations

import asyncio
import calendar
import csv
import io
import os
import subprocess
import sys
from typing import Any

import pytest

from proxy.accounts.audit import AuditEntry, to_csv
from proxy.accounts.usage import UsageLedger
from proxy.http.app import KEYSTORE, STORE
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import Proxy, Upstream, make_settings
from tests.helpers import Clock

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
ADMIN = "admin-secret-for-tests-0123456789"
DAY = "2026-11-05"
NOON = float(calendar.timegm((2026, 11, 5, 12, 0, 0)))
NAMES = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1:A2)", "\t=1", "\r=1", "plain = name", "a-b",
         "x\r=cmd|' /C calc'!A0", "two\r\nlines"]


def names_in(text: str) -> dict[str, str]:
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert all(None not in r and r["team"] == "ads" for r in rows)  # no cell has started a row of its own
    return {r["key"]: r["key_name"] for r in rows}


async def test_key_names_in_usage_csv_are_never_formulas(make_proxy: Any, upstream: Upstream,
                                                         redis_url: str) -> None:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN))
    ledger = UsageLedger(p.app[STORE], RedisKeys("ep"), clock=Clock(NOON))
    ids = {}
    for name in NAMES:
        _, record = await p.app[KEYSTORE].create("ads", name=name)
        ids[record.id] = name
        ledger.record("ads", record.id, MODEL, 10, 4)
    await ledger.flush()
    expected = {i: (name if name[0] not in "=+-@\t\r" else "'" + name).replace("\r\n", "\n").replace("\r", "\n")
                for i, name in ids.items()}

    resp = await p.client.get(f"/admin/usage?since={DAY}&until={DAY}&by=key&format=csv",
                              headers={"Authorization": f"Bearer {ADMIN}"})
    text = await resp.text()
    assert resp.status == 200 and names_in(text) == expected
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert {(r["requests"], r["upstream_tokens"]) for r in rows} == {("1", "4")}  # numbers as they were
    json_rows = (await (await p.client.get(f"/admin/usage?since={DAY}&until={DAY}&by=key",
                                           headers={"Authorization": f"Bearer {ADMIN}"})).json())["data"]
    assert {r["key"]: r["key_name"] for r in json_rows} == ids  # JSON is data, not a spreadsheet: unchanged

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "REDIS_", "CACHE_REDIS_"))}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", "usage", "--since", DAY, "--until", DAY, "--by", "key",
                         "--format", "csv"], env={**env, "REDIS_URL": redis_url}, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    assert names_in(done.stdout) == expected


def test_audit_csv_cells_are_never_formulas() -> None:
    entry = AuditEntry(action="keys.create", outcome="ok", status=201, actor="=HYPERLINK(\"http://x\")",
                       email="+1@example.com", team="ads", reason="-x", ts=NOON)
    row = next(csv.DictReader(io.StringIO(to_csv([entry]))))
    assert (row["actor"], row["email"], row["reason"], row["team"], row["status"]) == (
        "'=HYPERLINK(\"http://x\")", "'+1@example.com", "'-x", "ads", "201")
