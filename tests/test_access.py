"""Who may do what (issue 17): named admins with roles, the one permission table, team admins confined to their
teams, viewers reading only, revocation on every instance; against a real Redis, over HTTP.

The table test walks every route the app registers with every role: a route without an entry fails it, and a
route the table does not know is refused (deny by default)."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.accounts.access import ROOT, Need, Principal
from proxy.accounts.permissions import PERMISSIONS, Unlisted, route_need
from proxy.console import is_console
from proxy.http.app import KEYSTORE, create_app
from tests.conftest import Proxy, Upstream, make_settings

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
ADMIN = "root-admin-key-for-access-tests-0123456789"
CONFIG = "[quotas]\nteam_cache_s = 0.0\n[teams.ads]\nrpm = 100\ntpm = 50000\n"


async def make(make_proxy: Any, upstream: Upstream, redis_url: str, config: str = "") -> Proxy:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, CONFIG + config, PROXY_ADMIN_KEY=ADMIN))
    return p


async def call(p: Proxy, method: str, path: str, body: Any = None, key: str = ADMIN) -> tuple[int, Any]:
    resp = await p.client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
    text = await resp.text()
    return resp.status, (await resp.json()) if resp.content_type == "application/json" else text


async def new_admin(p: Proxy, name: str, role: str, teams: list[str] | None = None) -> str:
    status, body = await call(p, "POST", "/admin/admins", {"name": name, "role": role, "teams": teams or []})
    assert status == 201, body
    assert body["credential"].startswith("sk-admin-") and len(body["credential"]) >= len("sk-admin-") + 32
    return str(body["credential"])


def admin_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, template) of every admin route the app registers, the console's files and the catch-all aside."""
    out = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        template = info.get("formatter") or info.get("path") or ""
        if not template.startswith("/admin/") or route.resource is None or route.resource.name in (
                "console-redirect", "console-index", "console-file", "unmatched"):
            continue
        out.append((route.method, template))
    return sorted(set(out))


def unlisted(app: web.Application) -> list[str]:
    missing = []
    for method, template in admin_routes(app):
        try:
            route_need(method, template)
        except Unlisted as exc:
            missing.append(str(exc))
    return missing


async def test_the_table_names_every_admin_route_and_a_new_route_without_one_is_refused(
        make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url)
    routes = admin_routes(p.app)
    assert ("POST", "/admin/keys/{id}/revoke") in routes and ("GET", "/admin/audit") in routes
    assert unlisted(p.app) == []
    api_entries = {k for k in PERMISSIONS if not k.startswith("cli ")}
    registered = {f"{m} {t}" for m, t in routes if m != "HEAD"}
    assert api_entries == registered  # nor an entry for a route that is gone

    # a route added without an entry: the walk finds it, and a request to it is refused even for root
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="should never answer")

    app = create_app(make_settings(upstream.base_url, redis_url, CONFIG, PROXY_ADMIN_KEY=ADMIN))
    app.router.add_get("/admin/brand-new", handler)  # matched before the catch-all: the more specific path wins
    assert sorted(set(unlisted(app))) == ["GET /admin/brand-new"]
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/admin/brand-new", headers={"Authorization": f"Bearer {ADMIN}"})
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "permission_denied"


# Each route called as each role, on targets of team `ads` (the confined roles' own team): the answer is 403
# exactly when the role's rules refuse the route's permission.
ROLES = {"platform": ("platform", []), "team-ads": ("team", ["ads"]), "viewer": ("viewer", []),
         "viewer-ads": ("viewer", ["ads"])}


async def _targets(p: Proxy, tag: str) -> dict[str, str]:
    _, record = await p.app[KEYSTORE].create("ads", name="walk")
    await new_admin(p, f"victim-{tag}", "viewer")
    return {"id": record.id, "team": "ads", "name": f"victim-{tag}"}


def _body(method: str, template: str, tag: str) -> Any:
    return {
        "POST /admin/keys": {"team": "ads", "rpm": 10},
        "PATCH /admin/keys/{id}": {"rpm": 5},
        "POST /admin/keys/{id}/rotate": {"grace_s": 60},
        "PUT /admin/teams/{team}": {"rpm": 90},
        "POST /admin/cache/purge": {"model": MODEL},
        "POST /admin/admins": {"name": f"made-by-{tag}", "role": "viewer"},
    }.get(f"{method} {template}")


async def test_every_route_with_every_role_answers_as_the_table_says(
        make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url)
    checked = 0
    for tag, (role, teams) in ROLES.items():
        credential = await new_admin(p, tag, role, teams)
        principal = Principal(tag, "admin", role, tuple(teams))  # type: ignore[arg-type]
        for method, template in admin_routes(p.app):
            if method == "HEAD":
                continue
            need = route_need(method, template)
            path = template.format(**await _targets(p, f"{tag}-{checked}"))
            if need is None:  # the sign-in steps: no admin needed, so none refused
                status, body = await call(p, method, path, key="")
                assert status not in (401, 403) and status < 500, (method, template, body)
                checked += 1
                continue
            status, body = await call(p, method, path, _body(method, template, tag), key=credential)
            allowed = principal.may(need)
            assert (status == 403) == (not allowed), (tag, method, template, status, body)
            assert status < 500, (tag, method, template, body)
            checked += 1
    assert checked == len(ROLES) * len([r for r in admin_routes(p.app) if r[0] != "HEAD"])


def test_every_command_of_the_command_line_has_an_entry() -> None:
    from proxy.cli.main import build_parser

    def commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [prefix]
        return list(itertools.chain.from_iterable(
            commands(p, f"{prefix} {name}".strip()) for name, p in subs[0].choices.items()))

    found = {f"cli {c}" for c in commands(build_parser(), "")}
    assert found == {k for k in PERMISSIONS if k.startswith("cli ")}


def test_roles_follow_the_rules() -> None:
    team = Principal("lead", "admin", "team", ("ads",))
    viewer = Principal("v", "admin", "viewer")
    assert ROOT.may(Need("purge", "cache")) and ROOT.may(Need("create", "admins"))
    assert team.may(Need("create", "keys")) and team.may(Need("revoke", "keys")) and team.may(Need("list", "usage"))
    assert not team.may(Need("update", "teams")) and not team.may(Need("purge", "cache"))
    assert not team.may(Need("get", "cache")) and not team.may(Need("list", "admins"))  # confined: no team-wide reads
    assert viewer.may(Need("get", "cache")) and viewer.may(Need("list", "audit"))
    assert not viewer.may(Need("create", "keys")) and not viewer.may(Need("revoke", "admins"))
    assert team.sees("ads") and not team.sees("search") and viewer.sees("search")


async def test_a_team_admin_runs_its_own_teams_keys_and_nothing_else(
        make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url)
    lead = await new_admin(p, "ads-lead", "team", ["ads"])
    _, other = await p.app[KEYSTORE].create("search", name="not yours")

    status, created = await call(p, "POST", "/admin/keys", {"team": "ads", "name": "svc", "rpm": 50}, key=lead)
    assert status == 201 and created["team"] == "ads"
    assert (await p.embed(created["key"], {"model": MODEL, "input": "lead's key"})).status == 200
    status, rotated = await call(p, "POST", f"/admin/keys/{created['id']}/rotate", {"grace_s": 60}, key=lead)
    assert status == 201
    status, _ = await call(p, "POST", f"/admin/keys/{rotated['id']}/revoke", key=lead)
    assert status == 200
    status, listed = await call(p, "GET", "/admin/keys", key=lead)
    assert status == 200 and {k["team"] for k in listed["data"]} == {"ads"}
    status, teams = await call(p, "GET", "/admin/teams", key=lead)
    assert [t["team"] for t in teams["data"]] == ["ads"]

    refusals = [
        ("POST", "/admin/keys", {"team": "search"}),
        ("GET", "/admin/keys?team=search", None),
        ("GET", f"/admin/keys/{other.id}", None),
        ("POST", f"/admin/keys/{other.id}/revoke", None),
        ("POST", f"/admin/keys/{other.id}/rotate", {}),
        ("PATCH", f"/admin/keys/{other.id}", {"rpm": 1}),
        ("GET", "/admin/usage?team=search", None),
        ("PUT", "/admin/teams/ads", {"rpm": 1000}),  # no team limits, even its own
        ("DELETE", "/admin/teams/ads", None),
        ("POST", "/admin/cache/purge", {"model": MODEL}),
        ("POST", "/admin/admins", {"name": "sneaky", "role": "platform"}),
        ("POST", "/admin/keys", {"team": "ads", "rpm": 101}),  # above the team's own rpm of 100
        ("PATCH", f"/admin/keys/{created['id']}", {"tpm": 50001}),
    ]
    for method, path, body in refusals:
        status, answer = await call(p, method, path, body, key=lead)
        assert status == 403, (method, path, answer)
        assert answer["error"]["code"] in ("permission_denied", "limit_above_team"), answer
    # the other team's key is untouched
    assert (await p.app[KEYSTORE].get(other.id)).revoked is False  # type: ignore[union-attr]
    status, audit = await call(p, "GET", "/admin/audit?actor=ads-lead&limit=100")
    refused = [e for e in audit["data"] if e["outcome"] == "refused"]
    assert len(refused) == len(refusals)
    assert {e["action"] for e in refused} >= {"keys.create", "keys.revoke", "teams.update", "cache.purge"}
    assert any(e["team"] == "search" and e["key_id"] == other.id and e["action"] == "keys.revoke" for e in refused)


async def test_a_viewer_reads_and_changes_nothing(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url)
    viewer = await new_admin(p, "finance", "viewer")
    _, record = await p.app[KEYSTORE].create("ads")
    for path in ("/admin/keys", f"/admin/keys/{record.id}", "/admin/teams", "/admin/usage", "/admin/cache",
                 "/admin/upstreams", "/admin/admins", "/admin/audit", "/admin/whoami"):
        status, body = await call(p, "GET", path, key=viewer)
        assert status == 200, (path, body)
    for method, path, body in [("POST", "/admin/keys", {"team": "ads"}),
                               ("POST", f"/admin/keys/{record.id}/revoke", None),
                               ("PUT", "/admin/teams/ads", {"rpm": 1}),
                               ("POST", "/admin/cache/purge", {"model": MODEL}),
                               ("POST", "/admin/admins", {"name": "x", "role": "viewer"})]:
        status, answer = await call(p, method, path, body, key=viewer)
        assert status == 403 and answer["error"]["code"] == "permission_denied", (path, answer)
    assert (await p.app[KEYSTORE].get(record.id)).revoked is False  # type: ignore[union-attr]
    status, me = await call(p, "GET", "/admin/whoami", key=viewer)
    assert me["actor"] == "finance" and me["role"] == "viewer" and me["kind"] == "admin"
    assert "list keys" in me["permissions"] and "create keys" not in me["permissions"]


async def test_a_revoked_admin_is_refused_on_every_instance_from_its_next_request(
        make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    one = await make(make_proxy, upstream, redis_url)
    two = await make(make_proxy, upstream, redis_url)  # another instance on the same Redis
    credential = await new_admin(one, "leaving", "platform")
    assert (await call(two, "GET", "/admin/keys", key=credential))[0] == 200
    status, body = await call(one, "POST", "/admin/admins/leaving/revoke")
    assert status == 200 and body["revoked"] is True and "credential" not in body
    for p in (one, two):
        status, body = await call(p, "GET", "/admin/keys", key=credential)
        assert status == 401 and body["error"]["code"] == "admin_credential_revoked"
    status, listed = await call(two, "GET", "/admin/admins")
    assert [a["name"] for a in listed["data"]] == ["leaving"] and credential not in str(listed)
    # a name is never given again, and bad input is a 400 in OpenAI's shape
    assert (await call(one, "POST", "/admin/admins", {"name": "leaving", "role": "viewer"}))[0] == 409
    for body, param in [({"name": "x", "role": "king"}, "role"), ({"name": "bad name", "role": "viewer"}, "name"),
                        ({"name": "t", "role": "team"}, "teams"), ({"name": "t", "role": "team", "teams": ["A"]},
                                                                   "teams"), ({"role": "viewer"}, "name")]:
        status, answer = await call(one, "POST", "/admin/admins", body)
        assert status == 400 and answer["error"]["param"] == param, (body, answer)
    assert (await call(one, "POST", "/admin/admins/nobody/revoke"))[0] == 404


async def test_the_bootstrap_key_is_root_and_wrong_credentials_are_refused(
        make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url)
    status, me = await call(p, "GET", "/admin/whoami")
    assert me["actor"] == "root" and me["kind"] == "root" and me["role"] == "platform"
    assert (await call(p, "GET", "/admin/keys", key="sk-admin-" + "x" * 43))[0] == 401
    gateway = await p.new_key("ads")
    status, body = await call(p, "GET", "/admin/keys", key=gateway)
    assert status == 403 and body["error"]["code"] == "not_admin_key"
    # without PROXY_ADMIN_KEY named admins still work
    p2: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, CONFIG))
    credential = await new_admin(p, "named", "platform")
    assert (await call(p2, "GET", "/admin/keys", key=credential))[0] == 200
    status, body = await call(p2, "GET", "/admin/keys", key="something-else")
    assert status == 403 and body["error"]["code"] == "admin_disabled"
    assert is_console  # the console's files stay outside auth (tests/test_console.py)
