"""`fleetlimits` (issue 19 point 2): 2 instances x 2 workers on one Redis against an upstream that enforces a `tpm`,
offered twice that for `--fleetlimits-seconds` (default 60). Three phases, each on a fresh mock: the upstream does not
announce its limit and the proxy is told it (`tpm` in the upstream's table); the same without the proxy knowing
(the baseline: each process on its own, as before); the upstream announces it (x-ratelimit-*), the proxy not told.
Reported: the upstream's 429s, and the fraction of the `tpm` the upstream served in the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import env as E
from .scenarios import Ctx, _fmt, _ok, open_loop_over

TPM = 30000
TEXT_TOKENS = 25  # about: each request is one new input of this many tokens
PHASES = (("unannounced, proxy told", True, True), ("unannounced, proxy not told (baseline)", True, False),
          ("announced, proxy not told", False, False))


def start(e: E.Env, penv: dict[str, str], base_config: str, workdir: Path, unannounced: bool,
          told: bool, tag: str) -> list[E.Proc]:
    extra = ["--tpm", str(TPM), "--rate-window-s", "60"] + (["--unannounced"] if unannounced else [])
    mock = E.start_mock(e, 5.0, name=f"mock-fleetlimits-{tag}", extra=extra)
    config = workdir / f"proxy-fleetlimits-{tag}.toml"
    limit = f"tpm = {TPM}\n" if told else ""
    config.write_text(base_config.replace("[upstreams.default]\n",
                                          f"[upstreams.default]\nmax_queue_wait_s = 2.0\n{limit}", 1))
    env = {**penv, "UPSTREAM_BASE_URL": f"http://127.0.0.1:{mock.port}/v1", "PROXY_CONFIG": str(config)}
    return [mock, *(E.start_proxy(e, env, 2, name=f"proxy-fleetlimits-{tag}-{i}") for i in range(2))]


async def _stats(port: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/_mock/stats") as r:
        out: dict[str, Any] = await r.json()
        return out


async def scenario(ctx: Ctx, e: E.Env, penv: dict[str, str], base_config: str, workdir: Path,
                   seconds: float) -> None:
    import asyncio

    rate = 2 * TPM / TEXT_TOKENS / 60  # requests per second, over both instances: twice the tpm
    results = []
    for n, (name, unannounced, told) in enumerate(PHASES):
        mock, *proxies = start(e, penv, base_config, workdir, unannounced, told, str(n))
        await asyncio.sleep(3.0)

        def text(i: int, k: int, n: int = n) -> str:
            words = " ".join(f"w{(k * 7 + j) % 997}" for j in range(TEXT_TOKENS // 2))
            return f"fleet {ctx.run_id} {n} {i} {k} {words}"

        try:
            done = await open_loop_over(ctx, proxies, text, rate, seconds, (200, 429))
            stats = await _stats(mock.port)
        finally:
            for proc in (mock, *proxies):
                proc.stop()
        client = {str(s): sum(r.statuses.get(s, 0) for r in done) for s in (200, 429)}
        used = stats["busiest_window"]["tokens"] / TPM
        results.append({"phase": name, "upstream_429": stats["rate_limited"], "upstream_calls": stats["requests"],
                        "billed_tokens": stats["billed_tokens"], "busiest_minute_tokens": stats["busiest_window"],
                        "tpm_used": used, "client": client})
        ctx.row(f"fleetlimits {name}: upstream 429s; tpm used", f"{stats['rate_limited']}; {_fmt(used, 3)}",
                f"client 200/429 {client['200']}/{client['429']}", "", "0 429s, >= 0.9" if told else "",
                _ok(stats["rate_limited"] == 0 and used >= 0.9) if told else "")
    ctx.results["fleetlimits"] = {"tpm": TPM, "seconds": seconds, "offered_tpm": 2 * TPM, "instances": 2,
                                  "workers": 2, "phases": results}
