// Number, size, time and duration formatting; every formatter answers "—" for a missing value.

export const DASH = "—";

const missing = (v) => v === null || v === undefined || (typeof v === "number" && !Number.isFinite(v));

/** An accuracy or other fraction as 0.9870. */
export function acc(v) {
  return missing(v) ? DASH : Number(v).toFixed(4);
}

/** A fraction as a percentage: 98.70 %. */
export function pct(v, digits = 2) {
  return missing(v) ? DASH : `${(Number(v) * 100).toFixed(digits)} %`;
}

/** A 95% interval [lo, hi] as "0.9663–0.9899". */
export function interval(ci) {
  return Array.isArray(ci) && ci.length === 2 && !missing(ci[0]) && !missing(ci[1])
    ? `${acc(ci[0])} – ${acc(ci[1])}` : DASH;
}

/** A signed difference of accuracies: +0.0500. */
export function signed(v) {
  if (missing(v)) return DASH;
  const s = Number(v).toFixed(4);
  return v > 0 ? `+${s}` : s;
}

export function signedInterval(ci) {
  return Array.isArray(ci) && ci.length === 2 && !missing(ci[0]) && !missing(ci[1])
    ? `${signed(ci[0])} – ${signed(ci[1])}` : DASH;
}

/** A p-value: 0.012 or 3.5e-6 (small values in scientific notation, as they range over decades). */
export function pValue(v) {
  if (missing(v)) return DASH;
  return v < 0.001 ? Number(v).toExponential(1) : Number(v).toFixed(3);
}

/** Bytes in B, KB, MB or GB (1024-based). */
export function bytes(v) {
  if (missing(v)) return DASH;
  const units = ["B", "KB", "MB", "GB", "TB"];
  let n = Number(v);
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

/** A large count (parameters, MACs) as 272.2 K / 2.53 M / 1.20 G. */
export function count(v) {
  if (missing(v)) return DASH;
  const n = Number(v);
  const scales = [[1e9, "G"], [1e6, "M"], [1e3, "K"]];
  for (const [scale, unit] of scales) {
    if (Math.abs(n) >= scale) return `${(n / scale).toFixed(n / scale < 10 ? 2 : 1)} ${unit}`;
  }
  return String(n);
}

/** An integer with thousands separators. */
export function int(v) {
  return missing(v) ? DASH : Number(v).toLocaleString("en-US");
}

/** Seconds as "1m 12s", "2h 05m", "12s", "0.4s". */
export function duration(seconds) {
  if (missing(seconds) || seconds < 0) return DASH;
  const s = Number(seconds);
  if (s < 10) return `${s.toFixed(1)}s`;
  const total = Math.round(s);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const sec = total % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

/** Milliseconds of latency: 0.069 ms, 1.43 ms, 12.3 ms. */
export function ms(v) {
  if (missing(v)) return DASH;
  const n = Number(v);
  return `${n < 1 ? n.toFixed(3) : n < 100 ? n.toFixed(2) : n.toFixed(0)} ms`;
}

/** A ratio such as a speedup: 3.12×. */
export function times(v) {
  return missing(v) ? DASH : `${Number(v).toFixed(2)}×`;
}

/** A generic number: integers as they are, others with up to 4 significant decimals. */
export function num(v) {
  if (missing(v)) return DASH;
  const n = Number(v);
  if (Number.isInteger(n)) return String(n);
  return Math.abs(n) >= 0.001 ? String(Number(n.toPrecision(4))) : n.toExponential(2);
}

/** An API timestamp (UTC ISO) in the browser's local time: 2026-11-29 14:36:12. */
export function time(iso) {
  if (!iso) return DASH;
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** Seconds between two API timestamps; `end` missing means now (a running job). */
export function secondsBetween(startIso, endIso) {
  if (!startIso) return null;
  const start = new Date(startIso).getTime();
  const end = endIso ? new Date(endIso).getTime() : Date.now();
  return Number.isFinite(start) && Number.isFinite(end) ? Math.max(0, (end - start) / 1000) : null;
}

/** An input size [h, w] as 8×8 (one number when square). */
export function size2(v) {
  if (!Array.isArray(v)) return missing(v) ? DASH : String(v);
  return v.length === 2 && v[0] === v[1] ? `${v[0]}×${v[1]}` : v.join("×");
}

export function list(v) {
  return Array.isArray(v) ? v.map((x) => (typeof x === "number" ? num(x) : String(x))).join(", ") : DASH;
}
