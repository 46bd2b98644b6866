// Following one job live: the SSE stream read with fetch() (EventSource cannot send the Authorization
// header), reconnecting after the last event id, and polling every 2 s where the stream is missing or keeps failing.

import { api, authHeaders, isAbort, noteStatus, qs } from "./api.js";

export const FINAL = new Set(["succeeded", "failed", "cancelled"]);

const POLL_MS = 2000;
const MAX_FAILURES = 4; // connections in a row that brought nothing: then the stream is taken as broken
const STALL_MS = 45_000; // three missed keep-alives (sent every 15 s): the connection is dead, reconnect

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
});

/**
 * Follow job `id` until it is final or `stop()` is called.
 * handlers: onJob(job), onProgress(progress), onEvent(eventOut) (epoch and the rest, each once by id),
 * onEnd(status), onMode("stream" | "reconnecting" | "polling").
 */
export function followJob(id, handlers) {
  const outer = new AbortController();
  const state = { lastId: null, ended: false };
  const h = { onJob() {}, onProgress() {}, onEvent() {}, onEnd() {}, onMode() {}, ...handlers };

  const event = (ev) => {
    // The stream and the polling may overlap by one event around a reconnect: each id once.
    if (state.lastId !== null && ev.id <= state.lastId) return;
    state.lastId = ev.id;
    h.onEvent(ev);
  };
  const end = (status) => {
    if (state.ended) return;
    state.ended = true;
    h.onEnd(status);
  };

  run(id, outer.signal, state, h, event, end).catch((e) => {
    if (!isAbort(e)) console.warn("kdistill: following the job stopped", e);
  });
  return { stop: () => outer.abort() };
}

async function run(id, signal, state, h, event, end) {
  let failures = 0;
  while (!signal.aborted && !state.ended) {
    const result = await connect(id, signal, state, h, event, end);
    if (result === "unsupported" || result === "unauthorized") break;
    if (result === "ended" || signal.aborted) return;
    failures = result === "progressed" ? 0 : failures + 1;
    if (failures >= MAX_FAILURES) break;
    h.onMode("reconnecting");
    await sleep(Math.min(500 * 2 ** failures, 8000), signal);
  }
  if (!signal.aborted && !state.ended) await poll(id, signal, state, h, event, end);
}

/** One stream connection: "ended", "progressed" (messages came, then it dropped), "failed", "unsupported". */
async function connect(id, signal, state, h, event, end) {
  const local = new AbortController();
  const forward = () => local.abort();
  signal.addEventListener("abort", forward, { once: true });
  let watchdog = null;
  const touch = () => { clearTimeout(watchdog); watchdog = setTimeout(() => local.abort(), STALL_MS); };
  let messages = 0;
  try {
    const headers = { Accept: "text/event-stream", ...authHeaders() };
    if (state.lastId !== null) headers["Last-Event-ID"] = String(state.lastId);
    touch();
    const response = await fetch(`/v1/jobs/${encodeURIComponent(id)}/stream${qs({ after: state.lastId })}`,
      { headers, signal: local.signal, cache: "no-store" });
    if (response.status === 404 || response.status === 405) return "unsupported";
    if (response.status === 401) { noteStatus(401); return "unauthorized"; }
    if (!response.ok || !response.body) return "failed";
    h.onMode("stream");
    await readSse(response.body, touch, (msg) => {
      messages += 1;
      dispatch(msg, h, event, end);
      return state.ended;
    });
    return state.ended ? "ended" : messages ? "progressed" : "failed";
  } catch (e) {
    if (signal.aborted) return "ended";
    if (!isAbort(e)) console.warn("kdistill: job stream dropped", e.message || e);
    return messages ? "progressed" : "failed";
  } finally {
    clearTimeout(watchdog);
    signal.removeEventListener("abort", forward);
    local.abort(); // closes the connection when we stopped reading (after `end`)
  }
}

function dispatch(msg, h, event, end) {
  let data;
  try { data = JSON.parse(msg.data); } catch { return; }
  switch (msg.event) {
    case "job": h.onJob(data); if (data.progress) h.onProgress(data.progress); break;
    case "progress": h.onProgress(data); break;
    case "epoch":
    case "event": event(data); break;
    case "end": end(data.status); break;
    default: break; // a message kind from a newer server: ignore it
  }
}

/**
 * Read an SSE body (text/event-stream, per the HTML spec): lines, "field: value", a blank line dispatches.
 * `onChunk` is called on every chunk (keep-alives included); `onMessage` returns true to stop reading.
 */
export async function readSse(body, onChunk, onMessage) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let msg = { event: "", data: [], id: null };
  const line = (text) => {
    if (text === "") {
      const done = msg.data.length ? onMessage({ event: msg.event || "message", data: msg.data.join("\n"), id: msg.id }) : false;
      msg = { event: "", data: [], id: null };
      return done;
    }
    if (text.startsWith(":")) return false; // a comment: the keep-alive
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") msg.event = value;
    else if (field === "data") msg.data.push(value);
    else if (field === "id" && !value.includes("\0")) msg.id = value;
    return false;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      onChunk();
      buffer += decoder.decode(value, { stream: true });
      for (;;) {
        const m = /\r\n|\r|\n/.exec(buffer);
        // A lone "\r" at the end may be the first half of "\r\n": wait for the next chunk.
        if (!m || (m[0] === "\r" && m.index === buffer.length - 1)) break;
        const text = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        if (line(text)) return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** The fallback: GET the job and its new events every 2 s until it is final. */
async function poll(id, signal, state, h, event, end) {
  h.onMode("polling");
  while (!signal.aborted && !state.ended) {
    try {
      // The job first, then its events: an event written before the job turned final is then always read.
      const job = await api(`/v1/jobs/${encodeURIComponent(id)}`, { signal });
      h.onJob(job);
      h.onProgress(job.progress || {});
      let more = true;
      while (more && !signal.aborted) {
        const page = await api(`/v1/jobs/${encodeURIComponent(id)}/events${qs({ after: state.lastId, limit: 500 })}`,
          { signal });
        page.items.forEach(event);
        more = Boolean(page.next_cursor) && page.items.length > 0;
      }
      if (FINAL.has(job.status)) { end(job.status); return; }
    } catch (e) {
      if (isAbort(e) || e.status === 401 || e.status === 404) return;
      console.warn("kdistill: polling the job failed, retrying", e.message || e);
    }
    await sleep(POLL_MS, signal);
  }
}
