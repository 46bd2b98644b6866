// The kdistill dashboard: who the caller is (/v1/me, the API key prompt), then a hash router over the pages.

import { api, forgetKey, getKey, isAbort, onUnauthorized, setKey } from "./js/api.js";
import { renderCatalogItem, renderCatalogList } from "./js/catalog.js";
import { el, fill, notice } from "./js/dom.js";
import { renderJob } from "./js/job.js";
import { renderJobs } from "./js/jobs.js";
import { renderSubmit } from "./js/submit.js";

const ROUTES = [
  [/^\/jobs\/?$/, renderJobs, "jobs"],
  [/^\/jobs\/([^/]+)$/, renderJob, "jobs"],
  [/^\/submit\/?$/, renderSubmit, "submit"],
  [/^\/teachers\/?$/, (main, ctx) => renderCatalogList("teachers", main, ctx), "teachers"],
  [/^\/teachers\/([^/]+)$/, (main, ctx) => renderCatalogItem("teachers", main, ctx), "teachers"],
  [/^\/datasets\/?$/, (main, ctx) => renderCatalogList("datasets", main, ctx), "datasets"],
  [/^\/datasets\/([^/]+)$/, (main, ctx) => renderCatalogItem("datasets", main, ctx), "datasets"],
];

const main = document.getElementById("main");
const tenant = document.querySelector("[data-testid=tenant]");
const forget = document.getElementById("forget-key");
let current = null; // {controller, cleanup} of the page on screen
let signedIn = false;

/** Tear down the page on screen: its requests, timers, streams and charts. */
function leave() {
  if (!current) return;
  current.controller.abort();
  try { if (typeof current.cleanup === "function") current.cleanup(); } catch (e) { console.warn(e); }
  current = null;
}

function route() {
  if (!signedIn) return;
  const hash = location.hash.replace(/^#/, "") || "/jobs";
  if (!location.hash) history.replaceState(null, "", "#/jobs");
  const [path, query = ""] = hash.split("?");
  leave();
  window.scrollTo(0, 0);
  for (const [pattern, render, nav] of ROUTES) {
    const m = pattern.exec(path);
    if (!m) continue;
    markNav(nav);
    const controller = new AbortController();
    const ctx = { params: m.slice(1).map(decodeURIComponent), query: new URLSearchParams(query), signal: controller.signal };
    current = { controller, cleanup: null };
    current.cleanup = render(main, ctx);
    return;
  }
  markNav(null);
  fill(main, el("h1", null, "Not found"), notice(`Nothing at #${path}. `), el("a", { href: "#/jobs" }, "Back to the jobs"));
}

function markNav(name) {
  document.querySelectorAll("nav [data-nav]").forEach((a) => {
    if (a.dataset.nav === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
}

// -- who is calling ------------------------------------------------------------------------------------------

async function signIn(message) {
  signedIn = false;
  let me;
  try {
    me = await api("/v1/me", { quiet401: true });
  } catch (e) {
    if (isAbort(e)) return;
    if (e.status === 401) { askForKey(message); return; }
    if (e.status !== 404) { // 404: a server without /v1/me; anything else: say so and offer a retry
      fill(main, notice(`The API did not answer: ${e.message}`, "error"),
        el("button", { type: "button", onclick: () => signIn() }, "Try again"));
      return;
    }
  }
  tenant.textContent = me && me.tenant ? me.tenant.name : "";
  tenant.title = me && me.tenant ? `tenant ${me.tenant.id}${me.auth === "disabled" ? " (API keys are off on this server)" : ""}` : "";
  forget.hidden = !getKey();
  signedIn = true;
  route();
}

function askForKey(message) {
  leave();
  markNav(null);
  tenant.textContent = "";
  forget.hidden = true;
  const input = el("input", { type: "password", id: "api-key", "data-testid": "api-key-input", autocomplete: "off",
    placeholder: "kd_…", required: true });
  const form = el("form", { class: "card key-prompt", novalidate: true, onsubmit: (e) => {
    e.preventDefault();
    if (!input.value.trim()) { input.focus(); return; }
    setKey(input.value);
    signIn("That key was refused: check it and try again.");
  } },
  el("h1", null, "API key"),
  el("p", null, "This server needs an API key (", el("code", null, "kdistill keys create"),
    " makes one). It is kept in this tab only (sessionStorage) and sent as ", el("code", null, "Authorization: Bearer …"), "."),
  message ? notice(message, "error") : null,
  el("div", { class: "field" }, el("label", { for: "api-key" }, "Key"), input),
  el("button", { type: "submit", class: "primary", "data-testid": "api-key-save" }, "Save key"));
  fill(main, form);
  input.focus();
}

// A 401 in the middle of a session (key revoked or expired): the key is already dropped; ask again.
onUnauthorized(() => {
  if (signedIn) askForKey("The server refused the key (revoked or expired?): enter a key again.");
  signedIn = false;
});

forget.addEventListener("click", (e) => {
  e.preventDefault();
  forgetKey();
  signIn();
});

window.addEventListener("hashchange", route);
// Promises that fail after their page was left (aborted requests) are expected: keep them off the console.
window.addEventListener("unhandledrejection", (e) => { if (isAbort(e.reason)) e.preventDefault(); });
signIn();
