// Form fields generated from the API's own OpenAPI document, so that every hyperparameter the server knows
// appears with its default and description. Nothing here validates: the API's 422 is the one judge.

import { api } from "./api.js";
import { el } from "./dom.js";

let openapi = null;

async function document_() {
  if (!openapi) openapi = api("/openapi.json").catch((e) => { openapi = null; throw e; });
  return openapi;
}

function schemas(doc) {
  return (doc.components && doc.components.schemas) || {};
}

/** Follow a local $ref (and a lone allOf wrapper FastAPI may add), keeping the outer default/description. */
function deref(doc, s) {
  let schema = s || {};
  for (let i = 0; i < 10; i += 1) {
    if (schema.$ref) {
      const name = schema.$ref.split("/").pop();
      const { $ref, ...outer } = schema;
      schema = { ...schemas(doc)[name], ...outer };
    } else if (Array.isArray(schema.allOf) && schema.allOf.length === 1) {
      const { allOf, ...outer } = schema;
      schema = { ...allOf[0], ...outer };
    } else break;
  }
  return schema;
}

function findSchema(doc, name) {
  const all = schemas(doc);
  return all[name] || all[`${name}-Input`] || null;
}

/**
 * The job form's fields from /openapi.json: {hyperparameters: [field], options: [field]}, each field
 * {path, schema, kind, ...}. `options` are JobCreate's other settings (baseline, export_formats, data.*, ...).
 */
export async function jobFields() {
  const doc = await document_();
  const job = findSchema(doc, "JobCreate");
  if (!job) throw new Error("the OpenAPI document has no JobCreate schema");
  const props = job.properties || {};
  const hyper = deref(doc, props.hyperparameters || { $ref: "#/components/schemas/Hyperparameters" });
  const required = (schema, key) => (schema.required || []).includes(key);
  const hyperparameters = Object.entries(hyper.properties || {})
    .map(([key, s]) => describe(doc, `hyperparameters.${key}`, key, s, required(hyper, key)));
  const skip = new Set(["teacher_id", "dataset_id", "student", "hyperparameters"]);
  const options = [];
  for (const [key, raw] of Object.entries(props)) {
    if (skip.has(key)) continue;
    const s = deref(doc, raw);
    if (s.type === "object" && s.properties) {
      // A nested settings object (data, checks): one field per property, named by its dotted path.
      for (const [sub, subSchema] of Object.entries(s.properties)) {
        options.push(describe(doc, `${key}.${sub}`, `${key}.${sub}`, subSchema, required(s, sub)));
      }
    } else options.push(describe(doc, key, key, raw, required(job, key)));
  }
  return { hyperparameters, options };
}

/** Classify one property into a widget kind and the values it needs. */
function describe(doc, path, label, raw, required) {
  const s = deref(doc, raw);
  const arms = (s.anyOf || s.oneOf || [s]).map((a) => deref(doc, a));
  const nullable = arms.some((a) => a.type === "null");
  // FastAPI leaves `default: null` out of the document: an optional nullable field without one defaults to null.
  const base = { path, label, description: s.description || "", hint: rangeHint(s),
    default: "default" in s ? s.default : (nullable ? null : undefined), required };
  const real = arms.filter((a) => a.type !== "null");
  const choices = choiceValues(real);
  if (choices) return { ...base, kind: "choice", choices: nullable ? [null, ...choices] : choices };
  if (real.length === 1) {
    const a = real[0];
    const hint = base.hint || rangeHint(a);
    if (a.type === "boolean") return { ...base, hint, kind: nullable ? "choice" : "checkbox", choices: [null, true, false] };
    if (a.type === "integer" || a.type === "number") return { ...base, hint, kind: "number", nullable, float: a.type === "number" };
    if (a.type === "string") return { ...base, hint, kind: "text", nullable };
    if (a.type === "array") {
      const items = deref(doc, a.items);
      if (Array.isArray(items.enum)) return { ...base, kind: "multi", choices: items.enum };
      return { ...base, kind: "list", nullable };
    }
  }
  // Anything else ("auto" or a list of weights, objects): free text, read as JSON where it looks like JSON.
  return { ...base, kind: "mixed", nullable };
}

/** The values of an enum-like schema (enums, consts, booleans), or null when some arm is free-form. */
function choiceValues(arms) {
  if (!arms.length) return null;
  const values = [];
  for (const a of arms) {
    if (Array.isArray(a.enum)) values.push(...a.enum);
    else if ("const" in a) values.push(a.const);
    else if (a.type === "boolean" && arms.length > 1) values.push(false, true);
    else return null;
  }
  return [...new Set(values)];
}

function rangeHint(s) {
  const parts = [];
  if (s.exclusiveMinimum !== undefined) parts.push(`> ${s.exclusiveMinimum}`);
  else if (s.minimum !== undefined) parts.push(`≥ ${s.minimum}`);
  if (s.exclusiveMaximum !== undefined) parts.push(`< ${s.exclusiveMaximum}`);
  else if (s.maximum !== undefined) parts.push(`≤ ${s.maximum}`);
  return parts.join(", ");
}

// -- widgets ----------------------------------------------------------------------------------------------

const choiceKey = (v) => (v === null || v === undefined ? "" : String(v));
const choiceLabel = (v) => (v === null || v === undefined ? "(none)" : String(v));

/** Text shown for a default: numbers typed `number` keep a decimal point (4.0), so people read them as floats. */
function display(field, v) {
  if (v === null || v === undefined) return "";
  if (field.kind === "number" && field.float && Number.isInteger(v)) return v.toFixed(1);
  if (Array.isArray(v)) return v.join(", ");
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

/**
 * The DOM of one field: a wrapper whose `.control` is the element an error goes after, and a `read()` that
 * returns the value as the API should get it.
 */
export function fieldWidget(field) {
  const id = `f-${field.path}`;
  const attrs = { id, name: field.path, "data-testid": `field-${field.path}` };
  let control;
  let read;
  if (field.kind === "checkbox") {
    const box = el("input", { type: "checkbox", ...attrs, checked: Boolean(field.default) });
    control = el("label", { class: "check" }, box, ` ${field.label}`);
    read = () => box.checked;
  } else if (field.kind === "choice") {
    const byKey = new Map(field.choices.map((v) => [choiceKey(v), v]));
    const select = el("select", attrs, field.choices.map((v) => el("option", { value: choiceKey(v) }, choiceLabel(v))));
    select.value = choiceKey(field.default);
    control = select;
    read = () => (byKey.has(select.value) ? byKey.get(select.value) : select.value);
  } else if (field.kind === "multi") {
    const chosen = new Set(field.default || []);
    const boxes = field.choices.map((v) => el("input", { type: "checkbox", name: field.path, value: String(v), checked: chosen.has(v) }));
    control = el("fieldset", { class: "multi", id, "data-testid": `field-${field.path}` },
      el("legend", null, field.label), boxes.map((b, i) => el("label", { class: "check" }, b, ` ${field.choices[i]}`)));
    read = () => field.choices.filter((v, i) => boxes[i].checked);
  } else {
    const input = el("input", { type: "text", ...attrs, value: display(field, field.default), autocomplete: "off",
      spellcheck: "false", inputmode: field.kind === "number" ? "decimal" : null,
      placeholder: field.nullable ? "none" : null });
    control = input;
    read = () => parseText(field, input.value);
  }
  const label = field.kind === "checkbox" || field.kind === "multi" ? null : el("label", { for: id }, field.label);
  const desc = el("small", { class: "desc" }, field.description, field.hint ? el("span", { class: "hint" }, `${field.description ? " " : ""}(${field.hint})`) : null);
  const wrap = el("div", { class: `field field-${field.kind}`, "data-path": field.path }, label, control, desc);
  return { field, wrap, control, read };
}

const NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;

/** The typed text as the API should get it; what is not a number stays text so that the API can say why. */
function parseText(field, text) {
  const t = text.trim();
  if (t === "") return field.nullable || field.kind === "mixed" ? null : (field.kind === "number" ? null : "");
  if (field.kind === "number") return NUMBER.test(t) ? Number(t) : t;
  if (field.kind === "text") return text;
  if (t.startsWith("[") || t.startsWith("{")) {
    try { return JSON.parse(t); } catch { return t; }
  }
  if (field.kind === "list" || (field.kind === "mixed" && t.includes(","))) {
    return t.split(",").map((x) => x.trim()).filter(Boolean).map((x) => (NUMBER.test(x) ? Number(x) : x));
  }
  if (field.kind === "mixed" && NUMBER.test(t)) return Number(t);
  return t;
}

/** Whether `value` is the field's default (a set of checkboxes compares as a set: order means nothing). */
export function isDefault(field, value) {
  const norm = (v) => (field.kind === "multi" && Array.isArray(v) ? [...v].sort() : v ?? null);
  return JSON.stringify(norm(value)) === JSON.stringify(norm(field.default));
}

/** Set `value` at a dotted `path` inside `obj` ("data.augment" -> obj.data.augment). */
export function setPath(obj, path, value) {
  const keys = path.split(".");
  let node = obj;
  for (const k of keys.slice(0, -1)) {
    if (typeof node[k] !== "object" || node[k] === null) node[k] = {};
    node = node[k];
  }
  node[keys[keys.length - 1]] = value;
}
