// Single sign-on: "Sign in with SSO" when the proxy has [admin.oidc] (GET /admin/oidc). The session is a cookie
// the page never sees (HttpOnly); its CSRF token comes with /admin/whoami (who.js) and goes with every change
// (api.js). The provider sends the browser back to /admin/ui/#sso, or #sso-error=WHY; a reload of the tab finds
// the session again (a flag in this tab's sessionStorage says there is one to look for).

import {api} from "./api.js";

const FLAG = "embedding-proxy-sso";
const ERRORS = {
  "no-role": "You are signed in at the identity provider, but none of your groups has a role in this proxy: " +
             "ask a platform admin to map one ([admin.oidc.roles]).",
  "denied": "The identity provider did not sign you in.",
  "expired": "The sign-in took too long or was used already: sign in again.",
  "provider": "The identity provider could not be reached or its answer was refused: try again, or use an " +
              "admin key.",
};

export async function offerSso() {
  const button = document.getElementById("sso-sign-in");
  try {
    button.hidden = !(await api("oidc", {key: null})).enabled;
  } catch (_) {
    button.hidden = true; // a proxy from before single sign-on: admin keys only
  }
  button.onclick = () => window.location.assign(new URL("../oidc/login", document.baseURI));
}

// What the provider's return says: {session: true}, {error: "words"}, or {} (no return); the fragment is dropped.
export function ssoOutcome() {
  const hash = window.location.hash.slice(1);
  if (hash !== "sso" && !hash.startsWith("sso-error=")) return {};
  history.replaceState(null, "", window.location.pathname + window.location.search);
  if (hash === "sso") {
    sessionStorage.setItem(FLAG, "1");
    return {session: true};
  }
  return {error: ERRORS[hash.slice("sso-error=".length)] || ERRORS.provider};
}

export const ssoHinted = () => sessionStorage.getItem(FLAG) === "1";

export async function ssoSignOut() {
  sessionStorage.removeItem(FLAG);
  await api("oidc/signout", {method: "POST", key: null});
}
