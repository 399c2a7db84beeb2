"""The run's interactive dashboard: one self-contained HTML file, plotly.js inlined, so it
opens without the network, from disk or in MLflow's artifact viewer (which shows an HTML
artifact inline, in a sandboxed frame that runs scripts).

:func:`write_dashboard` writes ``dashboard.html`` from the local history
(:class:`~ddsmon.sinks.history.LocalHistory`: readings, events, the trainer's scalars and
the spectra of the checkpoints it keeps). Its sections:

* **Readings over steps**: a dropdown of every reading (the headline ones first); a
  layer x step heatmap of the one chosen, events marked where they happened, and its
  lines per layer (the layer on hover; events as vertical lines).
* **Spectra**: dropdowns of a checkpoint (those the history keeps) and a layer; its
  spectra of X, G and K on a log axis, each with its trust floor dashed.
* **Events**: every event, in step order (step, layer, kind, reading, magnitude,
  message).
* **Trainer's scalars**: accuracies on the left axis, the others on the right.

The numbers go into the page as one JSON object (:func:`dashboard_data`, values to 5
significant digits, at most :data:`MAX_STEPS` checkpoints, thinned evenly); a few lines
of script draw it with ``Plotly.react``. plotly (the Python package) is needed only for
the plotly.js bundle it ships.
"""

from __future__ import annotations

import html
import importlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ddsmon.readings import READINGS, SPECTRA
from ddsmon.sinks.history import event_dict, thin_steps

__all__ = ("MAX_EVENTS", "MAX_STEPS", "dashboard_data", "plotly_js", "write_dashboard")

#: Checkpoints drawn at most (more are thinned evenly, the first and last kept).
MAX_STEPS = 400
#: Events listed at most in the table (all are marked in the figures).
MAX_EVENTS = 2000
_LOG10_UNITS = ("ratio", "value", "floor")
_SIDE_COLOR = {"X": "#1f77b4", "G": "#ff7f0e", "K": "#2ca02c"}


def plotly_js() -> str:
    """The plotly.js bundle of the installed plotly package (ImportError without it)."""
    offline = importlib.import_module("plotly.offline")
    return str(offline.get_plotlyjs())


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return float(f"{v:.5g}") if math.isfinite(v) else None


def dashboard_data(
    history: Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]],
    events: Iterable[Any] = (),
    *,
    train: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    spectra: Mapping[int, Mapping[str, Any]] | None = None,
    title: str = "",
    source: str = "",
    max_steps: int = MAX_STEPS,
) -> dict[str, Any]:
    """What the page draws, as plain JSON-ready data.

    ``history``: layer -> ``[(step, readings), ...]``
    (:meth:`~ddsmon.sinks.history.LocalHistory.layers`); ``events``: events or their
    dicts; ``train``: name -> ``[(step, value), ...]``; ``spectra``: step ->
    :func:`~ddsmon.sinks.history.compact_spectra`.

    Returns ``{"title", "source", "layers", "steps", "thinned", "readings": [{"name", "title",
    "description", "unit", "side", "headline", "log10"}, ...] (headline first, table order),
    "values": {reading: [[value or None per step] per layer]}, "events": [...],
    "events_total", "train": {name: [[step, value], ...]}, "spectra": {step: ...},
    "sides": [{"side", "label", "color"}, ...]}``.
    """
    layers = list(history)
    all_steps = sorted({int(s) for points in history.values() for s, _ in points})
    dropped = set(thin_steps(all_steps, max_steps)) if len(all_steps) > max_steps else set()
    steps = [s for s in all_steps if s not in dropped]
    col = {s: j for j, s in enumerate(steps)}
    rows = sorted(READINGS, key=lambda r: not r.headline)  # stable: table order kept
    values: dict[str, list[list[float | None]]] = {}
    for r in rows:
        matrix: list[list[float | None]] = []
        for layer in layers:
            line: list[float | None] = [None] * len(steps)
            for s, readings in history[layer]:
                j = col.get(int(s))
                if j is not None:
                    line[j] = _num(readings.get(r.name))
            matrix.append(line)
        values[r.name] = matrix
    evs = sorted((event_dict(e) for e in events), key=lambda e: (int(e.get("step", 0)), str(e)))
    kept_events = [
        {
            "step": int(e["step"]),
            "layer": str(e.get("layer", "")),
            "kind": str(e.get("kind", "")),
            "reading": str(e.get("reading", "")),
            "magnitude": _num(e.get("magnitude")),
            "message": str(e.get("message", "")),
        }
        for e in evs
        if e.get("step") is not None
    ]
    return {
        "title": title,
        "source": source,
        "layers": layers,
        "steps": steps,
        "thinned": len(dropped),
        "readings": [
            {
                "name": r.name,
                "title": r.title,
                "description": r.description,
                "unit": r.unit,
                "side": r.side,
                "headline": r.headline,
                "log10": r.unit in _LOG10_UNITS,
            }
            for r in rows
        ],
        "values": values,
        "events": kept_events[:MAX_EVENTS],
        "events_total": len(kept_events),
        "train": {
            str(k): [[int(s), _num(v)] for s, v in sorted(pts, key=lambda p: p[0])]
            for k, pts in (train or {}).items()
        },
        "spectra": {str(int(k)): dict(v) for k, v in sorted((spectra or {}).items())},
        "sides": [
            {"side": sp.side, "label": sp.label, "color": _SIDE_COLOR.get(sp.side, "#7f7f7f")}
            for sp in SPECTRA
        ],
    }


def write_dashboard(
    path: Path | str,
    history: Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]],
    events: Iterable[Any] = (),
    *,
    train: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    spectra: Mapping[int, Mapping[str, Any]] | None = None,
    title: str = "",
    source: str = "",
) -> Path:
    """Write the dashboard (see the module docstring) to ``path``, whole or not at all;
    return ``path``. ``title``: the page's heading; ``source``: where the readings come
    from (the watched directory), said under it. ImportError when plotly is not
    installed."""
    path = Path(path)
    js = plotly_js()
    data = dashboard_data(history, events, train=train, spectra=spectra, title=title, source=source)
    # inside <script>, "</script" would end the element and "<!--" change how it is read:
    # "<" (only ever inside a JSON string) written as its escape
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    parts = {
        "TITLE": html.escape(title or "ddsmon dashboard"),
        "STYLE": _STYLE,
        "DATA": blob,
        "APP": _APP,
        "PLOTLY": re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE),
    }
    # one pass: what is put in is never searched again for a placeholder
    page = re.sub(r"@(TITLE|STYLE|DATA|APP|PLOTLY)@", lambda m: parts[m.group(1)], _PAGE)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>@TITLE@</title>
<style>@STYLE@</style>
<script>@PLOTLY@</script>
</head>
<body>
<header><h1>@TITLE@</h1><p id="summary"></p></header>
<section id="readings-section">
  <h2>Readings over steps</h2>
  <label>reading <select id="reading"></select></label>
  <p id="reading-description" class="note"></p>
  <div id="heatmap" class="plot"></div>
  <div id="lines" class="plot"></div>
</section>
<section id="spectra-section">
  <h2>Spectra of a checkpoint</h2>
  <label>checkpoint <select id="spectra-step"></select></label>
  <label>layer <select id="spectra-layer"></select></label>
  <p class="note">Dashed: each spectrum's trust floor; values below it are unresolved.
  The rank is the count above it.</p>
  <div id="spectra" class="plot"></div>
</section>
<section id="events-section">
  <h2>Events</h2>
  <p id="events-summary" class="note"></p>
  <div id="events-plot" class="plot"></div>
  <table id="events"><thead><tr><th>step</th><th>layer</th><th>kind</th><th>reading</th>
  <th>magnitude</th><th>message</th></tr></thead><tbody></tbody></table>
</section>
<section id="train-section">
  <h2>Trainer's scalars</h2>
  <div id="train" class="plot"></div>
</section>
<script type="application/json" id="ddsmon-data">@DATA@</script>
<script>@APP@</script>
</body>
</html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; }
h1 { font-size: 1.3em; margin: 0.8em 0 0.2em; } h2 { font-size: 1.1em; margin: 1.4em 0 0.4em; }
label { margin-right: 1.5em; font-size: 0.95em; } select { font-size: 0.95em; max-width: 40em; }
.note { color: #555; font-size: 0.9em; margin: 0.3em 0; }
.plot { width: 100%; }
table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""

_APP = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("ddsmon-data").textContent);
  var CONFIG = {displaylogo: false, responsive: true};
  var KIND = {
    collapse: ["triangle-down", "#ff7f0e"], revival: ["triangle-up", "#2ca02c"],
    rank_change: ["diamond", "#9467bd"], dying: ["circle", "#e377c2"],
    nonfinite: ["x", "#000000"], transition: ["circle-open", "#d62728"]
  };
  // counts: none light, many dark (matplotlib's magma_r, as in the heatmap PNGs)
  var COUNTS = [[0, "#fcfdbf"], [0.25, "#fc8961"], [0.5, "#b73779"], [0.75, "#51127c"],
    [1, "#000004"]];
  var layerIndex = {};
  D.layers.forEach(function (l, i) { layerIndex[l] = i; });
  function label(l) { return l === "" ? "(model)" : l; }
  function el(id) { return document.getElementById(id); }
  function option(sel, value, text) {
    var o = document.createElement("option"); o.value = value; o.textContent = text;
    sel.appendChild(o); return o;
  }
  function eventLayers(e) {
    if (e.kind !== "transition" || e.layer in layerIndex) { return [e.layer]; }
    return e.layer.split(",").map(function (s) { return s.trim(); });
  }
  el("summary").textContent = (D.source ? D.source + ": " : "") + D.layers.length + " layers, " + D.steps.length +
    " checkpoints" + (D.steps.length ? " (steps " + D.steps[0] + " to " +
    D.steps[D.steps.length - 1] + ")" : "") + (D.thinned ? ", " + D.thinned +
    " more checkpoints thinned out" : "") + ", " + D.events_total + " events.";

  // ---------------------------------------------------------------- readings
  var readingSel = el("reading");
  var groups = {true: document.createElement("optgroup"), false: document.createElement("optgroup")};
  groups[true].label = "headline"; groups[false].label = "details";
  readingSel.appendChild(groups[true]); readingSel.appendChild(groups[false]);
  var byName = {};
  D.readings.forEach(function (r) {
    byName[r.name] = r; option(groups[r.headline], r.name, r.name + "  (" + r.title + ")");
  });
  function xRange() {
    var s = D.steps;
    if (!s.length) { return undefined; }
    if (s.length === 1) { return [s[0] - 0.5, s[0] + 0.5]; }
    return [s[0] - (s[1] - s[0]) / 2, s[s.length - 1] + (s[s.length - 1] - s[s.length - 2]) / 2];
  }
  function lvl(r, v) {
    if (v === null) { return null; }
    if (r.log10) { return v > 0 ? Math.log10(v) : null; }
    return v;
  }
  function onPanel(e, r) {
    if (e.kind === "nonfinite" || e.kind === "transition" || e.kind === "dying") { return true; }
    if (e.reading === r.name) { return true; }
    var other = byName[e.reading];
    return e.kind === "rank_change" && other && other.unit === "count" &&
      r.unit === "count" && other.side === r.side;
  }
  function drawReading() {
    var r = byName[readingSel.value];
    el("reading-description").textContent = r.description;
    var matrix = D.values[r.name];
    var z = matrix.map(function (row) { return row.map(function (v) { return lvl(r, v); }); });
    var perLayer = D.layers.length <= 60 ? 22 : 8;
    var height = Math.min(2600, Math.max(320, 130 + perLayer * D.layers.length));
    var traces = [{
      type: "heatmap", x: D.steps, y: D.layers.map(label), z: z,
      customdata: matrix, colorscale: r.unit === "count" ? COUNTS : "Viridis",
      colorbar: {title: {text: (r.log10 ? "log10 " : "") + r.name}},
      hovertemplate: "step %{x}<br>%{y}<br>" + r.name + " %{customdata:.4g}<extra></extra>",
      hoverongaps: false
    }];
    var marks = {};
    D.events.forEach(function (e) {
      if (!onPanel(e, r)) { return; }
      eventLayers(e).forEach(function (l) {
        if (!(l in layerIndex)) { return; }
        var m = marks[e.kind] || (marks[e.kind] = {x: [], y: [], text: []});
        m.x.push(e.step); m.y.push(label(l)); m.text.push(e.message);
      });
    });
    Object.keys(marks).forEach(function (k) {
      var style = KIND[k] || ["square", "#7f7f7f"];
      traces.push({
        type: "scatter", mode: "markers", name: k, x: marks[k].x, y: marks[k].y,
        text: marks[k].text, hovertemplate: k + " at step %{x}<br>%{y}<br>%{text}<extra></extra>",
        marker: {symbol: style[0], color: style[1], size: 10, line: {width: 1.2, color: "#000"}}
      });
    });
    Plotly.react(el("heatmap"), traces, {
      title: {text: r.name + " per layer and step (grey: unresolved)"},
      height: height, margin: {l: 220, r: 20, t: 50, b: 50},
      // fixed ranges: the markers' padding would otherwise add empty rows and columns
      xaxis: {title: {text: "training step"}, range: xRange()},
      yaxis: {range: [D.layers.length - 0.5, -0.5], automargin: true, type: "category",
        dtick: D.layers.length <= 60 ? 1 : undefined},
      legend: {orientation: "h", x: 0, y: 1, yanchor: "bottom"}, plot_bgcolor: "#d9d9d9"
    }, CONFIG);
    var many = D.layers.length > 40;
    var lines = D.layers.map(function (l, i) {
      return {
        type: many ? "scattergl" : "scatter", mode: "lines+markers", name: label(l),
        x: D.steps, y: matrix[i], connectgaps: false, marker: {size: 4},
        hovertemplate: label(l) + "<br>step %{x}<br>" + r.name + " %{y:.4g}<extra></extra>"
      };
    });
    var shapes = [], seen = {};
    D.events.forEach(function (e) {
      var key = e.step + "/" + e.kind;
      if (!onPanel(e, r) || seen[key]) { return; }
      seen[key] = true;
      var style = KIND[e.kind] || ["", "#7f7f7f"];
      shapes.push({type: "line", xref: "x", yref: "paper", x0: e.step, x1: e.step, y0: 0, y1: 1,
        line: {color: style[1], width: e.kind === "transition" ? 2.5 : 1,
          dash: e.kind === "transition" ? "solid" : "dot"}});
    });
    Plotly.react(el("lines"), lines, {
      title: {text: r.name + " per layer over steps (vertical lines: events)"},
      height: 460, showlegend: !many, margin: {t: 50},
      xaxis: {title: {text: "training step"}},
      yaxis: {type: r.log10 ? "log" : "linear", title: {text: r.name}}, shapes: shapes
    }, CONFIG);
  }
  readingSel.addEventListener("change", drawReading);
  // first shown: the headline reading of the first collapse (else of the first event),
  // else the first headline reading
  function about(kinds) {
    var e = D.events.filter(function (e) {
      return (!kinds || kinds.indexOf(e.kind) >= 0) && byName[e.reading] &&
        byName[e.reading].headline;
    })[0];
    return e ? byName[e.reading] : null;
  }
  var first = about(["collapse"]) || about(null) || D.readings[0];
  if (first) { readingSel.value = first.name; drawReading(); }

  // ---------------------------------------------------------------- spectra
  var stepSel = el("spectra-step"), layerSel = el("spectra-layer");
  var specSteps = Object.keys(D.spectra).map(Number).sort(function (a, b) { return a - b; });
  specSteps.forEach(function (s) { option(stepSel, String(s), "step " + s); });
  function fillLayers() {
    var keep = layerSel.value, at = D.spectra[stepSel.value] || {};
    layerSel.innerHTML = "";
    Object.keys(at).forEach(function (l) { option(layerSel, l, label(l)); });
    if (keep && keep in at) { layerSel.value = keep; }
  }
  function drawSpectra() {
    var at = (D.spectra[stepSel.value] || {})[layerSel.value];
    var traces = [], shapes = [], title = "no spectra kept";
    if (at) {
      title = "step " + stepSel.value + ", layer " + label(layerSel.value) +
        (at.finite ? "" : " (non-finite)");
      D.sides.forEach(function (side) {
        var s = at[side.side];
        if (!s) { return; }
        var xs = [], ys = [];
        s.i.forEach(function (i, k) {
          if (s.v[k] !== null && s.v[k] > 0) { xs.push(i + 1); ys.push(s.v[k]); }
        });
        var rank = s.rank === null ? "" : ", rank " + s.rank + "/" + s.n;
        traces.push({type: "scatter", mode: "lines+markers", name: side.label + rank, x: xs, y: ys,
          line: {color: side.color}, marker: {size: 4}});
        if (s.floor !== null && s.floor > 0) {
          traces.push({type: "scatter", mode: "lines", name: side.side + " floor",
            x: [1, s.n], y: [s.floor, s.floor], line: {color: side.color, dash: "dash", width: 1}});
        }
      });
    }
    Plotly.react(el("spectra"), traces, {
      title: {text: title}, height: 460, margin: {t: 50},
      xaxis: {title: {text: "index (descending)"}},
      yaxis: {title: {text: "value"}, type: "log", exponentformat: "power"}
    }, CONFIG);
  }
  stepSel.addEventListener("change", function () { fillLayers(); drawSpectra(); });
  layerSel.addEventListener("change", drawSpectra);
  if (specSteps.length) { stepSel.value = String(specSteps[specSteps.length - 1]); }
  fillLayers(); drawSpectra();

  // ---------------------------------------------------------------- events
  var body = document.querySelector("#events tbody");
  D.events.forEach(function (e) {
    var tr = document.createElement("tr");
    [e.step, label(e.layer), e.kind, e.reading,
     e.magnitude === null ? "" : Number(e.magnitude).toPrecision(3), e.message
    ].forEach(function (v, i) {
      var td = document.createElement("td"); td.textContent = String(v);
      if (i === 0 || i === 4) { td.className = "num"; }
      tr.appendChild(td);
    });
    body.appendChild(tr);
  });
  el("events-summary").textContent = D.events_total ? D.events_total + " events" +
    (D.events_total > D.events.length ? " (the first " + D.events.length + " listed)" : "") +
    "; hover a mark for its message." : "No events.";
  var byKind = {};
  D.events.forEach(function (e) {
    eventLayers(e).forEach(function (l) {
      var m = byKind[e.kind] || (byKind[e.kind] = {x: [], y: [], text: []});
      m.x.push(e.step); m.y.push(label(l)); m.text.push(e.reading + ": " + e.message);
    });
  });
  Plotly.react(el("events-plot"), Object.keys(byKind).map(function (k) {
    var style = KIND[k] || ["square", "#7f7f7f"];
    return {type: "scatter", mode: "markers", name: k, x: byKind[k].x, y: byKind[k].y,
      text: byKind[k].text, hovertemplate: k + " at step %{x}<br>%{y}<br>%{text}<extra></extra>",
      marker: {symbol: style[0], color: style[1], size: 10}};
  }), {
    title: {text: "events by step and layer"}, height: 360, margin: {l: 220, t: 50},
    xaxis: {title: {text: "training step"}, range: D.steps.length ?
      [D.steps[0], D.steps[D.steps.length - 1]] : undefined},
    yaxis: {type: "category", categoryorder: "array", categoryarray: D.layers.map(label),
      autorange: "reversed", automargin: true}
  }, CONFIG);

  // ---------------------------------------------------------------- trainer
  var names = Object.keys(D.train), right = false;
  var scalars = names.map(function (n) {
    var acc = n.toLowerCase().indexOf("acc") >= 0;
    if (!acc) { right = true; }
    return {type: "scatter", mode: "lines+markers", name: n + (acc ? "" : " (right)"),
      x: D.train[n].map(function (p) { return p[0]; }),
      y: D.train[n].map(function (p) { return p[1]; }),
      yaxis: acc ? "y" : "y2", line: {dash: acc ? "solid" : "dash"}, marker: {size: 4}};
  });
  // the right axis is logarithmic when its scalars are positive and span two decades
  var lo = Infinity, hi = -Infinity, positive = true;
  names.forEach(function (n) {
    if (n.toLowerCase().indexOf("acc") >= 0) { return; }
    D.train[n].forEach(function (p) {
      if (p[1] === null) { return; }
      if (p[1] <= 0) { positive = false; }
      lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]);
    });
  });
  var logRight = positive && lo > 0 && hi / lo > 100;
  Plotly.react(el("train"), scalars, {
    title: {text: names.length ? "the trainer's scalars found in the checkpoints" :
      "no trainer scalars in the checkpoints"},
    height: 380, margin: {t: 50}, xaxis: {title: {text: "training step"}},
    yaxis: {title: {text: "accuracies"}},
    yaxis2: right ? {overlaying: "y", side: "right", type: logRight ? "log" : "linear",
      tickmode: "auto", showgrid: false,
      title: {text: "other scalars"}} : undefined
  }, CONFIG);
})();
"""
