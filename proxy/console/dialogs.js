// Modal dialogs and their forms: what a form refuses (here or in the admin API) shows inside the dialog. Each
// submitted form is a new action: the previous action's confirmation goes, the new one comes when it is done.

import {h, notice, uniqueId} from "./dom.js";

// A modal built when opened and removed when closed, so only the open one's fields are in the page.
export function dialog(title, build) {
  const titleId = uniqueId("d");
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
export function submitter(form, errorEl, work) {
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    errorEl.textContent = "";
    notice("");
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

export class Invalid extends Error {}

export function buttons(close, submitLabel, cls) {
  return h("div", {class: "dialog-actions"},
    h("button", {type: "button", onclick: close}, "Cancel"),
    h("button", {type: "submit", class: cls || "primary"}, submitLabel));
}

export function confirmDialog(title, text, action, work) {
  dialog(title, ({errorEl, close}) => {
    const form = h("form", {novalidate: true}, h("p", {}, text), errorEl, buttons(close, action, "danger"));
    submitter(form, errorEl, async () => { await work(); close(); });
    return form;
  });
}
