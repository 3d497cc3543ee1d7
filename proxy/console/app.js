// embedding-proxy console: a client of the public admin API, nothing more. No framework, no build step.
// The admin key lives in this tab's sessionStorage only; every call sends it in the Authorization header.
"use strict";

(() => {
  const STORAGE_KEY = "embedding-proxy-admin-key";
  const API = new URL("../", document.baseURI); // /admin/ui/ -> /admin/: works behind a path prefix too
  const TEAM_RE = /^[a-z0-9][a-z0-9_.-]{0,62}$/;
  const TEAM_RULE = "Team names are 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit.";
  const MAX_NAME_CHARS = 200; // keys.py MAX_NAME_CHARS
  const LIMITS = [
    ["rpm", "Requests per minute"],
    ["tpm", "Tokens per minute"],
    ["tokens_per_day", "Tokens per day"],
    ["tokens_per_month", "Tokens per month"],
  ];
  const SHORT = {rpm: "RPM", tpm: "TPM", tokens_per_day: "Tokens / day", tokens_per_month: "Tokens / month"};
  const MAX_EXPIRY_DAYS = 3650; // keep in step with the admin API's bound on expires_in_s
  const MAX_GRACE_HOURS = 24 * 3650;
  const DAY_MS = 86400000;

  let adminKey = null;
  let current = "teams";
  let keysOf = ""; // the keys view's team filter
  const usageState = {since: "", until: "", team: "", by: "team", chart: "tokens"};

  // --- small DOM helpers -------------------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return el;
  }

  let uid = 0;
  function field(label, input, hint) {
    const id = input.id || `f${++uid}`;
    input.id = id;
    return h("div", {class: "field"}, h("label", {for: id}, label), input,
             hint ? h("small", {class: "hint"}, hint) : null);
  }

  function status(text, isError) {
    const el = document.getElementById("status");
    el.textContent = text || "";
    el.className = isError ? "error" : "";
  }

  // --- formatting --------------------------------------------------------------------------------------------

  const int = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
  function usd(v) {
    const n = Number(v || 0);
    if (n === 0) return "$0";
    if (n >= 1) return "$" + n.toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: 2});
    if (n >= 0.01) return "$" + n.toFixed(4);
    return "$" + n.toFixed(6).replace(/0+$/, "");
  }
  function compact(n) {
    const a = Math.abs(n);
    if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
    if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e3) return (n / 1e3).toFixed(a >= 1e4 ? 0 : 1) + "k";
    return String(Math.round(n * 100) / 100);
  }
  function when(ts, bare) {
    if (ts === null || ts === undefined) return "—";
    return new Date(ts * 1000).toISOString().slice(0, 16).replace("T", " ") + (bare ? "" : " UTC");
  }
  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Number(n);
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : String(v)) + " " + units[i];
  }
  const isoDay = (d) => d.toISOString().slice(0, 10);
  const today = () => isoDay(new Date());
  const monthStart = () => today().slice(0, 8) + "01";

  // --- the admin API -----------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, param) {
      super(message);
      this.status = status;
      this.param = param;
    }
  }

  async function request(path, options) {
    const {method = "GET", body, key = adminKey} = options || {};
    const headers = {Authorization: "Bearer " + key};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(new URL(path, API), {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store", credentials: "omit", redirect: "error",
      });
    } catch (err) {
      throw new ApiError(0, "The proxy did not answer: " + err.message);
    }
    if (!resp.ok) {
      let message = `${resp.status} ${resp.statusText}`;
      let param = null;
      try {
        const e = (await resp.json()).error;
        if (e && e.message) { message = e.message; param = e.param; }
      } catch (_) { /* not JSON: keep the status line */ }
      const err = new ApiError(resp.status, message, param);
      if (resp.status === 401 && key === adminKey && adminKey !== null) signOut(message);
      throw err;
    }
    return resp;
  }

  const api = async (path, options) => (await request(path, options)).json();

  // --- sign in and out ---------------------------------------------------------------------------------------

  async function signIn(key) {
    await api("teams", {key}); // a wrong key is refused here, before anything is shown
    adminKey = key;
    sessionStorage.setItem(STORAGE_KEY, key);
    document.getElementById("sign-in-view").hidden = true;
    document.getElementById("nav").hidden = false;
    document.getElementById("sign-out").hidden = false;
    show(current);
  }

  function signOut(message) {
    adminKey = null;
    sessionStorage.removeItem(STORAGE_KEY);
    for (const d of document.querySelectorAll("dialog")) d.remove();
    document.getElementById("view").replaceChildren();
    document.getElementById("nav").hidden = true;
    document.getElementById("sign-out").hidden = true;
    document.getElementById("sign-in-view").hidden = false;
    document.getElementById("sign-in-error").textContent = message || "";
    const input = document.getElementById("admin-key");
    input.value = "";
    input.focus();
    status("");
  }

  document.getElementById("sign-in").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = document.getElementById("admin-key");
    const errorEl = document.getElementById("sign-in-error");
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
  document.getElementById("sign-out").addEventListener("click", () => signOut(""));

  // --- views -------------------------------------------------------------------------------------------------

  const VIEWS = {teams: teamsView, keys: keysView, usage: usageView, cache: cacheView, upstreams: upstreamsView};

  document.getElementById("nav").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-view]");
    if (b) show(b.dataset.view);
  });

  async function show(name) {
    current = name;
    for (const b of document.querySelectorAll("#nav button")) {
      if (b.dataset.view === name) b.setAttribute("aria-current", "page");
      else b.removeAttribute("aria-current");
    }
    const view = document.getElementById("view");
    // not labelled: field labels are a contract (tests find "Team" by label), so nothing else may carry one
    const section = h("section", {class: "view"});
    view.replaceChildren(section);
    status("");
    try {
      await VIEWS[name](section);
    } catch (err) {
      if (adminKey !== null) status(err.message, true);
    }
  }

  const refresh = () => show(current);

  function table(columns, rows, empty) {
    if (!rows.length) return h("p", {class: "empty"}, empty);
    return h("div", {class: "table-wrap"},
      h("table", {},
        h("thead", {}, h("tr", {}, columns.map((c) => h("th", {scope: "col", class: c.num ? "num" : null,
                                                               title: c.title}, c.label)))),
        h("tbody", {}, rows.map((r) => h("tr", {},
          columns.map((c, i) => h(i === 0 ? "th" : "td", {scope: i === 0 ? "row" : null,
                                                           class: c.num ? "num" : c.wrap ? "wrap" : null},
                                  c.cell(r))))))));
  }

  function heading(title, note, ...actions) {
    return h("div", {class: "view-head"},
      h("div", {}, h("h1", {}, title), note ? h("p", {class: "muted"}, note) : null),
      h("div", {class: "actions"}, actions));
  }

  // Teams: limits in force (config or run time) and usage this month.

  async function teamsView(root) {
    const since = monthStart();
    const until = today();
    const [teams, usage, keys] = await Promise.all([
      api("teams"), api(`usage?since=${since}&until=${until}`), api("keys"),
    ]);
    const byTeam = new Map();
    const row = (team) => {
      if (!byTeam.has(team)) byTeam.set(team, {team, limits: null, source: null, usage: null, keys: 0});
      return byTeam.get(team);
    };
    for (const t of teams.data) Object.assign(row(t.team), {limits: t.limits, source: t.source});
    for (const u of usage.data) row(u.team).usage = u;
    for (const k of keys.data) if (["active", "rotated"].includes(keyStatus(k).split(":")[0])) row(k.team).keys++;
    const rows = [...byTeam.values()].sort((a, b) => a.team.localeCompare(b.team));
    const limit = (name) => (r) => (r.limits && r.limits[name] !== null ? int(r.limits[name]) : "unlimited");
    const used = (name, fmt) => (r) => (r.usage ? fmt(r.usage[name]) : fmt(0));
    root.append(
      heading("Teams", `Limits in force and usage this month (${since} to ${until}, UTC).`,
              h("button", {type: "button", class: "primary", onclick: () => limitsDialog({kind: "team"})},
                "Set team limits")),
      table([
        {label: "Team", cell: (r) => r.team},
        {label: "Limits from", cell: (r) => (r.source === "runtime" ? "run time" : r.source || "none")},
        ...LIMITS.map(([name, label]) => ({label: SHORT[name], title: label, num: true, cell: limit(name)})),
        {label: "Keys", title: "Keys that work now", num: true, cell: (r) => int(r.keys)},
        {label: "Requests", num: true, cell: used("requests", int)},
        {label: "Upstream tokens", num: true, cell: used("upstream_tokens", int)},
        {label: "Cached tokens", num: true, cell: used("cached_tokens", int)},
        {label: "Cost", num: true, cell: used("upstream_cost_usd", usd)},
        {label: "Saved", num: true, cell: used("saved_usd", usd)},
        {label: "Actions", cell: (r) => h("div", {class: "row-actions"},
          h("button", {type: "button", onclick: () => limitsDialog({kind: "team", team: r.team, limits: r.limits})}, "Edit"),
          r.source === "runtime"
            ? h("button", {type: "button", class: "danger-quiet", onclick: () => resetTeam(r.team)}, "Reset")
            : null)},
      ], rows, "No team has limits, keys or usage yet."));
  }

  function resetTeam(team) {
    confirmDialog(`Reset the limits of ${team}?`,
      "The limits set at run time are dropped: the team's configured limits (or none) apply again.", "Reset",
      async () => {
        await api(`teams/${encodeURIComponent(team)}`, {method: "DELETE"});
        status(`Limits of ${team} reset.`);
        refresh();
      });
  }

  // Keys: never a key, only records; create, revoke, rotate, limits.

  function keyStatus(k) {
    const now = Date.now() / 1000;
    if (k.revoked) return "revoked";
    const ends = [k.expires_at, k.grace_until].filter((t) => t !== null && t !== undefined);
    if (ends.length && now >= Math.min(...ends)) return "expired";
    if (k.grace_until !== null && k.grace_until !== undefined) return "rotated: works until " + when(k.grace_until);
    return "active";
  }

  function limitsText(limits) {
    const set = LIMITS.filter(([n]) => limits[n] !== null).map(([n]) => `${n.replace(/_/g, " ")} ${int(limits[n])}`);
    return set.length ? set.join(", ") : "none";
  }

  async function keysView(root) {
    const team = keysOf;
    const all = await api("keys");
    const keys = team ? await api(`keys?team=${encodeURIComponent(team)}`) : all;
    const names = [...new Set([...all.data.map((k) => k.team), ...(team ? [team] : [])])].sort();
    const filter = h("select", {}, h("option", {value: ""}, "all teams"),
                     names.map((n) => h("option", {value: n, selected: n === team}, n)));
    filter.addEventListener("change", () => { keysOf = filter.value; refresh(); });
    const rows = keys.data.slice().sort((a, b) => b.created_at - a.created_at);
    root.append(
      heading("Keys", "Gateway keys by id: a key itself is shown once, when it is created or rotated.",
              h("button", {type: "button", class: "primary", onclick: () => newKeyDialog(team)}, "New key")),
      h("div", {class: "toolbar"}, field("Show keys of", filter)),
      table([
        {label: "ID", cell: (k) => h("code", {}, k.id)},
        {label: "Team", cell: (k) => k.team},
        {label: "Name", cell: (k) => k.name || "—"},
        {label: "Status", cell: (k) => {
          const st = keyStatus(k);
          return h("span", {class: "badge " + st.split(":")[0]}, st);
        }},
        {label: "Created (UTC)", cell: (k) => when(k.created_at, true)},
        {label: "Expires (UTC)", cell: (k) => (k.expires_at ? when(k.expires_at, true) : "never")},
        {label: "Models", wrap: true, cell: (k) => (k.models.length
          ? k.models.map((m, i) => [i ? ", " : "", h("span", {class: "nowrap"}, m)]) : "all")},
        {label: "Limits", wrap: true, cell: (k) => limitsText(k.limits)},
        {label: "Actions", cell: (k) => {
          const live = ["active", "rotated"].includes(keyStatus(k).split(":")[0]);
          return h("div", {class: "row-actions"},
            h("button", {type: "button", onclick: () => limitsDialog({kind: "key", id: k.id, limits: k.limits})}, "Limits"),
            live ? h("button", {type: "button", onclick: () => rotateDialog(k)},
                     "Rotate") : null,
            !k.revoked ? h("button", {type: "button", class: "danger-quiet", onclick: () => revokeKey(k)}, "Revoke") : null);
        }},
      ], rows, team ? `No keys for ${team}.` : "No keys yet: create one with New key."));
  }

  function revokeKey(k) {
    confirmDialog(`Revoke ${k.id}?`,
      `The key of ${k.team}${k.name ? ` (${k.name})` : ""} is refused on every instance from its next request.`,
      "Revoke", async () => {
        await api(`keys/${encodeURIComponent(k.id)}/revoke`, {method: "POST"});
        status(`${k.id} revoked.`);
        refresh();
      });
  }

  // --- dialogs -----------------------------------------------------------------------------------------------

  // A modal built when opened and removed when closed, so only the open one's fields are in the page.
  function dialog(title, build) {
    const titleId = `d${++uid}`;
    const errorEl = h("p", {class: "error", role: "alert"});
    const d = h("dialog", {"aria-labelledby": titleId});
    const close = () => { d.close(); };
    d.addEventListener("close", () => d.remove());
    const body = build({errorEl, close, dialog: d});
    d.append(h("h2", {id: titleId}, title), body);
    document.body.append(d);
    d.showModal();
    return d;
  }

  // Runs `work` for a submitted form; shows what is refused (by us or by the admin API) in the dialog.
  function submitter(form, errorEl, work) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      errorEl.textContent = "";
      const buttons = form.querySelectorAll("button");
      for (const b of buttons) b.disabled = true;
      try {
        await work();
      } catch (err) {
        errorEl.textContent = err.message;
      } finally {
        for (const b of buttons) b.disabled = false;
      }
    });
  }

  class Invalid extends Error {}

  function readLimit(input, label) {
    const v = input.value.trim();
    if (v === "") return null;
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(Number(v))) {
      throw new Invalid(`${label} must be a whole number, 0 or more (0 or empty: unlimited).`);
    }
    return Number(v) || null;
  }

  function limitInputs(limits) {
    return LIMITS.map(([name, label]) => {
      const input = h("input", {type: "text", inputmode: "numeric", name, autocomplete: "off",
                                value: limits && limits[name] !== null ? String(limits[name]) : "",
                                placeholder: "unlimited"});
      return {name, label, input, el: field(label, input)};
    });
  }

  function readLimits(inputs) {
    const out = {};
    for (const {name, label, input} of inputs) out[name] = readLimit(input, label);
    return out;
  }

  function buttons(close, submitLabel, cls) {
    return h("div", {class: "dialog-actions"},
      h("button", {type: "button", onclick: close}, "Cancel"),
      h("button", {type: "submit", class: cls || "primary"}, submitLabel));
  }

  function limitsDialog(target) {
    const isTeam = target.kind === "team";
    const title = isTeam ? (target.team ? `Limits of ${target.team}` : "Set limits") : `Limits of ${target.id}`;
    dialog(title, ({errorEl, close}) => {
      const teamInput = isTeam && !target.team
        ? h("input", {type: "text", name: "team", autocomplete: "off", spellcheck: "false"}) : null;
      const inputs = limitInputs(target.limits);
      const form = h("form", {novalidate: true},
        isTeam && !target.team ? field("Team", teamInput) : null,
        h("p", {class: "muted"}, isTeam
          ? "These replace the team's limits from the config until they are reset. 0 or empty: unlimited."
          : "A key's own limits apply on top of its team's. 0 or empty: unlimited."),
        h("div", {class: "grid2"}, inputs.map((i) => i.el)),
        errorEl, buttons(close, "Save"));
      submitter(form, errorEl, async () => {
        const team = teamInput ? teamInput.value.trim() : target.team;
        if (isTeam && !TEAM_RE.test(team)) throw new Invalid(TEAM_RULE);
        const body = readLimits(inputs);
        if (isTeam) await api(`teams/${encodeURIComponent(team)}`, {method: "PUT", body});
        else await api(`keys/${encodeURIComponent(target.id)}`, {method: "PATCH", body});
        close();
        status(isTeam ? `Limits of ${team} saved.` : `Limits of ${target.id} saved.`);
        refresh();
      });
      return form;
    });
  }

  function newKeyDialog(team) {
    dialog("New key", ({errorEl, close, dialog: d}) => {
      const teamInput = h("input", {type: "text", name: "team", value: team || "", autocomplete: "off",
                                    spellcheck: "false", required: true});
      const nameInput = h("input", {type: "text", name: "name", autocomplete: "off"});
      const modelsInput = h("input", {type: "text", name: "models", autocomplete: "off", placeholder: "all models"});
      const expiryInput = h("input", {type: "text", inputmode: "decimal", name: "expires", autocomplete: "off",
                                      placeholder: "never"});
      const inputs = limitInputs(null);
      const form = h("form", {novalidate: true},
        h("div", {class: "grid2"},
          field("Team", teamInput), field("Name", nameInput),
          field("Models", modelsInput, "Comma-separated; empty: every model."),
          field("Expires in (days)", expiryInput, `Empty: never; at most ${MAX_EXPIRY_DAYS}.`),
          inputs.map((i) => i.el)),
        errorEl, buttons(close, "Create"));
      submitter(form, errorEl, async () => {
        const t = teamInput.value.trim();
        if (!TEAM_RE.test(t)) throw new Invalid(TEAM_RULE);
        const name = nameInput.value.trim();
        const chars = [...name].length; // code points, as the API counts them (not UTF-16 units)
        if (chars > MAX_NAME_CHARS) {
          throw new Invalid(`Key names are at most ${MAX_NAME_CHARS} characters (this one has ${chars}).`);
        }
        const body = {team: t, name,
                      models: modelsInput.value.split(",").map((m) => m.trim()).filter(Boolean)};
        const days = expiryInput.value.trim();
        if (days !== "") {
          const n = Number(days);
          if (!Number.isFinite(n) || n <= 0 || n > MAX_EXPIRY_DAYS) {
            throw new Invalid(`Expires in must be a number of days above 0 and at most ${MAX_EXPIRY_DAYS}.`);
          }
          body.expires_in_s = Math.round(n * 86400);
        }
        Object.assign(body, readLimits(inputs));
        const created = await api("keys", {method: "POST", body});
        d.close();
        showKeyOnce(`Key created for ${created.team}`, created);
        refresh();
      });
      return form;
    });
  }

  function rotateDialog(k) {
    dialog(`Rotate ${k.id}`, ({errorEl, close}) => {
      const grace = h("input", {type: "text", inputmode: "decimal", name: "grace", value: "24", autocomplete: "off"});
      const form = h("form", {novalidate: true},
        h("p", {class: "muted"}, "A new key replaces this one, with the same team, name, models, limits and quota " +
          "counters. The old key keeps working for the grace period, so clients can move over."),
        field("Grace period (hours)", grace),
        errorEl, buttons(close, "Rotate"));
      submitter(form, errorEl, async () => {
        const hours = Number(grace.value.trim());
        if (grace.value.trim() === "" || !Number.isFinite(hours) || hours <= 0 || hours > MAX_GRACE_HOURS) {
          throw new Invalid(`The grace period must be a number of hours above 0 and at most ${MAX_GRACE_HOURS}.`);
        }
        const rotated = await api(`keys/${encodeURIComponent(k.id)}/rotate`, {method: "POST",
                                                                              body: {grace_s: hours * 3600}});
        close();
        showKeyOnce(`${k.id} rotated`, rotated,
                    `The old key works until ${when(rotated.previous.grace_until)}.`);
        refresh();
      });
      return form;
    });
  }

  function showKeyOnce(title, record, extra) {
    dialog(title, ({close}) => {
      const keyInput = h("input", {type: "text", readonly: true, value: record.key, class: "secret",
                                   spellcheck: "false", autocomplete: "off"});
      const copied = h("span", {class: "muted", role: "status"});
      const copy = async () => {
        keyInput.select();
        try {
          await navigator.clipboard.writeText(keyInput.value);
          copied.textContent = "Copied.";
        } catch (_) {
          copied.textContent = document.execCommand && document.execCommand("copy")
            ? "Copied." : "Selected: press Ctrl+C (or Cmd+C) to copy.";
        }
      };
      const wrap = h("div", {},
        h("p", {}, `Key ${record.id} of team ${record.team}. Copy it now: it is not shown again.`),
        field("Key", keyInput),
        h("div", {class: "copy-row"}, h("button", {type: "button", class: "primary", onclick: copy}, "Copy"), copied),
        extra ? h("p", {class: "muted"}, extra) : null,
        h("div", {class: "dialog-actions"}, h("button", {type: "button", onclick: close}, "Done")));
      return wrap;
    });
  }

  function confirmDialog(title, text, action, work) {
    dialog(title, ({errorEl, close}) => {
      const form = h("form", {novalidate: true}, h("p", {}, text), errorEl, buttons(close, action, "danger"));
      submitter(form, errorEl, async () => { await work(); close(); });
      return form;
    });
  }

  // Usage: per team, key, model or day, with a chart per day and CSV.

  async function usageView(root) {
    const st = usageState;
    const since = h("input", {type: "date", value: st.since || isoDay(new Date(Date.now() - 13 * DAY_MS))});
    const until = h("input", {type: "date", value: st.until || today()});
    const teams = await api("teams");
    const scopeTeams = new Set([...teams.data.map((t) => t.team), ...(st.team ? [st.team] : [])]);
    const scope = h("select", {}, h("option", {value: ""}, "all teams"));
    const by = h("select", {}, ["team", "key", "model", "day"].map(
      (v) => h("option", {value: v, selected: v === st.by}, v)));
    const metric = h("select", {}, [["tokens", "tokens"], ["requests", "requests"], ["money", "cost and savings"]]
      .map(([v, l]) => h("option", {value: v, selected: v === st.chart}, l)));
    const errorEl = h("p", {class: "error", role: "alert"});
    const out = h("div", {});
    const form = h("form", {class: "toolbar", novalidate: true},
      field("From", since), field("To", until), field("Scope", scope), field("Group by", by), field("Chart", metric),
      h("div", {class: "toolbar-buttons"},
        h("button", {type: "submit", class: "primary"}, "Show"),
        h("button", {type: "button", onclick: () => download().catch((e) => { errorEl.textContent = e.message; })},
          "Download CSV")));
    root.append(heading("Usage", "From the usage ledger (UTC days): what each team, key and model used, what it " +
                        "cost upstream and what the cache saved."), form, errorEl, out);

    function query(extra) {
      const q = new URLSearchParams({since: since.value, until: until.value, ...extra});
      if (scope.value) q.set("team", scope.value);
      return q;
    }
    function check() {
      if (!since.value || !until.value) throw new Invalid("Choose both dates.");
      if (until.value < since.value) throw new Invalid("'To' is before 'From'.");
    }
    async function download() {
      errorEl.textContent = "";
      check();
      const q = query({format: "csv"});
      if (by.value !== "team") q.set("by", by.value);
      const blob = await (await request("usage?" + q)).blob();
      const url = URL.createObjectURL(blob);
      const a = h("a", {href: url, download: `usage-${since.value}-${until.value}.csv`, hidden: true});
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    }
    async function load() {
      errorEl.textContent = "";
      try {
        check();
      } catch (err) {
        errorEl.textContent = err.message;
        return;
      }
      Object.assign(usageState, {since: since.value, until: until.value, team: scope.value, by: by.value,
                                 chart: metric.value});
      const grouped = query({});
      if (by.value !== "team") grouped.set("by", by.value);
      try {
        const [rows, days] = await Promise.all([api("usage?" + grouped), api("usage?" + query({by: "day"}))]);
        for (const r of rows.data) {
          if (!scopeTeams.has(r.team)) { scopeTeams.add(r.team); scope.append(h("option", {value: r.team}, r.team)); }
        }
        out.replaceChildren(totals(rows.data), chart(days.data, since.value, until.value, metric.value),
                            usageTable(rows.data, by.value));
      } catch (err) {
        errorEl.textContent = err.message;
        out.replaceChildren();
      }
    }
    for (const t of [...scopeTeams].sort()) scope.append(h("option", {value: t, selected: t === st.team}, t));
    form.addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
    metric.addEventListener("change", load);
    await load();
  }

  function totals(rows) {
    const sum = (k) => rows.reduce((a, r) => a + Number(r[k] || 0), 0);
    const tiles = [
      ["Requests", int(sum("requests"))], ["Upstream tokens", int(sum("upstream_tokens"))],
      ["Cached tokens", int(sum("cached_tokens"))], ["Cost upstream", usd(sum("upstream_cost_usd"))],
      ["Saved by the cache", usd(sum("saved_usd"))],
    ];
    return h("div", {class: "tiles"}, tiles.map(([label, value]) =>
      h("div", {class: "tile"}, h("div", {class: "tile-label"}, label), h("div", {class: "tile-value"}, value))));
  }

  function usageTable(rows, by) {
    const cols = [{label: "Team", cell: (r) => r.team}];
    if (by !== "team") cols.push({label: by[0].toUpperCase() + by.slice(1), cell: (r) => r[by]});
    cols.push(
      {label: "Requests", num: true, cell: (r) => int(r.requests)},
      {label: "Upstream tokens", num: true, cell: (r) => int(r.upstream_tokens)},
      {label: "Cached tokens", num: true, cell: (r) => int(r.cached_tokens)},
      {label: "Total tokens", num: true, cell: (r) => int(r.total_tokens)},
      {label: "Cost", num: true, cell: (r) => usd(r.upstream_cost_usd)},
      {label: "Saved", num: true, cell: (r) => usd(r.saved_usd)});
    return table(cols, rows, "No usage in this range.");
  }

  // An inline SVG bar chart, one stacked bar per day.
  function chart(rows, since, until, metric) {
    const days = [];
    for (let t = Date.parse(since + "T00:00:00Z"); t <= Date.parse(until + "T00:00:00Z"); t += DAY_MS) {
      days.push(isoDay(new Date(t)));
      if (days.length > 400) break;
    }
    const series = {
      tokens: [["upstream_tokens", "Upstream tokens", "s1"], ["cached_tokens", "Cached tokens", "s2"]],
      requests: [["requests", "Requests", "s1"]],
      money: [["upstream_cost_usd", "Cost upstream", "s1"], ["saved_usd", "Saved by the cache", "s2"]],
    }[metric];
    const fmt = metric === "money" ? usd : int;
    const values = new Map(days.map((d) => [d, series.map(() => 0)]));
    for (const r of rows) {
      const v = values.get(r.day);
      if (v) series.forEach(([k], i) => { v[i] += Number(r[k] || 0); });
    }
    const W = 960, H = 260, L = 64, R = 12, T = 12, B = 34;
    const max = Math.max(0, ...[...values.values()].map((v) => v.reduce((a, b) => a + b, 0)));
    const top = niceCeil(max);
    const step = (W - L - R) / days.length;
    const bw = Math.max(1, Math.min(48, step * 0.7));
    const y = (v) => T + (H - T - B) * (1 - (top ? v / top : 0));
    const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                          "aria-label": `${series.map((x) => x[1]).join(" and ")} per day, ${since} to ${until}`});
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4;
      svg.append(s("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}),
                 s("text", {x: L - 8, y: y(v) + 4, class: "axis", "text-anchor": "end"},
                   metric === "money" ? usd(v) : compact(v)));
    }
    const every = Math.max(1, Math.ceil(days.length / 10));
    days.forEach((d, i) => {
      const x = L + i * step + (step - bw) / 2;
      let base = 0;
      const g = s("g", {}, s("title", {}, `${d}: ` + series.map(([, label], j) =>
        `${label} ${fmt(values.get(d)[j])}`).join(", ")));
      series.forEach(([, , cls], j) => {
        const v = values.get(d)[j];
        if (v > 0) g.append(s("rect", {x, width: bw, y: y(base + v), height: Math.max(0.5, y(base) - y(base + v)),
                                       class: "bar " + cls}));
        base += v;
      });
      svg.append(g);
      if (i % every === 0) {
        svg.append(s("text", {x: x + bw / 2, y: H - B + 18, class: "axis", "text-anchor": "middle"}, d.slice(5)));
      }
    });
    svg.append(s("line", {x1: L, x2: W - R, y1: y(0), y2: y(0), class: "baseline"}));
    const legend = h("div", {class: "legend"}, series.map(([, label, cls]) =>
      h("span", {}, h("span", {class: "swatch " + cls}), label)));
    return h("figure", {class: "card chart-card"}, svg, legend);
  }

  function niceCeil(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  // Cache: what GET /admin/cache reports (entries, memory, hit ratios, purge generations); Purge per model.

  const percent = (v) => (v === null || v === undefined ? "—" : (v * 100).toFixed(1) + "%");
  const memory = (n) => (n === null || n === undefined ? "—" : bytes(n));

  async function cacheView(root) {
    root.append(heading("Cache", "Entries and memory of the cache's Redis, hit ratios, and purges per model.",
      h("button", {type: "button", onclick: refresh}, "Refresh")));
    const c = await api("cache");
    const p = c.process || {};
    const tile = ([label, value, title]) => h("div", {class: "tile", title},
      h("div", {class: "tile-label"}, label), h("div", {class: "tile-value"}, value));
    root.append(h("div", {class: "tiles"}, [
      ["Entries", (c.estimated ? "≈ " : "") + int(c.entries),
       c.estimated ? "Estimated from a sample of random keys" : "Counted"],
      ["Memory", memory(c.memory_bytes), "Used by the cache's Redis servers (INFO memory)"],
      ["Hit ratio today", percent(c.hit_ratio), `Share of tokens served from the cache on ${c.day} (UTC), ` +
       "every instance, from the usage ledger"],
      ["Hit ratio here", percent(p.hit_ratio), `Lookups answered from the cache by process ${p.pid} since it ` +
       "started"],
      ["In-process tier", `${memory(p.local_bytes)} / ${memory(p.local_max_bytes)}`,
       `${int(p.local_entries)} entries in process ${p.pid}`],
    ].map(tile)));
    root.append(h("h2", {}, "Models"),
      h("p", {class: "muted"}, "A purge makes every proxy stop serving the model's cached vectors within seconds: " +
        "they are asked of the upstream again (and paid for). Entries per model are not known: keys are hashes."),
      table([
        {label: "Model", cell: (m) => m.model},
        {label: "Generation", num: true, title: "Purges so far", cell: (m) => int(m.generation)},
        ...(c.scope === "team" ? [{label: "Team purges", wrap: true, cell: (m) => Object.entries(
          m.team_generations || {}).map(([t, n]) => `${t}: ${n}`).join(", ") || "—"}] : []),
        {label: "Cached tokens today", num: true, cell: (m) => int(m.cached_tokens)},
        {label: "Tokens today", num: true, cell: (m) => int(m.total_tokens)},
        {label: "Hit ratio today", num: true, cell: (m) => percent(m.hit_ratio)},
        {label: "Actions", cell: (m) => h("div", {class: "row-actions"},
          h("button", {type: "button", class: "danger-quiet", onclick: () => purgeDialog(m.model, c.scope)},
            "Purge"))},
      ], c.models, "No models are configured."),
      h("h2", {}, "Redis servers"),
      table([
        {label: "Store", cell: (r) => r.store},
        {label: "Node", cell: (r) => r.node || "—"},
        {label: "Keys", num: true, cell: (r) => int(r.keys)},
        {label: "Cache entries", num: true, cell: (r) => (r.estimated ? "≈ " : "") + int(r.entries)},
        {label: "Memory", num: true, cell: (r) => memory(r.memory_bytes)},
        {label: "Max memory", num: true, cell: (r) => memory(r.maxmemory_bytes)},
        {label: "Policy", cell: (r) => r.maxmemory_policy || "—"},
        {label: "Evicted keys", num: true, cell: (r) => int(r.evicted_keys)},
      ], c.stores, "No Redis server answered."));
    if (c.teams) {
      root.append(h("h2", {}, "Entries per team"),
        table([{label: "Team", cell: (t) => t.team}, {label: "Cache entries", num: true, cell: (t) => int(t.entries)}],
              c.teams, "No entries yet."));
    }
  }

  function purgeDialog(model, scope) {
    dialog(`Purge ${model}?`, ({errorEl, close}) => {
      const teamInput = scope === "team"
        ? h("input", {type: "text", name: "team", autocomplete: "off", spellcheck: "false", placeholder: "every team"})
        : null;
      const form = h("form", {novalidate: true},
        h("p", {}, `Every proxy stops serving the cached vectors of ${model} within seconds; each is fetched from ` +
          "the upstream again when next asked for. The old entries are not deleted: they leave Redis by TTL or " +
          "eviction."),
        teamInput ? field("Team", teamInput, "Only this team's entries; empty: every team's.")
          : h("p", {class: "muted"}, "The cache is shared by every team: the purge covers them all."),
        errorEl, buttons(close, "Purge", "danger"));
      submitter(form, errorEl, async () => {
        const team = teamInput ? teamInput.value.trim() : "";
        if (team && !TEAM_RE.test(team)) throw new Invalid(TEAM_RULE);
        const done = await api("cache/purge", {method: "POST", body: team ? {model, team} : {model}});
        close();
        await refresh(); // the view clears the status line: say it after
        status(`${model}${team ? ` (team ${team})` : ""} purged: generation ${done.generation}.`);
      });
      return form;
    });
  }

  // Upstreams: each deployment's state in the worker that answered; a proxy without the endpoint says so.

  const STATES = {healthy: "healthy", cooling_down: "cooling down", paused: "paused"};
  function clock(ts) {
    if (ts === null || ts === undefined) return "—";
    const d = new Date(ts * 1000);
    const time = d.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false});
    return d.toDateString() === new Date().toDateString() ? time : `${d.toLocaleDateString()} ${time}`;
  }
  const resets = (ts) => (ts === null || ts === undefined ? null : `Resets at ${clock(ts)}`);

  async function upstreamsView(root) {
    root.append(heading("Upstreams", "The upstream deployments and their health.",
      h("button", {type: "button", onclick: refresh}, "Refresh")));
    let body;
    try {
      body = await api("upstreams");
    } catch (err) {
      if (err.status === 404) {
        root.append(h("p", {class: "card notice"},
          "Upstream health comes with the upstream fleet: this proxy has no GET /admin/upstreams yet."));
        return;
      }
      throw err;
    }
    // out of rotation until the later of the two (a cooldown and a 429's pause can overlap)
    const until = (d) => {
      const ends = [d.cooling_down_until, d.paused_until].filter((t) => t !== null && t !== undefined);
      return ends.length ? Math.max(...ends) : null;
    };
    root.append(
      h("p", {class: "muted"},
        `Answered by process ${body.pid} (each worker keeps its own deployment state)`),
      table([
        {label: "Model", cell: (d) => d.model},
        {label: "Upstream", title: "The deployment, and the model it is asked for when that differs",
         cell: (d) => [d.upstream, d.upstream_model && d.upstream_model !== d.model
           ? h("span", {class: "sub"}, d.upstream_model) : null]},
        {label: "Kind", cell: (d) => d.kind},
        {label: "Weight", num: true, cell: (d) => int(d.weight)},
        {label: "Priority", num: true, cell: (d) => int(d.priority)},
        {label: "State", cell: (d) => h("span", {class: `badge ${d.state.replace(/_/g, "-")}`},
                                        STATES[d.state] || d.state)},
        {label: "Until", title: "Cooling down or paused until (local time)", cell: (d) => clock(until(d))},
        {label: "Consecutive failures", num: true, cell: (d) =>
          h("span", {title: `${int(d.cooldowns)} cooldowns since the process started`}, int(d.consecutive_failures))},
        {label: "Last error", wrap: true, cell: (d) => (d.last_error
          ? h("span", {title: `At ${clock(d.last_error_at)}`}, d.last_error) : "—")},
        {label: "Remaining requests", num: true, title: "By the upstream's rate-limit headers",
         cell: (d) => h("span", {title: resets(d.requests_reset_at)}, int(d.remaining_requests))},
        {label: "Remaining tokens", num: true, title: "By the upstream's rate-limit headers",
         cell: (d) => h("span", {title: resets(d.tokens_reset_at)}, int(d.remaining_tokens))},
      ], body.data, "No upstream deployments are configured."));
  }

  // --- start -------------------------------------------------------------------------------------------------

  const saved = sessionStorage.getItem(STORAGE_KEY);
  if (saved) {
    signIn(saved).catch((err) => {
      // Only a refusal of the key itself signs out (401: wrong key; 403: the admin API is off or it is no admin
      // key). Anything else (a 503 while Redis is down, the proxy restarting) keeps it: reload to try again.
      if (err.status === 401 || err.status === 403) signOut(err.message);
      else document.getElementById("sign-in-error").textContent = err.message;
    });
  } else {
    document.getElementById("admin-key").focus();
  }
})();
