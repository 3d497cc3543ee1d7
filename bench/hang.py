"""`hang` (issue 19, the hung-deployment target): 2 instances x 2 workers on one Redis, a model on two mock
deployments of equal weight (a and b), 20 requests a second over both instances (open loop, every input new).
After WARM_S, a hangs for HANG_S (every call to it stalls: the mock's `timeout` failure), then answers again; the
traffic goes on for AFTER_S, past the end of a's first cooldown (`cooldown_s` 30 from its start). Two phases, each on
fresh mocks and proxies: the default (`silent_after_s` left out: adaptive) and the baseline `silent_after_s = 0`
(no silence: as before it). Upstream settings: `attempt_timeout_s = 2`, `allowed_fails = 3`, `cooldown_s = 30`.
Reported: calls to a in the hang's first `attempt_timeout_s` (sent before any of them could time out), during the
hang, and until it answered again; the clients' statuses and p99; each worker's threshold for a (the adaptive
`silent_after_s`, from /admin/upstreams) just before the hang. Each request goes on the connection idle longest, so
every worker of an instance gets its share.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from . import env as E
from .scenarios import MODEL, Ctx, _ok, open_loop_over

RATE = 20.0  # requests per second over both instances
WARM_S, HANG_S, AFTER_S = 5.0, 20.0, 20.0
ATTEMPT_TIMEOUT_S, ALLOWED_FAILS = 2.0, 3
PHASES = (("silence on (default)", ""), ("silence off (baseline)", "silent_after_s = 0\n"))
ADMIN_KEY = "bench-admin-key-0123456789abcdef"


def start(e: E.Env, penv: dict[str, str], base_config: str, workdir: Path, silence: str,
          tag: str) -> list[E.Proc]:
    a, b = (E.start_mock(e, 5.0, name=f"mock-hang-{n}-{tag}") for n in "ab")
    config = workdir / f"proxy-hang-{tag}.toml"
    upstreams = "".join(
        f'[upstreams.{n}]\nbase_url = "http://127.0.0.1:{m.port}/v1"\nattempt_timeout_s = {ATTEMPT_TIMEOUT_S}\n'
        f"allowed_fails = {ALLOWED_FAILS}\ncooldown_s = 30.0\n{silence if n == 'a' else ''}"
        for n, m in (("a", a), ("b", b)))
    config.write_text(f'{base_config}\n{upstreams}[models."{MODEL}"]\ndimensions = 1536\n'
                      'deployments = [{ upstream = "a" }, { upstream = "b" }]\n')
    env = {**penv, "PROXY_CONFIG": str(config), "PROXY_ADMIN_KEY": ADMIN_KEY}
    return [a, b, *(E.start_proxy(e, env, 2, name=f"proxy-hang-{tag}-{i}") for i in range(2))]


async def _mock(port: int, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as s:
        call = s.get(f"http://127.0.0.1:{port}{path}") if body is None else s.post(
            f"http://127.0.0.1:{port}{path}", json=body)
        async with call as r:
            out: dict[str, Any] = await r.json()
            return out


async def _calls_to_a(a: E.Proc, proxies: list[E.Proc], started: float) -> dict[str, Any]:
    """Drive a's hang (from WARM_S to WARM_S + HANG_S of the run) and count its calls meanwhile."""
    await asyncio.sleep(max(started + WARM_S - time.monotonic(), 0.0))
    thresholds: dict[str, float | None] = {}  # per worker process (an instance's connections reach both)
    for p in proxies * 4:
        doc = await _mock(p.port, "/admin/upstreams")
        thresholds[str(doc["pid"])] = next(r["silent_after_s"] for r in doc["data"] if r["upstream"] == "a")
    base = (await _mock(a.port, "/_mock/stats"))["requests"]
    await _mock(a.port, "/_mock/fail", {"mode": "timeout", "times": 100_000})
    hang_at = time.monotonic()
    first_window = None
    while time.monotonic() < hang_at + HANG_S:
        await asyncio.sleep(0.05)
        if first_window is None and time.monotonic() >= hang_at + ATTEMPT_TIMEOUT_S:
            first_window = (await _mock(a.port, "/_mock/stats"))["requests"] - base
    during = (await _mock(a.port, "/_mock/stats"))["requests"] - base
    await _mock(a.port, "/_mock/reset", {})  # answers again (its counters start over)
    back_after = None
    while time.monotonic() < started + WARM_S + HANG_S + AFTER_S - 0.5:
        await asyncio.sleep(0.1)
        stats = await _mock(a.port, "/_mock/stats")
        if back_after is None and stats["requests"] > 0:
            back_after = time.monotonic() - hang_at - HANG_S
    return {"first_window": first_window, "during_hang": during, "answered_again_after_s": back_after,
            "thresholds_s": thresholds}


async def scenario(ctx: Ctx, e: E.Env, penv: dict[str, str], base_config: str, workdir: Path) -> None:
    results = []
    for n, (name, silence) in enumerate(PHASES):
        a, b, *proxies = start(e, penv, base_config, workdir, silence, str(n))
        await asyncio.sleep(3.0)

        def text(i: int, k: int, n: int = n) -> str:
            return f"hang {ctx.run_id} {n} {i} {k}"

        try:
            done, counts = await asyncio.gather(
                open_loop_over(ctx, proxies, text, RATE, WARM_S + HANG_S + AFTER_S, (200,), rotate=True),
                _calls_to_a(a, proxies, time.monotonic()))
        finally:
            for proc in (a, b, *proxies):
                proc.stop()
        statuses: dict[str, int] = {}
        for r in done:
            for status, count in r.statuses.items():
                statuses[str(status)] = statuses.get(str(status), 0) + count
        p99 = max(r.pct(99) for r in done)
        results.append({"phase": name, **counts, "client_statuses": statuses, "client_p99_s": p99})
        target = ALLOWED_FAILS + 1
        back = counts["answered_again_after_s"]
        ctx.row(f"hang {name}: calls to a in its first {ATTEMPT_TIMEOUT_S:g} s; during the {HANG_S:g} s hang",
                f"{counts['first_window']}; {counts['during_hang']}",
                f"clients {statuses}", "a never called again" if back is None else f"a called {back:.1f} s after",
                f"<= {target} per cooldown" if not silence else "",
                _ok(counts["during_hang"] <= target) if not silence else "")
    ctx.results["hang"] = {"rate": RATE, "warm_s": WARM_S, "hang_s": HANG_S, "after_s": AFTER_S, "instances": 2,
                           "workers": 2, "attempt_timeout_s": ATTEMPT_TIMEOUT_S, "allowed_fails": ALLOWED_FAILS,
                           "phases": results}
