// Usage: per team, key, model or day, with totals, a chart per day (chart.js) and CSV. Its filters are its
// address: `#/usage?team=ads&from=2026-11-01&to=2026-11-14&by=key&chart=money` (no dates: the last 14 days).

import {api, request} from "./api.js";
import {chart} from "./chart.js";
import {Invalid} from "./dialogs.js";
import {field, h, heading, table} from "./dom.js";
import {DAY_MS, int, isDay, isoDay, micros, money, moneyOfMicros, today} from "./format.js";
import {go, loadInto} from "./view.js";

const GROUPS = ["team", "key", "model", "day"];
const CHARTS = [["tokens", "tokens"], ["requests", "requests"], ["money", "cost and savings"]];

export async function usageView(root, params) {
  const pick = (name, allowed, fallback) => (allowed.includes(params.get(name)) ? params.get(name) : fallback);
  const st = {
    from: params.get("from") || isoDay(new Date(Date.now() - 13 * DAY_MS)), to: params.get("to") || today(),
    team: params.get("team") || "", by: pick("by", GROUPS, "team"), chart: pick("chart", CHARTS.map((c) => c[0]),
                                                                                 "tokens"),
  };
  const day = (value) => h("input", {type: "text", inputmode: "numeric", value, placeholder: "YYYY-MM-DD",
                                     autocomplete: "off", spellcheck: "false", maxlength: 10});
  const since = day(st.from);
  const until = day(st.to);
  const scope = h("select", {}, h("option", {value: ""}, "all teams"));
  const by = h("select", {}, GROUPS.map((v) => h("option", {value: v, selected: v === st.by}, v)));
  const metric = h("select", {}, CHARTS.map(([v, l]) => h("option", {value: v, selected: v === st.chart}, l)));
  const errorEl = h("p", {class: "error", role: "alert"});
  const out = h("div", {});
  const form = h("form", {class: "toolbar", novalidate: true},
    field("From", since), field("To", until), field("Scope", scope),
    field("Group by", by), field("Chart", metric),
    h("div", {class: "toolbar-buttons"},
      h("button", {type: "submit", class: "primary"}, "Show"),
      h("button", {type: "button", onclick: () => download().catch((e) => { errorEl.textContent = e.message; })},
        "Download CSV")));
  root.append(heading("Usage", "From the usage ledger, by UTC day (YYYY-MM-DD, both days included): what each " +
                      "team, key and model used, what it cost upstream and what the cache saved."), form, errorEl, out);

  const teams = new Set(st.team ? [st.team] : []);
  const options = () => scope.replaceChildren(h("option", {value: ""}, "all teams"),
    ...[...teams].sort().map((t) => h("option", {value: t, selected: t === st.team}, t)));
  options();

  function query(extra) {
    const q = new URLSearchParams({since: since.value.trim(), until: until.value.trim(), ...extra});
    if (scope.value) q.set("team", scope.value);
    return q;
  }
  function check() {
    const [a, b] = [since.value.trim(), until.value.trim()];
    if (!isDay(a) || !isDay(b)) throw new Invalid("Dates are UTC days written YYYY-MM-DD, such as 2026-11-30.");
    if (b < a) throw new Invalid("'To' is before 'From'.");
  }
  async function download() {
    errorEl.textContent = "";
    check();
    const q = query({format: "csv"});
    if (by.value !== "team") q.set("by", by.value);
    const blob = await (await request("usage?" + q)).blob();
    const url = URL.createObjectURL(blob);
    const a = h("a", {href: url, download: `usage-${since.value.trim()}-${until.value.trim()}.csv`, hidden: true});
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }
  // Show, or a new chart: the filters become the address (a history entry), which draws the screen again.
  const show = () => go("usage", {team: scope.value, from: since.value.trim(), to: until.value.trim(),
                                  by: by.value === "team" ? "" : by.value,
                                  chart: metric.value === "tokens" ? "" : metric.value});
  form.addEventListener("submit", (ev) => { ev.preventDefault(); show(); });
  metric.addEventListener("change", show);

  try {
    check();
  } catch (err) {
    errorEl.textContent = err.message;
    return;
  }
  await loadInto(out, "The usage report", async () => {
    // one report: its rows and, from the same reads, its rows by day for the chart (daily=1)
    const grouped = query({daily: "1"});
    if (st.by !== "team") grouped.set("by", st.by);
    const [rows, known] = await Promise.all([api("usage?" + grouped), api("teams")]);
    for (const r of [...known.data, ...rows.data]) teams.add(r.team);
    options();
    out.append(totals(rows.data), chart(rows.daily, st.from, st.to, st.chart, out),
               usageTable(rows.data, st.by));
  });
}

function totals(rows) {
  const sum = (k) => rows.reduce((a, r) => a + Number(r[k] || 0), 0);
  const usd = (k) => moneyOfMicros(rows.reduce((a, r) => a + micros(r[k]), 0));
  const tiles = [
    ["Requests", int(sum("requests"))], ["Upstream tokens", int(sum("upstream_tokens"))],
    ["Cached tokens", int(sum("cached_tokens"))], ["Cost upstream", usd("upstream_cost_usd")],
    ["Saved by the cache", usd("saved_usd")],
  ];
  return h("div", {class: "tiles"}, tiles.map(([label, value]) =>
    h("div", {class: "tile"}, h("div", {class: "tile-label"}, label), h("div", {class: "tile-value"}, value))));
}

function usageTable(rows, by) {
  const cols = [{label: "Team", cell: (r) => r.team}];
  if (by === "key") {
    // the key's name beside its id (the team is the row's header); "—" for a key without a name, or whose record
    // is gone (key_name null)
    cols.push({label: "Key", cell: (r) => h("code", {}, r.key)},
              {label: "Name", wrap: true, cell: (r) => (r.key_name ? h("span", {class: "clamp", title: r.key_name},
                                                                         r.key_name) : "—")});
  }
  else if (by !== "team") cols.push({label: by[0].toUpperCase() + by.slice(1), wrap: by === "model",
                                     cell: (r) => r[by]});
  cols.push(
    {label: "Requests", num: true, cell: (r) => int(r.requests)},
    {label: "Upstream tokens", num: true, cell: (r) => int(r.upstream_tokens)},
    {label: "Cached tokens", num: true, cell: (r) => int(r.cached_tokens)},
    {label: "Total tokens", num: true, cell: (r) => int(r.total_tokens)},
    {label: "Cost", num: true, cell: (r) => money(r.upstream_cost_usd)},
    {label: "Saved", num: true, cell: (r) => money(r.saved_usd)});
  return table(cols, rows, "No usage in this range.");
}
