/// The status page: one self-contained document (inline CSS and script, no external fetch but
/// its own API). It polls /api/v1/status every second and redraws the tables in place.
///
/// Stable hooks for tests and scripts: `body[data-updates]` counts redraws; rows carry
/// `data-node-id`/`data-state` and `data-volume-id`/`data-condition`; each replica badge
/// `data-replica-node`/`data-in-sync`; each resync `data-replica-node`, `data-percent`,
/// `data-active`; each event `data-event-kind`.
enum StatusPage {
    static let html = #"""
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Cairn status</title>
<style>
  :root { --ok: #1f883d; --warn: #bf8700; --info: #0969da; --bad: #cf222e; --muted: #6e7781; --line: #d0d7de; }
  * { box-sizing: border-box; }
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1f2328; background: #f6f8fa; }
  header { display: flex; align-items: baseline; gap: 16px; padding: 14px 24px; background: #24292f; color: #fff; }
  header h1 { font-size: 18px; margin: 0; }
  header .meta { color: #d0d7de; font-size: 13px; }
  #connection[data-state="error"] { color: #ff8182; }
  main { padding: 16px 24px; display: grid; gap: 20px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  table { width: 100%; border-collapse: collapse; }
  th, td { text-align: left; padding: 6px 8px; border-top: 1px solid var(--line); vertical-align: top; }
  th { font-weight: 600; color: var(--muted); border-top: none; font-size: 12px; text-transform: uppercase; }
  .badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; color: #fff; }
  .healthy, .live, .insync { background: var(--ok); }
  .degraded, .away { background: var(--warn); }
  .resyncing { background: var(--info); }
  .faulted, .removed, .outofsync { background: var(--bad); }
  .replica { margin: 0 4px 4px 0; }
  .replica.outofsync.copying { background: var(--info); }
  .resync { margin-top: 4px; font-size: 12px; }
  .bar { width: 220px; height: 8px; background: #eaeef2; border-radius: 4px; overflow: hidden; display: inline-block; vertical-align: middle; margin-right: 6px; }
  .bar > div { height: 100%; background: var(--info); transition: width .5s; }
  .message { color: var(--muted); font-size: 12px; max-width: 560px; }
  .usage { width: 120px; height: 6px; background: #eaeef2; border-radius: 3px; overflow: hidden; margin-top: 3px; }
  .usage > div { height: 100%; background: #57606a; }
  #events { list-style: none; margin: 0; padding: 0; max-height: 360px; overflow-y: auto; }
  #events li { padding: 4px 0; border-top: 1px solid var(--line); font-size: 13px; }
  #events time { color: var(--muted); margin-right: 8px; font-variant-numeric: tabular-nums; }
  #events .kind { font-weight: 600; margin-right: 8px; }
  .empty { color: var(--muted); }
  .num { font-variant-numeric: tabular-nums; }
</style>
</head>
<body data-updates="0">
<header>
  <h1>Cairn status</h1>
  <span class="meta" id="summary"></span>
  <span class="meta">updated <span id="updated">never</span></span>
  <span class="meta" id="connection" data-state="connecting">connecting…</span>
</header>
<main>
  <section>
    <h2>Volumes</h2>
    <table id="volumes">
      <thead><tr><th>Volume</th><th>Size</th><th>Condition</th><th>Epoch</th><th>Attached</th><th>Replicas</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>
  <section>
    <h2>Nodes</h2>
    <table id="nodes">
      <thead><tr><th>Node</th><th>State</th><th>Data address</th><th>Capacity</th><th>Used</th><th>Replicas</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>
  <section>
    <h2>Recent events</h2>
    <ol id="events"></ol>
  </section>
</main>
<script>
"use strict";
const units = ["B", "KiB", "MiB", "GiB", "TiB"];
function bytes(n) {
  if (n === null || n === undefined) return "–";
  let v = n, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? n + " B" : v.toFixed(1) + " " + units[u];
}
function rate(bps) { return bps > 0 ? bytes(bps) + "/s" : "rate unknown"; }
function duration(s) {
  if (s === null || s === undefined) return "ETA unknown";
  s = Math.round(s);
  if (s < 60) return "ETA " + s + " s";
  if (s < 3600) return "ETA " + Math.floor(s / 60) + " min " + (s % 60) + " s";
  return "ETA " + Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function clock(iso) { const d = new Date(iso); return isNaN(d) ? iso : d.toLocaleTimeString(); }
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}
function replace(tbody, rows, columns, emptyText) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: columns, class: "empty" }, emptyText))]));
}

function volumeRow(v) {
  const badges = el("div");
  const resyncs = [];
  for (const r of v.replicas) {
    const copying = !r.inSync && r.resync && r.resync.active;
    badges.append(el("span", {
      class: "badge replica " + (r.inSync ? "insync" : "outofsync") + (copying ? " copying" : ""),
      "data-replica-node": r.node, "data-in-sync": String(r.inSync), "data-node-state": r.nodeState,
      title: r.inSync ? "in sync" : (r.reason || "out of sync"),
    }, r.node + (r.inSync ? " ✓" : copying ? " ⟳" : " ✗")));
    if (!r.inSync && r.resync) {
      const p = r.resync;
      const pct = Math.max(0, Math.min(100, p.percent));
      resyncs.push(el("div", { class: "resync", "data-replica-node": r.node, "data-percent": pct.toFixed(1),
                               "data-active": String(p.active), "data-phase": p.phase },
        el("span", { class: "bar" }, el("div", { style: "width:" + pct.toFixed(1) + "%" })),
        el("span", { class: "resync-text num" },
           r.node + ": " + p.phase + " " + pct.toFixed(0) + "% (" + bytes(p.bytesDone) + " of " + bytes(p.bytesTotal) + ")" +
           (p.active ? " · " + rate(p.bytesPerSecond) + " · " + duration(p.etaSeconds) : ""))));
    }
  }
  if (!v.replicas.length) badges.append(el("span", { class: "empty" }, "local file"));
  const attached = v.attachments.length
    ? v.attachments.map(a => a.node + (a.readOnly ? " (ro)" : "") + " @" + a.epoch).join(", ") : "–";
  return el("tr", { "data-volume-id": v.id, "data-condition": v.condition },
    el("td", {}, el("div", {}, v.name), el("div", { class: "message" }, v.id)),
    el("td", { class: "num" }, bytes(v.sizeBytes)),
    el("td", {}, el("span", { class: "badge condition " + v.condition }, v.condition),
       el("div", { class: "message" }, v.message)),
    el("td", { class: "num epoch" }, v.epoch),
    el("td", { class: "attachment", "data-attached": v.attachments.map(a => a.node).join(",") }, attached),
    el("td", {}, badges, ...resyncs));
}

function nodeRow(n) {
  const fraction = n.capacityBytes ? Math.min(1, n.usedBytes / n.capacityBytes) : 0;
  return el("tr", { "data-node-id": n.id, "data-state": n.state },
    el("td", {}, n.id),
    el("td", {}, el("span", { class: "badge " + n.state }, n.state)),
    el("td", { class: "num" }, n.dataAddress || "–"),
    el("td", { class: "num" }, bytes(n.capacityBytes)),
    el("td", { class: "num" }, bytes(n.usedBytes),
       n.capacityBytes ? el("div", { class: "usage" }, el("div", { style: "width:" + (fraction * 100).toFixed(1) + "%" })) : null),
    el("td", { class: "num" }, n.replicas));
}

function eventItem(e) {
  const subject = [e.volumeID ? "volume " + e.volumeID : null, e.nodeID ? "node " + e.nodeID : null].filter(Boolean).join(", ");
  return el("li", { "data-event-kind": e.kind, "data-volume-id": e.volumeID || "", "data-node-id": e.nodeID || "" },
    el("time", { datetime: e.time }, clock(e.time)), el("span", { class: "kind" }, e.kind),
    subject ? el("span", { class: "subject" }, subject + ": ") : null, e.message);
}

function render(s) {
  replace(document.querySelector("#volumes tbody"), s.volumes.map(volumeRow), 6, "no volumes");
  replace(document.querySelector("#nodes tbody"), s.nodes.map(nodeRow), 6, "no nodes");
  const events = document.getElementById("events");
  events.replaceChildren(...(s.events.length ? s.events.map(eventItem) : [el("li", { class: "empty" }, "no events yet")]));
  const count = c => s.volumes.filter(v => v.condition === c).length;
  document.getElementById("summary").textContent =
    s.volumes.length + " volumes (" + ["healthy", "degraded", "resyncing", "faulted"].map(c => count(c) + " " + c).join(", ") + "), " +
    s.nodes.filter(n => n.state === "live").length + " of " + s.nodes.length + " nodes live";
  document.getElementById("updated").textContent = clock(s.generatedAt);
  document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
}

async function poll() {
  const connection = document.getElementById("connection");
  try {
    const response = await fetch("api/v1/status", { cache: "no-store" });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    render(body);
    connection.dataset.state = "ok";
    connection.textContent = "live";
  } catch (error) {
    connection.dataset.state = "error";
    connection.textContent = "cannot reach the controller: " + error.message + " (retrying)";
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"""#
}
