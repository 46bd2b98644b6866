// #/submit: pick or upload a teacher and a dataset, choose a student, set hyperparameters, submit the job.
// The form never validates values: what the API answers (422 with `field`) is shown next to that field.

import { api, ApiError, isAbort, listAll, qs, upload } from "./api.js";
import { remember } from "./cache.js";
import { el, fill, notice, section } from "./dom.js";
import * as f from "./format.js";
import { fieldWidget, isDefault, jobFields, setPath } from "./schema_form.js";

const SEARCH_DELAY_MS = 250;

/** Render the submit page into `main`; returns its clean-up. */
export function renderSubmit(main, ctx) {
  const page = new SubmitPage(main, ctx);
  return () => page.destroy();
}

class SubmitPage {
  constructor(main, ctx) {
    this.ctx = ctx;
    this.anchors = new Map(); // API field path -> the element its error goes right after
    this.widgets = [];
    this.searchTimer = null;
    this.searchSeq = 0;
    this.students = new Map();

    this.formError = el("div", { class: "form-error-slot" });
    this.submitButton = el("button", { type: "submit", class: "primary", "data-testid": "submit-job" }, "Submit job");
    this.hyperBox = el("div", { class: "fields" }, notice("Loading the hyperparameters…"));
    this.optionsBox = el("div", { class: "fields" });
    this.form = el("form", { class: "submit-form", novalidate: true, onsubmit: (e) => { e.preventDefault(); this.submit(); } },
      this.teacherPart(), this.datasetPart(), this.studentPart(),
      section("Hyperparameters", null, el("p", { class: "small muted" },
        "Each field starts at the server's default; only what you change is sent."), this.hyperBox),
      section("Job options", null, this.optionsBox),
      el("div", { class: "submit-bar" }, this.submitButton, this.formError));
    fill(main, el("div", { class: "page-head" }, el("h1", null, "New distillation job")), this.form);

    this.loadChoices();
    this.loadSchema();
  }

  destroy() {
    clearTimeout(this.searchTimer);
  }

  // -- teacher ----------------------------------------------------------------------------------------------

  teacherPart() {
    this.teacherSelect = el("select", { "data-testid": "teacher-select", name: "teacher_id", id: "teacher-select",
      onchange: () => this.showTeacher() }, el("option", { value: "" }, "— choose a teacher —"));
    this.teacherInfo = el("div", { class: "small muted pick-info" });
    this.anchors.set("teacher_id", this.teacherSelect);

    const file = el("input", { type: "file", name: "file", "data-testid": "teacher-file", accept: ".onnx,.pt,.pth,.safetensors,.ts" });
    const text = (name, attrs) => el("input", { type: "text", name, id: `teacher-${name}`, autocomplete: "off", ...attrs });
    const inputs = {
      arch: text("arch", { list: "arch-list", placeholder: "e.g. resnet50 (state dicts)" }),
      input_channels: text("input_channels", { value: "3", inputmode: "numeric" }),
      input_size: text("input_size", { value: "224", inputmode: "numeric" }),
      mean: text("mean", { placeholder: "ImageNet's for 3 channels, 0.5 for 1" }),
      std: text("std", { placeholder: "ImageNet's for 3 channels, 0.5 for 1" }),
      classes: text("classes", { placeholder: "read from the file when it names them" }),
    };
    this.archList = el("datalist", { id: "arch-list" });
    const progress = el("progress", { max: "100", value: 0, "data-testid": "teacher-upload-progress" });
    const status = el("span", { class: "small muted" });
    const scope = new Map([["file", file], ...Object.entries(inputs)]);
    const button = el("button", { type: "button", "data-testid": "teacher-upload", onclick: () => this.uploadTeacher(file, inputs, progress, status, scope) }, "Upload teacher");
    const row = (label, input, help) => el("div", { class: "field" }, el("label", { for: input.id }, label), input,
      help ? el("small", { class: "desc" }, help) : null);
    file.id = "teacher-file";
    this.teacherUploadError = el("div", { class: "form-error-slot" });
    return section("1. Teacher", null, el("div", { class: "two-col" },
      el("div", null, el("h3", null, "An earlier teacher"),
        el("div", { class: "field" }, el("label", { for: "teacher-select" }, "Teacher"), this.teacherSelect), this.teacherInfo),
      el("div", { class: "upload" }, el("h3", null, "Or upload one"),
        row("File (.onnx, TorchScript .pt, state dict .safetensors/.pt)", file),
        el("div", { class: "fields compact" },
          row("Architecture", inputs.arch, "a registry name; needed for a state dict"),
          row("Input channels", inputs.input_channels),
          row("Input size (px)", inputs.input_size),
          row("Mean", inputs.mean, "comma-separated, one per channel"),
          row("Std", inputs.std, "comma-separated, one per channel"),
          row("Classes", inputs.classes, "optional, comma-separated output names")),
        this.archList,
        el("div", { class: "upload-bar" }, button, progress, status), this.teacherUploadError)));
  }

  async uploadTeacher(file, inputs, progress, status, scope) {
    this.clearErrors();
    const data = new FormData();
    if (file.files[0]) data.append("file", file.files[0]);
    for (const [name, input] of Object.entries(inputs)) if (input.value.trim() !== "") data.append(name, input.value.trim());
    const teacher = await this.send(data, "/v1/teachers", progress, status, scope, this.teacherUploadError);
    if (teacher) this.adopt("teacher", teacher, this.teacherSelect, teacherOption(teacher), () => this.showTeacher(), status);
  }

  /** A just uploaded teacher or dataset: cached, first in its list, selected and described. */
  adopt(kind, item, select, option, show, status) {
    remember(kind, item);
    select.insertBefore(option, select.options[1] || null);
    select.value = item.id;
    show();
    status.textContent = `uploaded: ${item.id}`;
  }

  showTeacher() {
    const t = this.teachers && this.teachers.get(this.teacherSelect.value);
    fill(this.teacherInfo, t ? `${t.format}${t.arch ? `, ${t.arch}` : ""}; ${t.num_classes} classes` +
      `${t.classes ? ` (${t.classes.slice(0, 8).join(", ")}${t.classes.length > 8 ? ", …" : ""})` : ""}; ` +
      `input ${t.input_channels}×${f.size2(t.input_size)}; ${f.bytes(t.size_bytes)}` : "");
  }

  // -- dataset ----------------------------------------------------------------------------------------------

  datasetPart() {
    this.datasetSelect = el("select", { "data-testid": "dataset-select", name: "dataset_id", id: "dataset-select",
      onchange: () => this.showDataset() }, el("option", { value: "" }, "— choose a dataset —"));
    this.datasetInfo = el("div", { class: "small muted pick-info" });
    this.anchors.set("dataset_id", this.datasetSelect);
    const file = el("input", { type: "file", name: "file", id: "dataset-file", "data-testid": "dataset-file", accept: ".npz,.zip,.tar,.tar.gz,.tgz" });
    const testFile = el("input", { type: "file", name: "test_file", id: "dataset-test-file", "data-testid": "dataset-test-file", accept: ".npz,.zip,.tar,.tar.gz,.tgz" });
    const progress = el("progress", { max: "100", value: 0, "data-testid": "dataset-upload-progress" });
    const status = el("span", { class: "small muted" });
    const scope = new Map([["file", file], ["test_file", testFile]]);
    this.datasetUploadError = el("div", { class: "form-error-slot" });
    const button = el("button", { type: "button", "data-testid": "dataset-upload", onclick: async () => {
      this.clearErrors();
      const data = new FormData();
      if (file.files[0]) data.append("file", file.files[0]);
      if (testFile.files[0]) data.append("test_file", testFile.files[0]);
      const ds = await this.send(data, "/v1/datasets", progress, status, scope, this.datasetUploadError);
      if (ds) this.adopt("dataset", ds, this.datasetSelect, datasetOption(ds), () => this.showDataset(), status);
    } }, "Upload dataset");
    return section("2. Dataset", null, el("div", { class: "two-col" },
      el("div", null, el("h3", null, "An earlier dataset"),
        el("div", { class: "field" }, el("label", { for: "dataset-select" }, "Dataset"), this.datasetSelect), this.datasetInfo),
      el("div", { class: "upload" }, el("h3", null, "Or upload one"),
        el("div", { class: "field" }, el("label", { for: "dataset-file" }, "Data (.npz, or a .zip/.tar of class folders)"), file),
        el("div", { class: "field" }, el("label", { for: "dataset-test-file" }, "Test split (optional, same format)"), testFile),
        el("div", { class: "upload-bar" }, button, progress, status), this.datasetUploadError)));
  }

  showDataset() {
    const d = this.datasets && this.datasets.get(this.datasetSelect.value);
    fill(this.datasetInfo, d ? `${d.format}; ${d.num_classes} classes; ${f.int(d.num_train)} train, ${f.int(d.num_val)} validation` +
      `${d.num_unlabeled ? `, ${f.int(d.num_unlabeled)} unlabeled` : ""}${d.num_test ? `, ${f.int(d.num_test)} test` : ""}; ` +
      `${d.channels}×${f.size2(d.image_size)} images; ${f.bytes(d.size_bytes)}` : "");
  }

  // -- uploads ----------------------------------------------------------------------------------------------

  /** POST a multipart form with progress; answers the created object, or null after showing the errors. */
  async send(data, path, progress, status, scope, errorSlot) {
    progress.value = 0;
    status.textContent = "uploading…";
    try {
      // 100 only once the server has answered: after the last byte it still reads and checks the file.
      const obj = await upload(path, data, (fraction) => {
        progress.value = Math.min(99, Math.round(fraction * 100));
        if (fraction >= 1) status.textContent = "checking the file…";
      });
      progress.value = 100;
      return obj;
    } catch (e) {
      status.textContent = "";
      progress.value = 0;
      this.showErrors(e, scope, errorSlot);
      return null;
    }
  }

  // -- student ------------------------------------------------------------------------------------------------

  studentPart() {
    this.search = el("input", { type: "search", "data-testid": "student-search", id: "student-search", autocomplete: "off",
      placeholder: "filter by name, e.g. mobilenet", oninput: () => this.scheduleSearch(),
      onkeydown: (e) => { if (e.key === "Enter") e.preventDefault(); } }); // Enter filters; it must not submit the job
    this.studentSelect = el("select", { "data-testid": "student-arch", name: "student.arch", id: "student-arch", size: "8" });
    this.studentInfo = el("small", { class: "desc" });
    this.searchStatus = el("small", { class: "desc", "aria-live": "polite" });
    this.catalogue = null; // the unfiltered list, for filtering as one types
    this.catalogueFull = false;
    this.catalogueState = "";
    this.studentSelect.addEventListener("change", () => this.showStudent());
    const inputSize = fieldWidget({ path: "student.input_size", label: "Input size (px)", kind: "number", nullable: true,
      default: null, description: "square input of the student; empty: the teacher's" });
    this.widgets.push(inputSize);
    this.anchors.set("student.arch", this.studentSelect);
    this.anchors.set("student", this.studentSelect);
    this.anchors.set("student.input_size", inputSize.control);
    return section("3. Student", null, el("div", { class: "two-col" },
      el("div", null,
        el("div", { class: "field" }, el("label", { for: "student-search" }, "Search"), this.search, this.searchStatus),
        el("div", { class: "field" }, el("label", { for: "student-arch" }, "Architecture"), this.studentSelect, this.studentInfo)),
      el("div", null, inputSize.wrap)));
  }

  scheduleSearch() {
    clearTimeout(this.searchTimer);
    const filter = this.search.value.trim();
    const seq = ++this.searchSeq; // answers may come back out of order: only the latest search counts
    // Filter what is already listed at once; the server's answer (with timm's names) can take seconds.
    if (this.catalogue) {
      const needle = filter.toLowerCase();
      this.fillStudents(this.catalogue.filter((s) => s.arch.toLowerCase().includes(needle)), filter);
    }
    if (!filter) {
      this.searchStatus.textContent = this.catalogueState;
      return;
    }
    this.searchStatus.textContent = "searching the catalogue…";
    this.searchTimer = setTimeout(() => this.searchServer(filter, seq), SEARCH_DELAY_MS);
  }

  async searchServer(filter, seq) {
    let items;
    try {
      items = (await api(`/v1/students${qs({ filter })}`, { signal: this.ctx.signal })).items;
    } catch (e) {
      if (isAbort(e)) return;
      items = null; // no catalogue (an older server): the typed name is the choice
    }
    if (seq !== this.searchSeq) return;
    this.searchStatus.textContent = "";
    this.fillStudents(items, filter);
  }

  /**
   * The unfiltered list. A fresh server takes tens of seconds to count every architecture's parameters,
   * so the small-input family (about a second) is shown first and the whole list replaces it when it comes.
   */
  async loadCatalogue() {
    const get = (params) => api(`/v1/students${qs(params)}`, { signal: this.ctx.signal }).then((r) => r.items);
    this.catalogueState = "loading the architectures…";
    this.searchStatus.textContent = this.catalogueState;
    const full = get({});
    get({ family: "small" }).then((items) => {
      if (!this.catalogueFull) this.setCatalogue(items, "loading the other architectures…");
    }).catch(() => {});
    try {
      const items = await full;
      this.catalogueFull = true;
      this.setCatalogue(items, "");
    } catch (e) {
      if (isAbort(e)) return;
      this.catalogueState = "";
      if (!this.catalogue && !this.search.value.trim()) { this.searchStatus.textContent = ""; this.fillStudents(null, ""); }
    }
  }

  setCatalogue(items, state) {
    this.catalogue = items;
    this.catalogueState = state;
    this.fillArchList(items);
    if (this.search.value.trim()) return; // a search is on screen: its own answer decides the list
    this.fillStudents(items, "");
    this.searchStatus.textContent = state;
  }

  fillStudents(items, filter) {
    const select = this.studentSelect;
    const previous = select.value;
    const shown = items ? items : (filter ? [{ arch: filter }] : []);
    this.students = new Map(shown.map((s) => [s.arch, s]));
    fill(select, shown.length ? shown.map((s) => el("option", { value: s.arch }, studentLabel(s)))
      : el("option", { value: "", disabled: true }, filter ? `nothing matches “${filter}”` : "no students listed"));
    // Keep the choice through searches; an exact name match wins, else the first match of a search.
    const exact = shown.find((s) => s.arch === filter);
    if (exact) select.value = exact.arch;
    else if (this.students.has(previous)) select.value = previous;
    else if (filter && shown.length) select.value = shown[0].arch;
    this.showStudent();
  }

  showStudent() {
    const s = this.students.get(this.studentSelect.value);
    if (!s || !s.family) { this.studentInfo.textContent = ""; return; }
    // the API leaves a timm model's figures out when the filter matches too many of them to count
    this.studentInfo.textContent = s.parameters == null && s.min_input_size == null
      ? `${s.family}; narrow the search to see its size`
      : `${s.family}; ${f.count(s.parameters)} parameters for 10 classes; ` +
        `default input ${s.default_input_size} px, at least ${s.min_input_size} px`;
  }

  fillArchList(items) {
    fill(this.archList, items.map((s) => el("option", { value: s.arch })));
  }

  // -- earlier uploads and the schema -------------------------------------------------------------------

  async loadChoices() {
    const query = this.ctx.query;
    this.loadCatalogue(); // not awaited: the uploads' lists must not wait for it
    const [teachers, datasets] = await Promise.all([
      listAll("/v1/teachers", { signal: this.ctx.signal }).catch((e) => (isAbort(e) ? null : [])),
      listAll("/v1/datasets", { signal: this.ctx.signal }).catch((e) => (isAbort(e) ? null : [])),
    ]);
    if (!teachers || !datasets || this.ctx.signal.aborted) return;
    this.teachers = new Map(teachers.map((t) => [t.id, t]));
    this.datasets = new Map(datasets.map((d) => [d.id, d]));
    // Uploads made while the lists loaded are already at the top: keep them.
    const known = (select) => new Set([...select.options].map((o) => o.value));
    const tKnown = known(this.teacherSelect);
    const dKnown = known(this.datasetSelect);
    teachers.filter((t) => !tKnown.has(t.id)).forEach((t) => this.teacherSelect.append(teacherOption(t)));
    datasets.filter((d) => !dKnown.has(d.id)).forEach((d) => this.datasetSelect.append(datasetOption(d)));
    if (query.get("teacher") && !this.teacherSelect.value) this.teacherSelect.value = query.get("teacher");
    if (query.get("dataset") && !this.datasetSelect.value) this.datasetSelect.value = query.get("dataset");
    this.showTeacher();
    this.showDataset();
  }

  async loadSchema() {
    let fields;
    try {
      fields = await jobFields();
    } catch (e) {
      fill(this.hyperBox, notice(`Could not read the API's schema (/openapi.json): ${e.message}. The job is sent with the defaults.`, "error"));
      return;
    }
    if (this.ctx.signal.aborted) return;
    const build = (list) => list.map((field) => {
      const w = fieldWidget(field);
      this.widgets.push(w);
      this.anchors.set(field.path, w.control);
      return w.wrap;
    });
    fill(this.hyperBox, build(fields.hyperparameters));
    fill(this.optionsBox, build(fields.options));
  }

  // -- the job ---------------------------------------------------------------------------------------------

  body() {
    const body = {};
    if (this.teacherSelect.value) body.teacher_id = this.teacherSelect.value;
    if (this.datasetSelect.value) body.dataset_id = this.datasetSelect.value;
    body.student = { arch: this.studentSelect.value || this.search.value.trim() };
    // Only what differs from the server's default is sent: the request then reads as the user's choices.
    for (const w of this.widgets) {
      const value = w.read();
      if (w.field.required || !isDefault(w.field, value)) setPath(body, w.field.path, value);
    }
    return body;
  }

  async submit() {
    this.clearErrors();
    this.submitButton.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", json: this.body() });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      this.showErrors(e, this.anchors, this.formError);
    } finally {
      this.submitButton.disabled = false;
    }
  }

  // -- errors --------------------------------------------------------------------------------------------

  clearErrors() {
    this.form.querySelectorAll("[data-testid=field-error], [data-testid=form-error]").forEach((n) => n.remove());
    this.form.querySelectorAll(".has-error").forEach((n) => n.classList.remove("has-error"));
  }

  /** Each error goes right after its field (its own path, else its nearest parent); the rest to `slot`. */
  showErrors(e, scope, slot) {
    if (!(e instanceof ApiError)) {
      slot.append(el("p", { class: "form-error", "data-testid": "form-error" }, String(e && e.message ? e.message : e)));
      return;
    }
    const byField = new Map();
    if (e.field) byField.set(e.field, e.message);
    for (const d of e.errors) if (d && d.field && !byField.has(d.field)) byField.set(d.field, d.message || e.message);
    const unplaced = [];
    for (const [field, message] of byField) {
      const anchor = nearest(scope, field);
      if (!anchor) { unplaced.push(`${field}: ${message}`); continue; }
      anchor.classList.add("has-error");
      anchor.after(el("span", { class: "field-error", "data-testid": "field-error", "data-field": field, role: "alert" }, message));
    }
    if (!byField.size) unplaced.push(e.status === 401 ? "the API key was refused" : `${e.message}${e.code ? ` (${e.code})` : ""}`);
    if (unplaced.length) slot.append(el("p", { class: "form-error", "data-testid": "form-error", role: "alert" }, unplaced.join("; ")));
  }
}

function nearest(scope, field) {
  const parts = field.split(".");
  for (let n = parts.length; n > 0; n -= 1) {
    const anchor = scope.get(parts.slice(0, n).join("."));
    if (anchor) return anchor;
  }
  return null;
}

function teacherOption(t) {
  return el("option", { value: t.id }, `${t.arch || t.format} · ${t.filename} · ${t.num_classes} classes · ${f.time(t.created_at)}`);
}

function datasetOption(d) {
  return el("option", { value: d.id }, `${d.filename} · ${d.num_classes} classes · ${f.int(d.num_train)} train · ${f.time(d.created_at)}`);
}

function studentLabel(s) {
  if (!s.family) return s.arch;
  if (s.min_input_size == null) return `${s.arch} — ${s.family}`;
  return `${s.arch} — ${s.family}, ${f.count(s.parameters)} params, ≥ ${s.min_input_size} px`;
}
