// Building DOM without innerHTML: every string from the API goes in as text, never as markup.

/**
 * el("td", {class: "num", dataset: {field: "x"}, onclick: fn}, "text", childNode, [more])
 * Attribute values are set with setAttribute (or as properties for value/checked/disabled/on*), children are
 * strings (text nodes), nodes, or nested arrays; null/undefined/false children are skipped.
 */
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "value" || key === "checked" || key === "selected" || key === "disabled" || key === "hidden") {
      node[key] = value;
    } else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace every child of `node` with `children`. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** A <table> from a header row and body rows (each row: array of cells: strings, nodes or {cell attrs}). */
export function table(attrs, headers, rows, caption) {
  return el("table", attrs,
    caption ? el("caption", null, caption) : null,
    headers ? el("thead", null, el("tr", null, headers.map((h) => el("th", { scope: "col" }, h)))) : null,
    el("tbody", null, rows.map((row) => el("tr", null, row.map(cell)))));
}

function cell(c) {
  if (c && typeof c === "object" && !(c instanceof Node) && !Array.isArray(c) && "content" in c) {
    const { content, tag, ...attrs } = c;
    return el(tag || "td", attrs, content);
  }
  return el("td", null, c);
}

/** A definition list from [label, value] pairs, skipping pairs whose value is null/undefined. */
export function defs(pairs, attrs) {
  return el("dl", { class: "defs", ...attrs }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => [el("dt", null, k), el("dd", null, v)]));
}

/** A status badge; the text is exactly the status (tests and people read it). */
export function badge(status, attrs) {
  return el("span", { class: `badge badge-${status || "unknown"}`, ...attrs }, status || "unknown");
}

/** A 0..100 <progress> with its percentage as text beside it for people. */
export function progressBar(percent, attrs) {
  const value = Math.max(0, Math.min(100, Number.isFinite(percent) ? percent : 0));
  return el("progress", { max: "100", value, ...attrs }, `${value.toFixed(0)} %`);
}

export function section(title, attrs, ...children) {
  return el("section", { class: "card", ...attrs }, title ? el("h2", null, title) : null, ...children);
}

/** Short-lived status text ("Loading…", errors) inside a page. */
export function notice(text, kind = "info", attrs) {
  return el("p", { class: `notice notice-${kind}`, ...attrs }, text);
}
