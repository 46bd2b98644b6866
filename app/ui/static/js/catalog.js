// #/teachers, #/datasets and their detail pages: what was read from each file at upload.

import { api, isAbort, qs } from "./api.js";
import { remember } from "./cache.js";
import { defs, el, fill, notice, section } from "./dom.js";
import * as f from "./format.js";

const PAGE_SIZE = 25;

const KINDS = {
  teachers: {
    title: "Teachers", one: "teacher", path: "/v1/teachers", use: "teacher",
    columns: ["Teacher", "File", "Format", "Architecture", "Classes", "Input", "Size", "Created"],
    row: (t) => [t.filename, t.format, t.arch || f.DASH, f.int(t.num_classes),
      `${t.input_channels}×${f.size2(t.input_size)}`, f.bytes(t.size_bytes), f.time(t.created_at)],
    details: (t) => [
      ["File", t.filename], ["Format", t.format], ["Architecture", t.arch || "(in the file)"],
      ["Classes", `${f.int(t.num_classes)}`], ["Input channels", String(t.input_channels)],
      ["Input size", f.size2(t.input_size)], ["Mean", f.list(t.mean)], ["Std", f.list(t.std)],
      ["Size", `${f.bytes(t.size_bytes)} (${f.int(t.size_bytes)} bytes)`], ["sha256", el("code", { class: "sha" }, t.sha256)],
      ["Created", f.time(t.created_at)], ["Id", el("code", null, t.id)]],
  },
  datasets: {
    title: "Datasets", one: "dataset", path: "/v1/datasets", use: "dataset",
    columns: ["Dataset", "File", "Format", "Classes", "Train", "Validation", "Unlabeled", "Test", "Images", "Size", "Created"],
    row: (d) => [d.filename, d.format, f.int(d.num_classes), f.int(d.num_train), f.int(d.num_val), f.int(d.num_unlabeled),
      f.int(d.num_test), `${d.channels}×${f.size2(d.image_size)}`, f.bytes(d.size_bytes), f.time(d.created_at)],
    details: (d) => [
      ["File", d.filename], ["Format", d.format], ["Classes", f.int(d.num_classes)],
      ["Training samples (labelled)", f.int(d.num_train)], ["Unlabeled samples", f.int(d.num_unlabeled)],
      ["Validation samples", `${f.int(d.num_val)} (${d.val_source})`],
      ["Test samples", d.num_test ? `${f.int(d.num_test)} (${d.test_source || "given"})` : "none"],
      ["Channels", String(d.channels)], ["Image size", f.size2(d.image_size)],
      ["Size", `${f.bytes(d.size_bytes)} (${f.int(d.size_bytes)} bytes)`], ["sha256", el("code", { class: "sha" }, d.sha256)],
      ["Created", f.time(d.created_at)], ["Id", el("code", null, d.id)]],
  },
};

/** The list page of `kind` ("teachers" or "datasets"). */
export function renderCatalogList(kind, main, ctx) {
  const k = KINDS[kind];
  const state = { after: null, back: [], next: null };
  const body = el("div", { class: "table-wrap" }, notice("Loading…"));
  const prev = el("button", { type: "button", class: "secondary", "data-testid": "prev-page", disabled: true,
    onclick: () => { if (state.back.length) { state.after = state.back.pop(); load(); } } }, "← newer");
  const next = el("button", { type: "button", class: "secondary", "data-testid": "next-page", disabled: true,
    onclick: () => { if (state.next) { state.back.push(state.after); state.after = state.next; load(); } } }, "older →");
  fill(main, el("div", { class: "page-head" }, el("h1", null, k.title),
    el("div", { class: "toolbar" }, el("a", { class: "button", href: "#/submit" }, `Upload on the job page`))),
    body, el("div", { class: "pager" }, prev, next));

  async function load() {
    let page;
    try {
      page = await api(`${k.path}${qs({ limit: PAGE_SIZE, after: state.after })}`, { signal: ctx.signal });
    } catch (e) {
      if (!isAbort(e)) fill(body, notice(`Could not load the ${kind}: ${e.message}`, "error"));
      return;
    }
    state.next = page.next_cursor;
    prev.disabled = !state.back.length;
    next.disabled = !state.next;
    page.items.forEach((item) => remember(k.one, item));
    if (!page.items.length) { fill(body, notice(`No ${kind} yet: upload one on the job page.`)); return; }
    fill(body, el("table", { class: "list" },
      el("thead", null, el("tr", null, k.columns.map((c) => el("th", { scope: "col" }, c)))),
      el("tbody", null, page.items.map((item) => {
        const href = `#/${kind}/${encodeURIComponent(item.id)}`;
        return el("tr", { class: "clickable", "data-testid": `${k.one}-row`, "data-id": item.id,
          onclick: (e) => { if (!e.target.closest("a")) location.hash = href; } },
        el("td", null, el("a", { href, class: "mono" }, item.id)), k.row(item).map((c) => el("td", null, c)));
      }))));
  }
  load();
}

/** The detail page of one teacher or dataset. */
export function renderCatalogItem(kind, main, ctx) {
  const k = KINDS[kind];
  const id = ctx.params[0];
  fill(main, el("h1", null, `${k.one[0].toUpperCase()}${k.one.slice(1)} `, el("code", null, id)), notice("Loading…"));
  api(`${k.path}/${encodeURIComponent(id)}`, { signal: ctx.signal }).then((item) => {
    remember(k.one, item);
    const classes = item.classes || [];
    fill(main,
      el("div", { class: "page-head" }, el("h1", null, `${k.one[0].toUpperCase()}${k.one.slice(1)} `, el("code", null, id)),
        el("div", { class: "toolbar" },
          el("a", { class: "button", href: `#/submit${qs({ [k.use]: item.id })}` }, `New job with this ${k.one}`),
          el("a", { class: "button secondary", href: `#/${kind}` }, `All ${kind}`))),
      section("What was read at upload", { "data-testid": `${k.one}-detail` }, defs(k.details(item), { class: "defs grid" })),
      section(`Classes (${classes.length || item.num_classes})`, null, classes.length
        ? el("ol", { class: "classes", start: "0" }, classes.map((c) => el("li", null, String(c))))
        : notice("The file does not name its outputs.")));
  }).catch((e) => {
    if (isAbort(e)) return;
    fill(main, el("h1", null, el("code", null, id)),
      notice(e.status === 404 ? `No such ${k.one} (for this API key).` : `Could not load it: ${e.message}`, "error"));
  });
}
