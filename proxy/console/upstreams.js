// Upstreams: each deployment's state in the worker that answered, then the fleet's shared state of it (Redis: the
// same from every instance); a proxy without the endpoint says so.

import {api} from "./api.js";
import {h, heading, table} from "./dom.js";
import {int, when, whenCell} from "./format.js";
import {loadInto, refresh} from "./view.js";

const STATES = {healthy: "healthy", cooling_down: "cooling down", paused: "paused", silent: "silent"};
const clock = (ts) => when(ts, true); // UTC with seconds, as everywhere in the console
const resets = (ts) => (ts === null || ts === undefined ? null : `Resets at ${clock(ts)}`);

export async function upstreamsView(root) {
  const box = h("div", {});
  root.append(heading("Upstreams", "The upstream deployments and their health.",
    h("button", {type: "button", onclick: refresh}, "Refresh")), box);
  await loadInto(box, "The upstream deployments", async () => {
    let body;
    try {
      body = await api("upstreams");
    } catch (err) {
      if (err.status !== 404) throw err;
      box.append(h("p", {class: "card notice"},
        "Upstream health comes with the upstream fleet: this proxy has no GET /admin/upstreams yet."));
      return;
    }
    deployments(box, body);
    fleet(box, body);
  });
}

// Out of rotation until the later of the two (a cooldown and a 429's pause can overlap).
function until(d) {
  const ends = [d.cooling_down_until, d.paused_until].filter((t) => t !== null && t !== undefined);
  return ends.length ? Math.max(...ends) : null;
}

const badge = (state) => h("span", {class: `badge ${state.replace(/_/g, "-")}`}, STATES[state] || state);
const of = (n, limit) => (limit ? `${int(n)} of ${int(limit)}` : int(n));

// What is left of a budget: the configured limit's, else what the upstream last announced (minus the fleet's since).
function left(f, name, configured) {
  const told = f.announced && f.announced[name];
  if (configured !== null && configured !== undefined) {
    return h("span", {title: "Of the limit configured in the proxy, in the last minute"}, int(configured));
  }
  if (!told) return "—";
  return h("span", {title: [`As the upstream announced${told.limit ? ` (limit ${int(told.limit)})` : ""}`,
                            resets(told.reset_at)].filter(Boolean).join(". ")}, int(told.remaining));
}

function fleet(root, body) {
  const rows = body.data.filter((d) => d.fleet);
  if (body.fleet_error) {
    root.append(h("p", {class: "card notice"}, `The fleet's shared state is unavailable: ${body.fleet_error}`));
  }
  if (!rows.length) return; // a proxy from before the fleet view, or Redis cannot say
  const event = (e) => (e ? `Last health event: ${e.op} by ${e.by || "—"} at ${clock(e.at)}` : null);
  root.append(
    h("h2", {}, "Fleet"),
    h("p", {class: "muted"}, "Shared by every instance (held in Redis): health, the budget of the last minute, "
      + "the calls in flight fleet-wide and per instance."),
    table([
      {label: "Deployment", cell: (d) => [d.upstream, h("span", {class: "sub"}, d.model)]},
      {label: "Fleet health", cell: (d) => badge(d.fleet.state)},
      {label: "Cooldown until", title: "Cooling down or paused until, fleet-wide (UTC)", wrap: true,
       cell: (d) => whenCell(until(d.fleet), true)},
      {label: "Failures in a row", num: true,
       cell: (d) => h("span", {title: event(d.fleet.last_event)}, int(d.fleet.consecutive_failures))},
      {label: "Requests used", num: true, title: "In the last minute, fleet-wide (of the configured rpm)",
       cell: (d) => of(d.fleet.requests_used, d.fleet.limits.rpm)},
      {label: "Tokens used", num: true, title: "In the last minute, fleet-wide (of the configured tpm)",
       cell: (d) => of(d.fleet.tokens_used, d.fleet.limits.tpm)},
      {label: "Requests left", num: true, cell: (d) => left(d.fleet, "requests", d.fleet.requests_left)},
      {label: "Tokens left", num: true, cell: (d) => left(d.fleet, "tokens", d.fleet.tokens_left)},
      {label: "In flight", num: true, title: "Calls in flight fleet-wide (of the configured max_in_flight)",
       cell: (d) => of(d.fleet.in_flight, d.fleet.limits.max_in_flight)},
      {label: "Per instance", wrap: true, title: "Calls in flight per instance, and its last reservation",
       cell: (d) => (d.fleet.instances.length ? d.fleet.instances.map((i) => h("span", {
         class: "instance", title: i.last_reserved_at ? `Last reserved at ${clock(i.last_reserved_at)}` : null},
       `${i.instance}: ${int(i.in_flight)} in flight`)) : "—")},
    ], rows, ""));
}

function deployments(root, body) {
  root.append(
    h("p", {class: "muted"},
      `Answered by process ${body.pid} (its own view: the fleet's shared state is below)`),
    table([
      {label: "Model", cell: (d) => d.model},
      {label: "Upstream", title: "The deployment, and the model it is asked for when that differs",
       cell: (d) => [d.upstream, d.upstream_model && d.upstream_model !== d.model
         ? h("span", {class: "sub"}, d.upstream_model) : null]},
      {label: "Kind", cell: (d) => d.kind},
      {label: "Weight", num: true, cell: (d) => int(d.weight)},
      {label: "Priority", num: true, cell: (d) => int(d.priority)},
      {label: "State", cell: (d) => badge(d.state)},
      {label: "Until", title: "Cooling down or paused until (UTC)", wrap: true,
       cell: (d) => whenCell(until(d), true)},
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
