// The REST API (/api/v1) and the live event stream, with the API token from sessionStorage
// sent as `Authorization: Bearer` (never in a URL, never a cookie).

const KEY = "tcm.console.token";

export const auth = {
  get token() {
    return sessionStorage.getItem(KEY);
  },
  set(token) {
    sessionStorage.setItem(KEY, token);
  },
  clear() {
    sessionStorage.removeItem(KEY);
  },
};

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

let unauthorized = () => {};
export function onUnauthorized(callback) {
  unauthorized = callback;
}

function headers(extra) {
  return { Authorization: `Bearer ${auth.token || ""}`, ...extra };
}

export async function api(method, path, body) {
  const init = { method, headers: headers(), cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(`/api/v1${path}`, init);
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: text };
  }
  if (!r.ok) {
    const e = new ApiError(r.status, data);
    if (r.status === 401) unauthorized(e);
    throw e;
  }
  return data;
}

// A file the API answers (a CSV, an install package): GET, or `method` with a JSON `body`.
// The token goes in the header, as for every call; the caller saves the Blob (downloadBlob).
export async function apiBlob(path, { method = "GET", body, onResponse } = {}) {
  const init = { method, headers: headers(), cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(`/api/v1${path}`, init);
  if (!r.ok) {
    const e = new ApiError(r.status, await r.json().catch(() => ({})));
    if (r.status === 401) unauthorized(e);
    throw e;
  }
  if (onResponse) onResponse(r);
  return r.blob();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// What the page's streams received (read by bench/console.py; nothing depends on it).
export const streamStats = { batches: 0, events: 0, lastBatchAt: null, resyncs: 0 };
window.tcmStats = streamStats;

// One server-sent event stream read with fetch (so the token goes in a header): `batch`
// events carry deltas; `resync` (or a reconnect, when deltas may have been missed) asks
// the page to load its snapshot again.
export class LiveStream {
  constructor(topics, { onEvents, onResync, onStatus }) {
    this.topics = topics;
    this.onEvents = onEvents;
    this.onResync = onResync;
    this.onStatus = onStatus || (() => {});
    this.stopped = true;
    this.batches = 0;
  }

  start() {
    this.stopped = false;
    this.run();
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
  }

  async run() {
    let delay = 500;
    let reconnect = false;
    while (!this.stopped) {
      this.controller = new AbortController();
      try {
        const topics = encodeURIComponent(this.topics.join(","));
        const r = await fetch(`/api/v1/events?topics=${topics}`, {
          headers: headers(),
          signal: this.controller.signal,
          cache: "no-store",
        });
        if (!r.ok) {
          const body = await r.json().catch(() => ({}));
          this.onStatus("error", body.error || `HTTP ${r.status}`);
          if (r.status === 401 || r.status === 403 || r.status === 400) return;
        } else {
          const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += value;
            let end;
            while ((end = buffer.indexOf("\n\n")) >= 0) {
              const block = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              if (this.handle(block, reconnect)) {
                reconnect = false;
                delay = 500;
              }
            }
          }
        }
      } catch (e) {
        if (this.stopped) return;
      }
      if (this.stopped) return;
      reconnect = true;
      this.onStatus("reconnecting");
      await sleep(delay);
      delay = Math.min(delay * 2, 10000);
    }
  }

  handle(block, reconnect) {
    let type = "message";
    let data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      if (line.startsWith("event: ")) type = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (type === "hello") {
      this.onStatus("live");
      if (reconnect) this.onResync();
      return true;
    }
    if (type === "batch") {
      const batch = JSON.parse(data);
      this.batches += 1;
      streamStats.batches += 1;
      streamStats.events += batch.events.length;
      streamStats.lastBatchAt = Date.now() / 1000;
      if (batch.resync) streamStats.resyncs += 1;
      if (batch.resync) this.onResync();
      else this.onEvents(batch.events);
    }
    return false;
  }
}

// A page's live view: its stream starts first, then its snapshot loads; deltas that arrive
// while a snapshot loads wait and are applied after it (they are newer, or no older).
export function live(topics, { load, apply, onStatus, onError }) {
  let loading = null;
  let queued = [];
  const reload = () => {
    queued = [];
    loading = Promise.resolve()
      .then(load)
      .catch((e) => (onError ? onError(e) : console.warn("could not load:", e.message)))
      .finally(() => {
        loading = null;
        const waiting = queued;
        queued = [];
        if (waiting.length) apply(waiting);
      });
    return loading;
  };
  const stream = new LiveStream(topics, {
    onEvents: (events) => {
      if (loading) queued.push(...events);
      else apply(events);
    },
    onResync: reload,
    onStatus,
  });
  stream.start();
  const first = reload();
  return { stream, reload, ready: first, stop: () => stream.stop() };
}
