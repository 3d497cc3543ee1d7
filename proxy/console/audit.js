// Audit: GET /admin/audit, newest first: who changed what (or was refused), how, when and from where; CSV too.
// Its filters are its address: `#/audit?from=2026-11-01&to=2026-11-07&actor=ads-lead&team=ads&action=keys` (no
// dates: the last 7 days).

import {api, request} from "./api.js";
import {Invalid} from "./dialogs.js";
import {field, h, heading, table} from "./dom.js";
import {DAY_MS, isDay, isoDay, today, whenCell} from "./format.js";
import {go, loadInto} from "./view.js";

// The fields of a value, flattened ("limits.rpm"), without the empty ones and those the row shows already.
const SHOWN = new Set(["id", "team", "created_at", "lineage", "name"]);
function flat(v, prefix, out) {
  if (v === null || v === undefined || (Array.isArray(v) && !v.length)) return out;
  if (typeof v === "object" && !Array.isArray(v)) {
    for (const [k, x] of Object.entries(v)) if (prefix || !SHOWN.has(k)) flat(x, prefix + k + ".", out);
  } else {
    out[prefix.slice(0, -1)] = Array.isArray(v) ? v.join(", ") : String(v);
  }
  return out;
}

// What changed, in words: "limits.rpm: 5 → 7"; a creation lists what was set; a refusal says why.
function change(e) {
  if (e.outcome !== "ok") return e.reason || "—";
  const before = flat(e.before, "", {});
  const after = flat(e.after, "", {});
  const keys = [...new Set([...Object.keys(before), ...Object.keys(after)])].filter((k) => before[k] !== after[k]);
  if (!keys.length) return "—";
  return keys.map((k) => (e.before === null || e.before === undefined
    ? `${k}: ${after[k]}` : `${k}: ${before[k] ?? "none"} → ${after[k] ?? "none"}`)).join("; ");
}

export async function auditView(root, params) {
  const st = {from: params.get("from") || isoDay(new Date(Date.now() - 6 * DAY_MS)), to: params.get("to") || today(),
              actor: params.get("actor") || "", team: params.get("team") || "", action: params.get("action") || ""};
  const day = (value) => h("input", {type: "text", inputmode: "numeric", value, placeholder: "YYYY-MM-DD",
                                     autocomplete: "off", spellcheck: "false", maxlength: 10});
  const since = day(st.from);
  const until = day(st.to);
  const text = (name, value, placeholder) => h("input", {type: "text", name, value, autocomplete: "off",
                                                         spellcheck: "false", placeholder});
  const actor = text("actor", st.actor, "anyone");
  const team = text("team", st.team, "every team");
  const action = text("action", st.action, "keys, keys.revoke, ...");
  const errorEl = h("p", {class: "error", role: "alert"});
  const out = h("div", {});
  const form = h("form", {class: "toolbar", novalidate: true},
    field("From", since), field("To", until), field("Actor", actor), field("Team", team), field("Action", action),
    h("div", {class: "toolbar-buttons"},
      h("button", {type: "submit", class: "primary"}, "Show"),
      h("button", {type: "button", onclick: () => download().catch((e) => { errorEl.textContent = e.message; })},
        "Download CSV")));
  root.append(heading("Audit", "Every admin change and every refusal, newest first (UTC days, YYYY-MM-DD, both " +
                      "included): who, how, what, before and after. Never a key or a credential."),
              form, errorEl, out);

  function check() {
    const [a, b] = [since.value.trim(), until.value.trim()];
    if (!isDay(a) || !isDay(b)) throw new Invalid("Dates are UTC days written YYYY-MM-DD, such as 2026-11-30.");
    if (b < a) throw new Invalid("'To' is before 'From'.");
  }
  function query(extra) {
    const q = new URLSearchParams({since: since.value.trim(), until: until.value.trim(), ...extra});
    for (const [name, input] of [["actor", actor], ["team", team], ["action", action]]) {
      if (input.value.trim()) q.set(name, input.value.trim());
    }
    return q;
  }
  async function download() {
    errorEl.textContent = "";
    check();
    const blob = await (await request("audit?" + query({format: "csv"}))).blob();
    const url = URL.createObjectURL(blob);
    const a = h("a", {href: url, download: `audit-${since.value.trim()}-${until.value.trim()}.csv`, hidden: true});
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
  // Show: the filters become the address (a history entry), which draws the screen again.
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    go("audit", {from: since.value.trim(), to: until.value.trim(), actor: actor.value.trim(),
                 team: team.value.trim(), action: action.value.trim()});
  });

  try {
    check();
  } catch (err) {
    errorEl.textContent = err.message;
    return;
  }
  await loadInto(out, "The audit log", async () => {
    const entries = (await api("audit?" + query({}))).data;
    out.append(auditTable(entries));
  });
}

function auditTable(entries) {
  return table([
    {label: "Time", wrap: true, cell: (e) => whenCell(e.ts, true)},
    {label: "Actor", wrap: true, cell: (e) => (e.email ? `${e.actor} (${e.email})` : e.actor || "—")},
    {label: "How", cell: (e) => e.how},
    {label: "Action", cell: (e) => h("code", {}, e.action)},
    {label: "Outcome", cell: (e) => h("span", {class: "badge " + (e.outcome === "ok" ? "active" : "revoked")},
                                      e.outcome)},
    {label: "Team", wrap: true, cls: "team", cell: (e) => e.team || "—"},
    {label: "Target", wrap: true, cell: (e) => e.key_id || e.model || e.admin || "—"},
    {label: "Change", wrap: true, cell: (e) => h("span", {class: "change"}, change(e))},
    {label: "Client", cell: (e) => e.client || "—"},
  ], entries, "No audit entries in this range.");
}
