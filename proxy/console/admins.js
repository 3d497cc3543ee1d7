// Admins: named admin credentials (GET/POST /admin/admins): who may use the admin API and with which role. A new
// credential is shown once, in a dialog; revoking one refuses it everywhere from its next request.

import {api, everyPage} from "./api.js";
import {buttons, confirmDialog, dialog, Invalid, submitter} from "./dialogs.js";
import {field, h, heading, notice, table} from "./dom.js";
import {whenCell} from "./format.js";
import {TEAM_RE, TEAM_RULE} from "./limits.js";
import {loadInto, refresh} from "./view.js";
import {can} from "./who.js";

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/;
const ROLES = [["viewer", "viewer: reads only"], ["team", "team admin: its teams' keys"],
               ["platform", "platform admin: everything"]];

export async function adminsView(root) {
  const box = h("div", {});
  root.append(
    heading("Admins", "Named admin credentials and their roles; PROXY_ADMIN_KEY stays the bootstrap (root).",
            can("create admins")
              ? h("button", {type: "button", class: "primary", onclick: newAdminDialog}, "New admin") : null),
    box);
  await loadInto(box, "The admins", async () => {
    box.append(adminsTable(await everyPage("admins")));
  });
}

function adminsTable(admins) {
  return table([
    {label: "Name", wrap: true, cell: (a) => a.name},
    {label: "Role", cell: (a) => a.role},
    {label: "Teams", wrap: true, cls: "team", cell: (a) => (a.teams.length ? a.teams.join(", ") : "all")},
    {label: "Status", cell: (a) => h("span", {class: "badge " + (a.revoked ? "revoked" : "active")},
                                     a.revoked ? "revoked" : "active")},
    {label: "Created", wrap: true, cell: (a) => whenCell(a.created_at)},
    {label: "By", wrap: true, cell: (a) => a.created_by || "—"},
    {label: "Actions", actions: true, cell: (a) => h("div", {class: "row-actions"}, !a.revoked && can("revoke admins")
      ? h("button", {type: "button", class: "danger-quiet", onclick: () => revokeAdmin(a)}, "Revoke") : null)},
  ], admins, "No named admins yet.");
}

function revokeAdmin(a) {
  confirmDialog(`Revoke ${a.name}?`, `The credential of ${a.name} is refused on every instance from its next ` +
    "request. The name stays in the audit log and is not given again.", "Revoke", async () => {
    await api(`admins/${encodeURIComponent(a.name)}/revoke`, {method: "POST"});
    notice(`${a.name} revoked.`);
    refresh();
  });
}

function newAdminDialog() {
  dialog("New admin", ({errorEl, close, dialog: d}) => {
    const name = h("input", {type: "text", name: "name", autocomplete: "off", spellcheck: "false"});
    const role = h("select", {name: "role"}, ROLES.map(([v, l]) => h("option", {value: v}, l)));
    const teams = h("input", {type: "text", name: "teams", autocomplete: "off", spellcheck: "false",
                              placeholder: "every team"});
    const form = h("form", {novalidate: true},
      h("div", {class: "grid2"}, field("Admin name", name), field("Role", role),
        field("Teams", teams, "Comma-separated; a team admin needs one at least.")),
      errorEl, buttons(close, "Create"));
    submitter(form, errorEl, async () => {
      if (!NAME_RE.test(name.value.trim())) {
        throw new Invalid("Admin names are 1-64 characters of A-Z, a-z, 0-9, '_', '.', '@', '-'.");
      }
      const list = teams.value.split(",").map((t) => t.trim()).filter(Boolean);
      if (list.some((t) => !TEAM_RE.test(t))) throw new Invalid(TEAM_RULE);
      const made = await api("admins", {method: "POST", body: {name: name.value.trim(), role: role.value,
                                                               teams: list}});
      d.close();
      notice(`Admin ${made.name} created (${made.role}).`);
      showOnce(made);
      refresh();
    });
    return form;
  });
}

function showOnce(made) {
  dialog(`Admin ${made.name} created`, ({close}) => {
    const input = h("input", {type: "text", readonly: true, value: made.credential, class: "secret",
                              spellcheck: "false", autocomplete: "off"});
    return h("div", {},
      h("p", {}, `The credential of ${made.name} (${made.role}). Copy it now: it is not shown again.`),
      field("Credential", input),
      h("div", {class: "dialog-actions"}, h("button", {type: "button", onclick: close}, "Done")));
  });
}
