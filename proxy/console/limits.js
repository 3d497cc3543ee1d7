// Limits of a team or a key: the four counters, their form fields and checks, and the Limits dialog.

import {api} from "./api.js";
import {buttons, dialog, Invalid, submitter} from "./dialogs.js";
import {field, h, notice} from "./dom.js";
import {int} from "./format.js";
import {refresh} from "./view.js";

export const TEAM_RE = /^[a-z0-9][a-z0-9_.-]{0,62}$/;
export const TEAM_RULE = "Team names are 1-63 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit.";

export const LIMITS = [
  ["rpm", "Requests per minute"],
  ["tpm", "Tokens per minute"],
  ["tokens_per_day", "Tokens per day"],
  ["tokens_per_month", "Tokens per month"],
];

function readLimit(input, label) {
  const v = input.value.trim();
  if (v === "") return null;
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(Number(v))) {
    throw new Invalid(`${label} must be a whole number, 0 or more (0 or empty: unlimited).`);
  }
  return Number(v) || null;
}

export function limitInputs(limits) {
  return LIMITS.map(([name, label]) => {
    const input = h("input", {type: "text", inputmode: "numeric", name, autocomplete: "off",
                              value: limits && limits[name] !== null ? String(limits[name]) : "",
                              placeholder: "unlimited"});
    return {name, label, input, el: field(label, input)};
  });
}

export function readLimits(inputs) {
  const out = {};
  for (const {name, label, input} of inputs) out[name] = readLimit(input, label);
  return out;
}

const limitParts = (limits) => LIMITS.filter(([n]) => limits && limits[n] !== null && limits[n] !== undefined)
  .map(([n]) => [n.replace(/_/g, " "), int(limits[n])]);
// "rpm 600, tpm 1,000,000", or "unlimited" (the CLI's word too) when none is set.
export function limitsText(limits) {
  return limitParts(limits).map(([n, v]) => `${n} ${v}`).join(", ") || "unlimited";
}
// The same for a table cell: each number kept whole, so a narrow column breaks between words.
export function limitsCell(limits) {
  const parts = limitParts(limits);
  return parts.length
    ? parts.map(([n, v], i) => [i ? ", " : "", n, " ", h("span", {class: "nowrap"}, v)]) : "unlimited";
}

export function limitsDialog(target) {
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
      notice(`Limits of ${isTeam ? team : target.id} saved: ${limitsText(body)}.`);
      refresh();
    });
    return form;
  });
}
