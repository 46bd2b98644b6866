// Talking to the kdistill API: the key (sessionStorage only), JSON calls, uploads with progress, downloads.

const KEY_NAME = "kdistill.apiKey";

/** An error answer of the API: {code, message, field?, errors?} plus the HTTP status (0: no answer). */
export class ApiError extends Error {
  constructor(status, body) {
    const b = body && typeof body === "object" ? body : {};
    super(b.message || `HTTP ${status}`);
    this.status = status;
    this.code = b.code || (status ? `http_${status}` : "network_error");
    this.field = b.field || null;
    this.errors = Array.isArray(b.errors) ? b.errors : [];
  }
}

// sessionStorage, never localStorage: the key goes when the tab closes.
export function getKey() {
  try { return sessionStorage.getItem(KEY_NAME) || ""; } catch { return ""; }
}

export function setKey(key) {
  sessionStorage.setItem(KEY_NAME, key.trim());
}

export function forgetKey() {
  try { sessionStorage.removeItem(KEY_NAME); } catch { /* storage disabled: nothing was kept */ }
}

export function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

let unauthorized = () => {};

/** Called on any 401 after start-up: the app drops the key and asks for one again. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

function handle401(status, quiet) {
  if (status !== 401) return;
  forgetKey();
  if (!quiet) unauthorized();
}

/** For callers that fetch by themselves (the event stream): a 401 there means the same as anywhere. */
export function noteStatus(status) {
  handle401(status, false);
}

export function isAbort(e) {
  return e && (e.name === "AbortError" || e.code === "aborted");
}

/** "?a=1&b=x" from the entries whose value is not empty. */
export function qs(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

async function errorBody(response) {
  try { return await response.json(); } catch { return { message: `${response.status} ${response.statusText}` }; }
}

/**
 * A JSON call. `json` is sent as the body; `quiet401` leaves a 401 to the caller (the start-up /v1/me).
 * Throws ApiError for an error answer or no answer; an AbortError passes through.
 */
export async function api(path, { method = "GET", json, signal, headers, quiet401 = false } = {}) {
  const init = { method, signal, headers: { Accept: "application/json", ...authHeaders(), ...headers } };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (isAbort(e)) throw e;
    throw new ApiError(0, { code: "network_error", message: `the server did not answer (${e.message})` });
  }
  if (!response.ok) {
    handle401(response.status, quiet401);
    throw new ApiError(response.status, await errorBody(response));
  }
  return response.status === 204 ? null : response.json();
}

/** Every item of a cursor-paginated listing (for select boxes), up to `max`. */
export async function listAll(path, { signal, max = 1000 } = {}) {
  const items = [];
  let after = null;
  do {
    const page = await api(`${path}${qs({ limit: 200, after })}`, { signal });
    items.push(...page.items);
    after = page.next_cursor;
  } while (after && items.length < max);
  return items;
}

/**
 * A multipart upload with progress (fetch cannot report upload progress; XMLHttpRequest can).
 * `onProgress(fraction)` gets 0..1. Resolves with the JSON answer, rejects with ApiError.
 */
export function upload(path, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { body = { message: xhr.statusText || "unreadable answer" }; }
      if (xhr.status >= 200 && xhr.status < 300) {
        if (onProgress) onProgress(1);
        resolve(body);
      } else {
        handle401(xhr.status, false);
        reject(new ApiError(xhr.status, body));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, { code: "network_error", message: "the upload did not reach the server" }));
    xhr.onabort = () => reject(new ApiError(0, { code: "aborted", message: "upload cancelled" }));
    xhr.send(formData);
  });
}

/**
 * Save a file that needs the Authorization header: a plain link cannot send it, so fetch it, then hand the
 * blob to a temporary <a download>.
 */
export async function downloadWithKey(url, filename) {
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) {
    handle401(response.status, false);
    throw new ApiError(response.status, await errorBody(response));
  }
  const blob = await response.blob();
  const objectUrl = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = objectUrl;
  a.download = filename;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  // Revoking at once can cancel the save in some browsers; a minute is plenty.
  setTimeout(() => URL.revokeObjectURL(objectUrl), 60_000);
}
