// The figures of a finished job: test metrics with intervals, per-class table, confusion heatmap,
// teacher-vs-student size and speed, reduced-precision exports.

import { el, section, table } from "./dom.js";
import * as f from "./format.js";

const MAX_MATRIX_CLASSES = 60; // past this a heatmap is unreadable: list the largest confusions instead

/** Whether `metrics` hold an evaluation (a cancelled or failed job keeps only its last epoch's figures). */
export function hasResults(metrics) {
  const m = metrics || {};
  return m.accuracy_split !== undefined && Boolean(m.test || m.per_class || m.confusion || m.efficiency || m.gain !== undefined);
}

/** All result sections of a finished job's `metrics`; [] while it runs (its metrics are one epoch's then). */
export function resultSections(metrics, final) {
  const m = metrics || {};
  if (!final || !hasResults(m)) return [];
  const out = [section("Test metrics", { class: "card results" }, testMetrics(m))];
  if (Array.isArray(m.per_class) || m.confusion) {
    out.push(section("Per class", { class: "card results" }, el("div", { class: "two-col" },
      Array.isArray(m.per_class) ? el("div", null, perClass(m.per_class, m.confusion)) : null,
      m.confusion ? el("div", null, confusion(m.confusion)) : null)));
  }
  if (m.efficiency) out.push(section("Teacher vs student: size and speed", null, efficiency(m.efficiency)));
  if (m.exports && Object.keys(m.exports).length) {
    out.push(section("Reduced-precision exports", null, exportsTable(m.exports, m.accuracy_split)));
  }
  const notes = [...(m.notes || []), ...((m.efficiency && m.efficiency.notes) || [])];
  if (notes.length) out.push(section("Notes", null, el("ul", { class: "notes" }, notes.map((n) => el("li", null, noteText(n))))));
  return out;
}

function noteText(n) {
  if (typeof n === "string") return n;
  if (n && typeof n === "object") return n.message || JSON.stringify(n);
  return String(n);
}

// -- test metrics --------------------------------------------------------------------------------------------

function splitFigures(m, split) {
  if (m[split] && typeof m[split] === "object") return m[split];
  return split === m.accuracy_split ? m : null; // older jobs: only the top-level figures
}

function accCell(value, ci) {
  return { content: [el("span", { class: "figure" }, f.acc(value)),
    ci ? el("span", { class: "ci" }, ` [${f.interval(ci)}]`) : null], class: "num" };
}

function testMetrics(m) {
  const splits = [m.accuracy_split];
  if (m.accuracy_split !== "validation" && m.validation) splits.push("validation");
  const figs = splits.map((s) => splitFigures(m, s) || {});
  const head = ["", ...splits.map((s, i) => `${s === m.accuracy_split ? `${s} (reported)` : s}${figs[i].n ? `, n = ${f.int(figs[i].n)}` : ""}`)];
  const row = (label, cellOf, when = true) => (when ? [{ content: label, tag: "th", scope: "row" }, ...figs.map(cellOf)] : null);
  const hasBaseline = figs.some((x) => x.baseline_accuracy !== undefined && x.baseline_accuracy !== null);
  const rows = [
    row("Student (distilled)", (x) => accCell(x.student_accuracy, x.student_accuracy_ci)),
    row("Teacher", (x) => accCell(x.teacher_accuracy, x.teacher_accuracy_ci)),
    row("Student on labels alone (baseline)", (x) => accCell(x.baseline_accuracy, x.baseline_accuracy_ci), hasBaseline),
    row("Gain from distillation", (x) => ({ class: "num", content: [
      el("span", { class: `figure ${x.gain > 0 ? "good" : x.gain < 0 ? "bad" : ""}` }, f.signed(x.gain)),
      x.gain_ci ? el("span", { class: "ci" }, ` [${f.signedInterval(x.gain_ci)}]`) : null,
      x.gain_p_value !== undefined && x.gain_p_value !== null ? el("span", { class: "ci" }, ` p = ${f.pValue(x.gain_p_value)}`) : null] }),
    hasBaseline),
    row("Agreement with the teacher", (x) => ({ class: "num", content: f.acc(x.agreement) })),
    row("Student top-5", (x) => ({ class: "num", content: f.acc(x.student_top5) }),
      figs.some((x) => x.student_top5 !== undefined)),
    row("Distillation helped", (x) => ({ class: "num",
      content: x.distillation_helped === undefined || x.distillation_helped === null ? f.DASH : x.distillation_helped ? "yes" : "no" }),
    figs.some((x) => x.distillation_helped !== undefined)),
  ].filter(Boolean);
  const caption = `Accuracy on the ${m.accuracy_split} split, with 95 % intervals in brackets` +
    (m.best_epoch ? `; the student's epoch ${m.best_epoch} was chosen on validation` : "") +
    (m.baseline_best_epoch ? `, the baseline's epoch ${m.baseline_best_epoch}` : "") + ".";
  return table({ class: "metrics", "data-testid": "test-metrics", "data-split": m.accuracy_split }, head, rows, caption);
}

// -- per class and confusion ----------------------------------------------------------------------------------

function perClass(rows, conf) {
  const f1 = (p, r) => (p === null || p === undefined || r === null || r === undefined || p + r === 0 ? null : (2 * p * r) / (p + r));
  return table({ class: "list compact", "data-testid": "per-class" }, ["Class", "Precision", "Recall", "F1", "Support"],
    rows.map((r) => [String(r.class), { class: "num", content: f.acc(r.precision) },
      { class: "num", content: f.acc(r.recall) }, { class: "num", content: f.acc(f1(r.precision, r.recall)) },
      { class: "num", content: f.int(r.support) }]),
    `Student, ${conf && conf.split ? `${conf.split} split` : "evaluation split"}; precision is — where nothing was predicted as the class`);
}

function confusion(conf) {
  const classes = conf.classes || [];
  const matrix = conf.matrix || [];
  const wrap = el("figure", { class: "confusion", "data-testid": "confusion", "data-classes": classes.length },
    el("figcaption", null, `Confusion matrix (${conf.split || "evaluation"} split): rows are the true class, columns the predicted one; colour is the share of the row.`));
  if (classes.length > MAX_MATRIX_CLASSES) {
    wrap.append(topConfusions(classes, matrix));
    return wrap;
  }
  const head = el("tr", null, el("th", { class: "corner", scope: "col" }, "true \\ pred"),
    classes.map((c) => el("th", { scope: "col", class: "pred" }, String(c))));
  const body = matrix.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0);
    return el("tr", null, el("th", { scope: "row" }, String(classes[i] ?? i)),
      row.map((n, j) => heatCell(n, total, i === j, classes[i] ?? i, classes[j] ?? j)));
  });
  wrap.append(el("div", { class: "table-wrap" }, el("table", { class: "heatmap" }, el("thead", null, head), el("tbody", null, body))));
  return wrap;
}

function heatCell(n, rowTotal, diagonal, trueClass, predClass) {
  const share = rowTotal ? n / rowTotal : 0;
  // Mistakes are usually a few percent of a row: stretch their scale so that they show at all.
  const alpha = diagonal ? share : Math.min(1, share * 4);
  const rgb = diagonal ? "37, 99, 235" : "220, 38, 38";
  return el("td", {
    class: `num${alpha > 0.55 ? " dark" : ""}${n === 0 ? " zero" : ""}`,
    style: n ? `background-color: rgba(${rgb}, ${alpha.toFixed(3)})` : null,
    title: `true ${trueClass}, predicted ${predClass}: ${n} (${f.pct(share, 1)} of the row)`,
  }, String(n));
}

function topConfusions(classes, matrix) {
  const pairs = [];
  matrix.forEach((row, i) => row.forEach((n, j) => { if (i !== j && n > 0) pairs.push([n, i, j]); }));
  pairs.sort((a, b) => b[0] - a[0]);
  return table({ class: "list compact" }, ["True", "Predicted as", "Count"],
    pairs.slice(0, 25).map(([n, i, j]) => [String(classes[i]), String(classes[j]), { class: "num", content: String(n) }]),
    `${classes.length} classes: the 25 most frequent confusions`);
}

// -- efficiency ------------------------------------------------------------------------------------------------

function efficiency(e) {
  const t = e.teacher || {};
  const s = e.student || {};
  const lat = (x, b) => (x.latency_ms || {})[b];
  const ratio = (a, b) => (a && b ? f.times(a / b) : f.DASH);
  const rows = [
    ["Parameters", f.count(t.parameters), f.count(s.parameters), ratio(t.parameters, s.parameters)],
    ["MACs per image", f.count(t.macs), f.count(s.macs), ratio(t.macs, s.macs)],
    ["File size", f.bytes(t.file_size_bytes), f.bytes(s.file_size_bytes), ratio(t.file_size_bytes, s.file_size_bytes)],
    ["Latency, batch 1", f.ms(lat(t, "batch_1")), f.ms(lat(s, "batch_1")), f.times((e.speedup || {}).batch_1)],
    ["Latency, batch 32", f.ms(lat(t, "batch_32")), f.ms(lat(s, "batch_32")), f.times((e.speedup || {}).batch_32)],
  ].map(([label, ...cells]) => [{ content: label, tag: "th", scope: "row" }, ...cells.map((c) => ({ class: "num", content: c }))]);
  const summary = [
    e.speedup ? `Speedup ${f.times(e.speedup.batch_1)} at batch 1, ${f.times(e.speedup.batch_32)} at batch 32` : null,
    e.compression ? `compression ${f.times(e.compression)} (parameters)` : null,
    e.size_ratio ? `size ratio ${f.times(e.size_ratio)} (file)` : null,
  ].filter(Boolean).join("; ");
  const how = e.runtime ? `Measured with ${e.runtime}${e.threads ? `, ${e.threads} thread${e.threads > 1 ? "s" : ""}` : ""}.` : "";
  return [table({ class: "metrics", "data-testid": "efficiency" }, ["", "Teacher", "Student", "Teacher ÷ student"], rows),
    summary || how ? el("p", { class: "small muted" }, summary ? `${summary}. ` : "", how) : null];
}

// -- exports -----------------------------------------------------------------------------------------------

function exportsTable(exportsReport, split) {
  const rows = Object.entries(exportsReport).map(([format, x]) => {
    const splits = x.splits || {};
    const figs = splits[split] || Object.values(splits)[0] || {};
    const change = figs.accuracy_change;
    return [
      { content: format, tag: "th", scope: "row" },
      x.file || (x.published === false ? "(measured only)" : f.DASH),
      { class: "num", content: f.bytes(x.size_bytes) },
      { class: "num", content: f.acc(figs.accuracy) },
      { class: `num ${change < 0 ? "bad" : ""}`, content: change === undefined || change === null ? f.DASH : f.signed(change) },
      { class: "num", content: f.acc(figs.agreement) },
      { class: "num", content: f.ms((x.latency_ms || {}).batch_1) },
      { class: "num", content: f.times((x.speedup || {}).batch_1) },
      x.error ? el("span", { class: "bad" }, x.error) : "",
    ];
  });
  return table({ class: "list compact", "data-testid": "exports" },
    ["Format", "File", "Size", "Accuracy", "Change vs fp32", "Agreement with fp32", "Latency b1", "Speedup b1", ""], rows,
    `Accuracy on the ${split} split of each ONNX variant against the fp32 ONNX student`);
}
