// The screen on show and its address. Every screen and its filters have one, `#/usage?team=ads&from=2026-11-01`:
// it can be bookmarked and shared, a reload shows it again, back and forward move between them. A screen is drawn
// from its address; `go` changes the address (a new history entry), `refresh` draws the screen again after a
// change. What a screen cannot load is shown in its place: what is missing, the admin API's message (which names
// the store that is down) and Retry.

import {signedIn} from "./api.js";
import {h, notice} from "./dom.js";

export const START = "teams"; // the screen of an address without one

const VIEWS = {}; // name -> async (section, params: URLSearchParams) => void; app.js registers the screens
let shown = null; // the name of the screen on show

export function addViews(views) {
  Object.assign(VIEWS, views);
}

// `#/name?k=v`; empty filters are left out.
export function address(name, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
  const qs = q.toString();
  return `#/${name}${qs ? "?" + qs : ""}`;
}

function route() {
  const m = /^#\/([a-z]+)(?:\?(.*))?$/.exec(location.hash);
  return m && Object.hasOwn(VIEWS, m[1]) ? {name: m[1], params: new URLSearchParams(m[2] || "")} : null;
}

// To a screen with these filters: a new history entry, or the same address drawn again.
export function go(name, params) {
  const target = address(name, params);
  if (location.hash === target) draw();
  else location.hash = target; // the hashchange draws it
}

export async function draw() {
  let r = route();
  if (r === null) { // none, or not a screen: the start screen, in place of the address (no history entry)
    history.replaceState(null, "", address(START));
    r = route();
  }
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.view === r.name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (r.name !== shown) notice(""); // a confirmation belongs to the screen it was given on
  shown = r.name;
  const view = document.getElementById("view");
  // not labelled: field labels are a contract (tests find "Team" by label), so nothing else may carry one
  const section = h("section", {class: "view", "data-address": location.hash});
  view.replaceChildren(section);
  try {
    await VIEWS[r.name](section, r.params);
  } catch (err) { // a screen's own panels catch what they load; this is the last resort
    if (signedIn()) section.append(failed("This screen", err));
  }
}

export const refresh = () => draw();

// In place of what could not be loaded (Grafana's panel error is the model): what, why, and Retry.
export function failed(what, err, ...more) {
  const answered = err.status
    ? `The admin API answered ${err.status}${err.path ? ` to /admin/${err.path}` : ""}.` : "";
  return h("div", {class: "panel-error", role: "alert"},
    h("p", {class: "panel-error-title"}, `${what} could not be loaded`),
    h("p", {}, err.message),
    answered ? h("p", {class: "muted"}, answered) : null,
    more,
    h("button", {type: "button", onclick: refresh}, "Retry"));
}

// Fills `box` with `load`; if it fails, the error panel takes the box's place. A refused admin key signs out
// instead (api.js), leaving nothing to show.
export async function loadInto(box, what, load, extra) {
  try {
    await load();
  } catch (err) {
    if (!signedIn()) return;
    box.replaceChildren(failed(what, err, extra ? await extra(err) : null));
  }
}
