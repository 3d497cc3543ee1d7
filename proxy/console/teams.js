// Teams: limits in force (config or run time) and usage this month.

import {api} from "./api.js";
import {confirmDialog} from "./dialogs.js";
import {h, heading, notice, table} from "./dom.js";
import {int, money, monthStart, today} from "./format.js";
import {allTeams} from "./keys.js";
import {limitsCell, limitsDialog} from "./limits.js";
import {address, loadInto, refresh} from "./view.js";
import {can} from "./who.js";

const SOURCES = {config: "from the config", runtime: "set at run time"};

export async function teamsView(root) {
  const since = monthStart();
  const until = today();
  const box = h("div", {});
  root.append(
    heading("Teams", `Limits in force and usage this month (${since} to ${until}, UTC).`,
            can("update teams")
              ? h("button", {type: "button", class: "primary", onclick: () => limitsDialog({kind: "team"})},
                  "Set team limits") : null),
    box);
  await loadInto(box, "The teams", async () => {
    const [teams, usage] = await Promise.all([allTeams(), api(`usage?since=${since}&until=${until}`)]);
    box.append(teamsTable(teams, usage.data));
  });
}

// Each team's working keys are counted by the server, from the team's index (no key is fetched to count them).
function teamsTable(teams, usage) {
  const byTeam = new Map();
  const row = (team) => {
    if (!byTeam.has(team)) byTeam.set(team, {team, limits: null, source: null, usage: null, keys: 0});
    return byTeam.get(team);
  };
  for (const t of teams) Object.assign(row(t.team), {limits: t.limits, source: t.source, keys: t.keys});
  for (const u of usage) row(u.team).usage = u;
  const rows = [...byTeam.values()].sort((a, b) => a.team.localeCompare(b.team));
  const used = (name, fmt) => (r) => fmt(r.usage ? r.usage[name] : 0);
  return table([
    {label: "Team", cell: (r) => r.team},
    {label: "Limits", wrap: true, title: "Limits in force, and where they come from",
     cell: (r) => [limitsCell(r.limits), SOURCES[r.source] ? h("span", {class: "sub"}, SOURCES[r.source]) : null]},
    {label: "Keys", title: "Keys that work now", num: true,
     cell: (r) => h("a", {href: address("keys", {team: r.team}), title: `The keys of ${r.team}`}, int(r.keys))},
    {label: "Requests", num: true, cell: used("requests", int)},
    {label: "Upstream tokens", num: true, cell: used("upstream_tokens", int)},
    {label: "Cached tokens", num: true, cell: used("cached_tokens", int)},
    {label: "Cost", num: true, cell: used("upstream_cost_usd", money)},
    {label: "Saved", num: true, cell: used("saved_usd", money)},
    {label: "Actions", actions: true, cell: (r) => h("div", {class: "row-actions"},
      can("update teams")
        ? h("button", {type: "button", onclick: () => limitsDialog({kind: "team", team: r.team, limits: r.limits})},
            "Edit") : null,
      r.source === "runtime" && can("delete teams")
        ? h("button", {type: "button", class: "danger-quiet", onclick: () => resetTeam(r.team)}, "Reset")
        : null,
      can("list usage") ? h("a", {href: address("usage", {team: r.team}), class: "button-link"}, "Usage") : null)},
  ], rows, "No team has limits, keys or usage yet.");
}

function resetTeam(team) {
  confirmDialog(`Reset the limits of ${team}?`,
    "The limits set at run time are dropped: the team's configured limits (or none) apply again.", "Reset",
    async () => {
      await api(`teams/${encodeURIComponent(team)}`, {method: "DELETE"});
      notice(`Limits of ${team} reset: the configured limits (or none) apply again.`);
      refresh();
    });
}
