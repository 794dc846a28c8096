// The Ringway dashboard: /stats and /v1/dead-letters over fetch, the rest live over /v1/live.
"use strict";

const TOKEN_KEY = "ringway.token";
const PAGE = 10;
const EVENTS_SHOWN = 100;
const fmt = new Intl.NumberFormat("en-US");
const $ = (sel) => document.querySelector(sel);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  history: [],
  windowS: 60,
  dl: { offset: 0, total: 0, reason: "", recipient: "", open: new Set() },
  ws: null,
  backoff: 1000,
  dlTimer: null,
};

class AuthNeeded extends Error {}

// -- HTTP ----------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  // The service takes POSTs only as JSON (a cross-site form post is refused).
  if (options.method === "POST") headers["Content-Type"] = "application/json";
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) throw new AuthNeeded();
  if (!resp.ok) {
    let reason = resp.statusText;
    try { reason = (await resp.json()).reason || reason; } catch (e) { /* not JSON */ }
    throw new Error(`${path}: HTTP ${resp.status}: ${reason}`);
  }
  return resp;
}

// -- the token -----------------------------------------------------------------------------
function askToken(refused) {
  const dialog = $("#token-dialog");
  $("#token-why").textContent = refused
    ? "The token was refused. Type the service's token (ENGINE_AUTH_TOKEN) again."
    : "This service needs its token (ENGINE_AUTH_TOKEN). It is kept for this tab only.";
  $("#token-input").value = "";
  if (!dialog.open) dialog.showModal();
}

$("#token-form").addEventListener("submit", () => {
  state.token = $("#token-input").value;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  start();
});

function b64url(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// -- rendering -----------------------------------------------------------------------------
function setMetric(name, value) {
  const el = document.querySelector(`[data-metric="${name}"]`);
  if (el) el.textContent = value === null || value === undefined ? "–" : fmt.format(Math.round(value));
}

function cell(text, cls, field) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  if (field) td.dataset.field = field;
  return td;
}

function renderStats(stats) {
  for (const key of ["submitted", "delivered", "in_flight", "dead_lettered", "failed_attempts", "redelivered", "expired"]) {
    setMetric(key, stats[key]);
  }
  const addr = (stats.service && stats.service.addresses) || {};
  $("#service-address").textContent = addr.tcp ? `tcp ${addr.tcp} · http ${addr.http || location.host}` : location.host;

  const lanes = $("#lanes tbody");
  lanes.replaceChildren();
  for (const [lane, depth] of Object.entries(stats.queue_depth)) {
    const fill = stats.ring_fill[lane] || 0;
    const tr = document.createElement("tr");
    tr.dataset.lane = lane;
    tr.append(cell(lane), cell(fmt.format(depth), "num", "queued"));
    const td = document.createElement("td");
    const bar = document.createElement("div");
    bar.className = "bar" + (fill >= 0.8 ? " hot" : "");
    bar.title = `${(fill * 100).toFixed(1)}% of the fullest ring of this lane`;
    const span = document.createElement("span");
    span.style.width = `${Math.min(100, fill * 100).toFixed(1)}%`;
    bar.append(span);
    td.append(bar);
    tr.append(td);
    lanes.append(tr);
  }

  const rec = $("#recipients tbody");
  rec.replaceChildren();
  for (const top of stats.top_recipients || []) {
    const tr = document.createElement("tr");
    tr.dataset.recipient = top.recipient;
    tr.append(cell(top.recipient), cell(fmt.format(top.held), "num", "held"));
    rec.append(tr);
  }
  if (!rec.children.length) {
    const tr = document.createElement("tr");
    tr.append(cell("no backlog", "hint"), cell(""));
    rec.append(tr);
  }

  const workers = $("#workers tbody");
  workers.replaceChildren();
  for (const w of stats.workers) {
    const tr = document.createElement("tr");
    tr.dataset.worker = String(w.worker);
    const up = w.alive;
    tr.append(
      cell(String(w.worker), "", "worker"),
      cell(String(w.pid), "num", "pid"),
      cell(up ? "up" : w.error ? "cannot boot" : "down", up ? "state-up" : "state-down", "state"),
      cell((w.rss_bytes / 1048576).toFixed(1), "num", "rss"),
      cell(w.cpu_percent.toFixed(0), "num", "cpu"),
      cell(fmt.format(w.delivered), "num", "delivered"),
      cell(String(w.restarts), "num", "restarts"),
      cell(`${w.heartbeat_age_s.toFixed(1)}s`, "num", "heartbeat"),
      cell(w.last_error || "", "error", "last_error"),
    );
    workers.append(tr);
  }
  const m = stats.monitor;
  $("#monitor").textContent = `monitor pid ${m.pid} ${m.alive ? "up" : "DOWN"}, ${m.restarts} restarts${m.error ? ": " + m.error : ""}`;

  // Placeholders for the batch cache (issue 13) and the cluster view (issue 12).
  renderObject("#cache-panel", "#cache", stats.cache);
  renderObject("#cluster-panel", "#cluster", stats.cluster);
}

function renderObject(panelSel, tableSel, obj) {
  const panel = $(panelSel);
  panel.hidden = !obj;
  if (!obj) return;
  const body = $(`${tableSel} tbody`);
  body.replaceChildren();
  for (const [k, v] of Object.entries(obj)) {
    const tr = document.createElement("tr");
    tr.append(cell(k), cell(typeof v === "object" ? JSON.stringify(v) : String(v)));
    body.append(tr);
  }
}

function renderCharts() {
  // The x axis spans the history held, in whole minutes: 1 to 10.
  const h = state.history;
  const span = h.length > 1 ? h[h.length - 1].t - h[0].t : 0;
  state.windowS = Math.min(600, Math.max(60, Math.ceil(span / 60) * 60));
  document.querySelectorAll(".window").forEach((el) => { el.textContent = String(state.windowS / 60); });
  const pts = (key, scale) => state.history.map((s) => [s.t, s[key] === null || s[key] === undefined ? null : s[key] * scale]);
  RingwayCharts.drawLineChart($("#chart-rates"), [
    { name: "submitted", color: "#2f6fdf", points: pts("submitted_per_s", 1) },
    { name: "delivered", color: "#1f9d55", points: pts("delivered_per_s", 1) },
    { name: "dead-lettered", color: "#d33a2c", points: pts("dead_lettered_per_s", 1) },
    { name: "redelivered", color: "#c98a00", points: pts("redelivered_per_s", 1) },
  ], state.windowS);
  RingwayCharts.drawLineChart($("#chart-latency"), [
    { name: "p50", color: "#1f9d55", points: pts("p50_s", 1000) },
    { name: "p95", color: "#c98a00", points: pts("p95_s", 1000) },
    { name: "p99", color: "#d33a2c", points: pts("p99_s", 1000) },
  ], state.windowS);
  const last = state.history[state.history.length - 1];
  setMetric("msgs_per_s", last ? last.delivered_per_s : null);
}

function addEvent(ev, live) {
  const list = $("#events");
  const li = document.createElement("li");
  li.className = `lvl-${ev.level}`;
  li.dataset.event = ev.type;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = new Date(ev.ts * 1000).toLocaleTimeString();
  li.append(time, document.createTextNode(ev.message));
  list.prepend(li);
  while (list.children.length > EVENTS_SHOWN) list.lastChild.remove();
  if (live && ev.type === "dead_letter") scheduleDeadLetters();
}

// -- dead letters --------------------------------------------------------------------------
function scheduleDeadLetters() {
  if (state.dlTimer) return;
  state.dlTimer = setTimeout(() => { state.dlTimer = null; loadDeadLetters().catch(report); }, 500);
}

async function loadDeadLetters() {
  const q = new URLSearchParams({ offset: String(state.dl.offset), limit: String(PAGE), newest_first: "1" });
  if (state.dl.reason) q.set("reason", state.dl.reason);
  if (state.dl.recipient) q.set("recipient", state.dl.recipient);
  const resp = await api(`/v1/dead-letters?${q}`);
  state.dl.total = Number(resp.headers.get("X-Total-Count") || "0");
  const letters = await resp.json();
  const body = $("#dead-letters tbody");
  body.replaceChildren();
  for (const dl of letters) {
    const tr = document.createElement("tr");
    tr.dataset.deadLetter = String(dl.id);
    const actions = document.createElement("td");
    const replay = document.createElement("button");
    replay.type = "button";
    replay.textContent = "Replay";
    replay.className = "replay";
    replay.addEventListener("click", () => confirmReplay([dl.id], `Replay message ${dl.id} to ${dl.recipient}?`));
    actions.append(replay);
    if (dl.traceback) {
      const show = document.createElement("button");
      show.type = "button";
      show.textContent = "Traceback";
      show.className = "show-traceback";
      show.addEventListener("click", () => toggleTraceback(tr, dl.id, dl.traceback));
      actions.append(" ", show);
    }
    tr.append(
      cell(String(dl.id), "num", "id"), cell(dl.recipient, "", "recipient"), cell(dl.reason, "", "reason"),
      cell(String(dl.attempts), "num", "attempts"), cell(dl.error, "error", "error"), actions,
    );
    body.append(tr);
    // A refresh (a new dead letter came) keeps the tracebacks that were open.
    if (dl.traceback && state.dl.open.has(dl.id)) showTraceback(tr, dl.traceback);
  }
  if (!letters.length) {
    const tr = document.createElement("tr");
    const td = cell("no dead letters", "hint");
    td.colSpan = 6;
    tr.append(td);
    body.append(tr);
  }
  const pages = Math.max(1, Math.ceil(state.dl.total / PAGE));
  const page = Math.floor(state.dl.offset / PAGE) + 1;
  $("#dl-page").textContent = `page ${page} of ${pages}`;
  $("#dl-total").textContent = `${fmt.format(state.dl.total)} stored${state.dl.reason || state.dl.recipient ? " (filtered)" : ""}`;
  $("#dl-prev").disabled = state.dl.offset === 0;
  $("#dl-next").disabled = state.dl.offset + PAGE >= state.dl.total;
  $("#dl-replay-all").disabled = state.dl.total === 0;
}

function toggleTraceback(tr, id, text) {
  const next = tr.nextElementSibling;
  if (next && next.classList.contains("traceback-row")) {
    next.remove();
    state.dl.open.delete(id);
    return;
  }
  state.dl.open.add(id);
  showTraceback(tr, text);
}

function showTraceback(tr, text) {
  const row = document.createElement("tr");
  row.className = "traceback-row";
  const td = document.createElement("td");
  td.colSpan = 6;
  const pre = document.createElement("pre");
  pre.className = "traceback";
  pre.textContent = text;
  td.append(pre);
  row.append(td);
  tr.after(row);
}

function confirmReplay(ids, text) {
  const dialog = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    const q = ids ? "?" + ids.map((id) => `id=${id}`).join("&") : "";
    try {
      await api(`/v1/dead-letters/replay${q}`, { method: "POST" });
      await loadDeadLetters();
    } catch (e) { report(e); }
  };
  dialog.showModal();
}

$("#dl-filter").addEventListener("submit", (e) => {
  e.preventDefault();
  state.dl.reason = $("#dl-reason").value;
  state.dl.recipient = $("#dl-recipient").value.trim();
  state.dl.offset = 0;
  loadDeadLetters().catch(report);
});
$("#dl-prev").addEventListener("click", () => { state.dl.offset = Math.max(0, state.dl.offset - PAGE); loadDeadLetters().catch(report); });
$("#dl-next").addEventListener("click", () => { state.dl.offset += PAGE; loadDeadLetters().catch(report); });
$("#dl-replay-all").addEventListener("click", () => confirmReplay(null, `Replay all ${fmt.format(state.dl.total)} stored dead letters (every reason and recipient)?`));

// -- live ----------------------------------------------------------------------------------
function setConnected(on, text) {
  const el = $("#connection");
  el.className = "status " + (on ? "status-on" : "status-off");
  el.textContent = text;
}

function connect() {
  const protocols = ["ringway.v1"];
  if (state.token) protocols.push("bearer." + b64url(state.token));
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/v1/live`, protocols);
  state.ws = ws;
  ws.onopen = () => { state.backoff = 1000; setConnected(true, "live"); };
  ws.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    if (msg.type === "hello") {
      state.history = msg.history;
      $("#events").replaceChildren();
      for (const ev of msg.events) addEvent(ev, false);
      renderStats(msg.stats);
      renderCharts();
    } else if (msg.type === "stats") {
      state.history.push(msg.sample);
      const horizon = msg.sample.t - 600;
      while (state.history.length && state.history[0].t < horizon) state.history.shift();
      renderStats(msg.stats);
      renderCharts();
    } else if (msg.type === "event") {
      addEvent(msg.event, true);
    }
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    setConnected(false, `disconnected; retrying in ${state.backoff / 1000}s`);
    setTimeout(start, state.backoff);
    state.backoff = Math.min(10000, state.backoff * 2);
  };
}

function report(err) {
  if (err instanceof AuthNeeded) { askToken(Boolean(state.token)); return; }
  setConnected(false, String(err.message || err));
}

async function start() {
  try {
    const stats = await (await api("/stats")).json();
    renderStats(stats);
    await loadDeadLetters();
    if (!state.ws || state.ws.readyState > 1) connect();
  } catch (err) {
    report(err);
    if (!(err instanceof AuthNeeded)) {
      setTimeout(start, state.backoff);
      state.backoff = Math.min(10000, state.backoff * 2);
    }
  }
}

start();
