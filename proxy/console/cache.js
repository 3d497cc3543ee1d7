// Cache: what GET /admin/cache reports (entries, memory, hit ratios, purge generations); Purge per model. When the
// report cannot be had (it reads both stores), the screen still says which store answers, by GET /readyz.

import {api, readiness} from "./api.js";
import {buttons, dialog, Invalid, submitter} from "./dialogs.js";
import {field, h, heading, notice, table} from "./dom.js";
import {bytes, int} from "./format.js";
import {TEAM_RE, TEAM_RULE} from "./limits.js";
import {loadInto, refresh} from "./view.js";
import {can} from "./who.js";

const percent = (v) => (v === null || v === undefined ? "—" : (v * 100).toFixed(1) + "%");
const memory = (n) => (n === null || n === undefined ? "—" : bytes(n));

export async function cacheView(root) {
  const box = h("div", {});
  root.append(heading("Cache", "Entries and memory of the cache's Redis, hit ratios, and purges per model.",
    h("button", {type: "button", onclick: refresh}, "Refresh")), box);
  await loadInto(box, "The cache report", async () => report(box, await api("cache")), storesAnswering);
}

// Each store as the proxy's readiness probe sees it: the cache store's state is known while the state store is down.
async function storesAnswering() {
  const r = await readiness();
  if (!r || !r.redis) return null;
  const said = (v) => ({ok: "answers", embedded: "in the process (embedded)"}[v] || "unreachable");
  const lines = r.cache_redis === undefined
    ? [["The state and cache store (REDIS_URL)", said(r.redis)]]
    : [["The key and quota store (REDIS_URL)", said(r.redis)],
       ["The cache store (CACHE_REDIS_URL)", said(r.cache_redis)]];
  return h("div", {class: "stores-state"},
    h("p", {class: "muted"}, "By the proxy's readiness probe (GET /readyz):"),
    h("ul", {}, lines.map(([store, state]) => h("li", {}, `${store}: `, h("strong", {}, state)))));
}

function report(root, c) {
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
      {label: "Actions", actions: true, cell: (m) => h("div", {class: "row-actions"},
        can("purge cache")
          ? h("button", {type: "button", class: "danger-quiet", onclick: () => purgeDialog(m.model, c.scope)},
              "Purge") : null)},
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
      notice(`${model}${team ? ` (team ${team})` : ""} purged: generation ${done.generation}.`);
      refresh();
    });
    return form;
  });
}
