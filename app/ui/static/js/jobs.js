// #/jobs: the job list, filtered by status, paged by cursor, refreshed while something is moving.

import { api, isAbort, qs } from "./api.js";
import { getTeacher, teacherArch } from "./cache.js";
import { badge, el, fill, notice, progressBar } from "./dom.js";
import * as f from "./format.js";
import { hasResults } from "./results.js";

const PAGE_SIZE = 25;
const REFRESH_MS = 3000;
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const ACTIVE = new Set(["queued", "running"]);

// Kept across visits: coming back from a job page shows the same filter.
const memory = { status: "" };

/** Render the list into `main`; returns the page's clean-up. */
export function renderJobs(main, ctx) {
  const state = { status: memory.status, after: null, back: [], next: null, timer: null };
  const filter = el("select", { "data-testid": "status-filter", "aria-label": "status", onchange: () => {
    state.status = memory.status = filter.value;
    state.after = null;
    state.back = [];
    load();
  } }, el("option", { value: "" }, "all statuses"), STATUSES.map((s) => el("option", { value: s }, s)));
  filter.value = state.status;
  const prev = el("button", { type: "button", class: "secondary", "data-testid": "prev-page", disabled: true,
    onclick: () => { if (state.back.length) { state.after = state.back.pop(); load(); } } }, "← newer");
  const next = el("button", { type: "button", class: "secondary", "data-testid": "next-page", disabled: true,
    onclick: () => { if (state.next) { state.back.push(state.after); state.after = state.next; load(); } } }, "older →");
  const body = el("div", { class: "table-wrap" });
  const status = el("div", { class: "page-status", "aria-live": "polite" });

  fill(main,
    el("div", { class: "page-head" },
      el("h1", null, "Jobs"),
      el("div", { class: "toolbar" }, el("label", null, "Status ", filter),
        el("a", { class: "button", href: "#/submit" }, "New job"))),
    status, body,
    el("div", { class: "pager" }, prev, next));

  async function load() {
    clearTimeout(state.timer);
    let page;
    try {
      page = await api(`/v1/jobs${qs({ status: state.status, limit: PAGE_SIZE, after: state.after })}`,
        { signal: ctx.signal });
    } catch (e) {
      if (isAbort(e)) return;
      fill(status, notice(`Could not load the jobs: ${e.message}`, "error"));
      state.timer = setTimeout(load, REFRESH_MS * 2);
      return;
    }
    if (ctx.signal.aborted) return;
    status.replaceChildren();
    state.next = page.next_cursor;
    prev.disabled = state.back.length === 0;
    next.disabled = !state.next;
    fill(body, page.items.length ? jobTable(page.items) : empty(state));
    // Live rows only while something visible can still change.
    if (page.items.some((j) => ACTIVE.has(j.status))) state.timer = setTimeout(load, REFRESH_MS);
  }

  load();
  return () => clearTimeout(state.timer);
}

function empty(state) {
  if (state.status) return notice(`No ${state.status} jobs.`);
  return el("p", { class: "notice" }, "No jobs yet. ", el("a", { href: "#/submit" }, "Submit the first one"), ".");
}

function jobTable(jobs) {
  const head = ["Job", "Status", "Progress", "Student", "Teacher", "Student acc.", "Teacher acc.", "Baseline acc.",
    "Duration", "Created"];
  return el("table", { class: "list jobs" },
    el("thead", null, el("tr", null, head.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", null, jobs.map(jobRow)));
}

function jobRow(job) {
  const href = `#/jobs/${encodeURIComponent(job.id)}`;
  const teacherCell = el("td", { class: "muted" }, "…");
  getTeacher(job.teacher_id).then((t) => { teacherCell.textContent = teacherArch(t) || f.DASH; });
  const m = job.metrics || {};
  const final = hasResults(m); // otherwise the figures are the latest epoch's, on validation
  const accCell = (v) => el("td", { class: final ? "num" : "num muted",
    title: final ? `on the ${m.accuracy_split} split` : "latest epoch, validation" }, f.acc(v));
  const row = el("tr", { "data-testid": "job-row", "data-job-id": job.id, "data-status": job.status, class: "clickable",
    onclick: (e) => { if (!e.target.closest("a")) location.hash = href; } },
    el("td", null, el("a", { href, class: "mono" }, job.id)),
    el("td", null, badge(job.status), job.cancel_requested && job.status !== "cancelled"
      ? el("span", { class: "muted small" }, " cancelling") : null),
    el("td", { class: "progress-cell" }, rowProgress(job)),
    el("td", null, (job.request && job.request.student && job.request.student.arch) || f.DASH),
    teacherCell,
    accCell(m.student_accuracy),
    accCell(m.teacher_accuracy),
    accCell(m.baseline_accuracy),
    el("td", { class: "num" }, jobDuration(job)),
    el("td", { class: "nowrap" }, f.time(job.created_at)));
  return row;
}

function rowProgress(job) {
  const p = job.progress || {};
  const percent = job.status === "succeeded" ? 100 : (p.fraction || 0) * 100;
  const detail = p.epochs ? `epoch ${p.epoch}/${p.epochs}${p.run === "baseline" ? " (baseline)" : ""}` : "";
  return [progressBar(percent, { "data-testid": "row-progress", "aria-label": `${percent.toFixed(0)} %` }),
    el("span", { class: "small muted" }, ` ${percent.toFixed(0)} %`, detail ? ` · ${detail}` : "")];
}

/** Run time: start to finish, or start to now while it runs. */
export function jobDuration(job) {
  if (!job.started_at) return f.DASH;
  return f.duration(f.secondsBetween(job.started_at, job.finished_at || (ACTIVE.has(job.status) ? null : job.started_at)));
}
