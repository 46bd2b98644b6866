// Line charts over epochs, drawn with the vendored uPlot (window.uPlot, loaded by index.html).

import { el, fill } from "./dom.js";
import { num } from "./format.js";

const HEIGHT = 230;

// Room for the longest tick label (uPlot's fixed default cuts "0.04997" into the axis title).
function axisSize(u, values) {
  const longest = Math.max(0, ...(values || []).map((v) => String(v).length));
  return Math.max(50, 24 + longest * 7);
}

function last(values) {
  for (let i = (values || []).length - 1; i >= 0; i -= 1) if (values[i] !== null && values[i] !== undefined) return values[i];
  return null;
}

/**
 * A chart inside `container` (which keeps its own attributes: tests read data-* there).
 * options: {yLabel, log (offer a log-scale toggle), yRange(min, max) -> [lo, hi], format(v) -> text}
 */
export class LineChart {
  constructor(container, options) {
    this.container = container;
    this.options = { format: num, ...options };
    this.log = false;
    this.plot = null;
    this.key = "";
    this.data = null;
    this.series = [];
    this.controls = el("div", { class: "chart-controls" });
    this.area = el("div", { class: "chart-area" });
    if (this.options.log) {
      const box = el("input", { type: "checkbox", onchange: () => { this.log = box.checked; this.rebuild(); } });
      this.controls.append(el("label", { class: "inline" }, box, " log scale"));
    }
    fill(container, this.controls, this.area);
    this.placeholder("waiting for the first epoch…");
    // uPlot draws at a fixed pixel width: follow the container when the window or layout changes.
    this.resizer = new ResizeObserver(() => {
      if (this.plot) this.plot.setSize({ width: this.width(), height: HEIGHT });
    });
    this.resizer.observe(this.area);
  }

  width() {
    return Math.max(240, this.area.clientWidth || this.container.clientWidth || 600);
  }

  placeholder(text) {
    this.destroyPlot();
    fill(this.area, el("p", { class: "chart-empty" }, text));
  }

  /** series: [{label, color, dash?}], x: epochs, ys: one array per series (null = no point). */
  update(series, x, ys) {
    this.series = series;
    this.data = [x, ...ys];
    if (!x.length) { this.placeholder("waiting for the first epoch…"); this.key = ""; return; }
    if (!window.uPlot) { this.placeholder("the chart library did not load"); return; }
    const key = series.map((s) => s.label).join("|");
    if (this.plot && key === this.key) this.plot.setData(this.scaled(this.data));
    else { this.key = key; this.rebuild(); }
  }

  // A log axis cannot show 0 or negatives (a baseline's distillation loss is 0): those points are left out.
  scaled(data) {
    if (!this.log) return data;
    return data.map((col, i) => (i === 0 ? col : col.map((v) => (v !== null && v > 0 ? v : null))));
  }

  rebuild() {
    if (!this.data || !this.data[0].length || !window.uPlot) return;
    this.destroyPlot();
    this.area.replaceChildren();
    const fmt = this.options.format;
    const yRange = this.options.yRange;
    const opts = {
      width: this.width(),
      height: HEIGHT,
      scales: {
        x: { time: false },
        y: this.log ? { distr: 3 } : (yRange ? { range: (u, min, max) => yRange(min, max) } : {}),
      },
      axes: [
        { label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] },
        { label: this.options.yLabel, values: (u, vals) => vals.map((v) => fmt(v)), size: axisSize },
      ],
      series: [
        { label: "epoch", value: (u, v) => (v === null || v === undefined ? "—" : String(v)) },
        ...this.series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 2,
          dash: s.dash,
          points: { show: true, size: 4 },
          // Away from the cursor the legend shows each series' latest value instead of a dash.
          value: (u, v, si, idx) => {
            const shown = idx === null || idx === undefined ? last(u.data[si]) : v;
            return shown === null || shown === undefined ? "—" : fmt(shown);
          },
        })),
      ],
      cursor: { drag: { x: false, y: false } },
    };
    this.plot = new window.uPlot(opts, this.scaled(this.data), this.area);
  }

  destroyPlot() {
    if (this.plot) { this.plot.destroy(); this.plot = null; }
  }

  destroy() {
    this.resizer.disconnect();
    this.destroyPlot();
  }
}
