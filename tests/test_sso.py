"""Single sign-on end to end (issue 17): a real OpenID provider (npm `oidc-provider`, pinned in tests/package.json,
run with Debian's nodejs on loopback), two proxy processes sharing a real redis-server, and the console in Debian's
headless Chromium (Playwright). Test accounts: alice (platform-admins), bob (ads-leads), dave (interns: no role).

Needs nodejs and `npm ci` in tests/ (.ci/run does both); under CI=true this test must run."""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer, free_port
from tests.stack import Server, base_env, http, start_mock, start_proxy

pytestmark = pytest.mark.redis

TESTS = Path(__file__).resolve().parent
ROOT = "sso-test-root-admin-key-0123456789"
CLIENT_SECRET = "sso-test-client-secret-0123456789abcdef"
TIMEOUT_MS = 20_000
CONFIG = """
[upstreams.default]
backoff_base_s = 0.01
deadline_s = 5.0
max_retries = 1

[admin.oidc]
issuer = "http://127.0.0.1:{idp}"
client_id = "embedding-proxy"
client_secret_env = "PROXY_OIDC_CLIENT_SECRET"
redirect_url = "http://127.0.0.1:{port}/admin/oidc/callback"
scopes = ["openid", "email", "groups"]

[admin.oidc.roles]
"platform-admins" = "platform"
"ads-leads" = "team:ads"
"finance" = "viewer"
"""


def _need(what: str, found: bool) -> None:
    if found:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing; under CI the single sign-on test must run (.ci/run installs it)")
    pytest.skip(f"{what} is missing (apt-get install nodejs npm chromium; cd tests && npm ci)")


def _start_provider(workdir: Path, port: int, redirect: str) -> Server:
    d = workdir / "idp"
    d.mkdir()
    server = Server([shutil.which("node") or "node", str(TESTS / "oidc" / "provider.mjs"), str(port), redirect,
                     CLIENT_SECRET], base_env(), d)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/.well-known/openid-configuration", timeout=2):
                return server
        except OSError:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"oidc-provider did not start: {server.stderr()}") from None
            time.sleep(0.1)


@dataclass
class Sso:
    url: str  # the first proxy, the console's
    other: str  # a second proxy on the same Redis
    idp: str
    browser: Any
    redis: RedisServer
    proxies: list[Server]
    errors: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)  # every session id a test saw in a cookie

    def page(self) -> Any:
        """A fresh browser (own cookies) that may reach loopback only (the provider's page asks for a web font)."""
        context = self.browser.new_context(viewport={"width": 1280, "height": 800})
        context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), lambda route: route.abort())
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: self.errors.append(f"console {msg.type}: {msg.text} at {page.url}")
                if msg.type == "error" and page.url.startswith(self.url) else None)
        page.goto(self.url + "/admin/ui/")
        return page

    def root(self, method: str, path: str, body: Any = None) -> Any:
        status, doc = http(method, self.url + path, body, {"Authorization": f"Bearer {ROOT}"})
        assert status < 300, (path, doc)
        return doc


def expect() -> Any:
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=TIMEOUT_MS)
    return playwright_expect


@pytest.fixture(scope="module")
def sso(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sso]:
    _need("nodejs", shutil.which("node") is not None)
    _need("oidc-provider (cd tests && npm ci)", (TESTS / "node_modules" / "oidc-provider").is_dir())
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    _need("chromium", chromium is not None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright", False)
    workdir = tmp_path_factory.mktemp("sso")
    redis_server.flush()
    servers: list[Server] = []
    idp_port, port, other_port = free_port(), free_port(), free_port()
    try:
        servers.append(_start_provider(workdir, idp_port, f"http://127.0.0.1:{port}/admin/oidc/callback"))
        mock, mock_url = start_mock(workdir)
        servers.append(mock)
        env = {"PROXY_ADMIN_KEY": ROOT, "PROXY_OIDC_CLIENT_SECRET": CLIENT_SECRET}
        config = CONFIG.format(idp=idp_port, port=port)
        proxies = []
        for p in (port, other_port):
            proxy, _ = start_proxy(workdir, mock_url, redis_server.url, config, workers=1, env=env, port=p)
            servers.append(proxy)
            proxies.append(proxy)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
            try:
                yield Sso(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{other_port}", f"http://127.0.0.1:{idp_port}",
                          browser, redis_server, proxies)
            finally:
                browser.close()
    finally:
        for server in reversed(servers):
            server.stop()


@pytest.fixture
def console(sso: Sso) -> Iterator[Sso]:
    sso.errors.clear()
    yield sso
    assert sso.errors == [], "JavaScript errors, failed requests or CSP violations in the console"


def sign_in_with_sso(page: Any, login: str) -> None:
    """Through the provider's own pages: its login form (any password), then its consent."""
    page.get_by_role("button", name="Sign in with SSO").click()
    page.locator("input[name=login]").fill(login)
    page.locator("input[name=password]").fill("any password")
    page.get_by_role("button", name="Sign-in").click()
    page.get_by_role("button", name="Continue").click()


def cookie_header(page: Any, sso: Sso) -> str:
    [cookie] = [c for c in page.context.cookies() if c["name"] == "ep_admin_session"]
    sso.sessions.append(cookie["value"])
    return f"ep_admin_session={cookie['value']}"


def test_a_team_lead_signs_in_and_lands_on_its_team_alone(console: Sso) -> None:
    e = expect()
    console.root("POST", "/admin/keys", {"team": "search", "name": "another team's"})
    page = console.page()
    e(page.get_by_role("button", name="Sign in with SSO")).to_be_visible()
    sign_in_with_sso(page, "bob")
    e(page.locator("#who")).to_have_text("bob@example.com · team admin of ads · single sign-on")
    assert page.get_by_role("navigation").get_by_role("link").all_inner_texts() == ["Teams", "Keys", "Usage",
                                                                                     "Audit"]
    [cookie] = [c for c in page.context.cookies() if c["name"] == "ep_admin_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin/"
    assert cookie["secure"] is False  # plain http on loopback; Secure everywhere else
    assert "ep_admin_session" not in page.evaluate("document.cookie")  # the page's script never sees it

    page.get_by_role("navigation").get_by_role("link", name="Keys").click()
    page.get_by_role("button", name="New key").click()
    dialog = page.get_by_role("dialog", name="New key")
    page.get_by_label("Team").fill("ads")
    dialog.get_by_role("button", name="Create").click()  # a change: it carries the session's CSRF token
    shown = page.get_by_role("dialog", name="Key created for ads")
    key_id = re.search(r"Key (key_[0-9a-f]+) of team", shown.inner_text())
    assert key_id is not None
    shown.get_by_role("button", name="Done").click()
    e(page.get_by_role("row").filter(has_text=key_id.group(1))).to_contain_text("ads")
    assert page.get_by_text("another team's").count() == 0

    # the cookie alone changes nothing (another site's page could make the browser send it): 403 without the token
    cookie = cookie_header(page, console)
    assert http("GET", console.other + "/admin/whoami", None, {"Cookie": cookie})[0] == 200  # any instance
    status, body = http("POST", console.url + "/admin/keys", {"team": "ads"}, {"Cookie": cookie})
    assert status == 403 and body["error"]["code"] == "csrf_failed"

    page.get_by_role("button", name="Sign out").click()
    e(page.get_by_role("button", name="Sign in with SSO")).to_be_visible()
    for url in (console.url, console.other):  # ended on every instance
        status, body = http("GET", url + "/admin/whoami", None, {"Cookie": cookie})
        assert status == 401 and body["error"]["code"] == "session_expired"

    entries = console.root("GET", "/admin/audit?actor=bob")["data"]
    assert [(x["action"], x["outcome"], x["how"]) for x in entries] == [
        ("session.signout", "ok", "console"), ("keys.create", "refused", "console"), ("keys.create", "ok", "console"),
        ("session.signin", "ok", "console")]
    assert {x["email"] for x in entries} == {"bob@example.com"} and entries[-1]["after"]["teams"] == ["ads"]
    assert cookie.split("=", 1)[1] not in str(entries)
    page.context.close()


def test_an_account_whose_groups_map_to_no_role_is_told_so_and_gets_nothing(console: Sso) -> None:
    e = expect()
    page = console.page()
    sign_in_with_sso(page, "dave")
    e(page.get_by_role("alert")).to_contain_text("none of your groups has a role in this proxy")
    e(page.get_by_role("navigation")).to_be_hidden()
    assert [c for c in page.context.cookies() if c["name"] == "ep_admin_session"] == []
    [refused] = console.root("GET", "/admin/audit?action=session.signin&actor=dave")["data"]
    assert refused["outcome"] == "refused" and refused["email"] == "dave@example.com"
    assert refused["reason"].startswith("no_role")
    page.context.close()


def test_a_platform_admin_sees_everything_and_a_reload_keeps_the_session(console: Sso) -> None:
    e = expect()
    page = console.page()
    sign_in_with_sso(page, "alice")
    e(page.locator("#who")).to_have_text("alice@example.com · platform admin · single sign-on")
    assert len(page.get_by_role("navigation").get_by_role("link").all_inner_texts()) == 7
    cookie_header(page, console)
    page.reload()
    e(page.locator("#who")).to_have_text("alice@example.com · platform admin · single sign-on")
    page.get_by_role("navigation").get_by_role("link", name="Admins").click()
    e(page.get_by_role("button", name="New admin")).to_be_visible()
    page.context.close()


def _get(url: str, cookie: str = "") -> tuple[int, str]:
    """One GET without following a redirect: (status, Location)."""
    parts = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}", headers={"Cookie": cookie} if cookie else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.headers.get("Location", "")
    finally:
        conn.close()


def test_a_callback_this_browser_did_not_start_signs_no_one_in(sso: Sso) -> None:
    before = sso.root("GET", "/admin/audit?action=session")["data"]
    redis = sso.redis.client()
    stored = sorted(redis.keys("*"))
    status, location = _get(sso.url + "/admin/oidc/callback?code=forged&state=never-issued")
    assert (status, location) == (302, sso.url + "/admin/ui/#sso-error=expired")
    # a sign-in cookie of another state (a code injected into someone else's callback) is refused the same way
    cookie = f"ep_admin_sign_in=other-state.nonce.verifier.{int(time.time())}"
    assert _get(sso.url + "/admin/oidc/callback?code=c&state=never-issued", cookie)[1].endswith("sso-error=expired")
    stale = f"ep_admin_sign_in=s1.nonce.verifier.{int(time.time()) - 3600}"
    assert _get(sso.url + "/admin/oidc/callback?code=c&state=s1", stale)[1].endswith("sso-error=expired")
    assert _get(sso.url + "/admin/oidc/callback?error=access_denied&state=x")[1].endswith("sso-error=denied")
    status, body = http("GET", sso.url + "/admin/oidc/callback")
    assert status == 400 and body["error"]["param"] == "code"
    assert sso.root("GET", "/admin/audit?action=session")["data"] == before  # nothing signed in, nothing audited
    status, location = _get(sso.url + "/admin/oidc/login")
    assert status == 302 and location.startswith(sso.idp + "/auth?") and "code_challenge_method=S256" in location
    try:
        assert sorted(redis.keys("*")) == stored  # a sign-in nobody finished wrote nothing to the state store
    finally:
        redis.close()


def test_no_log_line_holds_a_credential_or_a_session(sso: Sso) -> None:
    """Runs last: every sign-in above is in the proxies' stdout (access log and audit lines) and stderr."""
    logs = "".join(s.stdout() + s.stderr() for s in sso.proxies)
    assert '"event":"audit"' in logs and '"action":"session.signin"' in logs
    for secret in [ROOT, CLIENT_SECRET, *sso.sessions]:
        assert secret not in logs, secret[:8]
