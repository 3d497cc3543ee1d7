// How numbers, money, sizes and times are shown; UTC days as the usage ledger counts them. One convention for
// people everywhere: times in UTC with the zone ("2026-12-07 03:54 UTC"), dates as YYYY-MM-DD, money with two
// decimals ("$1,234.57", "<$0.01" for what rounds to zero) and the exact amount in the element's title.

import {h} from "./dom.js";

export const DAY_MS = 86400000;

export const int = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));

// Money arrives as text with 6 decimals ("0.000055"), exact. It is read into whole micro-dollars (exact in a number
// up to $9 billion), so sums stay exact; `exactUsd` writes them back as the API would ("$0.000055").
export function micros(v) {
  if (typeof v === "string" && /^-?\d+(\.\d+)?$/.test(v)) {
    const [whole, frac = ""] = v.replace("-", "").split(".");
    const m = Number(whole) * 1e6 + Number((frac + "000000").slice(0, 6)) + (Number(frac[6] || 0) >= 5 ? 1 : 0);
    return v.startsWith("-") ? -m : m;
  }
  return Math.round(Number(v || 0) * 1e6);
}
export function exactUsd(m) {
  const a = Math.abs(m);
  return (m < 0 ? "-$" : "$") + Math.floor(a / 1e6) + "." + String(a % 1e6).padStart(6, "0");
}
// Two decimals for people: "$0.00" for nothing, "<$0.01" for an amount that rounds to zero, "$1,234.57".
export function usdText(m) {
  if (m === 0) return "$0.00";
  const cents = Math.round(Math.abs(m) / 1e4);
  const sign = m < 0 ? "-" : "";
  if (cents === 0) return sign + "<$0.01";
  return `${sign}$${Math.floor(cents / 100).toLocaleString("en-US")}.${String(cents % 100).padStart(2, "0")}`;
}
// An amount as shown in tiles and tables: the rounded text, the exact value in its title. From the API's text, or
// from a sum in micro-dollars.
export const moneyOfMicros = (m) => h("span", {class: "money", title: exactUsd(m)}, usdText(m));
export const money = (v) => moneyOfMicros(micros(v));

export function compact(n) {
  const a = Math.abs(n);
  if (a >= 1e9) return (n / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
  if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
  if (a >= 1e3) return (n / 1e3).toFixed(a >= 1e4 ? 0 : 1) + "k";
  return String(Math.round(n * 100) / 100);
}

// A time in UTC, with the zone: "2026-12-07 03:54 UTC" (with seconds: "2026-12-07 03:54:10 UTC").
export function when(ts, seconds) {
  if (ts === null || ts === undefined) return "—";
  return new Date(ts * 1000).toISOString().slice(0, seconds ? 19 : 16).replace("T", " ") + " UTC";
}
// The same for a table cell: the date and the time each kept whole, so a narrow column breaks between them.
export function whenCell(ts, seconds) {
  if (ts === null || ts === undefined) return "—";
  const [day, time] = when(ts, seconds).split(" ");
  return [h("span", {class: "nowrap"}, day), " ", h("span", {class: "nowrap"}, time + " UTC")];
}

export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(v)) + " " + units[i];
}

export const isoDay = (d) => d.toISOString().slice(0, 10);
export const today = () => isoDay(new Date());
export const monthStart = () => today().slice(0, 8) + "01";
// A UTC day as typed: YYYY-MM-DD, and a real date (not 2026-02-30).
export const isDay = (s) => /^\d{4}-\d{2}-\d{2}$/.test(s) && !Number.isNaN(Date.parse(s + "T00:00:00Z")) &&
  isoDay(new Date(s + "T00:00:00Z")) === s;
