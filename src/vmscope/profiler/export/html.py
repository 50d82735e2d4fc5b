"""A single self-contained HTML report: flame graphs, exit tables and a timeline.

Everything is inline (CSS, JavaScript, data as embedded JSON); the page loads nothing from the
network. The flame graphs and the timeline are SVG drawn by the inline script; the tables are
rendered here. After drawing, the script records the flame graph's box in
``#flame[data-bbox]`` and sets ``body[data-rendered="ok"]`` (tests and scripts can check both).
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

from vmscope.profiler.analysis import (
    FrameNamer,
    aggregate_stacks,
    describe_profile,
    exit_causes,
    exit_sample_weights,
    format_count,
    format_ns,
    format_pct,
    format_us,
    io_latency_rows,
    kvm_stat_events,
    select_samples,
    top_functions,
    vcpu_times,
)
from vmscope.profiler.counter_table import counter_table
from vmscope.profiler.emulated_table import TITLE as EMULATED_TITLE
from vmscope.profiler.emulated_table import emulated_table
from vmscope.profiler.model import IO_PART_NAMES, Profile

#: the timeline keeps the earliest spans up to this many, so the page stays loadable
MAX_TIMELINE_SPANS = 20_000
TOP_FUNCTIONS = 50


def flame_tree(stacks: dict[tuple[str, ...], float]) -> dict[str, Any]:
    """Nested ``{"n": name, "v": weight, "c": [children]}`` from root-first stacks; root is "all"."""
    root: dict[str, Any] = {"n": "all", "v": 0.0, "c": {}}
    for stack, weight in stacks.items():
        node = root
        node["v"] += weight
        for name in stack:
            children = node["c"]
            child = children.get(name)
            if child is None:
                child = children[name] = {"n": name, "v": 0.0, "c": {}}
            child["v"] += weight
            node = child

    def freeze(node: dict[str, Any]) -> dict[str, Any]:
        children = [freeze(child) for _, child in sorted(node["c"].items())]
        frozen: dict[str, Any] = {"n": node["n"], "v": round(node["v"], 3)}
        if children:
            frozen["c"] = children
        return frozen

    return freeze(root)


def _flames(profile: Profile, namer: FrameNamer) -> list[dict[str, Any]]:
    flames = []
    timer = select_samples(profile, origin="timer")
    if timer:
        flames.append(
            {
                "id": "cpu",
                "label": f"Guest CPU samples, all vCPUs ({len(timer)})",
                "unit": "samples",
                "root": flame_tree(aggregate_stacks(timer, namer, prefix="vcpu")),
            }
        )
        for vcpu in sorted({s.vcpu for s in timer}):
            own = [s for s in timer if s.vcpu == vcpu]
            flames.append(
                {
                    "id": f"vcpu{vcpu}",
                    "label": f"Guest CPU samples, vcpu{vcpu} ({len(own)})",
                    "unit": "samples",
                    "root": flame_tree(aggregate_stacks(own, namer)),
                }
            )
    exit_samples = [s for s in select_samples(profile, origin="exit") if s.exit_key is not None]
    if exit_samples:
        weights = {key: value[1] for key, value in exit_sample_weights(profile, exit_samples).items()}
        unit = "ns"
        if not any(weights.values()):
            weights = {key: 1.0 for key in weights}
            unit = "samples"
        flames.append(
            {
                "id": "exits",
                "label": f"Exit handling time by guest code ({len(exit_samples)} exit samples)",
                "unit": unit,
                "root": flame_tree(aggregate_stacks(exit_samples, namer, weights=weights)),
            }
        )
    return flames


def _timeline(profile: Profile) -> dict[str, Any]:
    spans = sorted(profile.spans, key=lambda s: (s.start_ns, s.end_ns))
    kept = spans[:MAX_TIMELINE_SPANS]
    tracks = sorted({s.track for s in kept}, key=lambda t: (not t.startswith("vcpu"), len(t), t))
    track_index = {t: i for i, t in enumerate(tracks)}
    names: dict[str, int] = {}
    rows = [[track_index[s.track], names.setdefault(s.name, len(names)), s.start_ns, s.end_ns] for s in kept]
    end = max([profile.metadata.duration_ns] + [s.end_ns for s in kept])
    return {
        "tracks": tracks,
        "names": list(names),
        "spans": rows,
        "end_ns": end,
        "dropped": len(spans) - len(kept),
    }


def _table(title: str, headers: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    if not rows:
        return f"<h3>{html.escape(title)}</h3><p class=empty>none</p>"
    head = "".join(
        f"<th{' class=num' if i >= numeric_from else ''}>{html.escape(h)}</th>" for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if i >= numeric_from else ''}>{html.escape(c)}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<h3>{html.escape(title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tables(profile: Profile, namer: FrameNamer) -> str:
    parts = []
    duration = profile.metadata.duration_ns
    parts.append(
        _table(
            "Where the time went, per vCPU",
            ["vCPU", "Guest", "Guest%", "Exit handling", "Exit%", "Exits"],
            [
                [
                    f"vcpu{row.vcpu}",
                    format_ns(row.guest_ns),
                    format_pct(100 * row.guest_ns / duration) if duration else "-",
                    format_ns(row.exit_handling_ns),
                    format_pct(100 * row.exit_handling_ns / duration) if duration else "-",
                    str(row.exits),
                ]
                for row in vcpu_times(profile)
            ],
        )
    )
    timer = select_samples(profile, origin="timer")
    parts.append(
        _table(
            f"Top functions ({len(timer)} timer samples)",
            ["Function", "Module", "Self%", "Self", "Total%", "Total"],
            [
                [
                    s.name,
                    s.module or "-",
                    format_pct(s.self_pct),
                    str(s.self_samples),
                    format_pct(s.total_pct),
                    str(s.total_samples),
                ]
                for s in top_functions(timer, namer)[:TOP_FUNCTIONS]
            ],
            numeric_from=2,
        )
    )
    parts.append(
        _table(
            "Exits by cause",
            [
                "Exit",
                "Guest code (leaf <- callers)",
                "Samples",
                "Exits (est.)",
                "Exits%",
                "Handling",
                "Time%",
            ],
            [
                [
                    c.event,
                    " <- ".join(c.code),
                    str(c.samples),
                    format_count(c.exits),
                    format_pct(c.exits_pct),
                    format_ns(c.handling_ns),
                    format_pct(c.time_pct),
                ]
                for c in exit_causes(profile, namer)
            ],
            numeric_from=2,
        )
    )
    for event in ("vmexit", "ioport", "mmio"):
        rows = kvm_stat_events(profile, event)
        parts.append(
            _table(
                f"Exit events: {event}",
                ["Event", "Samples", "Samples%", "Time%", "Min Time", "Max Time", "Avg time", "p50", "p99"],
                [
                    [
                        r.event,
                        str(r.samples),
                        format_pct(r.samples_pct),
                        format_pct(r.time_pct),
                        format_us(r.min_ns),
                        format_us(r.max_ns),
                        f"{format_us(r.mean_ns)} ±{r.mean_error_pct:.2f}%",
                        format_us(r.histogram.percentile(50)),
                        format_us(r.histogram.percentile(99)),
                    ]
                    for r in rows
                ],
            )
        )
    headers, emulated, summary = emulated_table(profile)
    if emulated:
        parts.append(_table(EMULATED_TITLE, headers, emulated, numeric_from=3))
        parts.append(f"<p class=meta>{html.escape(summary)}</p>")
    io_rows = io_latency_rows(profile)
    if io_rows:
        parts.append(
            _table(
                "I/O request latency, split into its parts (mean per request)",
                ["Device", "Request", "Count", "Total", *IO_PART_NAMES],
                [
                    [device, request, str(count), format_us(total)]
                    + [
                        f"{format_us(part)} ({format_pct(100 * part / total if total else 0)})"
                        for part in parts
                    ]
                    for device, request, count, total, parts in io_rows
                ],
                numeric_from=2,
            )
        )
    if profile.unclaimed:
        parts.append(
            _table(
                "Accesses no device claimed",
                ["Access", "Count"],
                [[u.label, str(u.count)] for u in sorted(profile.unclaimed, key=lambda u: -u.count)],
            )
        )
    return "\n".join(parts)


_STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 18px; margin: 0 0 4px; }
h2 { font-size: 15px; margin: 20px 0 6px; }
h3 { font-size: 13px; margin: 14px 0 4px; }
.meta { color: #555; margin: 0; }
#flame, #timeline { width: 1200px; max-width: 100%; }
#flame svg text, #timeline svg text { font: 11px monospace; pointer-events: none; }
#flame rect { stroke: #fff; stroke-width: 0.5; cursor: pointer; }
#flame-info, #timeline-info { font: 12px monospace; min-height: 16px; color: #333; }
table { border-collapse: collapse; margin-bottom: 8px; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; font-family: monospace; }
th.num, td.num { text-align: right; }
.empty { color: #888; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("vmscope-data").textContent);
  var SVG = "http://www.w3.org/2000/svg";
  var FRAME_H = 18;

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVG, name);
    for (var key in attrs) node.setAttribute(key, attrs[key]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function hash(text) {
    var h = 2166136261;
    for (var i = 0; i < text.length; i++) { h ^= text.charCodeAt(i); h = Math.imul(h, 16777619); }
    return h >>> 0;
  }
  // classic flame palette: reds, oranges, yellows
  function flameColor(name) {
    var h = hash(name);
    var r = 205 + (h % 50), g = (h >>> 8) % 230, b = (h >>> 16) % 55;
    return "rgb(" + r + "," + g + "," + b + ")";
  }
  function depthOf(node) {
    var best = 0;
    (node.c || []).forEach(function (c) { best = Math.max(best, depthOf(c)); });
    return best + 1;
  }
  function formatValue(value, unit) {
    if (unit === "ns") {
      if (value >= 1e9) return (value / 1e9).toFixed(3) + " s";
      if (value >= 1e6) return (value / 1e6).toFixed(2) + " ms";
      if (value >= 1e3) return (value / 1e3).toFixed(2) + " us";
      return Math.round(value) + " ns";
    }
    return Math.round(value) + " " + unit;
  }

  var flameBox = document.getElementById("flame");
  var info = document.getElementById("flame-info");
  var select = document.getElementById("flame-select");
  var current = null;

  function drawFlame(flame, focusPath) {
    current = flame;
    flameBox.textContent = "";
    var root = flame.root;
    var width = flameBox.clientWidth || 1200;
    var depth = depthOf(root);
    var height = depth * FRAME_H + 4;
    var svg = el("svg", {width: width, height: height, viewBox: "0 0 " + width + " " + height}, flameBox);
    // the focused node spans the full width; its ancestors are drawn full width too
    var focus = root, path = [root];
    (focusPath || []).forEach(function (name) {
      var next = (focus.c || []).filter(function (c) { return c.n === name; })[0];
      if (next) { focus = next; path.push(next); }
    });
    var drawn = 0;
    function frame(node, x, w, level, names) {
      if (w < 0.5) return;
      var y = height - (level + 1) * FRAME_H;
      var g = el("g", {}, svg);
      var rect = el("rect", {x: x, y: y, width: w, height: FRAME_H - 1, fill: flameColor(node.n)}, g);
      var pct = root.v ? (100 * node.v / root.v).toFixed(2) : "0.00";
      var tip = node.n + " (" + formatValue(node.v, flame.unit) + ", " + pct + "%)";
      el("title", {}, g).textContent = tip;
      if (w > 36) {
        var label = el("text", {x: x + 3, y: y + FRAME_H - 5}, g);
        var room = Math.floor((w - 6) / 6.6);
        label.textContent = node.n.length > room ? node.n.slice(0, Math.max(room - 2, 0)) + ".." : node.n;
      }
      rect.addEventListener("click", function () { drawFlame(flame, names.slice(1)); });
      rect.addEventListener("mouseover", function () { info.textContent = tip; });
      drawn++;
      return g;
    }
    var names = [];
    path.forEach(function (node, level) {
      names = names.concat([node.n]);
      frame(node, 0, width, level, names);
    });
    function children(node, x, w, level, names) {
      var offset = x;
      (node.c || []).forEach(function (child) {
        var cw = node.v ? w * child.v / node.v : 0;
        var childNames = names.concat([child.n]);
        frame(child, offset, cw, level, childNames);
        if (cw >= 0.5) children(child, offset, cw, level + 1, childNames);
        offset += cw;
      });
    }
    children(focus, 0, width, path.length, names);
    svg.setAttribute("data-frames", String(drawn));
    var box = svg.getBoundingClientRect();
    flameBox.setAttribute("data-bbox", JSON.stringify({
      x: Math.round(box.left + window.scrollX), y: Math.round(box.top + window.scrollY),
      width: Math.round(box.width), height: Math.round(box.height)}));
  }

  data.flames.forEach(function (flame, index) {
    var option = document.createElement("option");
    option.value = String(index);
    option.textContent = flame.label;
    select.appendChild(option);
  });
  select.addEventListener("change", function () { drawFlame(data.flames[Number(select.value)], []); });
  if (data.flames.length) {
    drawFlame(data.flames[0], []);
  } else {
    flameBox.textContent = "No samples in this profile.";
  }

  // timeline: one row per track, spans coloured by category
  var CATEGORY_COLORS = {guest: "#3f9f5f", exit: "#3b6fd6", io: "#8a55c9"};
  function spanColor(name) {
    var category = name.split(":")[0];
    if (CATEGORY_COLORS[category]) return CATEGORY_COLORS[category];
    return "hsl(" + (180 + hash(name) % 120) + ",45%,55%)";
  }
  var timeline = data.timeline, tbox = document.getElementById("timeline");
  var tinfo = document.getElementById("timeline-info");
  if (!timeline.spans.length) {
    tbox.textContent = "No timeline spans in this profile.";
  } else {
    var ROW = 22, LABEL = 120;
    var tw = tbox.clientWidth || 1200;
    var th = timeline.tracks.length * ROW + 20;
    var tsvg = el("svg", {width: tw, height: th}, tbox);
    var scale = (tw - LABEL - 4) / Math.max(timeline.end_ns, 1);
    timeline.tracks.forEach(function (track, i) {
      el("text", {x: 2, y: i * ROW + 15}, tsvg).textContent = track;
      el("line", {x1: LABEL, x2: tw, y1: (i + 1) * ROW - 1, y2: (i + 1) * ROW - 1, stroke: "#eee"}, tsvg);
    });
    timeline.spans.forEach(function (span) {
      var name = timeline.names[span[1]];
      var x = LABEL + span[2] * scale, w = Math.max((span[3] - span[2]) * scale, 1);
      var rect = el("rect", {x: x, y: span[0] * ROW + 2, width: w, height: ROW - 5,
                             fill: spanColor(name)}, tsvg);
      rect.addEventListener("mouseover", function () {
        tinfo.textContent = timeline.tracks[span[0]] + ": " + name + " at " +
          formatValue(span[2], "ns") + " for " + formatValue(span[3] - span[2], "ns");
      });
    });
    el("text", {x: LABEL, y: th - 4}, tsvg).textContent = "0";
    var endLabel = el("text", {x: tw - 4, y: th - 4, "text-anchor": "end"}, tsvg);
    endLabel.textContent = formatValue(timeline.end_ns, "ns");
    if (timeline.dropped) {
      tinfo.textContent = timeline.dropped + " later spans not shown";
    }
  }
  document.body.setAttribute("data-rendered", "ok");
})();
"""


def _counter_section(profile: Profile) -> str:
    """Host perf counters per vCPU / I/O thread, and why some could not be opened."""
    if not profile.counters and not profile.counter_notes:
        return ""
    headers, rows = counter_table(profile)
    notes = "".join(f"<p class=meta>note: {html.escape(note)}</p>" for note in profile.counter_notes)
    return f"<h2>Host counters</h2>{_table('Per thread (perf_event_open)', headers, rows)}{notes}"


def export_html(profile: Profile) -> str:
    namer = FrameNamer(profile.symbolizer())
    data = {"flames": _flames(profile, namer), "timeline": _timeline(profile)}
    # "<" escaped so the JSON can never close its <script> element
    embedded = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    header = describe_profile(profile)
    image = os.path.basename(profile.metadata.guest_image) or "guest"
    meta_lines = "".join(f"<p class=meta>{html.escape(line)}</p>" for line in header)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>vmscope: {html.escape(image)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>vmscope profile: {html.escape(image)}</h1>
{meta_lines}
<h2>Flame graph <select id="flame-select" aria-label="flame graph"></select></h2>
<div id="flame"></div>
<div id="flame-info"></div>
<h2>Exits and functions</h2>
{_tables(profile, namer)}
{_counter_section(profile)}
<h2>Timeline</h2>
<div id="timeline"></div>
<div id="timeline-info"></div>
<script type="application/json" id="vmscope-data">{embedded}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""
