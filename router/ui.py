"""The status page: ``GET /ui`` (plain HTML and a little JavaScript, read-only) and
the JSON it polls, ``GET /admin/status`` (admin token).

The page holds no data: it asks for the admin token, keeps it in the tab's
session storage, and fetches ``/admin/status`` with it every two seconds. What it
shows is this router process's view: the fleet (shared through the store when
there is one), its traffic shares, and the ejections it made itself.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import TYPE_CHECKING, Any

from router.store import health
from router.view import fleet_view

if TYPE_CHECKING:
    from router.app import Router

STATUS_COLUMNS = (
    "id", "gpu", "state", "reason", "models", "engine", "in_flight", "latency_ms",
    "success_ratio", "share", "requests", "pool", "join_token", "spent_share",
)  # fmt: skip


def status(router: Router) -> dict[str, Any]:
    """The status document: supply, nodes, recent ejections, this router."""
    now = router.clock()
    view = fleet_view(router.fleet.nodes.values(), router.proxy.policy, now)
    return {
        "router": {
            "policy": router.proxy.policy.name,
            "store": health(router.store),
            "routers": len(router.store.routers),
            "draining": router.draining,
            "in_flight": router.proxy.active,
            "queued": router.proxy.queued,
        },
        "supply": view["summary"],
        "models": router.fleet.supply_by_model(),
        "pools": router.proxy.pools.state() if router.proxy.pools is not None else [],
        "nodes": [{k: row[k] for k in STATUS_COLUMNS} for row in view["nodes"]],
        "ejections": list(reversed(router.health.recent)),
    }


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Ballast status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2330; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem; }
  h2 { font-size: 1rem; margin: 1.4rem 0 .4rem; }
  table { border-collapse: collapse; }
  th, td { padding: .25rem .6rem; border-bottom: 1px solid #e3e6eb; text-align: left; }
  th { background: #f4f6f9; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .state { padding: .05rem .4rem; border-radius: .3rem; font-size: .85em; }
  .serving, .verified { background: #d8f3dc; } .registered { background: #fff3bf; }
  .ejected, .gone { background: #ffd6d6; } .draining { background: #e7e7ff; }
  #meta { color: #5a6270; } #error { color: #b00020; }
  .cards { display: flex; gap: 1rem; flex-wrap: wrap; }
  .card { border: 1px solid #e3e6eb; border-radius: .4rem; padding: .5rem .9rem; min-width: 9rem; }
  .card b { display: block; font-size: 1.4rem; }
</style>
</head>
<body>
<h1>Ballast</h1>
<div id="meta">not connected</div>
<div id="error"></div>
<form id="login" hidden>
  <label>Admin token <input id="token" type="password" autocomplete="off"></label>
  <button type="submit">Show</button>
</form>
<section id="status" hidden>
  <h2>Supply</h2>
  <div class="cards" id="supply"></div>
  <h2>Models</h2>
  <table id="models"><thead><tr><th>model</th><th>claimed</th><th>routable</th></tr></thead>
  <tbody></tbody></table>
  <div id="pools-section" hidden>
  <h2>Pools (this router's view)</h2>
  <table id="pools"><thead><tr><th>pool</th><th>state</th><th>requests in window</th>
    <th>TTFB p95 ms</th><th>error rate</th></tr></thead><tbody></tbody></table>
  </div>
  <h2>Nodes</h2>
  <table id="nodes"><thead><tr>
    <th>node</th><th>GPU</th><th>state</th><th>reason</th><th>models</th><th>engine</th>
    <th>in flight</th><th>latency ms</th><th>success</th><th>traffic share</th>
    <th>pool</th><th>join token</th><th>spend share</th>
  </tr></thead><tbody></tbody></table>
  <h2>Recent ejections (by this router)</h2>
  <table id="ejections"><thead><tr><th>time</th><th>node</th><th>reason</th></tr></thead>
  <tbody></tbody></table>
</section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function fill(table, rows) {
  const body = $(table).querySelector("tbody");
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells);
    return tr;
  }));
}
function render(doc) {
  const r = doc.router;
  $("meta").textContent = `policy ${r.policy} | store ${r.store} | routers ${r.routers}` +
    ` | in flight ${r.in_flight} | queued ${r.queued}` + (r.draining ? " | DRAINING" : "") +
    ` | updated ${new Date().toLocaleTimeString()}`;
  $("supply").replaceChildren(...["claimed", "verified", "serving"].map((k) => {
    const s = doc.supply[k], div = document.createElement("div");
    div.className = "card";
    div.id = "supply-" + k;
    const b = document.createElement("b");
    b.textContent = s.nodes;
    div.append(k, b, `${s.gpus} GPUs, ${s.vram_gb} GB`);
    return div;
  }));
  fill("models", Object.entries(doc.models).map(([m, s]) =>
    [cell(m), cell(s.nodes, "num"), cell(s.routable, "num")]));
  fill("nodes", doc.nodes.map((n) => {
    const tried = n.requests > 0;
    const state = cell(n.state);
    state.firstChild.remove();
    const tag = document.createElement("span");
    tag.className = "state " + n.state;
    tag.textContent = n.state;
    state.append(tag);
    return [cell(n.id), cell(n.gpu || "-"), state, cell(n.reason || ""),
      cell(n.models.join(", ")), cell(n.engine || "-"), cell(n.in_flight, "num"),
      cell(tried ? n.latency_ms.toFixed(1) : "-", "num"),
      cell(tried ? n.success_ratio.toFixed(3) : "-", "num"),
      cell((n.share * 100).toFixed(1) + "%", "num"), cell(n.pool || "-"),
      cell(n.join_token || "-"), cell((n.spent_share * 100).toFixed(1) + "%", "num")];
  }));
  $("pools-section").hidden = doc.pools.length === 0;
  fill("pools", doc.pools.map((p) => [cell(p.pool), cell(p.state),
    cell(p.requests, "num"), cell(p.ttfb_p95_ms === null ? "-" : p.ttfb_p95_ms, "num"),
    cell((p.error_rate * 100).toFixed(1) + "%", "num")]));
  fill("ejections", doc.ejections.map((e) =>
    [cell(new Date(e.time * 1000).toLocaleTimeString()), cell(e.node), cell(e.reason)]));
}
async function poll() {
  const token = sessionStorage.getItem("ballast-admin-token");
  if (!token) { $("login").hidden = false; return; }
  try {
    const resp = await fetch("/admin/status", {headers: {Authorization: "Bearer " + token}});
    if (resp.status === 401) {
      sessionStorage.removeItem("ballast-admin-token");
      $("error").textContent = "wrong admin token";
      $("login").hidden = false;
      $("status").hidden = true;
      return;
    }
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    $("error").textContent = "";
    $("login").hidden = true;
    $("status").hidden = false;
  } catch (e) {
    $("error").textContent = "cannot reach the router: " + e.message;
  }
  setTimeout(poll, 2000);
}
$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("ballast-admin-token", $("token").value);
  poll();
});
poll();
</script>
</body>
</html>
"""


def _sha256(block: str) -> str:
    text = re.search(rf"<{block}>(.*?)</{block}>", PAGE, re.S)
    assert text is not None
    return (
        "'sha256-"
        + base64.b64encode(hashlib.sha256(text.group(1).encode()).digest()).decode()
        + "'"
    )


PAGE_BODY = PAGE.encode()
# Only this page's own script and style run; nothing is framed, cached or referred.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_sha256('script')}; style-src {_sha256('style')}; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
