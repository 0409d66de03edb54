// The runbell dashboard: plain JavaScript, no build step, no dependencies.
//
// Views live in the URL's fragment:
//   #/?status=running,failed&dag_id=d    the runs table (filter chips, infinite scroll, refreshed)
//   #/runs/{dag_id}/{run_id}            one run: task timeline and outcome, live over SSE
//   #/backfills/{backfill_id}           one backfill: its slots and a live progress bar
//
// Live streams are the browser client's (/v1/client/runbell.js), over EventSource. The browser
// reconnects by itself after a dropped connection and sends Last-Event-ID; when it gives up (the
// gateway answered an error while restarting), the client opens a new one with ?last_event_id= after
// a bounded backoff. Events are de-duplicated by id, so
// a replay after any reconnect never shows an event twice, and nothing after the last one seen is
// lost (the gateway replays from the run's log). An id is a position, EPOCH-SEQ: a newer epoch's
// events (Redis lost the run's state and counted from 1 again) come after every older one.
import { RunbellStream, parsePosition } from "/v1/client/runbell.js";

(() => {
  const STATUSES = ["queued", "running", "success", "failed", "unknown"];
  const PAGE_SIZE = 50;
  const REFRESH_MS = 2000; // the runs table re-reads its first page this often
  const TOKEN_KEY = "runbell.token";
  const TERMINAL_RUN = new Set(["success", "failed"]);
  // What the live streams did, for whoever looks (the browser test does): opened, recovered by the page.
  const stats = { opened: 0, reopened: 0, recovered: 0, duplicates: 0, unrecovered: 0 };
  window.runbellStats = stats;

  // -- small helpers --------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key === "style") Object.assign(el.style, value); // CSSOM: allowed by the page's CSP
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  const enc = encodeURIComponent;
  const runKey = (dagId, runId) => `${dagId}\u0000${runId}`;
  const runHash = (dagId, runId) => `#/runs/${enc(dagId)}/${enc(runId)}`;
  const runPath = (dagId, runId) => `/v1/dags/${enc(dagId)}/runs/${enc(runId)}`;

  function toMs(value) {
    if (value === null || value === undefined || value === "") return null;
    if (typeof value === "number") return value * 1000; // event ts: seconds since the epoch
    const ms = Date.parse(value);
    return Number.isNaN(ms) ? null : ms;
  }

  const pad = (n) => String(n).padStart(2, "0");
  function fmtTime(value) {
    const ms = toMs(value);
    if (ms === null) return "—";
    const d = new Date(ms);
    const day = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    return `${day} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtDuration(ms) {
    if (ms === null || ms === undefined || ms < 0 || Number.isNaN(ms)) return "—";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 60) return `${s.toFixed(1)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  const taskLabel = (taskId, mapIndex) => (mapIndex !== undefined && mapIndex !== null && mapIndex >= 0 ? `${taskId}[${mapIndex}]` : taskId);
  const badge = (state, extra) => h("span", { class: `badge state-${state || "unknown"}`, dataset: { state: state || "unknown" } }, extra || state || "unknown");

  function pretty(value) {
    try {
      return JSON.stringify(value, null, 2);
    } catch (err) {
      return String(value);
    }
  }

  // -- the connection indicator ---------------------------------------------------------------

  const conn = document.getElementById("conn");
  function setConn(state, text) {
    conn.dataset.state = state;
    conn.textContent = text || state;
  }

  // -- the token ------------------------------------------------------------------------------

  function takeTokenFromUrl() {
    const url = new URL(window.location.href);
    if (!url.searchParams.has("token")) return;
    sessionStorage.setItem(TOKEN_KEY, url.searchParams.get("token"));
    url.searchParams.delete("token"); // not left in the address bar or the history
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

  const tokenDialog = document.getElementById("token-dialog");
  const forgetButton = document.getElementById("forget-token");
  function askToken(message) {
    document.getElementById("token-message").textContent = message;
    if (!tokenDialog.hidden) return;
    tokenDialog.hidden = false;
    document.getElementById("token-input").focus();
  }
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token-input");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    tokenDialog.hidden = true;
    forgetButton.hidden = false;
    route();
  });
  forgetButton.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    forgetButton.hidden = true;
    route();
  });

  // -- HTTP -----------------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, body) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  // {status, body}; throws only when the gateway cannot be reached. A refused token opens the prompt.
  async function request(path, { signal } = {}) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = `Bearer ${token()}`;
    const response = await fetch(path, { headers, signal, cache: "no-store" });
    let body = null;
    if (response.status !== 204) {
      try {
        body = await response.json();
      } catch (err) {
        body = null;
      }
    }
    if (response.status === 401 || response.status === 403) {
      askToken(token() ? `The token was refused: ${(body && body.message) || response.status}` : "The gateway asks for a read token.");
    }
    return { status: response.status, body };
  }

  async function getJson(path, options) {
    const { status, body } = await request(path, options);
    if (status < 200 || status >= 300) throw new HttpError(status, body);
    return body;
  }

  const describeError = (err) => (err instanceof HttpError ? `${err.status}: ${err.message}` : `gateway unreachable (${err.message || err})`);

  // -- live streams ---------------------------------------------------------------------------

  // The page's live streams are the browser client's (/v1/client/runbell.js: one EventSource that
  // survives gateway restarts, each event once by its id). This adapter shows what a stream does in
  // the connection indicator and the stats, and hands its events to a view. `probe()` decides what to
  // do after the browser gave up: "reconnect", "done", "gone", "auth", or "retry" (gateway still away).
  const position = parsePosition;
  const isAfter = (a, b) => (a.epoch !== b.epoch ? a.epoch > b.epoch : a.seq > b.seq);

  class LiveStream {
    constructor({ path, types, onEvent, onEnd, onGone, probe, onReopen }) {
      Object.assign(this, { path, types, onEvent, onEnd, onGone, probe, onReopen });
      this.stream = null;
    }

    get stopped() {
      return !this.stream || this.stream.stopped;
    }

    start() {
      const stream = new RunbellStream({ path: this.path, kind: "run", types: this.types, token: () => token(), probe: this.probe });
      this.stream = stream;
      stream.on("connecting", () => setConn("connecting", "connecting…"));
      stream.on("open", ({ reopened }) => {
        setConn("live", "live");
        stats.opened += 1;
        if (reopened) {
          stats.reopened += 1;
          if (this.onReopen) this.onReopen();
        }
      });
      stream.on("reconnecting", ({ message }) => setConn("reconnecting", message));
      stream.on("recovering", ({ delay }) => setConn("reconnecting", `gateway away: retrying in ${(delay / 1000).toFixed(1)} s…`));
      stream.on("duplicate", () => { stats.duplicates += 1; });
      stream.on("recovery", (data) => { if (!(data || {}).recovered) stats.unrecovered += 1; });
      for (const type of this.types) {
        stream.on(type, (data, id) => {
          const at = position(id) || (data && data.seq ? { epoch: data.epoch || "", seq: data.seq } : null);
          this.onEvent(type, data, at);
        });
      }
      stream.on("end", (data) => {
        setConn("ended", "ended");
        if (this.onEnd) this.onEnd(data);
      });
      stream.on("gone", ({ message }) => { if (this.onGone) this.onGone(message); });
      stream.on("auth", () => setConn("error", "token needed"));
      const probe = this.probe;
      stream.probe = async () => {
        stats.recovered += 1;
        return probe();
      };
    }

    stop() {
      if (this.stream) this.stream.close();
    }
  }

  function parse(text) {
    try {
      return JSON.parse(text);
    } catch (err) {
      return null;
    }
  }

  // -- the runs table -------------------------------------------------------------------------

  class RunsView {
    constructor(query) {
      const statuses = (query.getAll("status").join(",") || "").split(",").map((s) => s.trim()).filter(Boolean);
      this.statuses = new Set(statuses);
      this.dagId = query.get("dag_id") || "";
      this.rows = []; // in the gateway's order
      this.byKey = new Map(); // key -> {row, tr, json}
      this.cursor = null;
      this.pages = 0;
      this.loading = false;
      this.dead = false;
      this.timer = null;
    }

    mount(root) {
      const chips = STATUSES.map((status) => h("button", {
        type: "button", class: `chip state-${status}`, dataset: { status }, "aria-pressed": String(this.statuses.has(status)),
        onclick: () => this.toggle(status),
      }, status));
      const dagInput = h("input", { id: "dag-filter", type: "search", placeholder: "DAG id", value: this.dagId });
      dagInput.addEventListener("change", () => this.navigate(this.statuses, dagInput.value.trim()));
      this.tbody = h("tbody");
      this.status = h("p", { id: "runs-status", class: "muted" }, "Loading…");
      this.sentinel = h("div", { id: "runs-sentinel", class: "sentinel" });
      root.replaceChildren(
        h("section", { class: "filters" },
          h("div", { id: "status-chips", class: "chips", role: "group", "aria-label": "status" },
            h("button", { type: "button", class: "chip", dataset: { status: "" }, "aria-pressed": String(this.statuses.size === 0),
              onclick: () => this.navigate(new Set(), this.dagId) }, "all"),
            chips),
          dagInput),
        h("table", { id: "runs", class: "grid" },
          h("thead", null, h("tr", null, ["State", "DAG", "Run", "Type", "Run after", "Started", "Duration", "Outcome"].map((t) => h("th", null, t)))),
          this.tbody),
        this.sentinel,
        this.status,
      );
      // The observer says when the end of the table may have come near; whether it is near is measured
      // again then (its entries can describe a layout from before the last page was added).
      this.observer = new IntersectionObserver((entries) => {
        if (entries.some((e) => e.isIntersecting)) this.fillViewport();
      }, { rootMargin: "400px" });
      this.observer.observe(this.sentinel);
      this.loadFirst();
    }

    unmount() {
      this.dead = true;
      clearTimeout(this.timer);
      if (this.observer) this.observer.disconnect();
    }

    toggle(status) {
      const next = new Set(this.statuses);
      if (next.has(status)) next.delete(status);
      else next.add(status);
      this.navigate(next, this.dagId);
    }

    navigate(statuses, dagId) {
      const params = new URLSearchParams();
      if (statuses.size) params.set("status", STATUSES.filter((s) => statuses.has(s)).join(","));
      if (dagId) params.set("dag_id", dagId);
      const query = params.toString().replace(/%2C/g, ",");
      location.hash = query ? `#/?${query}` : "#/";
    }

    url(cursor) {
      const params = new URLSearchParams();
      if (this.statuses.size) params.set("status", STATUSES.filter((s) => this.statuses.has(s)).join(","));
      if (this.dagId) params.set("dag_id", this.dagId);
      params.set("order", "desc");
      params.set("limit", String(PAGE_SIZE));
      if (cursor) params.set("cursor", cursor);
      return `/v1/runs?${params}`;
    }

    async loadFirst() {
      await this.fetchPage(null);
      this.scheduleRefresh();
    }

    loadMore() {
      if (this.cursor && !this.loading && !this.dead) this.fetchPage(this.cursor);
    }

    async fetchPage(cursor) {
      this.loading = true;
      if (cursor) this.status.textContent = "Loading more…";
      try {
        const body = await getJson(this.url(cursor));
        if (this.dead) return;
        if (cursor) {
          const shown = new Set(this.rows.map((r) => runKey(r.dag_id, r.run_id)));
          this.rows = this.rows.concat(body.runs.filter((r) => !shown.has(runKey(r.dag_id, r.run_id))));
          this.pages += 1;
        } else {
          this.rows = body.runs;
          this.pages = 1;
        }
        this.cursor = body.next_cursor || null;
        this.render();
        setConn("live", "live");
      } catch (err) {
        if (this.dead) return;
        this.status.textContent = `Could not load runs: ${describeError(err)}`;
        this.status.dataset.error = "true";
        setConn("offline", err instanceof HttpError ? "error" : "gateway unreachable");
        return;
      } finally {
        this.loading = false;
      }
      this.fillViewport();
    }

    // The first page again: new runs appear at the top, changed ones change in place.
    async refreshHead() {
      if (this.dead) return;
      if (this.loading || document.hidden) {
        this.scheduleRefresh();
        return;
      }
      this.loading = true;
      try {
        const body = await getJson(this.url(null));
        if (this.dead) return;
        const head = body.runs;
        const last = head[head.length - 1];
        // What was loaded beyond the first page is kept when it still joins on: the new first page
        // reaches back to the newest row shown before. Otherwise (many new runs) a gap could hide
        // between them, so the list starts again from the new first page and its cursor.
        const joins = this.pages > 1 && body.next_cursor && last && this.rows.length
          && (this.rows[0].run_after || "") >= (last.run_after || "");
        if (joins) {
          const headKeys = new Set(head.map((r) => runKey(r.dag_id, r.run_id)));
          const tail = this.rows.filter((r) => !headKeys.has(runKey(r.dag_id, r.run_id)) && (r.run_after || "") < (last.run_after || ""));
          this.rows = head.concat(tail);
        } else {
          this.rows = head;
          this.cursor = body.next_cursor || null;
          this.pages = 1;
        }
        this.render();
        setConn("live", "live");
      } catch (err) {
        if (this.dead) return;
        this.status.textContent = `Could not refresh: ${describeError(err)}`;
        this.status.dataset.error = "true";
        setConn("offline", err instanceof HttpError ? "error" : "gateway unreachable");
      } finally {
        this.loading = false;
      }
      this.scheduleRefresh();
      this.fillViewport();
    }

    scheduleRefresh() {
      clearTimeout(this.timer);
      if (!this.dead) this.timer = setTimeout(() => this.refreshHead(), REFRESH_MS);
    }

    // Infinite scroll: keep loading while the end of the table is (nearly) on screen.
    fillViewport() {
      requestAnimationFrame(() => {
        if (this.dead || !this.cursor || this.loading) return;
        if (this.sentinel.getBoundingClientRect().top < window.innerHeight + 400) this.loadMore();
      });
    }

    render() {
      delete this.status.dataset.error;
      const wanted = new Set();
      let previous = null;
      for (const row of this.rows) {
        const key = runKey(row.dag_id, row.run_id);
        wanted.add(key);
        const json = JSON.stringify(row);
        let entry = this.byKey.get(key);
        if (!entry || entry.json !== json) {
          const tr = this.rowElement(row);
          if (entry) entry.tr.replaceWith(tr);
          entry = { tr, json };
          this.byKey.set(key, entry);
        } else if (row.started && !row.ended) {
          entry.tr.querySelector(".duration").textContent = fmtDuration(Date.now() - toMs(row.started)); // it grows
        }
        const expected = previous ? previous.nextSibling : this.tbody.firstChild;
        if (expected !== entry.tr) this.tbody.insertBefore(entry.tr, expected);
        previous = entry.tr;
      }
      for (const [key, entry] of this.byKey) {
        if (!wanted.has(key)) {
          entry.tr.remove();
          this.byKey.delete(key);
        }
      }
      const shown = this.rows.length;
      this.status.textContent = shown === 0 ? "No runs match." : `${shown} run${shown === 1 ? "" : "s"}${this.cursor ? " — scroll for more" : ""}`;
    }

    rowElement(row) {
      const open = () => { location.hash = runHash(row.dag_id, row.run_id); };
      const started = toMs(row.started);
      const ended = toMs(row.ended);
      const duration = started === null ? null : (ended === null ? Date.now() : ended) - started;
      return h("tr", { class: "clickable", dataset: { key: runKey(row.dag_id, row.run_id), state: row.state, dag: row.dag_id, run: row.run_id }, onclick: open },
        h("td", null, badge(row.state), row.stale ? h("span", { class: "badge stale", title: "no event for a while: the run may be dead" }, "stale") : null),
        h("td", null, row.dag_id),
        h("td", { class: "mono" }, h("a", { href: runHash(row.dag_id, row.run_id), onclick: (e) => e.stopPropagation() }, row.run_id)),
        h("td", null, row.run_type || "—",
          row.backfill_id ? [" ", h("a", { href: `#/backfills/${enc(row.backfill_id)}`, onclick: (e) => e.stopPropagation() }, `backfill ${row.backfill_id}`)] : null),
        h("td", null, fmtTime(row.run_after)),
        h("td", null, fmtTime(row.started)),
        h("td", { class: "duration" }, fmtDuration(duration)),
        h("td", { class: "outcome-cell" }, outcomeSummary(row)),
      );
    }
  }

  function outcomeSummary(row) {
    const status = typeof row.outcome === "object" && row.outcome ? row.outcome.status : row.outcome;
    const failure = row.first_failure || (row.outcome && row.outcome.failure);
    if (status === "failed" && failure) {
      const message = failure.error ? `${failure.error.type}: ${failure.error.message}` : "";
      return [badge("failed"), " ", failure.task_id ? taskLabel(failure.task_id, failure.map_index) : "run", message ? h("span", { class: "muted" }, ` — ${message}`) : null];
    }
    if (status === "success") {
      const task = row.result_task;
      return [badge("success"), task ? h("span", { class: "muted" }, ` result of ${taskLabel(task.task_id, task.map_index)}`) : null];
    }
    return status ? h("span", { class: "muted" }, status) : "—";
  }

  // -- a task waiting for a person ------------------------------------------------------------
  //
  // What one of Airflow's human-in-the-loop operators asks (the stream's needs_input event), as a
  // card: its options as buttons (checkboxes when several may be chosen), its params as form fields
  // typed by their JSON schema, its deadline counting down. The answer goes to the gateway's
  // POST .../tasks/{task_id}/input with the page's token, which passes it on to Airflow. Every text
  // here comes from a DAG's author: it is only ever set as text (h() appends text nodes).

  function fmtCountdown(ms) {
    const s = Math.max(Math.floor(ms / 1000), 0);
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${pad(s % 60)} s`;
    const hours = Math.floor(m / 60);
    if (hours < 48) return `${hours} h ${pad(m % 60)} min`;
    return `${Math.floor(hours / 24)} days ${hours % 24} h`;
  }

  // Airflow sends each param as {value, schema, description} (older releases: the bare value).
  function paramSpec(raw) {
    const full = raw && typeof raw === "object" && !Array.isArray(raw) && ("schema" in raw || "value" in raw);
    const spec = full ? raw : { value: raw };
    const schema = spec.schema && typeof spec.schema === "object" ? spec.schema : {};
    const value = spec.value === undefined ? null : spec.value;
    let types = Array.isArray(schema.type) ? schema.type : (schema.type ? [schema.type] : []);
    const nullable = types.includes("null") || types.length === 0;
    types = types.filter((t) => t !== "null");
    let type = types[0];
    if (!type) { // no type in the schema: guess from the default
      if (typeof value === "boolean") type = "boolean";
      else if (typeof value === "number") type = Number.isInteger(value) ? "integer" : "number";
      else if (value !== null && typeof value === "object") type = "json";
      else type = "string";
    }
    if (type === "array" || type === "object") type = "json";
    return { value, schema, type, nullable, description: typeof spec.description === "string" ? spec.description : "" };
  }

  class FieldError extends Error {}

  // One form field for a param: the control, and how to read its value back as JSON.
  function paramField(name, raw) {
    const { value, schema, type, nullable, description } = paramSpec(raw);
    let control;
    let read;
    if (Array.isArray(schema.enum) && schema.enum.length) {
      const choices = schema.enum;
      control = h("select", null, choices.map((choice) => h("option", { selected: JSON.stringify(choice) === JSON.stringify(value) }, choice === null ? "—" : String(choice))));
      read = () => choices[control.selectedIndex];
    } else if (type === "boolean") {
      control = h("input", { type: "checkbox", checked: value === true });
      read = () => control.checked;
    } else if (type === "integer" || type === "number") {
      control = h("input", { type: "number", step: type === "integer" ? (schema.multipleOf || 1) : "any", min: schema.minimum, max: schema.maximum, value: value ?? "" });
      read = () => {
        if (control.value.trim() === "") {
          if (nullable) return null;
          throw new FieldError("a number is needed");
        }
        const number = Number(control.value);
        if (Number.isNaN(number) || (type === "integer" && !Number.isInteger(number))) throw new FieldError(`${type === "integer" ? "a whole number" : "a number"} is needed`);
        return number;
      };
    } else if (type === "json") {
      control = h("textarea", { rows: 4, spellcheck: "false" }, value === null ? "" : pretty(value));
      read = () => {
        if (control.value.trim() === "") return null;
        try {
          return JSON.parse(control.value);
        } catch (err) {
          throw new FieldError("JSON is needed");
        }
      };
    } else {
      const multiline = schema.format === "multiline";
      const attrs = { minlength: schema.minLength, maxlength: schema.maxLength, pattern: schema.pattern, spellcheck: "false" };
      control = multiline ? h("textarea", { rows: 3, ...attrs }, value ?? "") : h("input", { type: schema.format === "date" ? "date" : "text", ...attrs, value: value ?? "" });
      // Left empty, a param with no default or a nullable one gets null, as Airflow's own form sends.
      read = () => (control.value === "" && (value === null || nullable) && !schema.minLength ? null : control.value);
    }
    control.dataset.param = name;
    const label = h("label", { class: "field" },
      h("span", { class: "field-name" }, typeof schema.title === "string" && schema.title ? schema.title : name),
      control,
      description ? h("span", { class: "muted small" }, description) : null);
    return {
      name,
      label,
      read() {
        if (!control.checkValidity()) throw new FieldError(control.validationMessage);
        return read();
      },
      control,
    };
  }

  class InputCard {
    constructor(dagId, runId, ask) {
      this.ask = ask;
      this.status = "open";
      const base = `${runPath(dagId, runId)}/tasks/${enc(ask.task_id)}/input`;
      this.path = ask.map_index >= 0 ? `${base}?map_index=${ask.map_index}` : base;
      this.build();
      this.tick();
    }

    get tryNumber() {
      return this.ask.try_number || 0;
    }

    build() {
      const a = this.ask;
      const params = a.params && typeof a.params === "object" ? a.params : {};
      this.fields = Object.entries(params).map(([name, raw]) => paramField(name, raw));
      const options = Array.isArray(a.options) ? a.options : [];
      const defaults = new Set(Array.isArray(a.defaults) ? a.defaults : []);
      const defaultNote = "the default: taken when the deadline passes";
      let choices;
      if (a.multiple) {
        this.boxes = options.map((option) => h("input", { type: "checkbox", value: option, checked: defaults.has(option), dataset: { option } }));
        choices = h("div", { class: "choices" },
          h("div", { class: "checks" }, this.boxes.map((box, i) => h("label", { class: "check", title: defaults.has(options[i]) ? defaultNote : null }, box, " ", options[i]))),
          h("button", { type: "button", class: "send", onclick: () => this.sendChecked() }, "Send"));
      } else {
        choices = h("div", { class: "choices" }, options.map((option) => h("button", {
          type: "button", class: defaults.has(option) ? "option default" : "option", dataset: { option }, title: defaults.has(option) ? defaultNote : null,
          onclick: () => this.send([option]),
        }, option)));
      }
      const users = Array.isArray(a.assigned_users) ? a.assigned_users : [];
      this.countdown = h("span", { class: "countdown" });
      this.statusEl = h("p", { class: "answer-status", role: "status" });
      this.el = h("article", { class: "card ask", dataset: { task: a.task_id, map: a.map_index, status: this.status, kind: a.kind || "choice" } },
        h("p", { class: "ask-task muted small" }, `${taskLabel(a.task_id, a.map_index)}${a.try_number ? ` (try ${a.try_number})` : ""} waits for a person`,
          h("span", { class: "tag" }, a.kind || "choice")),
        h("h3", { class: "subject" }, a.subject || "(no subject)"),
        a.body ? h("div", { class: "ask-body" }, a.body) : null,
        a.truncated ? h("p", { class: "muted small" }, "Part of this request was too large to be sent here: Airflow's own page shows it whole.") : null,
        this.fields.length ? h("div", { class: "fields" }, this.fields.map((f) => f.label)) : null,
        choices,
        a.deadline ? h("p", { class: "deadline" }, `Deadline ${fmtTime(a.deadline)} — `, this.countdown) : null,
        users.length ? h("p", { class: "assigned muted" }, "Who may answer: ",
          users.map((u) => (u.name && u.name !== u.id ? `${u.name} (${u.id})` : u.id)).join(", ")) : null,
        this.statusEl,
      );
    }

    // Once a second: how long is left before Airflow takes the defaults.
    tick() {
      if (!this.ask.deadline) return;
      const left = toMs(this.ask.deadline) - Date.now();
      this.countdown.dataset.remaining = String(Math.max(Math.floor(left / 1000), 0));
      if (left > 0) this.countdown.textContent = `in ${fmtCountdown(left)}`;
      else this.countdown.textContent = this.ask.defaults && this.ask.defaults.length ? "passed: Airflow takes the defaults" : "passed";
    }

    setStatus(status, text, ...extra) {
      this.status = status;
      this.el.dataset.status = status;
      this.statusEl.className = `answer-status${status === "error" ? " err" : ""}`;
      this.statusEl.replaceChildren(text, ...extra);
      const locked = status === "sending" || status === "answered";
      for (const control of this.el.querySelectorAll(".choices button, .choices input, .fields input, .fields select, .fields textarea")) control.disabled = locked;
    }

    sendChecked() {
      const chosen = this.boxes.filter((box) => box.checked).map((box) => box.value);
      if (!chosen.length) {
        this.setStatus("error", "Choose at least one option.");
        return;
      }
      this.send(chosen);
    }

    readParams() {
      const values = {};
      for (const field of this.fields) {
        try {
          values[field.name] = field.read();
          field.control.removeAttribute("aria-invalid");
        } catch (err) {
          field.control.setAttribute("aria-invalid", "true");
          field.control.focus();
          throw new FieldError(`${field.name}: ${err.message}`);
        }
      }
      return values;
    }

    async send(chosen) {
      if (this.status === "sending" || this.status === "answered") return;
      const body = { chosen_options: chosen };
      try {
        if (this.fields.length) body.params_input = this.readParams();
      } catch (err) {
        this.setStatus("error", err.message);
        return;
      }
      this.setStatus("sending", "Sending…");
      const headers = { Accept: "application/json", "Content-Type": "application/json" };
      if (token()) headers.Authorization = `Bearer ${token()}`;
      let response;
      let reply = null;
      try {
        response = await fetch(this.path, { method: "POST", headers, body: JSON.stringify(body), cache: "no-store" });
        reply = await response.json().catch(() => null);
      } catch (err) {
        this.setStatus("error", "The gateway could not be reached: the answer was not sent.");
        return;
      }
      if (response.ok) {
        const taken = reply && Array.isArray(reply.chosen_options) ? reply.chosen_options : chosen;
        this.setStatus("answered", `Answered: ${taken.join(", ")}`);
        return;
      }
      const message = (reply && reply.message) || `HTTP ${response.status}`;
      if (response.status === 409) {
        this.setStatus("answered", `Already answered: ${message}`);
      } else if (response.status === 401 || response.status === 403) {
        this.setStatus("error", `Not allowed: ${message}. `, h("button", {
          type: "button", class: "link other-token", onclick: () => askToken("Answering needs a token with the respond role for this DAG."),
        }, "use another token"));
      } else {
        this.setStatus("error", `Not sent (${response.status}): ${message}`);
      }
    }

    // The gateway says an answer reached Airflow (this page's or anyone's).
    received() {
      if (this.status !== "answered") this.setStatus("answered", "Answered");
      this.el.dataset.received = "true";
    }
  }

  // -- one run --------------------------------------------------------------------------------

  class RunView {
    constructor(dagId, runId) {
      this.dagId = dagId;
      this.runId = runId;
      this.tasks = new Map(); // "task\u0000map" -> {task_id, map_index, try_number, state, start, end, error, seq, ...}
      this.run = { state: "unknown" };
      this.runStateSeq = 0;
      this.outcome = null;
      this.terminalSeen = false;
      this.requests = new Map(); // "task\u0000map" -> InputCard: what a task waiting for a person asks
      this.progressKeys = new Map(); // key -> {value, task_id, map_index}: the latest value of each key
      this.progressText = []; // the chunks (values without a key), in order
      this.progressAt = null; // the position of the last progress event applied: a replay applies nothing twice
      this.progressDropped = 0;
      this.dead = false;
    }

    mount(root) {
      this.inputsEl = h("section", { id: "needs-input", class: "inputs", "aria-live": "polite" });
      this.stateEl = h("span", { id: "run-state" }, badge("unknown"));
      this.metaEl = h("dl", { id: "run-meta", class: "meta" });
      this.outcomeEl = h("section", { id: "outcome", class: "card outcome", dataset: { status: "pending" } });
      this.progressEl = h("section", { id: "progress", class: "card progress", hidden: true });
      this.timelineBody = h("tbody");
      this.eventList = h("ol", { id: "events", class: "events" });
      this.notice = h("p", { id: "run-notice", class: "muted" });
      root.replaceChildren(
        h("p", null, h("a", { href: "#/" }, "← runs")),
        h("h1", { class: "run-title" }, this.stateEl, " ", h("span", { class: "muted" }, this.dagId), " / ", h("span", { id: "run-id", class: "mono" }, this.runId)),
        this.notice,
        this.metaEl,
        this.inputsEl,
        this.progressEl,
        this.outcomeEl,
        h("h2", null, "Tasks"),
        h("table", { id: "tasks", class: "grid timeline" },
          h("thead", null, h("tr", null, ["Task", "Try", "State", "Timeline", "Started", "Duration"].map((t) => h("th", null, t)))),
          this.timelineBody),
        h("h2", null, "Events"),
        this.eventList,
      );
      this.renderOutcome();
      this.renderMeta();
      this.loadDetail();
      this.stream = new LiveStream({
        path: `${runPath(this.dagId, this.runId)}/events`,
        types: ["task", "run", "progress", "outcome", "needs_input", "input_received"],
        onEvent: (type, data) => this.onEvent(type, data),
        onEnd: () => this.renderMeta(),
        onGone: (message) => { this.notice.textContent = message || `The gateway knows no run ${this.runId} of ${this.dagId}.`; },
        onReopen: () => { if (!this.outcome) this.checkOutcome(); },
        probe: () => this.probe(),
      });
      this.stream.start();
      this.ticker = setInterval(() => {
        if (!this.stream.stopped) this.renderTimeline();
        for (const card of this.requests.values()) card.tick();
      }, 1000);
    }

    unmount() {
      this.dead = true;
      if (this.stream) this.stream.stop();
      clearInterval(this.ticker);
    }

    async loadDetail() {
      try {
        const row = await getJson(runPath(this.dagId, this.runId));
        if (this.dead) return;
        Object.assign(this.run, row, { state: this.runStateSeq ? this.run.state : row.state });
        if (!this.progressAt) { // the stream's progress is newer: the stored latest values only fill in before it
          for (const p of row.progress || []) if (p.key !== null) this.progressKeys.set(p.key, p);
          this.renderProgress();
        }
        for (const ti of row.task_instances || []) {
          const key = `${ti.task_id}\u0000${ti.map_index}`;
          const task = this.tasks.get(key);
          if (task && (task.seq || (task.try_number || 0) > (ti.try_number || 0))) continue; // events are newer
          this.tasks.set(key, { ...task, task_id: ti.task_id, map_index: ti.map_index, try_number: ti.try_number, state: ti.state,
            start: toMs(ti.started), end: toMs(ti.ended), seq: 0 });
        }
        this.renderMeta();
        this.renderTimeline();
      } catch (err) {
        // The run's events still tell everything; the detail only adds what came before them.
      }
    }

    // The stream was refused (while the gateway restarts): what now?
    async probe() {
      const { status, body } = await request(`${runPath(this.dagId, this.runId)}/result?timeout=0`);
      if (status === 404) return "gone";
      if (status === 401 || status === 403) return "auth";
      if (status === 200) {
        this.showOutcome(body);
        return TERMINAL_RUN.has(body.run_state) && this.terminalSeen ? "done" : "reconnect";
      }
      return status === 202 ? "reconnect" : "retry";
    }

    // After a reconnect the outcome may have been decided by an event already seen.
    async checkOutcome() {
      try {
        const { status, body } = await request(`${runPath(this.dagId, this.runId)}/result?timeout=0`);
        if (status === 200 && !this.dead) this.showOutcome(body);
      } catch (err) { /* the stream will bring it */ }
    }

    onEvent(type, data, id) {
      if (!data) return;
      if (type === "outcome") {
        this.showOutcome(data);
        return;
      }
      if (type === "needs_input") {
        this.showRequest(data);
        return;
      }
      if (type === "input_received") {
        this.requestClosed(data);
        return;
      }
      if (type === "progress") {
        this.onProgress(data);
        return;
      }
      this.appendEvent(type, data);
      if (type === "run") {
        this.run.state = data.state;
        this.runStateSeq = data.seq;
        for (const field of ["run_type", "logical_date", "run_after", "backfill_id"]) if (data[field]) this.run[field] = data[field];
        if (!this.run.startTs && data.state === "running") this.run.startTs = data.ts;
        if (TERMINAL_RUN.has(data.state)) {
          this.terminalSeen = true;
          this.run.endTs = data.ts;
          for (const key of [...this.requests.keys()]) this.dropRequest(key); // nobody can answer now
        }
        if (data.ts && !this.run.firstTs) this.run.firstTs = data.ts;
        this.renderMeta();
        return;
      }
      const key = `${data.task_id}\u0000${data.map_index}`;
      const task = this.tasks.get(key) || { task_id: data.task_id, map_index: data.map_index, start: null, end: null };
      const tryNumber = data.try_number || task.try_number || 1;
      if (task.try_number && tryNumber < task.try_number) return; // a late event of an older try
      if (task.try_number && tryNumber > task.try_number) { task.start = null; task.end = null; } // a new try
      const ts = toMs(data.ts);
      Object.assign(task, { try_number: tryNumber, state: data.state, seq: data.seq, result_task: data.result_task || task.result_task, critical: data.critical || task.critical });
      if (task.start === null || task.start === undefined) task.start = ts;
      task.end = ["success", "failed", "skipped", "up_for_retry"].includes(data.state) ? ts : null;
      task.error = data.error || null;
      this.tasks.set(key, task);
      this.renderTimeline();
      this.taskMoved(key, data.state, tryNumber);
    }

    // A task's partial output: each key's latest value, and the chunks (values without a key) as one text.
    onProgress(data) {
      const at = { epoch: data.epoch || "", seq: data.seq };
      if (this.progressAt && !isAfter(at, this.progressAt)) return; // replayed after a reconnect
      this.progressAt = at;
      for (const item of data.progress.items) {
        if (item.key === undefined || item.key === null) this.progressText.push(typeof item.value === "string" ? item.value : pretty(item.value));
        else this.progressKeys.set(item.key, { value: item.value, task_id: data.task_id, map_index: data.map_index });
      }
      this.progressDropped += data.progress.dropped || 0;
      this.renderProgress();
    }

    renderProgress() {
      const keyed = [...this.progressKeys.entries()];
      if (!keyed.length && !this.progressText.length) return;
      this.progressEl.hidden = false;
      this.progressEl.replaceChildren(
        h("h2", null, "Progress"),
        keyed.length ? h("dl", { id: "progress-keys", class: "meta" }, ...keyed.flatMap(([key, p]) => [
          h("dt", null, key), h("dd", { dataset: { key } }, typeof p.value === "string" ? p.value : pretty(p.value),
            h("span", { class: "muted" }, ` — ${taskLabel(p.task_id, p.map_index)}`)),
        ])) : null,
        this.progressText.length ? h("pre", { id: "progress-text", class: "result" }, this.progressText.join("")) : null,
        this.progressDropped ? h("p", { class: "muted" }, `${this.progressDropped} value(s) the task sent faster than its rate were left out`) : null,
      );
    }

    showRequest(ask) {
      const key = `${ask.task_id}\u0000${ask.map_index}`;
      const known = this.requests.get(key);
      if (known && known.ask.position === ask.position) return;
      if (known) known.el.remove(); // an older try's, never answered
      const card = new InputCard(this.dagId, this.runId, ask);
      this.requests.set(key, card);
      this.inputsEl.append(card.el);
    }

    // input_received: answered through the gateway (the card says so until the task moves on), or
    // closed otherwise (the task resumed or ended: answered in Airflow, the deadline's defaults, the run's end).
    requestClosed(closed) {
      const key = `${closed.task_id}\u0000${closed.map_index}`;
      const card = this.requests.get(key);
      if (!card || card.ask.position !== closed.position) return;
      if (closed.closed_by === "input_received") card.received();
      else this.dropRequest(key);
    }

    // The task's own events: once it moves on (resumes, ends, a new try), its request is gone.
    taskMoved(key, state, tryNumber) {
      const card = this.requests.get(key);
      if (!card || state === "awaiting_input" || state === "input_received" || tryNumber < card.tryNumber) return;
      this.dropRequest(key);
    }

    dropRequest(key) {
      const card = this.requests.get(key);
      if (!card) return;
      card.el.remove();
      this.requests.delete(key);
    }

    appendEvent(type, data) {
      const li = h("li", { dataset: { epoch: data.epoch || "", seq: data.seq, kind: type, state: data.state } },
        h("span", { class: "seq" }, `#${data.seq}`), " ",
        h("span", { class: "muted" }, fmtTime(data.ts)), " ",
        type === "task" ? h("b", null, taskLabel(data.task_id, data.map_index)) : h("b", null, "run"), " → ",
        badge(data.state),
        data.try_number ? h("span", { class: "muted" }, ` try ${data.try_number}`) : null,
        data.error ? h("span", { class: "err" }, ` ${data.error.type}: ${data.error.message}`) : null,
        data.msg ? h("span", { class: "muted" }, ` ${data.msg}`) : null,
        data.input_request ? h("span", { class: "muted" }, ` asks: ${data.input_request.subject}`) : null,
      );
      // Keep the log in position order even if a replay delivered an older event late.
      const at = { epoch: data.epoch || "", seq: data.seq };
      let after = this.eventList.lastElementChild;
      while (after && isAfter({ epoch: after.dataset.epoch, seq: Number(after.dataset.seq) }, at)) after = after.previousElementSibling;
      this.eventList.insertBefore(li, after ? after.nextSibling : this.eventList.firstChild);
    }

    showOutcome(outcome) {
      if (!outcome || outcome.status === "pending" || this.outcome) return; // decided once, never flips
      this.outcome = outcome;
      if (outcome.run_state && outcome.run_state !== "unknown" && !this.runStateSeq) this.run.state = outcome.run_state;
      this.renderOutcome();
      this.renderMeta();
    }

    renderOutcome() {
      const o = this.outcome;
      const el = this.outcomeEl;
      if (!o) {
        el.dataset.status = "pending";
        el.replaceChildren(h("h2", null, "Outcome"), h("p", { class: "muted" }, "Waiting for the outcome…"));
        return;
      }
      el.dataset.status = o.status;
      const decided = h("p", { class: "muted" }, `decided by ${o.decided_by || "—"} at event #${o.decided_seq ?? o.seq}`);
      if (o.status === "success") {
        const t = o.result_task;
        el.replaceChildren(
          h("h2", null, badge("success", "Success")),
          decided,
          t ? h("p", null, "Result of ", h("b", { id: "result-task" }, taskLabel(t.task_id, t.map_index)), t.try_number ? ` (try ${t.try_number})` : "",
            t.is_ref ? h("span", { class: "muted" }, " — too large for the bus: a reference to Airflow's XCom") : null)
            : h("p", { class: "muted" }, "No result task: the run succeeded."),
          h("pre", { id: "result", class: "result" }, pretty(o.result)),
        );
        return;
      }
      const f = o.failure || {};
      const err = f.error || {};
      el.replaceChildren(
        h("h2", null, badge("failed", "Failed")),
        decided,
        h("p", null, f.task_id ? ["Failing task ", h("b", { id: "failed-task" }, taskLabel(f.task_id, f.map_index)), f.try_number ? ` (try ${f.try_number})` : ""] : "The run failed."),
        h("pre", { id: "failure", class: "failure" }, [err.type, err.message].filter((s) => s !== undefined && s !== "").join(": ") || "(no message)"),
      );
    }

    renderMeta() {
      this.stateEl.replaceChildren(badge(this.run.state));
      const items = [
        ["Type", this.run.run_type],
        ["Logical date", this.run.logical_date ? fmtTime(this.run.logical_date) : null],
        ["Run after", this.run.run_after ? fmtTime(this.run.run_after) : null],
        ["Backfill", this.run.backfill_id ? h("a", { href: `#/backfills/${enc(this.run.backfill_id)}` }, this.run.backfill_id) : null],
        ["Started", this.run.started ? fmtTime(this.run.started) : (this.run.startTs ? fmtTime(this.run.startTs) : null)],
        ["Ended", this.run.ended ? fmtTime(this.run.ended) : (this.run.endTs ? fmtTime(this.run.endTs) : null)],
        ["Stale", this.run.stale ? "yes — no event for a while" : null],
      ].filter(([, v]) => v);
      this.metaEl.replaceChildren(...items.flatMap(([k, v]) => [h("dt", null, k), h("dd", null, v)]));
    }

    renderTimeline() {
      const tasks = [...this.tasks.values()].sort((a, b) => (a.start ?? Infinity) - (b.start ?? Infinity) || a.task_id.localeCompare(b.task_id) || a.map_index - b.map_index);
      const now = Date.now();
      const starts = tasks.map((t) => t.start).filter((v) => v !== null);
      const ends = tasks.map((t) => t.end ?? (t.start !== null ? now : null)).filter((v) => v !== null);
      const from = Math.min(...starts, toMs(this.run.startTs) ?? Infinity);
      const to = Math.max(...ends, from + 1000);
      const span = Math.max(to - from, 1);
      this.timelineBody.replaceChildren(...tasks.map((t) => {
        const end = t.end ?? (t.start !== null ? now : null);
        const left = t.start === null ? 0 : ((t.start - from) / span) * 100;
        const width = t.start === null ? 0 : Math.max(((end - t.start) / span) * 100, 0.8);
        return h("tr", { dataset: { task: t.task_id, map: t.map_index, state: t.state } },
          h("td", null, h("b", null, taskLabel(t.task_id, t.map_index)),
            t.result_task ? h("span", { class: "tag", title: "its value is the run's result" }, "result") : null,
            t.critical ? h("span", { class: "tag", title: "its failure fails the run" }, "critical") : null),
          h("td", null, t.try_number || "—"),
          h("td", null, badge(t.state), t.error ? h("div", { class: "err small" }, `${t.error.type}: ${t.error.message}`) : null),
          h("td", { class: "bar-cell" }, h("div", { class: "track" }, h("div", { class: `bar state-${t.state}`, style: { marginLeft: `${left.toFixed(2)}%`, width: `${width.toFixed(2)}%` } }))),
          h("td", null, fmtTime(t.start === null ? null : t.start / 1000)),
          h("td", null, fmtDuration(t.start === null ? null : end - t.start)),
        );
      }));
    }
  }

  // -- one backfill ---------------------------------------------------------------------------

  const RANK = { queued: 0, running: 1, success: 2, failed: 2 };
  const rank = (state) => (state in RANK ? RANK[state] : -1);

  class BackfillView {
    constructor(backfillId) {
      this.backfillId = backfillId;
      this.slots = new Map(); // sort_ordinal -> slot
      this.progress = null; // from the stream; else counted from the slots
      this.info = {};
      this.dead = false;
    }

    get path() {
      return `/v1/backfills/${enc(this.backfillId)}`;
    }

    mount(root) {
      this.title = h("h1", null, "Backfill ", h("span", { class: "mono" }, this.backfillId));
      this.summary = h("p", { id: "backfill-summary", class: "muted" }, "Loading…");
      this.bar = h("div", { id: "progress", class: "progress", role: "progressbar", "aria-valuemin": "0" });
      this.tbody = h("tbody");
      root.replaceChildren(
        h("p", null, h("a", { href: "#/" }, "← runs")),
        this.title,
        this.summary,
        this.bar,
        h("table", { id: "slots", class: "grid" },
          h("thead", null, h("tr", null, ["#", "Logical date", "Run", "State", "Note"].map((t) => h("th", null, t)))),
          this.tbody),
      );
      this.load().then(() => {
        if (this.dead) return;
        this.stream = new LiveStream({
          path: `${this.path}/events`,
          types: ["slot", "progress", "backfill", "message"],
          onEvent: (type, data) => this.onEvent(type, data),
          onEnd: (data) => { if (data) this.onEvent("end", data); },
          onGone: () => { this.summary.textContent = `The gateway knows no backfill ${this.backfillId}.`; },
          onReopen: () => this.load(),
          probe: async () => {
            const { status } = await request(`${this.path}/runs?limit=1`);
            if (status === 404) return "gone";
            if (status === 401 || status === 403) return "auth";
            return status === 200 ? "reconnect" : "retry";
          },
        });
        this.stream.start();
      });
    }

    unmount() {
      this.dead = true;
      if (this.stream) this.stream.stop();
    }

    async load() {
      try {
        let offset = 0;
        const slots = [];
        for (let page = 0; page < 100; page++) { // bounded: 100 pages of 500 slots
          const body = await getJson(`${this.path}/runs?limit=500&offset=${offset}`);
          if (this.dead) return;
          this.info = { dag_id: body.dag_id, total: body.total_entries };
          slots.push(...(body.slots || []));
          offset += (body.slots || []).length;
          if (!body.slots || !body.slots.length || offset >= (body.total_entries || 0)) break;
        }
        (window.diag = window.diag || []).push([Date.now() % 100000, "load", JSON.stringify(slots.map((x) => x.state))]);
        for (const slot of slots) this.mergeSlot(slot);
        this.render();
      } catch (err) {
        if (this.dead) return;
        if (err instanceof HttpError && err.status === 404) this.summary.textContent = `The gateway knows no backfill ${this.backfillId}.`;
        else this.summary.textContent = `Could not load the backfill: ${describeError(err)}`;
      }
    }

    onEvent(type, data) {
      (window.diag = window.diag || []).push([Date.now() % 100000, type, JSON.stringify(data)]);
      if (!data) return;
      if (Array.isArray(data.slots)) for (const slot of data.slots) this.mergeSlot(slot);
      if (data.slot && typeof data.slot === "object") this.mergeSlot(data.slot);
      if (data.sort_ordinal !== undefined) this.mergeSlot(data);
      const progress = data.progress && typeof data.progress === "object" ? data.progress : (data.total !== undefined ? data : null);
      if (progress) this.progress = { done: progress.done || 0, failed: progress.failed || 0, running: progress.running || 0, skipped: progress.skipped || 0, total: progress.total || 0 };
      this.render();
      this.catchUp();
    }

    // The stream's progress can be ahead of the slots: a re-read after a reconnect may come from a
    // store that had not yet caught up, and the stream does not send again a slot it sent before.
    // Then the slots are read again, half a second apart, at most 10 times in a row.
    catchUp() {
      const p = this.progress, c = this.counted();
      if (!p || (c.done >= p.done && c.failed >= p.failed)) { this.catchUps = 0; return; }
      if (this.catchingUp || this.dead || (this.catchUps = (this.catchUps || 0) + 1) > 10) return;
      this.catchingUp = true;
      setTimeout(() => { this.catchingUp = false; if (!this.dead) this.load().then(() => this.catchUp()); }, 500);
    }

    // A slot's state only moves forward (queued, running, then success or failed), as the gateway's
    // does: a re-read of the slots after a reconnect may come from a store that has not caught up
    // with what the stream already said, and must not take a slot back.
    mergeSlot(slot) {
      if (slot.sort_ordinal === undefined) return;
      const known = this.slots.get(slot.sort_ordinal);
      const merged = { ...known, ...slot };
      if (known && known.run_id && rank(slot.state) < rank(known.state)) merged.state = known.state;
      this.slots.set(slot.sort_ordinal, merged);
    }

    counted() {
      const p = { done: 0, failed: 0, running: 0, skipped: 0, total: this.info.total || this.slots.size };
      for (const slot of this.slots.values()) {
        if (!slot.run_id) p.skipped += 1;
        else if (slot.state === "success") p.done += 1;
        else if (slot.state === "failed") p.failed += 1;
        else if (slot.state === "running") p.running += 1; // as the gateway counts: queued ones are in none
      }
      return p;
    }

    render() {
      const p = this.progress || this.counted();
      const total = Math.max(p.total, 1);
      const finished = p.done + p.failed + p.skipped;
      const pct = (n) => `${((n / total) * 100).toFixed(2)}%`;
      this.bar.setAttribute("aria-valuemax", String(p.total));
      this.bar.setAttribute("aria-valuenow", String(finished));
      Object.assign(this.bar.dataset, { done: p.done, failed: p.failed, running: p.running, skipped: p.skipped, total: p.total });
      this.bar.replaceChildren(
        h("div", { class: "seg state-success", style: { width: pct(p.done) }, title: `${p.done} done` }),
        h("div", { class: "seg state-failed", style: { width: pct(p.failed) }, title: `${p.failed} failed` }),
        h("div", { class: "seg state-skipped", style: { width: pct(p.skipped) }, title: `${p.skipped} skipped` }),
        h("div", { class: "seg state-running", style: { width: pct(p.running) }, title: `${p.running} running` }),
      );
      this.summary.textContent = `${this.info.dag_id ? `${this.info.dag_id}: ` : ""}${finished} of ${p.total} slots finished — ${p.done} done, ${p.failed} failed, ${p.running} running, ${p.skipped} skipped`;
      const slots = [...this.slots.values()].sort((a, b) => a.sort_ordinal - b.sort_ordinal);
      this.tbody.replaceChildren(...slots.map((s) => h("tr", { dataset: { ordinal: s.sort_ordinal, state: s.run_id ? s.state : "skipped" } },
        h("td", null, s.sort_ordinal),
        h("td", null, fmtTime(s.logical_date)),
        h("td", { class: "mono" }, s.run_id && this.info.dag_id ? h("a", { href: runHash(this.info.dag_id, s.run_id) }, s.run_id) : (s.run_id || "—")),
        h("td", null, s.run_id ? badge(s.state) : badge("skipped")),
        h("td", { class: "muted" }, s.exception_reason || ""),
      )));
    }
  }

  // -- routing --------------------------------------------------------------------------------

  let current = null;
  const root = document.getElementById("view");

  function parseHash() {
    const raw = location.hash.replace(/^#/, "") || "/";
    const [path, query = ""] = raw.split("?");
    let parts;
    try {
      parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    } catch (err) {
      parts = ["?"];
    }
    return { parts, query: new URLSearchParams(query) };
  }

  function route() {
    if (current) current.unmount();
    const { parts, query } = parseHash();
    if (parts.length === 0) current = new RunsView(query);
    else if (parts[0] === "runs" && parts.length === 3) current = new RunView(parts[1], parts[2]);
    else if (parts[0] === "backfills" && parts.length === 2) current = new BackfillView(parts[1]);
    else {
      current = { mount: (el) => el.replaceChildren(h("p", null, "No such page. ", h("a", { href: "#/" }, "All runs"))), unmount() {} };
    }
    document.body.dataset.view = parts[0] || "runs";
    setConn("idle", "");
    current.mount(root);
    window.scrollTo(0, 0);
  }

  takeTokenFromUrl();
  forgetButton.hidden = !token();
  window.addEventListener("hashchange", route);
  route();
})();
