// Server-Sent Events read with fetch, so that the Authorization header goes along (EventSource cannot send one).
// Parsing follows the HTML standard's event stream format: `event:`, `data:` (joined by newlines), `id:`, `retry:`,
// comment lines starting with ":", an event dispatched at each blank line.

import { ApiError, call } from "./api.js";

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}

// Feeds `onEvent(name, data)` with each event of `path` until a terminal event. A dropped connection (network,
// 5xx, a stream cut short) is resumed with Last-Event-ID after the server's `retry:` delay, as EventSource would;
// a 4xx answer (unknown job, bad key) rejects with its ApiError.
export async function followEvents(path, onEvent, { signal } = {}) {
  let lastEventId = null;
  let retryMs = 2000;
  for (;;) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastEventId) headers["Last-Event-ID"] = lastEventId;
      const response = await call(path, { headers, signal });
      const parser = new FrameParser((event) => {
        if (event.id) lastEventId = event.id;
        if (event.retry !== null) retryMs = event.retry;
        if (event.data === null) return false;
        onEvent(event.name, JSON.parse(event.data));
        return TERMINAL.has(event.name);
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        if (parser.push(value)) {
          reader.cancel().catch(() => {});
          return;
        }
      }
    } catch (err) {
      if (err.name === "AbortError") throw err;
      if (err instanceof ApiError && err.status >= 400 && err.status < 500) throw err;
    }
    await sleep(retryMs, signal);
  }
}

class FrameParser {
  constructor(dispatch) {
    this.dispatch = dispatch; // returns true to stop reading
    this.buffer = "";
    this.reset();
  }

  reset() {
    this.event = { name: "message", data: null, id: null, retry: null };
  }

  // Takes the next chunk of text; true once `dispatch` asked to stop.
  push(text) {
    this.buffer += text;
    let newline;
    while ((newline = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const length = this.buffer.startsWith("\r\n", newline) ? 2 : 1;
      if (this.buffer[newline] === "\r" && length === 1 && newline === this.buffer.length - 1) break; // maybe \r\n
      const line = this.buffer.slice(0, newline);
      this.buffer = this.buffer.slice(newline + length);
      if (this.line(line)) return true;
    }
    return false;
  }

  line(line) {
    if (line === "") {
      const stop = this.dispatch(this.event);
      this.reset();
      return stop;
    }
    if (line.startsWith(":")) return false;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event.name = value;
    else if (field === "data") this.event.data = this.event.data === null ? value : `${this.event.data}\n${value}`;
    else if (field === "id") this.event.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.event.retry = Number(value);
    return false;
  }
}
