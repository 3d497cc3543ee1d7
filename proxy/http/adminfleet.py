"""GET /admin/upstreams: each deployment as this process sees it, and the fleet's shared state of it.

`data[i]` is this process's view (router state, the headers it heard: upstream/status.py); `data[i].fleet` is what
Redis holds for the deployment, the same whichever instance answers: its health (state, cooldown and pause ends,
since when it has been silent, the failure streak, which instance booked the last event), its budget in the last
minute (requests and tokens used, and left of the configured `rpm` / `tpm`), the budget the upstream last announced
(minus what the fleet reserved since), the calls in flight fleet-wide, and per instance its last reservation and its
calls in flight.
Times are Unix times by Redis's clock. `fleet` is null while Redis cannot say (`fleet_error` says why).
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from aiohttp import web

from ..stores.fleetlimits import FleetLimits, FleetView
from ..stores.guard import StoreUnavailable
from ..upstream import FleetClient
from .routing import expect_continue

FLEET = web.AppKey("admin_fleet", FleetClient)
FLEET_LIMITS = web.AppKey("admin_fleet_limits", FleetLimits)


def _num(fields: dict[str, str], name: str) -> float:
    try:
        return float(fields.get(name, 0) or 0)
    except ValueError:
        return 0.0


def _until(fields: dict[str, str], name: str, now: float) -> float | None:
    value = _num(fields, name)
    return round(value, 3) if value > now else None


def fleet_state(view: FleetView, limits: tuple[int, int, int]) -> dict[str, Any]:
    """The fleet's state of one deployment (see the module's doc)."""
    now, h, b = view.now, view.health, view.budget
    cool, paused = _until(h, "cool", now), _until(h, "paused", now)
    rpm, tpm, max_in_flight = limits
    announced: dict[str, Any] = {}
    for dim, name in (("r", "requests"), ("t", "tokens")):
        if f"a{dim}" in b:
            reset = _until(b, f"e{dim}", now)
            limit = int(_num(b, f"l{dim}")) or None  # past the reset: the whole limit again (None: unknown)
            announced[name] = {"remaining": int(_num(b, f"a{dim}")) if reset else limit, "limit": limit,
                               "reset_at": reset}
    instances: dict[str, dict[str, Any]] = {
        name: {"instance": name, "last_reserved_at": round(at, 3), "in_flight": 0, "in_flight_tokens": 0}
        for name, at in view.instances.items()}
    for name, tokens in view.leases:
        row = instances.setdefault(name, {"instance": name, "last_reserved_at": None, "in_flight": 0,
                                          "in_flight_tokens": 0})
        row["in_flight"] += 1
        row["in_flight_tokens"] += tokens
    return {
        "state": "cooling_down" if cool else ("paused" if paused else "silent" if _num(h, "quiet") > 0 else "healthy"),
        "cooling_down_until": cool, "paused_until": paused, "consecutive_failures": int(_num(h, "fails")),
        "silent_since": round(_num(h, "quiet"), 3) or None,
        "last_event": {"op": h["op"], "by": h.get("by") or None, "at": round(_num(h, "at"), 3)} if "op" in h else None,
        "limits": {"rpm": rpm or None, "tpm": tpm or None, "max_in_flight": max_in_flight or None},
        "requests_used": view.used_requests, "tokens_used": view.used_tokens,
        "requests_left": max(0, rpm - view.used_requests) if rpm else None,
        "tokens_left": max(0, tpm - view.used_tokens) if tpm else None,
        "announced": announced or None,
        "in_flight": view.in_flight,
        "instances": sorted(instances.values(), key=lambda row: str(row["instance"])),
    }


async def upstreams(request: web.Request) -> web.Response:
    fleet, shared = request.app[FLEET], request.app[FLEET_LIMITS]
    data = fleet.snapshot()
    error = None
    for row, d in zip(data, fleet.router.deployments(), strict=True):
        row["fleet"] = None
        if error is not None:
            continue
        try:
            row["fleet"] = fleet_state(await shared.view(d.model, d.upstream), d.limits)
        except StoreUnavailable as exc:
            error = str(exc) or "redis unreachable"
    body = {"object": "list", "pid": os.getpid(), "instance": shared.instance, "fleet_error": error, "data": data}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def add_fleet_routes(app: web.Application, fleet: FleetClient, limits: FleetLimits) -> None:
    app[FLEET], app[FLEET_LIMITS] = fleet, limits
    app.router.add_get("/admin/upstreams", upstreams, expect_handler=expect_continue)
