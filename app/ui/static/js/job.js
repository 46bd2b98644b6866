// #/jobs/<id>: one job live: header and progress, per-epoch curves, results, artifacts, timeline, cancel.

import { api, ApiError, downloadWithKey, getKey, isAbort } from "./api.js";
import { getDataset, getTeacher, teacherArch } from "./cache.js";
import { LineChart } from "./charts.js";
import { badge, defs, el, fill, notice, progressBar, section, table } from "./dom.js";
import * as f from "./format.js";
import { jobDuration } from "./jobs.js";
import { resultSections } from "./results.js";
import { FINAL, followJob } from "./stream.js";

const COLORS = {
  total: "#111827", distill: "#2563eb", label: "#ea580c", feature: "#9333ea", baselineLoss: "#a16207",
  student: "#2563eb", teacher: "#16a34a", baseline: "#ea580c", agreement: "#9333ea",
};

/** Render job `id` into `main`; returns the page's clean-up. */
export function renderJob(main, ctx) {
  const id = ctx.params[0];
  const view = new JobView(main, id);
  let follower = null;
  api(`/v1/jobs/${encodeURIComponent(id)}`, { signal: ctx.signal }).then((job) => {
    if (ctx.signal.aborted) return;
    view.setJob(job);
    follower = followJob(id, {
      onJob: (j) => view.setJob(j),
      onProgress: (p) => view.setProgress(p),
      onEvent: (ev) => view.addEvent(ev),
      onMode: (mode) => view.setMode(mode),
      onEnd: () => view.finish(),
    });
  }).catch((e) => {
    if (isAbort(e)) return;
    fill(main, el("h1", null, "Job ", el("code", null, id)),
      notice(e.status === 404 ? "No such job (for this API key)." : `Could not load the job: ${e.message}`, "error"));
  });
  const tick = setInterval(() => view.tick(), 1000); // the running duration moves without any message
  return () => {
    clearInterval(tick);
    if (follower) follower.stop();
    view.destroy();
  };
}

class JobView {
  constructor(main, id) {
    this.id = id;
    this.job = null;
    this.progress = {};
    this.epochs = new Map(); // "run:epoch" -> epoch event data; a replayed epoch replaces the earlier one
    this.eventIds = new Set();
    this.chartTimer = null;
    this.resultsKey = "";

    this.status = el("span", { class: "status-slot" });
    this.phase = el("span", { class: "muted" });
    this.mode = el("span", { class: "mode small muted" });
    this.cancelSlot = el("span");
    this.bar = el("progress", { "data-testid": "job-progress", max: "100", value: 0, role: "progressbar",
      "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0" });
    this.progressText = el("span", { class: "progress-text" });
    this.info = el("div");
    this.problems = el("div");
    this.lossBox = el("div", { class: "chart", "data-testid": "chart-loss" });
    this.accBox = el("div", { class: "chart", "data-testid": "chart-accuracy", "data-student-epochs": "0", "data-baseline-epochs": "0" });
    this.lrBox = el("div", { class: "chart", "data-testid": "chart-lr" });
    this.results = el("div", { class: "results-slot" });
    this.artifacts = el("div");
    this.events = el("ol", { class: "timeline", "data-testid": "events" });
    this.showEpochs = el("input", { type: "checkbox", checked: true, onchange: () => {
      this.events.classList.toggle("hide-epochs", !this.showEpochs.checked);
    } });

    fill(main,
      el("div", { class: "page-head" },
        el("h1", null, "Job ", el("code", null, id)),
        el("div", { class: "toolbar" }, this.cancelSlot)),
      section(null, { class: "card job-head" },
        el("div", { class: "status-line" }, this.status, this.phase, this.mode),
        el("div", { class: "progress-line" }, this.bar, this.progressText),
        this.info),
      this.problems,
      section("Training curves", { class: "card" },
        el("div", { class: "charts" },
          el("div", null, el("h3", null, "Training loss"), this.lossBox),
          el("div", null, el("h3", null, "Validation accuracy"), this.accBox),
          el("div", null, el("h3", null, "Learning rate"), this.lrBox))),
      this.results,
      section("Artifacts", null, this.artifacts),
      section("Events", { class: "card" },
        el("label", { class: "inline small" }, this.showEpochs, " show epoch events"),
        el("div", { class: "timeline-wrap" }, this.events)));

    this.charts = {
      loss: new LineChart(this.lossBox, { yLabel: "loss", log: true }),
      acc: new LineChart(this.accBox, { yLabel: "accuracy", format: f.acc,
        yRange: (min, max) => [Math.max(0, Math.floor(((min ?? 0) - 0.02) * 20) / 20), Math.min(1, Math.max(max ?? 1, 0) + 0.02)] }),
      lr: new LineChart(this.lrBox, { yLabel: "learning rate", log: true }),
    };
  }

  // -- the job as a whole ---------------------------------------------------------------------------------

  setJob(job) {
    this.job = job;
    fill(this.status, badge(job.status, { "data-testid": "job-status" }));
    this.phase.textContent = job.phase ? ` ${job.phase}` : "";
    this.renderCancel();
    this.renderInfo();
    this.renderProblems();
    this.renderArtifacts();
    // The result tables rebuild only when the metrics change (a `job` message also comes for other reasons).
    const final = FINAL.has(job.status);
    const key = `${final}:${JSON.stringify(job.metrics || {})}`;
    if (key !== this.resultsKey) {
      this.resultsKey = key;
      fill(this.results, resultSections(job.metrics, final));
    }
    if (job.progress) this.setProgress(job.progress);
  }

  setProgress(p) {
    this.progress = p || {};
    const job = this.job || {};
    const percent = job.status === "succeeded" ? 100 : Math.max(0, Math.min(100, (this.progress.fraction || 0) * 100));
    this.bar.value = percent;
    this.bar.setAttribute("aria-valuenow", percent.toFixed(1));
    this.bar.textContent = `${percent.toFixed(0)} %`;
    const q = this.progress;
    const parts = [`${percent.toFixed(1)} %`];
    if (q.epochs) parts.push(`epoch ${q.epoch}/${q.epochs}`);
    if (q.run) parts.push(q.run === "baseline" ? "baseline run (labels only)" : "student run");
    if (!FINAL.has(job.status) && q.eta_seconds !== null && q.eta_seconds !== undefined) parts.push(`ETA ${f.duration(q.eta_seconds)}`);
    if (q.loss !== null && q.loss !== undefined) parts.push(`loss ${f.num(q.loss)}`);
    if (q.samples_per_s) parts.push(`${f.int(Math.round(q.samples_per_s))} samples/s`);
    this.progressText.textContent = parts.join(" · ");
  }

  setMode(mode) {
    const text = { stream: "● live", reconnecting: "reconnecting…", polling: "updating every 2 s", final: "" };
    this.mode.textContent = text[mode] ?? "";
    this.mode.dataset.mode = mode;
  }

  /** The job is final: nothing more will come. */
  finish() {
    this.setMode("final");
    if (this.epochs.size === 0) Object.values(this.charts).forEach((c) => c.placeholder("no epoch was recorded"));
  }

  tick() {
    if (this.job && this.job.status === "running" && this.durationText) this.durationText.textContent = jobDuration(this.job);
  }

  renderCancel() {
    const job = this.job;
    if (FINAL.has(job.status)) { this.cancelSlot.replaceChildren(); return; }
    if (!this.cancelButton) {
      // No confirm(): a cancelled job is cheap to submit again, and a second click only repeats the request.
      this.cancelButton = el("button", { type: "button", class: "danger", "data-testid": "cancel-job",
        onclick: () => this.cancel() }, "Cancel job");
      this.cancelNote = el("span", { class: "small muted" });
    }
    this.cancelNote.textContent = job.cancel_requested ? " cancel requested…" : "";
    if (!this.cancelSlot.firstChild) this.cancelSlot.append(this.cancelButton, this.cancelNote);
  }

  async cancel() {
    try {
      this.setJob(await api(`/v1/jobs/${encodeURIComponent(this.id)}/cancel`, { method: "POST" }));
    } catch (e) {
      if (e instanceof ApiError && e.status === 409) return; // already final: the stream brings that state
      if (this.cancelNote) this.cancelNote.textContent = ` could not cancel: ${e.message}`;
    }
  }

  renderInfo() {
    const job = this.job;
    const req = job.request || {};
    const student = req.student || {};
    const teacherLink = el("a", { href: `#/teachers/${encodeURIComponent(job.teacher_id)}`, class: "mono" }, job.teacher_id);
    const teacherArchText = el("span", { class: "muted" });
    const datasetLink = el("a", { href: `#/datasets/${encodeURIComponent(job.dataset_id)}`, class: "mono" }, job.dataset_id);
    const datasetText = el("span", { class: "muted" });
    getTeacher(job.teacher_id).then((t) => { if (t) teacherArchText.textContent = ` ${teacherArch(t)}, ${t.num_classes} classes`; });
    getDataset(job.dataset_id).then((d) => { if (d) datasetText.textContent = ` ${d.filename}`; });
    const hp = req.hyperparameters || {};
    this.durationText = el("span", null, jobDuration(job));
    fill(this.info, defs([
      ["Student", `${student.arch || f.DASH}${student.input_size ? ` at ${student.input_size}px` : ""}`],
      ["Teacher", [teacherLink, teacherArchText]],
      ["Dataset", [datasetLink, datasetText]],
      ["Distillation", hp.distillation ? `${hp.distillation}, T = ${f.num(hp.temperature)}, α = ${f.num(hp.alpha)}, ${hp.epochs} epochs` : null],
      ["Baseline", req.baseline ? "yes (labels only, for the gain)" : "no"],
      ["Queue", job.queue],
      ["Worker", job.worker],
      ["Device", job.device],
      ["Attempts", job.attempts > 1 ? String(job.attempts) : null],
      ["Created", f.time(job.created_at)],
      ["Started", job.started_at ? f.time(job.started_at) : null],
      ["Finished", job.finished_at ? f.time(job.finished_at) : null],
      ["Duration", this.durationText],
      ["Sweep", job.sweep_id ? `${job.sweep_id}${job.sweep_trial !== null && job.sweep_trial !== undefined ? `, trial ${job.sweep_trial}` : ""}` : null],
    ], { class: "defs grid" }));
  }

  renderProblems() {
    const job = this.job;
    const parts = [];
    if (job.error || job.status === "failed") {
      const err = job.error || { code: "failed", message: "the job failed without an error message" };
      parts.push(section("Error", { class: "card error-card", "data-testid": "job-error" },
        el("p", null, el("code", null, err.code), " ", err.message)));
    }
    if ((job.warnings || []).length) {
      parts.push(section(`Warnings (${job.warnings.length})`, { class: "card warn-card", "data-testid": "job-warnings" },
        el("ul", null, job.warnings.map((w) => el("li", null, el("code", null, w.code), " ", w.message)))));
    }
    fill(this.problems, parts);
  }

  renderArtifacts() {
    const list = this.job.artifacts || [];
    if (this.job.artifacts_expired_at) {
      fill(this.artifacts, notice(`The files were removed on ${f.time(this.job.artifacts_expired_at)} by the retention setting (KDISTILL_RETENTION_DAYS).`));
      return;
    }
    if (!list.length) {
      fill(this.artifacts, notice(FINAL.has(this.job.status) ? "No files." : "The files appear when the job succeeds."));
      return;
    }
    fill(this.artifacts, table({ class: "list compact artifacts" }, ["File", "Format", "Size", "sha256"],
      list.map((a) => [artifactLink(this.id, a), a.format, { class: "num", content: f.bytes(a.size_bytes) },
        el("code", { class: "sha" }, a.sha256)])));
  }

  // -- events and curves ------------------------------------------------------------------------------------

  addEvent(ev) {
    if (this.eventIds.has(ev.id)) return;
    this.eventIds.add(ev.id);
    this.events.append(eventItem(ev));
    if (ev.kind === "epoch" && ev.data) {
      const d = ev.data;
      this.epochs.set(`${d.run || "student"}:${d.epoch}`, d); // after a resume the same epoch comes again: keep the last
      this.scheduleCharts();
    }
  }

  // A reconnect replays many epochs at once: draw once per burst, not once per event.
  scheduleCharts() {
    if (this.chartTimer) return;
    this.chartTimer = setTimeout(() => { this.chartTimer = null; this.drawCharts(); }, 30);
  }

  drawCharts() {
    const runs = { student: new Map(), baseline: new Map() };
    for (const d of this.epochs.values()) (runs[d.run] || runs.student).set(d.epoch, d);
    this.accBox.dataset.studentEpochs = String(runs.student.size);
    this.accBox.dataset.baselineEpochs = String(runs.baseline.size);
    const x = [...new Set([...runs.student.keys(), ...runs.baseline.keys()])].sort((a, b) => a - b);
    const col = (run, key) => x.map((e) => {
      const d = runs[run].get(e);
      return d && typeof d[key] === "number" ? d[key] : null;
    });
    const any = (run, key) => col(run, key).some((v) => v !== null);
    const hasBaseline = runs.baseline.size > 0;

    const loss = [["total", COLORS.total, "student", "train_loss"], ["distillation", COLORS.distill, "student", "train_loss_distill"],
      ["labels", COLORS.label, "student", "train_loss_label"]];
    if (any("student", "train_loss_feature")) loss.push(["feature", COLORS.feature, "student", "train_loss_feature"]);
    if (hasBaseline) loss.push(["baseline (labels only)", COLORS.baselineLoss, "baseline", "train_loss", [6, 4]]);
    this.plot(this.charts.loss, x, loss, col);

    // The teacher's validation accuracy is the same in both runs: take the student run's, else the baseline's.
    const baselineTeacher = col("baseline", "teacher_accuracy");
    const teacher = col("student", "teacher_accuracy").map((v, i) => (v !== null ? v : baselineTeacher[i]));
    const accSeries = [{ label: "student", color: COLORS.student }, { label: "teacher", color: COLORS.teacher }];
    const accCols = [col("student", "student_accuracy"), teacher];
    if (hasBaseline) {
      accSeries.push({ label: "baseline (labels only)", color: COLORS.baseline });
      accCols.push(col("baseline", "student_accuracy"));
    }
    accSeries.push({ label: "agreement", color: COLORS.agreement, dash: [2, 3] });
    accCols.push(col("student", "agreement"));
    this.charts.acc.update(accSeries, x, accCols);

    const lr = [["student", COLORS.student, "student", "learning_rate"]];
    if (hasBaseline && any("baseline", "learning_rate")) lr.push(["baseline", COLORS.baseline, "baseline", "learning_rate", [6, 4]]);
    this.plot(this.charts.lr, x, lr, col);
  }

  /** defsList: [label, color, run, key, dash?] per series; `col(run, key)` gives its values over x. */
  plot(chart, x, defsList, col) {
    chart.update(defsList.map(([label, color, , , dash]) => ({ label, color, dash })), x,
      defsList.map(([, , run, key]) => col(run, key)));
  }

  destroy() {
    clearTimeout(this.chartTimer);
    Object.values(this.charts).forEach((c) => c.destroy());
  }
}

function eventItem(ev) {
  const warn = ev.kind === "warning" || ev.kind === "error";
  return el("li", { class: `event kind-${ev.kind}${warn ? " warn" : ""}`, "data-kind": ev.kind, "data-event-id": ev.id },
    el("time", { datetime: ev.created_at }, f.time(ev.created_at)),
    el("span", { class: "kind" }, ev.kind),
    el("span", { class: "message" }, ev.message));
}

/** A download link: plain when no key is in use; with a key, fetched with the header and saved as a blob. */
function artifactLink(jobId, a) {
  const url = a.url || `/v1/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(a.name)}`;
  const link = el("a", { href: url, download: a.name, "data-testid": "artifact-link", "data-name": a.name, "data-sha256": a.sha256 }, a.name);
  link.addEventListener("click", (e) => {
    if (!getKey()) return; // the browser's own download: no header needed
    e.preventDefault();
    downloadWithKey(url, a.name).catch((err) => { link.title = `download failed: ${err.message}`; link.classList.add("bad"); });
  });
  return link;
}
