// Small DOM helpers shared by every screen: elements, form fields, the confirmation line, tables and headings.

export function h(tag, attrs, ...children) {
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
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

let uid = 0;
// A fresh element id (for labels and dialog titles), unique in the page.
export const uniqueId = (prefix) => `${prefix}${++uid}`;

export function field(label, input, hint) {
  const id = input.id || uniqueId("f");
  input.id = id;
  return h("div", {class: "field"}, h("label", {for: id}, label), input,
           hint ? h("small", {class: "hint"}, hint) : null);
}

// What the last action did ("Limits of ads saved."), at the top of the page and kept in view while it scrolls:
// it stays until the next action starts or another screen is shown (a refresh after the action keeps it).
export function notice(text) {
  document.getElementById("notice").textContent = text || "";
}

// A table whose columns are {label, cell(row), num?, wrap?, title?, actions?, cls?}. Each cell carries its column's
// label (data-label): under 700 px wide the rows become cards that show it. The roles are explicit, so a table
// laid out as cards is still a table to assistive technology.
export function table(columns, rows, empty) {
  if (!rows.length) return h("p", {class: "empty"}, empty);
  const cls = (c) => [c.num ? "num" : "", c.wrap ? "wrap" : "", c.actions ? "actions-col" : "", c.cls || ""]
    .join(" ").trim();
  return h("div", {class: "table-wrap"},
    h("table", {role: "table"},
      h("thead", {role: "rowgroup"}, h("tr", {role: "row"}, columns.map((c) => h("th", {
        scope: "col", role: "columnheader", class: cls(c) || null, title: c.title}, c.label)))),
      h("tbody", {role: "rowgroup"}, rows.map((r) => h("tr", {role: "row"},
        columns.map((c, i) => h(i === 0 ? "th" : "td", {
          scope: i === 0 ? "row" : null, role: i === 0 ? "rowheader" : "cell", class: cls(c) || null,
          "data-label": c.label}, h("span", {class: "v"}, c.cell(r)))))))));
}

export function heading(title, note, ...actions) {
  return h("div", {class: "view-head"},
    h("div", {}, h("h1", {}, title), note ? h("p", {class: "muted"}, note) : null),
    h("div", {class: "actions"}, actions));
}
