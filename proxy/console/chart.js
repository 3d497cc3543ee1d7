// The Usage screen's chart: an inline SVG bar chart, one stacked bar per day. It is drawn at the width of its box
// (one SVG unit per pixel, so its labels keep their size on a phone) and again when the window's width changes.
// Money is added in whole micro-dollars and its scale steps by whole cents: every label reads "$0.25", never
// "$0.003125", in the format of the tiles and tables (format.js).

import {h, s} from "./dom.js";
import {compact, DAY_MS, exactUsd, int, isoDay, micros, usdText} from "./format.js";

const SERIES = {
  tokens: [["upstream_tokens", "Upstream tokens", "s1"], ["cached_tokens", "Cached tokens", "s2"]],
  requests: [["requests", "Requests", "s1"]],
  money: [["upstream_cost_usd", "Cost upstream", "s1"], ["saved_usd", "Saved by the cache", "s2"]],
};

export function chart(rows, since, until, metric, box) {
  const days = [];
  for (let t = Date.parse(since + "T00:00:00Z"); t <= Date.parse(until + "T00:00:00Z"); t += DAY_MS) {
    days.push(isoDay(new Date(t)));
    if (days.length > 400) break;
  }
  const series = SERIES[metric];
  const isMoney = metric === "money";
  const read = isMoney ? micros : (v) => Number(v || 0);
  const values = new Map(days.map((d) => [d, series.map(() => 0)]));
  for (const r of rows) {
    const v = values.get(r.day);
    if (v) series.forEach(([k], i) => { v[i] += read(r[k]); });
  }
  const legend = h("div", {class: "legend"}, series.map(([, label, cls]) =>
    h("span", {}, h("span", {class: "swatch " + cls}), label)));
  const figure = h("figure", {class: "card chart-card"});
  let drawn = 0;
  const draw = () => {
    const width = Math.max(280, Math.round((box.clientWidth || 960) - 42)); // the card's padding and border
    if (width === drawn) return;
    drawn = width;
    figure.replaceChildren(svg(days, values, series, isMoney, width, since, until), legend);
  };
  const onResize = () => { if (figure.isConnected) draw(); else window.removeEventListener("resize", onResize); };
  window.addEventListener("resize", onResize);
  draw();
  return figure;
}

function svg(days, values, series, isMoney, W, since, until) {
  const label = isMoney ? usdText : compact;
  const fmt = isMoney ? (m) => `${usdText(m)} (${exactUsd(m)})` : int;
  const H = W < 600 ? 220 : 260, L = isMoney ? 78 : 52, R = 8, T = 12, B = 30;
  const max = Math.max(0, ...[...values.values()].map((v) => v.reduce((a, b) => a + b, 0)));
  const step = isMoney ? 1e4 * niceStep(Math.ceil(max / 1e4) / 4) : niceStep(max / 4);
  const top = 4 * step;
  const slot = (W - L - R) / days.length;
  const bw = Math.max(1, Math.min(48, slot * 0.7));
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const out = s("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "chart", role: "img",
                        "aria-label": `${series.map((x) => x[1]).join(" and ")} per day, ${since} to ${until}`});
  for (let i = 0; i <= 4; i++) {
    out.append(s("line", {x1: L, x2: W - R, y1: y(step * i), y2: y(step * i), class: "grid"}),
               s("text", {x: L - 8, y: y(step * i) + 4, class: "axis", "text-anchor": "end"}, label(step * i)));
  }
  const every = Math.max(1, Math.ceil(days.length / Math.max(2, Math.floor((W - L) / 56))));
  days.forEach((d, i) => {
    const x = L + i * slot + (slot - bw) / 2;
    let base = 0;
    const g = s("g", {}, s("title", {}, `${d}: ` + series.map(([, name], j) =>
      `${name} ${fmt(values.get(d)[j])}`).join(", ")));
    series.forEach(([, , cls], j) => {
      const v = values.get(d)[j];
      if (v > 0) g.append(s("rect", {x, width: bw, y: y(base + v), height: Math.max(0.5, y(base) - y(base + v)),
                                     class: "bar " + cls}));
      base += v;
    });
    out.append(g);
    if (i % every === 0) {
      out.append(s("text", {x: x + bw / 2, y: H - B + 18, class: "axis", "text-anchor": "middle"}, d.slice(5)));
    }
  });
  out.append(s("line", {x1: L, x2: W - R, y1: y(0), y2: y(0), class: "baseline"}));
  return out;
}

// The smallest of 1, 2, 2.5, 5 times a power of ten that is at least v (at least 1: whole units, whole cents).
function niceStep(v) {
  if (v <= 1) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v && Number.isInteger(m * p)) return m * p;
  return 10 * p;
}
