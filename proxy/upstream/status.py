"""The deployments' state as operators see it: GET /admin/upstreams (and `embedding-proxy upstreams`), and the
cooldown and remaining-capacity gauges. Read-only views of the router's deployments, apart from the call path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..telemetry.metrics import Metrics
from .limiting import Reservation
from .router import Deployment


def refresh_gauges(m: Metrics, deployments: Iterable[Deployment], now: float,
                   fleet: Mapping[tuple[str, str], Reservation]) -> None:
    """Cooldown, silence and remaining-capacity gauges, as of `now`; the fleet's figures by each deployment's last
    reservation (`fleet`, limiting.py)."""
    for d in deployments:
        if (r := fleet.get((d.model, d.upstream))) is not None:
            m.child(m.fleet_in_flight, d.model, d.upstream).set(r.in_flight)
            for name, used, limit in (("requests", r.used_requests, d.limits[0]), ("tokens", r.used_tokens,
                                                                                    d.limits[1])):
                m.child(m.fleet_used, d.model, d.upstream, name).set(used)
                if limit:
                    m.child(m.fleet_left, d.model, d.upstream, name).set(max(0, limit - used))
        m.child(m.upstream_cooldown, d.model, d.upstream).set(1 if d.cooling(now) else 0)
        m.child(m.upstream_silent, d.model, d.upstream).set(1 if d.silent else 0)
        requests, tokens = d.budget.remaining(now)
        if requests is not None:
            m.child(m.upstream_remaining, d.model, d.upstream, "requests").set(requests)
        if tokens is not None:
            m.child(m.upstream_remaining, d.model, d.upstream, "tokens").set(tokens)


def snapshot(deployments: Iterable[Deployment], now: float, wall: float) -> list[dict[str, Any]]:
    """Each deployment's state; `now` on the monotonic clock deadlines count on, `wall` the same instant in Unix
    time (the times shown)."""

    def at(t: float) -> float | None:
        return round(wall + (t - now), 3) if t > now else None

    out = []
    for d in deployments:
        requests, tokens = d.budget.remaining(now)
        state = "cooling_down" if d.cooling(now) else ("paused" if d.paused_until > now else
                                                       "silent" if d.silent else "healthy")
        out.append({
            "model": d.model, "upstream": d.upstream, "kind": d.settings.kind,
            "upstream_model": d.upstream_model, "weight": d.weight, "priority": d.priority, "state": state,
            "cooling_down_until": at(d.cool_until), "paused_until": at(d.paused_until),
            "consecutive_failures": d.fails, "cooldowns": d.cooldowns,
            "silent": d.silent, "silences": d.silences, "steered_calls": d.steered,
            "silent_after_s": round(after, 3) if math.isfinite(after := d.silence.threshold(d.settings)) else None,
            "last_error": d.last_error or None, "last_error_at": round(wall - (now - d.last_error_at), 3)
            if d.last_error else None,
            "remaining_requests": requests, "remaining_tokens": tokens,
            "requests_reset_at": at(d.budget.requests.reset_at), "tokens_reset_at": at(d.budget.tokens.reset_at),
        })
    return out
