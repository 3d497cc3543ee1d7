// Who is signed in (GET /admin/whoami, once per sign-in): the header says who and how, the navigation keeps only
// the screens the role may read, and the screens ask `can("verb resource")` before offering a control, so nobody
// sees a button the admin API would refuse. The admin API still decides: this only keeps the page honest.

import {api, useSession} from "./api.js";

let me = null;

// Which permission each screen needs to be shown at all.
const SCREENS = {teams: "list teams", keys: "list keys", usage: "list usage", cache: "get cache",
                 upstreams: "list upstreams", audit: "list audit", admins: "list admins"};
const TITLES = {platform: "platform admin", team: "team admin", viewer: "viewer"};
const HOW = {root: "admin key", admin: "admin credential", sso: "single sign-on"};

export const can = (permission) => me !== null && me.permissions.includes(permission);
export const myTeams = () => (me ? me.teams : []);

export async function loadWho(key) {
  me = await api("whoami", key ? {key} : undefined);
  if (me.csrf_token) useSession(me.csrf_token); // signed in with SSO: changes carry the session's token
  const scope = me.teams.length ? ` of ${me.teams.join(", ")}` : "";
  const name = me.kind === "sso" && me.email ? `${me.email}` : me.actor;
  const el = document.getElementById("who");
  el.textContent = `${name} · ${TITLES[me.role]}${scope} · ${HOW[me.kind]}`;
  el.title = `Signed in as ${me.actor} (${TITLES[me.role]}${scope}) with ${HOW[me.kind] === "single sign-on"
    ? "single sign-on" : "an " + HOW[me.kind]}`;
  el.hidden = false;
  for (const a of document.querySelectorAll("#nav [data-view]")) a.hidden = !can(SCREENS[a.dataset.view]);
  return me;
}

export function forgetWho() {
  me = null;
  useSession(null);
  const el = document.getElementById("who");
  el.textContent = "";
  el.hidden = true;
  for (const a of document.querySelectorAll("#nav [data-view]")) a.hidden = false;
}
