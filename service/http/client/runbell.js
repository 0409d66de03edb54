// Runbell's browser client: an ES module with no dependency. The gateway serves it at
// /v1/client/runbell.js; the same file is the npm package `runbell-client` (types: runbell.d.ts).
//
//   import { followRun } from "/v1/client/runbell.js";
//   const run = followRun({ dagId, runId, token, refreshToken: () => fetchNewToken() });
//   run.on("progress", (data) => show(data.progress.items));
//   const outcome = await run.result();
//
// It wraps EventSource for a run, an asset or a backfill and adds what EventSource lacks: it resumes
// from the last event it delivered after the gateway went away (a restart), delivers every event once
// (by its id, EPOCH-SEQ), says when the gateway could not resume (`recovery`: the whole history
// follows, rebuild from it), and asks `refreshToken` for a new token when the gateway refuses the one
// it has (EventSource cannot send headers, nor see why it failed: the client asks the gateway).

const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000];
const POSITION = /^(?:([0-9a-z]+)-)?([0-9]{1,18})$/;

/** An SSE id as a position {epoch, seq}; null when it is none. */
export function parsePosition(id) {
  const m = POSITION.exec(id || "");
  return m ? { epoch: m[1] || "", seq: Number(m[2]) } : null;
}

const positionText = (p) => (p.epoch ? `${p.epoch}-${p.seq}` : String(p.seq));
const isAfter = (a, b) => (a.epoch !== b.epoch ? a.epoch > b.epoch : a.seq > b.seq);

const KINDS = {
  run: ["recovery", "task", "run", "progress", "needs_input", "input_received", "outcome"],
  asset: ["ready", "asset"],
  backfill: ["slot", "progress"],
};

// Besides the data events, a stream tells what it does: "connecting", "open", "reconnecting" (the
// browser retries, or the gateway said shutdown or slow_consumer: {message}), "recovering" (the
// browser gave up: the stream asks the gateway why after {delay} ms), "duplicate" (a replayed event
// was dropped), "auth" (the token was refused and none could be had), "end", "gone" ({message}).
export class RunbellStream {
  /**
   * @param {object} options  path (the stream's path), kind ("run", "asset", "backfill"), types (the
   *   data events; default: the kind's), base (the gateway's URL; default: this page's origin),
   *   token (a string, or a function giving the current one), refreshToken (async () => token),
   *   lastEventId (resume after it), probePath (a GET, with its query, whose status says why the
   *   stream cannot open: 401/403 refresh the token, 404 gone, 5xx or no answer retry), probe (async
   *   () => "reconnect" | "retry" | "gone" | "auth" | "done", in place of the probePath's rule)
   */
  constructor({ path, kind, types = null, base = "", token = null, refreshToken = null, lastEventId = null, probePath = null, probe = null }) {
    Object.assign(this, { path, kind, base, refreshToken, probePath, probe });
    this.types = types || KINDS[kind];
    this.tokenOf = typeof token === "function" ? token : () => this.token;
    this.token = typeof token === "function" ? null : token;
    this.last = parsePosition(lastEventId);
    this.listeners = new Map();
    this.seen = new Set();
    this.failures = 0;
    this.closed = false;
    this.es = null;
    this.timer = null;
    this.stats = { opened: 0, reopened: 0, recovered: 0, refreshed: 0, duplicates: 0, unrecovered: 0 };
    queueMicrotask(() => this.open());
  }

  /** Closed for good (ended, gone, refused, or closed by its owner). */
  get stopped() {
    return this.closed;
  }

  /** Call fn(data, id) for each event of this type ("end" and "gone" too). Returns this. */
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(fn);
    return this;
  }

  /** The id of the last event delivered (resume after it). */
  get lastEventId() {
    return this.last ? positionText(this.last) : null;
  }

  url() {
    const params = new URLSearchParams();
    const token = this.tokenOf();
    if (token) params.set("access_token", token);
    if (this.last) params.set("last_event_id", positionText(this.last));
    const query = params.toString();
    return `${this.base}${this.path}${query ? `?${query}` : ""}`;
  }

  open() {
    if (this.closed) return;
    const es = new EventSource(this.url());
    this.es = es;
    this.emit("connecting", null, null);
    es.addEventListener("open", () => {
      if (es !== this.es) return;
      this.stats.opened += 1;
      if (this.stats.opened > 1) this.stats.reopened += 1;
      this.failures = 0;
      this.emit("open", { reopened: this.stats.opened > 1 }, null);
    });
    for (const type of new Set([...this.types, "recovery"])) es.addEventListener(type, (event) => this.receive(es, type, event));
    es.addEventListener("shutdown", () => {
      if (es === this.es) this.emit("reconnecting", { message: "gateway restarting: reconnecting…" }, null);
    });
    es.addEventListener("end", (event) => {
      if (es !== this.es) return;
      this.close();
      this.emit("end", parse(event.data), event.lastEventId);
    });
    es.addEventListener("error", (event) => {
      if (es !== this.es || this.closed) return;
      if (event.data) { // the gateway's `error` event: slow_consumer (reconnect) or run_not_found
        const body = parse(event.data) || {};
        if (body.error === "run_not_found") this.gone(body.message);
        else this.emit("reconnecting", { message: `${body.error || "error"}: reconnecting…` }, null);
        return;
      }
      if (es.readyState === EventSource.CLOSED) this.recover(); // the browser gave up: we decide
      else this.emit("reconnecting", { message: "reconnecting…" }, null); // the browser retries with Last-Event-ID
    });
  }

  receive(es, type, event) {
    if (es !== this.es) return;
    const data = parse(event.data);
    if (type === "recovery" && data && !data.recovered) this.stats.unrecovered += 1;
    const at = parsePosition(event.lastEventId);
    if (at && at.seq > 0 && type !== "recovery") {
      const key = `${type}:${positionText(at)}`;
      if (this.seen.has(key)) { // a replay of what was delivered already
        this.stats.duplicates += 1;
        this.emit("duplicate", { type, id: event.lastEventId }, event.lastEventId);
        return;
      }
      this.seen.add(key);
      if (!this.last || isAfter(at, this.last)) this.last = at;
    }
    this.emit(type, data, event.lastEventId);
  }

  emit(type, data, id) {
    for (const fn of this.listeners.get(type) || []) {
      try {
        fn(data, id);
      } catch (err) {
        setTimeout(() => { throw err; }); // one listener's error never stops the stream
      }
    }
  }

  async recover() {
    if (this.es) this.es.close();
    if (this.closed) return;
    const delay = BACKOFF_MS[Math.min(this.failures, BACKOFF_MS.length - 1)];
    this.failures += 1;
    this.emit("recovering", { delay }, null);
    await new Promise((resolve) => { this.timer = setTimeout(resolve, delay); });
    if (this.closed) return;
    this.stats.recovered += 1;
    let verdict;
    try {
      verdict = await (this.probe ? this.probe() : this.probeStatus());
    } catch (err) {
      verdict = "retry";
    }
    if (this.closed) return;
    if (verdict === "refresh") {
      try {
        this.token = await this.refreshToken();
        this.tokenOf = () => this.token;
        this.stats.refreshed += 1;
      } catch (err) {
        this.gone("the token could not be refreshed");
        return;
      }
      this.open();
    } else if (verdict === "reconnect") this.open();
    else if (verdict === "done") {
      this.close();
      this.emit("end", null, null);
    } else if (verdict === "gone") this.gone("the gateway knows no such stream");
    else if (verdict === "auth") {
      this.close();
      this.emit("auth", { message: "the gateway refused the token" }, null);
    } else this.recover();
  }

  /** The default probe: the status of a GET of probePath says what to do. */
  async probeStatus() {
    const token = this.tokenOf();
    const response = await fetch(`${this.base}${this.probePath}`, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
    if (response.status === 401 || response.status === 403) return this.refreshToken ? "refresh" : "auth";
    if (response.status === 404) return "gone";
    return response.status >= 500 ? "retry" : "reconnect";
  }

  gone(message) {
    this.close();
    this.emit("gone", { message }, null);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.es) this.es.close();
  }
}

function parse(text) {
  try {
    return JSON.parse(text);
  } catch (err) {
    return null;
  }
}

const runPath = (dagId, runId) => `/v1/dags/${encodeURIComponent(dagId)}/runs/${encodeURIComponent(runId)}`;

/** A run's events; result() is a Promise of its outcome (rejected when the run is gone). */
export function followRun({ dagId, runId, ...options }) {
  const stream = new RunbellStream({ ...options, kind: "run", path: `${runPath(dagId, runId)}/events`, probePath: `${runPath(dagId, runId)}/result?timeout=0` });
  let settle;
  const outcome = new Promise((resolve, reject) => { settle = { resolve, reject }; });
  outcome.catch(() => {}); // nobody asked for it yet: not an unhandled rejection
  stream.on("outcome", (data) => settle.resolve(data));
  stream.on("gone", (data) => settle.reject(new Error(data.message)));
  stream.on("end", () => settle.reject(new Error("the run ended without an outcome"))); // never after an outcome: a Promise settles once
  stream.result = () => outcome;
  return stream;
}

/** An asset's events, from now on (or after lastEventId), never ending. */
export function followAsset({ name, ...options }) {
  const path = `/v1/assets/${encodeURIComponent(name)}`;
  return new RunbellStream({ ...options, kind: "asset", path: `${path}/events`, probePath: `${path}/next?timeout=0` });
}

/** A backfill's slots and counts, until every slot's run has ended. */
export function followBackfill({ backfillId, ...options }) {
  const path = `/v1/backfills/${encodeURIComponent(backfillId)}`;
  return new RunbellStream({ ...options, kind: "backfill", path: `${path}/events`, probePath: `${path}/runs?limit=1` });
}
