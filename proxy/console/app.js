// embedding-proxy console: a client of the public admin API, nothing more. No framework, no build step.
// The page's one script, an ES module: it wires the screens (one module each) to the page, signs in and out, opens
// and closes the menu on narrow screens, and starts. Every module is a fixed file the proxy serves next to this one
// (see proxy/console/__init__.py).

import {adminsView} from "./admins.js";
import {api, forget, keep, savedKey, signedIn, whenRefused} from "./api.js";
import {auditView} from "./audit.js";
import {cacheView} from "./cache.js";
import {notice} from "./dom.js";
import {keysView} from "./keys.js";
import {teamsView} from "./teams.js";
import {upstreamsView} from "./upstreams.js";
import {usageView} from "./usage.js";
import {offerSso, ssoHinted, ssoOutcome, ssoSignOut} from "./sso.js";
import {addViews, draw} from "./view.js";
import {forgetWho, loadWho} from "./who.js";

addViews({teams: teamsView, keys: keysView, usage: usageView, cache: cacheView, upstreams: upstreamsView,
          audit: auditView, admins: adminsView});

const $ = (id) => document.getElementById(id);

// --- sign in and out ---------------------------------------------------------------------------------------

// Only a refusal of the key itself keeps the console closed (401: wrong key; 403: the admin API is off or it is no
// admin key). An answer of the admin API's own (a 503 while a store is down) comes after the key check: the key is
// good, and each screen shows what is down in its place, with Retry.
function accepted(err) {
  return err.fromApi && err.status !== 401 && err.status !== 403;
}

let viaSso = false; // signed in with single sign-on: signing out ends the session on the proxy too

async function signIn(key) {
  try {
    await loadWho(key); // a wrong key is refused here, before anything is shown; then who, and what they may do
    await api("teams", {key});
  } catch (err) {
    if (!accepted(err)) throw err;
  }
  if (key) keep(key); // no key: a single sign-on session (its cookie)
  $("sign-in-view").hidden = true;
  $("nav").hidden = false;
  $("sign-out").hidden = false;
  $("menu-button").hidden = false;
  draw();
}

async function signOut(message) {
  if (viaSso) {
    viaSso = false;
    await ssoSignOut().catch(() => {}); // with the session's CSRF token, before it is forgotten
  }
  forget();
  forgetWho();
  for (const d of document.querySelectorAll("dialog")) d.remove();
  $("view").replaceChildren();
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("menu-button").hidden = true;
  menu(false);
  $("sign-in-view").hidden = false;
  $("sign-in-error").textContent = message || "";
  const input = $("admin-key");
  input.value = "";
  input.focus();
  notice("");
}

$("sign-in").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = $("admin-key");
  const errorEl = $("sign-in-error");
  const key = input.value.trim();
  errorEl.textContent = "";
  if (!key) { errorEl.textContent = "Enter the admin key."; return; }
  try {
    await signIn(key);
    input.value = "";
  } catch (err) {
    errorEl.textContent = err.message;
  }
});
$("sign-out").addEventListener("click", () => signOut(""));
whenRefused(signOut);

// --- the menu (narrow screens) and the addresses -------------------------------------------------------------

function menu(open) {
  $("top").classList.toggle("open", open);
  $("menu-button").setAttribute("aria-expanded", String(open));
}
$("menu-button").addEventListener("click", () => menu($("menu-button").getAttribute("aria-expanded") !== "true"));
$("nav").addEventListener("click", (ev) => {
  const a = ev.target.closest("a");
  if (!a) return;
  menu(false);
  if (a.hash === location.hash) draw(); // the screen on show: drawn again, as a reload would (no hashchange)
});
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && $("top").classList.contains("open")) { menu(false); $("menu-button").focus(); }
});
window.addEventListener("hashchange", () => { if (signedIn()) draw(); });

// --- start -------------------------------------------------------------------------------------------------

const outcome = ssoOutcome();
offerSso();
const saved = savedKey();
if (saved) {
  signIn(saved).catch((err) => {
    // A refused key signs out; no answer at all (the proxy restarting) keeps it: reload to try again.
    if (err.status === 401 || err.status === 403) signOut(err.message);
    else $("sign-in-error").textContent = err.message;
  });
} else if (outcome.session || ssoHinted()) {
  viaSso = true;
  signIn(null).catch((err) => {
    signOut(err.status === 401 ? "Your single sign-on session has ended: sign in again." : err.message);
  });
} else {
  $("sign-in-error").textContent = outcome.error || "";
  $("admin-key").focus();
}
