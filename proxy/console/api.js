// The admin API and the admin-key session. The key lives in this tab's sessionStorage only; every call sends it
// in the Authorization header, to this page's own origin. Signed in with SSO there is no key: the browser sends
// the session's cookie, and every call sends the session's CSRF token (useSession).

const STORAGE_KEY = "embedding-proxy-admin-key";
const API = new URL("../", document.baseURI); // /admin/ui/ -> /admin/: works behind a path prefix too

let adminKey = null;
let csrfToken = null;
let onRefused = () => {};

export const savedKey = () => sessionStorage.getItem(STORAGE_KEY);
export const signedIn = () => adminKey !== null || csrfToken !== null;

// A single sign-on session (its CSRF token, from /admin/whoami), or null when it ends.
export function useSession(token) {
  csrfToken = token;
}

export function keep(key) {
  adminKey = key;
  sessionStorage.setItem(STORAGE_KEY, key);
}

export function forget() {
  adminKey = null;
  sessionStorage.removeItem(STORAGE_KEY);
}

// What a 401 for the admin key in use does (app.js signs out): this module knows nothing of the page.
export function whenRefused(handler) {
  onRefused = handler;
}

// status 0: the proxy did not answer. fromApi: the answer was the admin API's own JSON error, so the admin key
// was accepted before it (a 503 for a store that is down comes from the handler, behind the key check).
class ApiError extends Error {
  constructor(status, message, param, path, fromApi) {
    super(message);
    this.status = status;
    this.param = param;
    this.path = path;
    this.fromApi = fromApi;
  }
}

export async function request(path, options) {
  const {method = "GET", body, key = adminKey} = options || {};
  const headers = {"X-Admin-Client": "console"}; // the audit log's `how`
  if (key) headers.Authorization = "Bearer " + key;
  else if (csrfToken) headers["X-CSRF-Token"] = csrfToken;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(new URL(path, API), {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "same-origin", redirect: "error",
    });
  } catch (err) {
    throw new ApiError(0, "The proxy did not answer: " + err.message, null, path, false);
  }
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    let param = null;
    let fromApi = false;
    try {
      const e = (await resp.json()).error;
      if (e && e.message) { message = e.message; param = e.param; fromApi = true; }
    } catch (_) { /* not JSON: keep the status line */ }
    const err = new ApiError(resp.status, message, param, path.split("?")[0], fromApi);
    if (resp.status === 401 && key === adminKey && signedIn()) onRefused(message);
    throw err;
  }
  return resp;
}

export const api = async (path, options) => (await request(path, options)).json();

// Every item of a paged admin list (GET /admin/teams, /admin/admins), read a page of 1000 at a time.
export async function everyPage(path) {
  const out = [];
  for (let after = null; ;) {
    const page = await api(`${path}?limit=1000${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    out.push(...page.data);
    if (!page.has_more || !page.next_cursor) return out;
    after = page.next_cursor;
  }
}

// Which stores answer, by the proxy's public readiness probe (GET /readyz, beside /admin/): its body says so for the
// state store and the cache store whatever its status (503 while the state store is down). null: no answer.
export async function readiness() {
  try {
    const resp = await fetch(new URL("../readyz", API), {cache: "no-store", credentials: "omit", redirect: "error"});
    return await resp.json();
  } catch (_) {
    return null;
  }
}
