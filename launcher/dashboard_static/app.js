// streampipe dashboard: one picture a second from /events (server-sent events), drawn as inline SVG and tables.
// No library: the page must work offline and stay small. Every text from the pipeline is escaped.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const STATES = ["running", "blocked", "starting", "backoff", "stopping", "stopped", "completed", "failed"];
const SVG = "http://www.w3.org/2000/svg";
let stageNames = "";

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function count(n) {
  n = Number(n) || 0;
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return n.toFixed(0);
}
function bytes(n) {
  n = Number(n) || 0;
  for (const unit of ["B", "K", "M", "G"]) { if (n < 1024) return n.toFixed(0) + unit; n /= 1024; }
  return n.toFixed(1) + "T";
}
function uptime(s) {
  if (!s || s <= 0) return "-";
  if (s < 60) return s.toFixed(0) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString([], {hour12: false}); }
function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}
function url(path, extra) { return `${path}?token=${encodeURIComponent(TOKEN)}${extra || ""}`; }

// -- the graph -------------------------------------------------------------------------------
function drawGraph(pic) {
  const svg = document.getElementById("graph");
  const graph = pic.graph, rows = (pic.status && pic.status.stages) || [];
  const W = 180, H = 66, DX = 250, DY = 96;
  const pos = {};
  const tall = Math.max(1, ...graph.layers.map(l => l.length));
  graph.layers.forEach((layer, i) => layer.forEach((name, j) => {
    pos[name] = {x: 20 + i * DX, y: 20 + (j + (tall - layer.length) / 2) * DY};
  }));
  const width = 40 + Math.max(1, graph.layers.length) * DX - (DX - W), height = 40 + tall * DY - (DY - H);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.style.height = Math.min(480, Math.max(160, height)) + "px";
  svg.textContent = "";
  el("defs", {}, svg).innerHTML = '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0L10,5L0,10z" fill="#667085"/></marker>';
  const pairs = {};
  for (const e of graph.edges) {
    const a = pos[e.src], b = pos[e.dest];
    if (!a || !b) continue;
    const k = e.src + ">" + e.dest, nth = pairs[k] = (pairs[k] ?? -1) + 1;
    const x0 = a.x + W, y0 = a.y + H / 2 + nth * 10, x1 = b.x, y1 = b.y + H / 2 + nth * 10, mx = (x0 + x1) / 2;
    el("path", {class: "edge", d: `M${x0},${y0} C${mx},${y0} ${mx},${y1} ${x1 - 2},${y1}`, "marker-end": "url(#arrow)"}, svg);
    const rate = pic.edge_rates[e.src + "|" + e.name];
    const label = el("text", {class: "edge-rate", "data-edge": `${e.src}>${e.output}>${e.dest}`, x: mx, y: (y0 + y1) / 2 - 4 + nth * 12,
                              "text-anchor": "middle"}, svg);
    label.textContent = (e.output !== "default" ? e.output + " " : "") + (rate === undefined ? "…" : count(rate) + "/s");
  }
  for (const s of graph.stages) {
    const p = pos[s.name];
    if (!p) continue;
    const g = el("g", {class: "node" + (s.source ? " source" : ""), "data-stage": s.name, transform: `translate(${p.x},${p.y})`}, svg);
    el("rect", {width: W, height: H, rx: s.source ? 18 : 5}, g);
    el("text", {class: "name", x: 10, y: 18}, g).textContent = s.name;
    el("text", {class: "type", x: 10, y: 33}, g).textContent = s.type;
    const reps = rows.filter(r => r.name === s.name);
    const rate = reps.reduce((sum, r) => sum + (r.rate || 0), 0);
    el("text", {class: "type", x: W - 8, y: 18, "text-anchor": "end"}, g).textContent = count(rate) + "/s";
    reps.forEach((r, i) => {
      const dot = el("circle", {class: `rep state-${r.state}`, "data-replica": r.replica, "data-state": r.state,
                                cx: 16 + i * 18, cy: 50, r: 7}, g);
      el("title", {}, dot).textContent = `${s.name}.${r.replica} ${r.state} pid ${r.pid ?? "-"}`;
    });
  }
}

// -- tables ----------------------------------------------------------------------------------
function statsText(stats) {
  return Object.entries(stats || {}).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
}
function drawReplicas(pic) {
  const rows = (pic.status && pic.status.stages) || [];
  document.querySelector("#replicas tbody").innerHTML = rows.map(r => {
    const err = r.last_error || "";
    const first = err.trim().split("\n").filter(Boolean).pop() || "";
    const errCell = err ? `<details><summary>${esc(first.slice(0, 90))}</summary><pre>${esc(err)}</pre></details>` : "";
    return `<tr data-stage="${esc(r.name)}" data-replica="${r.replica}" data-state="${esc(r.state)}">` +
      `<td>${esc(r.name)}</td><td>${r.replica}</td><td class="pid">${r.pid ?? "-"}</td>` +
      `<td class="state state-${esc(r.state)}">${esc(r.state)}</td><td>${uptime(r.uptime_s)}</td><td class="restarts">${r.restarts}</td>` +
      `<td>${r.cpu_percent == null ? "-" : r.cpu_percent.toFixed(0)}</td><td>${r.rss_bytes ? bytes(r.rss_bytes) : "-"}</td>` +
      `<td>${count(r.records_in)}</td><td>${count(r.records_out)}</td><td class="rate">${r.rate == null ? "-" : count(r.rate)}</td>` +
      `<td>${r.errors}</td><td class="stats">${esc(statsText(r.stats))}</td><td class="err">${errCell}</td></tr>`;
  }).join("");
}
function drawDead(pic) {
  const d = pic.dead_letters, stages = Object.keys(d.counts).sort();
  document.getElementById("dead").innerHTML = stages.length === 0 ? '<div class="note">none so far</div>' :
    stages.map(s => `<div class="dead-stage" data-stage="${esc(s)}"><b>${esc(s)}</b>: <span class="dead-count">${d.counts[s]}</span>` +
      (d.latest[s] || []).slice().reverse().map(e =>
        `<div class="dead-entry"><span class="why">${esc(e.error)}</span><br>${esc(e.record)}</div>`).join("") + "</div>").join("");
}
function drawEvents(pic) {
  document.getElementById("events").innerHTML = pic.events.slice().reverse().map(e => {
    const who = (e.stage || "supervisor") + (e.replica !== null && e.replica !== undefined ? "." + e.replica : "");
    return `<li><span class="t">${clock(e.time)}</span> <span class="ev ${esc(e.event)}">${esc(e.event)}</span> ` +
      `<b>${esc(who)}</b> pid=${e.pid ?? "-"} ${esc(e.reason || "")}</li>`;
  }).join("");
}

// -- the model -------------------------------------------------------------------------------
function drawChart(pic) {
  const svg = document.getElementById("chart"), note = document.getElementById("chart-note");
  const rows = pic.metrics;
  svg.textContent = "";
  const names = rows.length ? Object.keys(rows[rows.length - 1].metrics) : [];
  const metric = ["accuracy", "f1", "r2", "mae", "rmse"].find(m => names.includes(m)) || names[0];
  const pts = metric ? rows.filter(r => typeof r.metrics[metric] === "number") : [];
  svg.setAttribute("data-metric", metric || "");
  svg.setAttribute("data-points", String(pts.length));
  const W = 600, H = 220, L = 44, R = 10, T = 10, B = 26;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  if (pts.length === 0) { note.textContent = "no evaluation yet (the evaluator writes metrics.jsonl once a model exists)"; return; }
  const t0 = pts[0].time, t1 = Math.max(pts[pts.length - 1].time, t0 + 1);
  const vals = pts.map(r => r.metrics[metric]);
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (hi - lo < 0.02) { lo -= 0.01; hi += 0.01; }
  const x = t => L + (t - t0) / (t1 - t0) * (W - L - R), y = v => T + (hi - v) / (hi - lo) * (H - T - B);
  el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#98a2b3"}, svg);
  el("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#98a2b3"}, svg);
  for (const v of [lo, (lo + hi) / 2, hi]) {
    el("text", {x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#667085"}, svg).textContent = v.toFixed(3);
  }
  el("text", {x: W - R, y: H - 6, "text-anchor": "end", "font-size": 10, fill: "#667085"}, svg).textContent = `${(t1 - t0).toFixed(0)} s`;
  let version = null;
  for (const r of pts) {
    if (r.version !== version) {
      version = r.version;
      el("line", {x1: x(r.time), y1: T, x2: x(r.time), y2: H - B, stroke: "#d0d5dd", "stroke-dasharray": "2,3", class: "version-mark"}, svg);
    }
    if (r.drift) el("line", {x1: x(r.time), y1: T, x2: x(r.time), y2: H - B, stroke: "#d92d20", class: "drift-mark"}, svg);
  }
  el("polyline", {fill: "none", stroke: "#2b8fd6", "stroke-width": 1.6, class: "metric-line",
                  points: pts.map(r => `${x(r.time).toFixed(1)},${y(r.metrics[metric]).toFixed(1)}`).join(" ")}, svg);
  const last = pts[pts.length - 1];
  note.textContent = `${metric} on the hold-out slice: ${last.metrics[metric].toFixed(4)} (model v${last.version}), ` +
    `${pts.length} evaluations, versions ${pts[0].version}..${last.version}, ${pts.filter(r => r.drift).length} drift points`;
}

// -- actions ---------------------------------------------------------------------------------
function drawActions(pic) {
  const names = pic.graph.stages.map(s => s.name);
  if (names.join("|") === stageNames) return;          // keep what the user is typing
  stageNames = names.join("|");
  const rows = (pic.status && pic.status.stages) || [];
  document.getElementById("actions").innerHTML = names.map(n => {
    const reps = rows.filter(r => r.name === n).length || 1;
    return `<div class="stage-actions" data-stage="${esc(n)}"><span class="sname">${esc(n)}</span>` +
      `<button data-action="restart">restart</button>` +
      `<input type="number" min="1" max="64" value="${reps}" aria-label="replicas of ${esc(n)}"><button data-action="scale">scale</button>` +
      `<button data-action="logs">logs</button></div>`;
  }).join("");
}
async function act(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const box = button.closest(".stage-actions"), stage = box.dataset.stage, what = button.dataset.action;
  const result = document.getElementById("action-result");
  if (what === "logs") {
    const logs = document.getElementById("logs");
    logs.hidden = false;
    logs.textContent = await (await fetch(url("api/logs", "&stage=" + encodeURIComponent(stage)))).text();
    return;
  }
  const body = {stage};
  if (what === "scale") body.replicas = Number(box.querySelector("input").value);
  result.className = "note";
  result.textContent = `${what} ${stage} ...`;
  button.disabled = true;
  try {
    const reply = await (await fetch(url("api/" + what), {method: "POST", headers: {"Content-Type": "application/json"},
                                                         body: JSON.stringify(body)})).json();
    result.className = "note " + (reply.ok ? "good" : "bad");
    result.textContent = reply.ok ? reply.message : "refused: " + reply.error;
  } catch (err) {
    result.className = "note bad";
    result.textContent = String(err);
  } finally {
    button.disabled = false;
  }
}

// -- wiring ----------------------------------------------------------------------------------
function draw(pic) {
  const st = pic.status;
  document.getElementById("pipeline").textContent = st ? st.pipeline : "(no pipeline)";
  document.getElementById("summary").textContent = st ?
    `supervisor ${st.supervisor_pid} · up ${uptime(st.uptime_s)} · delivery ${st.delivery} · ${st.stages.length} replicas` : pic.error;
  drawGraph(pic);
  drawReplicas(pic);
  drawChart(pic);
  drawDead(pic);
  drawEvents(pic);
  drawActions(pic);
  document.body.dataset.version = pic.version;
}
function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource(url("events"));
  source.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
  source.onmessage = msg => draw(JSON.parse(msg.data));
  source.onerror = () => { conn.textContent = "disconnected"; conn.className = "conn down"; };
}
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("legend").innerHTML = STATES.map(s => `<span class="state-${s}"><i></i>${s}</span>`).join("");
  document.getElementById("actions").addEventListener("click", act);
  connect();
});
