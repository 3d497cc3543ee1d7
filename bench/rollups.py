"""`python -m bench.rollups --report-days 400 --report-keys 1000`: usage reports over long ranges, before and after
the month roll-ups (issue 18 point 14).

A private redis-server gets DAYS days x KEYS keys x MODELS models of one team's usage, written by this tree's
ledger (its flushes, so with flush marks and roll-ups). The same reports are then timed with the code of a baseline
git revision (`--baseline`, default `main`: exported with `git archive`, run from its own directory) and with this
tree's, each in a fresh process against the same data, best of `--repeat`: by key over the whole range, by key over
a range starting mid-month (its first month's edge days come from the ledger days), by day (the console's chart),
and the console's Usage screen (before: by key, then by day; after: one report by key with its rows by day).
With `--rebuild`, the roll-ups are then deleted, as for usage written before them: the first report reads every
day and rebuilds them, the next reads them. Printed as a table and a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import env as E

TEAM = "bench-rollups"
MODELS = ("text-embedding-3-small", "text-embedding-3-large", "embed-multilingual-v3.0")
PRICES = {"text-embedding-3-small": 0.02, "text-embedding-3-large": 0.13, "embed-multilingual-v3.0": 0.1}
ROOT = Path(__file__).resolve().parents[1]
# Run in a fresh process with PYTHONPATH at one tree: times its UsageLedger's reports (argv[1]: JSON of the plan).
TIMER = """
import asyncio, datetime as dt, json, sys, time
from proxy.accounts.usage import UsageLedger
from proxy.config import RedisSettings
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys

async def main(plan):
    settings = RedisSettings(url=plan["url"], operator_timeout_s=120)
    store = Store(connect(settings)[0], settings)
    ledger = UsageLedger(store, RedisKeys("ep"), retention_days=plan["retention"])
    out = {}
    for name, since, by, daily in plan["reports"]:
        best, rows = None, 0
        for _ in range(plan["repeat"]):
            started = time.perf_counter()
            args = (plan["team"], dt.date.fromisoformat(since), dt.date.fromisoformat(plan["until"]))
            if daily:
                got, days = await ledger.report_daily(*args, by, plan["prices"])
            else:
                got = []
                for b in by.split("+"):
                    got = await ledger.report(*args, b, plan["prices"])
            took = time.perf_counter() - started
            best, rows = (took if best is None else min(best, took)), len(got)
        out[name] = {"s": best, "rows": rows}
    await store.close()
    import proxy
    print(json.dumps({**out, "src": proxy.__file__}))

asyncio.run(main(json.loads(sys.argv[1])))
"""


async def fill(url: str, days: int, keys: int, until: dt.date, team: str = TEAM,
               models: tuple[str, ...] = MODELS) -> None:
    """`days` days of usage of `keys` keys x `models` for `team`, written by this tree's ledger (its flushes, so
    with flush marks and month roll-ups, as in production), one flush a day."""
    sys.path.insert(0, str(ROOT))
    from proxy.accounts.usage import UsageLedger
    from proxy.config import RedisSettings
    from proxy.stores.guard import Store, connect
    from proxy.stores.rediskeys import RedisKeys

    settings = RedisSettings(url=url, operator_timeout_s=120)
    store = Store(connect(settings)[0], settings)
    ledger = UsageLedger(store, RedisKeys("ep"), retention_days=days + 40)
    first = until - dt.timedelta(days=days - 1)
    for n in range(days):
        at = calendar.timegm((first + dt.timedelta(days=n)).timetuple()) + 3600
        for k in range(keys):
            for i, model in enumerate(models):
                ledger.record(team, f"key_{k:04d}", model, 40 + n % 7 + i, 30 + k % 5, at=at)
        await ledger.flush()
    await store.close()


def export(ref: str, into: Path) -> Path:
    """The `proxy` package of git revision `ref`, in a directory of its own."""
    into.mkdir()
    archive = subprocess.run(["git", "archive", ref, "proxy"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def timed(src: Path, plan: dict[str, Any]) -> dict[str, Any]:
    # run from `src`: `python -c` puts the working directory first on sys.path, before PYTHONPATH
    done = subprocess.run([sys.executable, "-c", TIMER, json.dumps(plan)], env={"PYTHONPATH": str(src)}, cwd=src,
                          capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode == 0 and json.loads(done.stdout).get("src") != str(src / "proxy" / "__init__.py"):
        raise RuntimeError(f"the timer ran another tree's code: {done.stdout}")
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    result: dict[str, Any] = json.loads(done.stdout)
    del result["src"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rollups", description=__doc__.split("\n\n")[0])
    p.add_argument("--report-days", type=int, default=400)
    p.add_argument("--report-keys", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--baseline", default="main", help="git revision timed as 'before' (default main)")
    p.add_argument("--rebuild", action="store_true", help="then time the first report without roll-ups (it builds "
                   "them) and the next")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-rollups-"))
    env = E.Env(workdir)
    until = dt.datetime.now(dt.UTC).date()
    since = until - dt.timedelta(days=args.report_days - 1)
    mid = since + dt.timedelta(days=(15 - since.day) % 31 or 15)  # a range whose first month starts mid-month
    try:
        proc, client = E.start_redis(env)
        url = f"redis://127.0.0.1:{proc.port}/0"
        started = time.perf_counter()
        asyncio.run(fill(url, args.report_days, args.report_keys, until))
        filled = time.perf_counter() - started
        fields = sum(client.hlen(k) for k in client.scan_iter("ep:usage:*"))
        base = dict(url=url, team=TEAM, until=until.isoformat(), prices=PRICES, repeat=args.repeat,
                    retention=args.report_days + 40)
        before = timed(export(args.baseline, workdir / "baseline"), {**base, "reports": [
            ["key", since.isoformat(), "key", False], ["key, from mid-month", mid.isoformat(), "key", False],
            ["day", since.isoformat(), "day", False], ["console", since.isoformat(), "key+day", False]]})
        after = timed(ROOT, {**base, "reports": [
            ["key", since.isoformat(), "key", False], ["key, from mid-month", mid.isoformat(), "key", False],
            ["day", since.isoformat(), "day", False], ["console", since.isoformat(), "key", True]]})
        rebuild = None
        if args.rebuild:
            client.delete(*client.scan_iter("ep:usage-month*"))  # usage written before the roll-ups
            rebuild = timed(ROOT, {**base, "repeat": 1, "reports": [["first", since.isoformat(), "key", False],
                                                                     ["next", since.isoformat(), "key", False]]})
    finally:
        env.stop_all()
    print(f"{args.report_days} days x {args.report_keys} keys x {len(MODELS)} models, one team: {fields:,} ledger "
          f"fields (filled in {filled:.0f} s); best of {args.repeat}; baseline {args.baseline}")
    print(f"{'report':<34}{'before s':>10}{'after s':>10}{'ratio':>9}{'rows':>7}")
    for name in after:
        b, a = before[name], after[name]
        label = {"console": "console Usage screen (by key)"}.get(name, f"by {name}")
        print(f"{label:<34}{b['s']:>10.2f}{a['s']:>10.3f}{b['s'] / a['s']:>8.1f}x{a['rows']:>7}")
    if rebuild:
        print(f"no roll-ups yet (usage from before them): first report {rebuild['first']['s']:.2f} s (reads the "
              f"days, writes the roll-ups), next {rebuild['next']['s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
