// Keys: never a key, only records; create, revoke, rotate, limits. A new key is shown once, in a dialog.

import {api, everyPage} from "./api.js";
import {buttons, confirmDialog, dialog, Invalid, submitter} from "./dialogs.js";
import {field, h, heading, notice, table} from "./dom.js";
import {when, whenCell} from "./format.js";
import {limitInputs, limitsCell, limitsDialog, readLimits, TEAM_RE, TEAM_RULE} from "./limits.js";
import {go, loadInto, refresh} from "./view.js";
import {can} from "./who.js";

const MAX_NAME_CHARS = 200; // keys.py MAX_NAME_CHARS
const MAX_EXPIRY_DAYS = 3650; // keep in step with the admin API's bound on expires_in_s
const MAX_GRACE_HOURS = 24 * 3650;

// One word per state, the CLI's too (`keys list`, `keys show`): active, rotated (the old key of a rotation, which
// works until `until`), expired, revoked.
export function keyStatus(k) {
  const now = Date.now() / 1000;
  if (k.revoked) return {word: "revoked"};
  const ends = [k.expires_at, k.grace_until].filter((t) => t !== null && t !== undefined);
  if (ends.length && now >= Math.min(...ends)) return {word: "expired"};
  if (k.grace_until !== null && k.grace_until !== undefined) return {word: "rotated", until: k.grace_until};
  return {word: "active"};
}

const PAGE = 100; // keys per page: the admin API's default, and far fewer rows than a big deployment has keys

// The teams to choose from, by name (teams with limits or keys: GET /admin/teams, a page of 1000 at a time).
export const allTeams = () => everyPage("teams");

// Filters: `#/keys?team=ads&q=batch`. Newest first, a page at a time (Load more); the search runs on the server
// (the name contains it, or the id starts with it), which may answer a short page with more to read after it.
export async function keysView(root, params) {
  const team = params.get("team") || "";
  const q = params.get("q") || "";
  const filter = h("select", {}, h("option", {value: ""}, "all teams"),
                   team ? h("option", {value: team, selected: true}, team) : null);
  filter.addEventListener("change", () => go("keys", {team: filter.value, q}));
  const search = h("input", {type: "search", name: "q", value: q, autocomplete: "off", spellcheck: "false",
                             placeholder: "name or key_..."});
  const form = h("form", {class: "toolbar", role: "search", novalidate: true},
    field("Show keys of", filter), field("Search keys", search),
    h("div", {class: "toolbar-buttons"}, h("button", {type: "submit"}, "Search")));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    go("keys", {team, q: search.value.trim()});
  });
  const box = h("div", {});
  root.append(
    heading("Keys", "Gateway keys by id, newest first: a key itself is shown once, when it is created or rotated.",
            can("create keys")
              ? h("button", {type: "button", class: "primary", onclick: () => newKeyDialog(team)}, "New key")
              : null),
    form, box);
  const query = `keys?order=desc&limit=${PAGE}${team ? `&team=${encodeURIComponent(team)}` : ""}` +
                (q ? `&q=${encodeURIComponent(q)}` : "");
  const rows = [];
  const show = (page) => {
    rows.push(...page.data);
    const empty = q ? `No key matches “${q}”.`
      : team ? `No keys for ${team}.` : "No keys yet: create one with New key.";
    const more = page.has_more
      ? h("button", {type: "button", onclick: async (e) => {
        e.target.disabled = true;
        try {
          show(await api(`${query}&after=${encodeURIComponent(page.next_cursor)}`));
        } catch (err) {
          e.target.disabled = false;
          notice(`More keys could not be loaded: ${err.message}`);
        }
      }}, "Load more") : null;
    const shown = `${rows.length} key${rows.length === 1 ? "" : "s"} shown${more ? "; more after them" : ""}.`;
    box.replaceChildren(rows.length || !more ? keysTable(rows, empty) : h("p", {class: "empty"}, "No match yet."),
                        h("div", {class: "pager"}, h("span", {class: "muted"}, shown), more));
  };
  await loadInto(box, "The keys", async () => {
    const [teams, first] = await Promise.all([allTeams(), api(query)]);
    const names = [...new Set([...teams.map((t) => t.team), ...(team ? [team] : [])])].sort();
    filter.replaceChildren(h("option", {value: ""}, "all teams"),
                           ...names.map((n) => h("option", {value: n, selected: n === team}, n)));
    show(first);
  });
}

function keysTable(rows, empty) {
  return table([
    {label: "ID", cell: (k) => h("code", {}, k.id)},
    {label: "Team", wrap: true, cls: "team", cell: (k) => k.team},
    {label: "Name", wrap: true, cell: (k) => (k.name ? h("span", {class: "clamp", title: k.name}, k.name) : "—")},
    {label: "Status", wrap: true, cell: (k) => {
      const st = keyStatus(k);
      return [h("span", {class: "badge " + st.word}, st.word),
              st.until ? h("span", {class: "sub"}, "works until ", whenCell(st.until)) : null];
    }},
    {label: "Created", wrap: true, cell: (k) => whenCell(k.created_at)},
    {label: "Expires", wrap: true, cell: (k) => (k.expires_at ? whenCell(k.expires_at) : "never")},
    {label: "Models", wrap: true, cell: (k) => (k.models.length
      ? k.models.map((m, i) => [i ? ", " : "", h("span", {class: "nowrap"}, m)]) : "all")},
    {label: "Limits", wrap: true, cell: (k) => limitsCell(k.limits)},
    {label: "Actions", actions: true, cell: (k) => {
      const live = ["active", "rotated"].includes(keyStatus(k).word);
      return h("div", {class: "row-actions"},
        can("update keys")
          ? h("button", {type: "button", onclick: () => limitsDialog({kind: "key", id: k.id, limits: k.limits})},
              "Limits") : null,
        live && can("rotate keys") ? h("button", {type: "button", onclick: () => rotateDialog(k)}, "Rotate") : null,
        !k.revoked && can("revoke keys")
          ? h("button", {type: "button", class: "danger-quiet", onclick: () => revokeKey(k)}, "Revoke") : null);
    }},
  ], rows, empty);
}

function revokeKey(k) {
  confirmDialog(`Revoke ${k.id}?`,
    `The key of ${k.team}${k.name ? ` (${k.name})` : ""} is refused on every instance from its next request.`,
    "Revoke", async () => {
      await api(`keys/${encodeURIComponent(k.id)}/revoke`, {method: "POST"});
      notice(`${k.id} revoked: refused on every instance from its next request.`);
      refresh();
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
      notice(`Key ${created.id} created for ${created.team}.`);
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
      const until = when(rotated.previous.grace_until);
      notice(`${k.id} rotated: its replacement is ${rotated.id}; the old key works until ${until}.`);
      showKeyOnce(`${k.id} rotated`, rotated, `The old key works until ${until}.`);
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
