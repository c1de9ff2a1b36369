// The jetworker console's page. Everything the server sends is put into the page as
// text (textContent, attribute values), never as markup: a dead letter whose subject,
// headers or payload hold <script> or tags shows them as text. The page's only script
// is this file (the Content-Security-Policy allows nothing else).
"use strict";

const POLL_MS = 2000;
const COLORS = ["#2456a6", "#c0453f", "#2e8b57", "#b8860b", "#6a3d9a", "#17becf"];
const SVG_NS = "http://www.w3.org/2000/svg";
// The figures of `status --json` shown per stream and per consumer, in column order.
const STREAM_FIELDS = ["messages", "bytes", "first_sequence", "last_sequence", "consumer_count"];
const CONSUMER_FIELDS = ["pending", "ack_pending", "redelivered", "waiting"];

const session = { csrf: null, readOnly: false };
let lastOverview = null;
let shownLetters = [];
let pollTimer = null;

function $(id) {
  return document.getElementById(id);
}

// An element with text content and attributes (values set as attributes, never parsed).
function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

function say(id, text) {
  const node = $(id);
  node.textContent = text || "";
  show(node, Boolean(text));
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// A request to the console's API; a state-changing one carries the CSRF token.
async function api(path, body) {
  const options = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    if (session.csrf) options.headers["X-Jetworker-Csrf"] = session.csrf;
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (response.status === 401) {
    showLogin();
    throw new ApiError(401, (data && data.error) || "log in");
  }
  if (!response.ok && !(data && (data.replayed || data.deleted !== undefined))) {
    throw new ApiError(response.status, (data && data.error) || response.statusText);
  }
  return { status: response.status, data };
}

function showLogin() {
  show($("login"), true);
  for (const id of ["view-overview", "view-letters", "view-letter"]) show($(id), false);
}

async function startSession() {
  try {
    const { data } = await api("/api/session");
    session.csrf = data.csrf;
    session.readOnly = data.read_only;
    show($("login"), false);
    show($("mode"), session.readOnly);
    for (const node of document.querySelectorAll(".changes")) show(node, !session.readOnly);
    route();
    poll();
  } catch (e) {
    if (e.status !== 401) say("problem", "cannot reach the console: " + e.message);
  }
}

async function login() {
  say("login-error", "");
  try {
    await api("/api/login", { token: $("login-token").value });
    $("login-token").value = "";
    await startSession();
  } catch (e) {
    say("login-error", e.status === 401 ? "wrong token" : e.message);
  }
}

// ---- overview ----

async function poll() {
  clearTimeout(pollTimer);
  try {
    const { data } = await api("/api/overview");
    lastOverview = data;
    renderOverview(data);
    say("problem", data.error ? "sampling the server failed: " + data.error : "");
  } catch (e) {
    if (e.status === 401) return;
    say("problem", "cannot reach the console: " + e.message);
  }
  pollTimer = setTimeout(poll, POLL_MS);
}

function numberCell(row, field, value, title) {
  const cell = el("td", value, { "data-field": field, class: "n" });
  if (title) cell.title = title;
  row.appendChild(cell);
}

function renderOverview(data) {
  $("sampled").textContent = data.sampled_at_ms
    ? "read " + new Date(data.sampled_at_ms).toLocaleTimeString() + ", every " + data.sample_every_ms / 1000 + " s"
    : "waiting for the first reading";
  const status = data.status;
  const streams = $("streams").tBodies[0];
  const consumers = $("consumers").tBodies[0];
  streams.replaceChildren();
  consumers.replaceChildren();
  if (!status) return;
  for (const s of status.streams) {
    const row = el("tr", null, { "data-stream": s.name });
    if (!s.exists) row.className = "missing";
    row.appendChild(el("td", s.dead_letters ? s.name + " (dead letters)" : s.name, { "data-field": "name" }));
    if (s.exists) {
      for (const field of STREAM_FIELDS) numberCell(row, field, s[field]);
    } else {
      row.appendChild(el("td", "missing: provision creates it", { colspan: STREAM_FIELDS.length }));
    }
    streams.appendChild(row);
  }
  for (const c of status.consumers) {
    const row = el("tr", null, { "data-stream": c.stream, "data-consumer": c.name });
    if (!c.exists) row.className = "missing";
    row.appendChild(el("td", c.name, { "data-field": "name" }));
    row.appendChild(el("td", c.stream, { "data-field": "stream" }));
    if (c.exists) {
      for (const field of CONSUMER_FIELDS) numberCell(row, field, c[field]);
    } else {
      row.appendChild(el("td", "missing", { colspan: CONSUMER_FIELDS.length }));
    }
    const shared = c.dead_letter_subject_shared_with || [];
    const dead = c.dead_letters === null ? "missing" : String(c.dead_letters) + (shared.length ? "*" : "");
    numberCell(row, "dead_letters", dead, shared.length ? "the dead-letter subject is shared with " + shared.join(", ") : "");
    const reasons = data.dead_letters_by_reason
      .filter((r) => r.consumer === c.name && r.stream === c.dead_letter_stream)
      .map((r) => r.reason + " " + r.count);
    row.appendChild(el("td", reasons.join(", "), { "data-field": "by_reason" }));
    consumers.appendChild(row);
  }
  renderCharts(data.charts);
  fillStreamFilter(status.streams.filter((s) => s.dead_letters).map((s) => s.name));
}

function fillStreamFilter(names) {
  const select = $("filter-stream");
  const have = Array.from(select.options).map((o) => o.value);
  for (const name of names) {
    if (!have.includes(name)) select.appendChild(el("option", name, { value: name }));
  }
}

// One SVG line chart per series set, scaled to the data.
function renderCharts(charts) {
  const box = $("charts");
  box.replaceChildren();
  const width = 380, height = 170, left = 44, bottom = 20, top = 8, right = 8;
  for (const chart of charts) {
    const figure = el("figure", null, { class: "chart", "data-chart": chart.title });
    figure.appendChild(el("figcaption", chart.title + " (" + chart.unit + ")"));
    const plot = svg("svg", { width, height, viewBox: "0 0 " + width + " " + height, role: "img" });
    const points = chart.series.flatMap((s) => s.points);
    const times = points.map((p) => p[0]);
    const values = points.map((p) => p[1]);
    const t0 = times.length ? Math.min(...times) : 0;
    const t1 = times.length ? Math.max(...times) : 1;
    const vmax = Math.max(1, ...values);
    const x = (t) => left + ((t - t0) / Math.max(1, t1 - t0)) * (width - left - right);
    const y = (v) => height - bottom - (v / vmax) * (height - top - bottom);
    plot.appendChild(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#c5ccd4" }));
    plot.appendChild(svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, stroke: "#c5ccd4" }));
    plot.appendChild(svg("text", { x: left - 4, y: top + 10, "text-anchor": "end" }, formatValue(vmax)));
    plot.appendChild(svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, "0"));
    const span = Math.round((t1 - t0) / 60000);
    plot.appendChild(svg("text", { x: left, y: height - 4 }, times.length ? (span ? "-" + span + " min" : "-" + Math.round((t1 - t0) / 1000) + " s") : "no data yet"));
    plot.appendChild(svg("text", { x: width - right, y: height - 4, "text-anchor": "end" }, "now"));
    chart.series.forEach((series, i) => {
      if (!series.points.length) return;
      const line = series.points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
      plot.appendChild(svg("polyline", { points: line, fill: "none", stroke: COLORS[i % COLORS.length], "stroke-width": 1.6, "data-series": series.name }));
    });
    figure.appendChild(plot);
    const legend = el("div", null, { class: "legend" });
    chart.series.forEach((series, i) => {
      const last = series.points.length ? series.points[series.points.length - 1][1] : null;
      legend.appendChild(el("span", series.name + (last === null ? "" : ": " + formatValue(last)), { class: "c" + (i % COLORS.length) }));
    });
    figure.appendChild(legend);
    box.appendChild(figure);
  }
}

function formatValue(v) {
  return Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1);
}

// ---- dead letters ----

function currentFilter() {
  const filter = {};
  const value = (id) => $(id).value.trim();
  const list = (id) => value(id).split(",").map((s) => s.trim()).filter(Boolean);
  if (value("filter-stream")) filter.stream = value("filter-stream");
  if (list("filter-consumer").length) filter.consumer = list("filter-consumer");
  if (list("filter-reason").length) filter.reason = list("filter-reason");
  if (value("filter-since")) filter.since = value("filter-since");
  if (value("filter-until")) filter.until = value("filter-until");
  return filter;
}

function filterQuery(filter) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(filter)) query.set(key, Array.isArray(value) ? value.join(",") : value);
  return query.toString();
}

async function loadLetters() {
  try {
    const { data } = await api("/api/letters?" + filterQuery(currentFilter()));
    shownLetters = data.letters;
    renderLetters(data);
    say("problem", "");
  } catch (e) {
    if (e.status !== 401) say("problem", "listing dead letters: " + e.message);
  }
}

function letterHash(stream, sequence) {
  return "#letter/" + encodeURIComponent(stream) + "/" + sequence;
}

function renderLetters(data) {
  const body = $("letters").tBodies[0];
  body.replaceChildren();
  $("select-all").checked = false;
  const dash = (v) => (v === null || v === undefined ? "-" : v);
  for (const l of data.letters) {
    const row = el("tr", null, { "data-stream": l.stream, "data-seq": l.sequence });
    const pick = el("input", null, { type: "checkbox", class: "pick" });
    const pickCell = el("td");
    pickCell.appendChild(pick);
    row.appendChild(pickCell);
    row.appendChild(el("td", l.stream));
    const seqCell = el("td", null, { class: "n" });
    seqCell.appendChild(el("a", l.sequence, { href: letterHash(l.stream, l.sequence), class: "open" }));
    row.appendChild(seqCell);
    row.appendChild(el("td", l.time));
    row.appendChild(el("td", dash(l.consumer), { "data-field": "consumer" }));
    row.appendChild(el("td", dash(l.reason), { "data-field": "reason" }));
    row.appendChild(el("td", dash(l.attempts), { class: "n" }));
    row.appendChild(el("td", l.replay_count, { class: "n" }));
    row.appendChild(el("td", dash(l.original_subject), { "data-field": "original_subject" }));
    row.appendChild(el("td", dash(l.error), { class: "error", "data-field": "error" }));
    body.appendChild(row);
  }
  $("letters-count").textContent =
    data.total === data.letters.length
      ? plural(data.total, "dead letter")
      : plural(data.total, "dead letter") + " (the oldest " + data.letters.length + " shown)";
}

function plural(n, word) {
  return n + " " + word + (n === 1 ? "" : "s");
}

function selectedLetters() {
  return Array.from(document.querySelectorAll("#letters tbody tr"))
    .filter((row) => row.querySelector("input.pick").checked)
    .map((row) => ({ stream: row.dataset.stream, sequence: Number(row.dataset.seq) }));
}

// Asks in the page's dialog; resolves true only for Confirm.
function confirmInPage(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-ok").onclick = null;
      $("confirm-cancel").onclick = null;
      dialog.close();
      resolve(answer);
    };
    $("confirm-ok").onclick = () => done(true);
    $("confirm-cancel").onclick = () => done(false);
    dialog.oncancel = () => done(false);
    dialog.showModal();
  });
}

function describeFilter(filter) {
  const parts = Object.entries(filter).map(([k, v]) => k + " " + (Array.isArray(v) ? v.join(",") : v));
  return parts.length ? "matching " + parts.join(", ") : "in every dead-letter stream";
}

// Replays or purges a selection after the user confirms it.
async function change(verb, selection, what) {
  const question =
    verb === "purge"
      ? "Delete " + what + " for good? They cannot be replayed afterwards."
      : "Replay " + what + "? Each is republished to its original subject, then removed from the dead letters.";
  if (!(await confirmInPage(question))) {
    say("notice", "cancelled: nothing was " + (verb === "purge" ? "deleted" : "replayed"));
    return false;
  }
  if (verb === "purge") selection.confirmed = true;
  try {
    const { data } = await api("/api/" + verb, selection);
    if (verb === "purge") {
      say("notice", "purged " + plural(data.deleted, "dead letter") + (data.already_gone ? " (" + data.already_gone + " already gone)" : ""));
    } else {
      const lines = ["replayed " + data.replayed.length + " of " + plural(data.selected, "dead letter")];
      for (const note of data.notes) lines.push("note: " + note);
      say("notice", lines.join("\n"));
      const problems = data.skipped.map((s) => "kept " + s.stream + " #" + s.sequence + ": " + s.why);
      if (data.failed) problems.push("stopped: " + data.failed + "; the remaining dead letters were not touched");
      say("problem", problems.join("\n"));
    }
    poll();
    return true;
  } catch (e) {
    if (e.status !== 401) say("problem", verb + " failed: " + e.message);
    return false;
  }
}

async function changeSelected(verb) {
  const letters = selectedLetters();
  if (!letters.length) {
    say("problem", "select dead letters first");
    return;
  }
  await change(verb, { letters }, plural(letters.length, "selected dead letter"));
  loadLetters();
}

async function changeMatching(verb) {
  const filter = currentFilter();
  const narrows = ["consumer", "reason", "since", "until"].some((k) => k in filter);
  const selection = narrows ? { filter } : { filter, all: true };
  await change(verb, selection, "all " + plural(shownLetters.length, "listed dead letter") + " " + describeFilter(filter));
  loadLetters();
}

// ---- one letter ----

async function loadLetter(stream, sequence) {
  const title = $("letter-title");
  title.textContent = "Dead letter " + stream + " #" + sequence;
  for (const id of ["letter-summary", "letter-payload"]) $(id).replaceChildren();
  $("letter-headers").tBodies[0].replaceChildren();
  try {
    const { data } = await api("/api/letters/" + encodeURIComponent(stream) + "/" + sequence);
    renderLetter(data);
    say("problem", "");
  } catch (e) {
    if (e.status !== 401) say("problem", "dead letter " + stream + " #" + sequence + ": " + e.message);
  }
}

function hexDump(hex) {
  const lines = [];
  for (let i = 0; i < hex.length; i += 32) {
    const chunk = hex.slice(i, i + 32);
    const bytes = chunk.match(/../g) || [];
    const ascii = bytes.map((b) => {
      const c = parseInt(b, 16);
      return c >= 32 && c < 127 ? String.fromCharCode(c) : ".";
    });
    lines.push((i / 2).toString(16).padStart(8, "0") + "  " + bytes.join(" ").padEnd(47) + "  |" + ascii.join("") + "|");
  }
  return lines.join("\n");
}

function renderLetter(data) {
  const summary = $("letter-summary");
  const fields = [
    ["Subject", data.subject],
    ["Stored", data.time],
    ["Consumer", data.consumer],
    ["Reason", data.reason],
    ["Attempts", data.attempts],
    ["Error", data.error],
    ["Original", (data.original_subject || "-") + (data.original_stream ? " (" + data.original_stream + " #" + data.original_sequence + ")" : "")],
    ["Replays", data.replay_count],
    ["Size", plural(data.size, "byte")],
  ];
  for (const [name, value] of fields) {
    summary.appendChild(el("dt", name));
    summary.appendChild(el("dd", value === null || value === undefined ? "-" : value, { "data-field": name.toLowerCase() }));
  }
  $("letter-readers").textContent = data.other_readers.length
    ? "a replay is also handled by " + data.other_readers.join(", ") + " (they read the original subject too)"
    : "";
  const headers = $("letter-headers").tBodies[0];
  for (const [name, values] of Object.entries(data.headers)) {
    for (const value of values) {
      const row = el("tr");
      row.appendChild(el("td", name));
      row.appendChild(el("td", value, { "data-header": name }));
      headers.appendChild(row);
    }
  }
  const payload = data.payload;
  $("payload-title").textContent = "Payload (" + payload.encoding + ")";
  $("payload-note").textContent = payload.note || "";
  let text;
  if (payload.encoding === "hex") text = hexDump(payload.value);
  else if (payload.encoding === "text") text = payload.value;
  else text = JSON.stringify(payload.value, null, 2);
  $("letter-payload").textContent = text;
  const one = { letters: [{ stream: data.stream, sequence: data.sequence }] };
  const what = "dead letter " + data.stream + " #" + data.sequence;
  $("replay-one").onclick = async () => {
    if (await change("replay", one, what)) location.hash = "#letters";
  };
  $("purge-one").onclick = async () => {
    if (await change("purge", one, what)) location.hash = "#letters";
  };
}

// ---- views ----

function route() {
  if (!session.csrf) return;
  const hash = location.hash || "#overview";
  const letter = hash.match(/^#letter\/([^/]+)\/(\d+)$/);
  const view = letter ? "letter" : hash === "#letters" ? "letters" : "overview";
  show($("view-overview"), view === "overview");
  show($("view-letters"), view === "letters");
  show($("view-letter"), view === "letter");
  $("nav-overview").className = view === "overview" ? "current" : "";
  $("nav-letters").className = view !== "overview" ? "current" : "";
  if (view === "letters") loadLetters();
  if (letter) loadLetter(decodeURIComponent(letter[1]), Number(letter[2]));
}

document.addEventListener("DOMContentLoaded", () => {
  window.addEventListener("hashchange", route);
  $("login-submit").addEventListener("click", login);
  $("login-token").addEventListener("keydown", (e) => {
    if (e.key === "Enter") login();
  });
  $("filter").addEventListener("submit", (e) => {
    e.preventDefault();
    loadLetters();
  });
  $("select-all").addEventListener("change", (e) => {
    for (const box of document.querySelectorAll("#letters input.pick")) box.checked = e.target.checked;
  });
  $("replay-selected").addEventListener("click", () => changeSelected("replay"));
  $("purge-selected").addEventListener("click", () => changeSelected("purge"));
  $("replay-matching").addEventListener("click", () => changeMatching("replay"));
  $("purge-matching").addEventListener("click", () => changeMatching("purge"));
  startSession();
});
