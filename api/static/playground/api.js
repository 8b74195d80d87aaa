// Calls to the sdqueue API: the API key, JSON requests, the error shape {"error": {"type", "message", "field"}}.
// Paths are relative ("v1/txt2img"), so the page works behind a proxy that serves the API under a path prefix.

const KEY_STORAGE = "sdqueue.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export class ApiError extends Error {
  constructor(status, type, message, field) {
    super(message);
    this.status = status;
    this.type = type;
    this.field = field;
  }

  // What the page shows: the server's own message, and the field at fault when it names one.
  describe() {
    return this.field ? `${this.message} (${this.field})` : this.message;
  }
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: an answer from a proxy in front of the API
  }
  const error = body && body.error;
  if (error && typeof error.message === "string") {
    return new ApiError(response.status, error.type, error.message, error.field ?? null);
  }
  return new ApiError(response.status, "http_error", `HTTP ${response.status} ${response.statusText}`.trim(), null);
}

// fetch with the key; resolves with the response of a 2xx answer, rejects with an ApiError otherwise.
export async function call(path, { method = "GET", body, headers = {}, signal } = {}) {
  const sent = { ...authHeaders(), ...headers };
  if (body !== undefined) sent["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, signal, headers: sent, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", `the server cannot be reached (${err.message})`, null);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(path, options) {
  return (await call(path, options)).json();
}

export function postJson(path, body) {
  return getJson(path, { method: "POST", body });
}

// A result image as a blob. Images the API serves itself (local storage) need the key, so an <img src> cannot load
// them when auth is on: they are fetched with it, from this page's origin by their key, which also works when the
// server's SDQ_PUBLIC_URL names another host than the one the page was opened at. Other URLs (presigned S3 URLs)
// are fetched as they are, without the key; that needs the bucket to allow this origin (CORS).
export async function imageBlob(record) {
  if (servedHere(record)) return (await call(`v1/images/${record.key}`)).blob();
  let response;
  try {
    response = await fetch(record.url);
  } catch (err) {
    throw new ApiError(0, "network", `the image cannot be read from ${record.url} (${err.message})`, null);
  }
  if (!response.ok) throw new ApiError(response.status, "http_error", `image download: HTTP ${response.status}`, null);
  return response.blob();
}

export function servedHere(record) {
  return new URL(record.url, location.href).pathname.endsWith(`/v1/images/${record.key}`);
}
