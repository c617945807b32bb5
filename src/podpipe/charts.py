"""The report's drawings, as inline SVG: the graph, a timeline of tasks, and charts of
lines over time with labelled axes. What they draw comes from `report`, which reads
the run's records; nothing here reads a file."""

from __future__ import annotations

import html
from typing import Any

from podpipe.model.graph import Graph
from podpipe.runtime.rundir.records import TaskRecord
from podpipe.runtime.rundir.status import Status

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")
WIDTH = 900  # the page fits a 1000 px window, margins and all


def pipeline_graph(graph: Graph, s: Status, busy: dict[str, dict[str, float]]) -> str:
    """Left to right by depth; top to bottom (a row per depth, wrapped) when the depths
    would not fit the page's width."""
    depth: dict[str, int] = {}
    for node in graph.order:
        depth[node] = 1 + max((depth[i] for i in graph.inputs[node]), default=-1)
    levels: dict[int, list[str]] = {}
    for node in graph.order:
        levels.setdefault(depth[node], []).append(node)
    box_w, box_h, gap_x, gap_y = 120, 44, 30, 16
    across = (WIDTH + gap_x) // (box_w + gap_x)  # boxes a row (or columns) the page holds
    down = len(levels) > across
    where: dict[str, tuple[int, int]] = {}
    if down:  # each depth a row (wrapped when wider than the page), top to bottom
        row = 0
        for d in sorted(levels):
            for i, n in enumerate(levels[d]):
                where[n] = ((i % across) * (box_w + gap_x) + 10,
                            (row + i // across) * (box_h + 2 * gap_y) + gap_y)
            row += (len(levels[d]) - 1) // across + 1
    else:
        where = {n: (d * (box_w + gap_x) + 10, i * (box_h + gap_y) + gap_y)
                 for d, nodes in levels.items() for i, n in enumerate(nodes)}
    width = max(x for x, _ in where.values()) + box_w + 10
    height = max(y for _, y in where.values()) + box_h + gap_y
    parts = [f'<svg class="graph" data-layout="{"down" if down else "across"}" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for node in graph.order:
        for source in graph.inputs[node]:
            x1, y1 = where[source]
            x2, y2 = where[node]
            ends = ((x1 + box_w / 2, y1 + box_h, x2 + box_w / 2, y2) if down else
                    (x1 + box_w, y1 + box_h / 2, x2, y2 + box_h / 2))
            parts.append(f'<line class="edge" data-from="{escape(source)}" data-to="{escape(node)}" '
                         f'x1="{ends[0]}" y1="{ends[1]}" x2="{ends[2]}" y2="{ends[3]}" '
                         f'stroke="#888" stroke-width="1.5"/>')
    for node in graph.order:
        x, y = where[node]
        share = busy[node]["busy"]
        shade = int(235 - 150 * min(1.0, share))
        st = s.stages.get(node)
        label = (st.kind if st else "") + (f" ×{st.workers_max}"
                                           if st and st.workers_max > 1 else "")
        parts.append(f'<g class="node" data-node="{escape(node)}">'
                     f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" '
                     f'fill="rgb({shade},{shade + 10 if shade < 245 else 255},255)" '
                     f'stroke="#4e79a7"/>'
                     f'<text x="{x + 8}" y="{y + 18}" font-weight="bold">{escape(node[:16])}</text>'
                     f'<text x="{x + 8}" y="{y + 34}">{escape(label)} · {share:.0%} busy</text></g>')
    parts.append("</svg>")
    return "".join(parts)


SETUP_COLOR = "#6a51a3"  # a process setting its stage up (a class's setup)


def timeline(tasks: list[TaskRecord], elapsed: float, graph: Graph,
             setups: list[TaskRecord] | None = None) -> str:
    """A row per node's worker, a bar per task coloured by its version, its wait for
    RAM apart, and a bar of its own for a process setting its stage up; `elapsed`:
    the span drawn."""
    setups = setups or []
    lanes = sorted({(t.node, t.worker) for t in tasks + setups},
                   key=lambda lane: (graph.order.index(lane[0]) if lane[0] in graph.order
                                     else 99, lane[1]))
    if not lanes:
        return "<p>No task has ended yet.</p>"
    color: dict[tuple[str, str], str] = {}  # a node's first version, its next, ...
    for t in sorted(tasks, key=lambda t: t.handed):
        key = (t.node, t.version or "")
        if key not in color:
            color[key] = PALETTE[sum(1 for n, _ in color if n == t.node) % len(PALETTE)]
    left, lane_h, scale = 110, 18, (WIDTH - 120) / elapsed
    height = len(lanes) * lane_h + 44
    parts = [f'<svg class="timeline" width="{WIDTH}" height="{height}">']
    for i, (node, worker) in enumerate(lanes):
        y = i * lane_h
        name = node if worker == 0 else f"{node}.{worker}"
        parts.append(f'<text x="0" y="{y + 13}">{escape(name[:16])}</text>')
        for t in (t for t in setups if (t.node, t.worker) == (node, worker)):
            x, w = left + t.handed * scale, max(1.0, (t.ended - t.handed) * scale)
            parts.append(f'<rect class="setup" data-node="{escape(node)}" x="{x:.1f}" '
                         f'y="{y + 2}" width="{w:.1f}" height="{lane_h - 4}" '
                         f'fill="{SETUP_COLOR}"><title>{escape(name)}: set up in '
                         f'{t.ended - t.handed:.3f} s</title></rect>')
        for t in (t for t in tasks if (t.node, t.worker) == (node, worker)):
            x = left + t.handed * scale
            w = max(1.0, (t.ended - t.handed) * scale)
            fill = color[(node, t.version or "")] if t.state == "done" else "#bbb"
            parts.append(f'<rect class="task" data-node="{escape(node)}" data-batch="{t.batch}" '
                         f'data-state="{escape(t.state)}" x="{x:.1f}" y="{y + 2}" '
                         f'width="{w:.1f}" height="{lane_h - 4}" fill="{fill}">'
                         f'<title>{escape(name)} batch {t.batch}: {t.state}, '
                         f'{t.ended - t.handed:.3f} s</title></rect>')
            if t.asked is not None and t.granted is not None:
                rx = left + t.asked * scale
                rw = max(0.5, (t.granted - t.asked) * scale)
                parts.append(f'<rect class="ram-wait" x="{rx:.1f}" y="{y + 2}" '
                             f'width="{rw:.1f}" height="{lane_h - 4}" fill="#e15759" '
                             f'opacity="0.6"><title>waiting for RAM</title></rect>')
    parts.append(time_axis(len(lanes) * lane_h, left, scale, elapsed))
    parts.append("</svg>")
    versions = max(sum(1 for n, _ in color if n == node) for node, _ in color)
    names = ["a stage's first version", "its second", "its third"]
    legend = "".join(f'<span style="background:{PALETTE[i % len(PALETTE)]}"></span>'
                     + (names[i] if i < len(names) else f"version {i + 1}")
                     for i in range(versions))
    if setups:
        legend += f'<span style="background:{SETUP_COLOR}"></span>setting up'
    return (f'<div class="legend">{legend}<span style="background:#e15759"></span>waiting for '
            'RAM<span style="background:#bbb"></span>not done (failed, denied, lost)</div>'
            + "".join(parts))


def time_axis(y: float, left: float, scale: float, elapsed: float) -> str:
    """Ticks under a chart at `y`, in seconds since the attempt started, titled."""
    parts = []
    for k in range(6):
        at = elapsed * k / 5
        anchor = "end" if k == 5 else "middle" if k else "start"
        parts.append(f'<text class="axis" x="{left + at * scale:.0f}" y="{y + 14}" '
                     f'text-anchor="{anchor}">{at:.1f} s</text>')
    parts.append(f'<text class="axis axis-title" x="{left + elapsed * scale / 2:.0f}" '
                 f'y="{y + 28}" text-anchor="middle">seconds since the attempt started</text>')
    return "".join(parts)


def lines(kind: str, elapsed: float, series: dict[str, list[tuple[float, float]]],
           label: str, unit: Any, extra: tuple[str, float] | None = None,
           attrs: str = "") -> str:
    """Lines over time: a labelled value axis (0, half, the top, in `unit`), the time
    axis, a legend; `extra`: a dashed line (a budget, say) and its name; `attrs`: the
    svg's own (data for a test, say)."""
    height, left, top_pad = 182, 78, 24  # (the value axis's title above its top)
    top = max([1e-9, *(v for points in series.values() for _, v in points),
               extra[1] if extra else 0.0])
    scale_x = (WIDTH - left - 10) / elapsed
    scale_y = (height - 20 - top_pad) / top
    base = height - 20

    def y_of(v: float) -> float:
        return base - v * scale_y
    parts = [f'<svg class="{kind}"{attrs} data-top="{top:g}" width="{WIDTH}" '
             f'height="{height + 30}">',
             f'<text class="axis axis-title" x="0" y="12">{escape(label)}</text>']
    for frac in (0.0, 0.5, 1.0):
        y = y_of(top * frac)
        parts.append(f'<line class="tick" x1="{left}" x2="{WIDTH - 10}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="axis" x="{left - 4}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{escape(unit(top * frac))}</text>')
    if extra:
        y = y_of(extra[1])
        parts.append(f'<line x1="{left}" x2="{WIDTH - 10}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#e15759" stroke-dasharray="4 3"/><text x="{WIDTH - 12}" '
                     f'y="{y - 3:.1f}" text-anchor="end">{escape(extra[0])}</text>')
    legend = []
    for i, (name, points) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        line = " ".join(f"{left + t * scale_x:.1f},{y_of(v):.1f}" for t, v in points)
        parts.append(f'<polyline data-series="{escape(name)}" points="{line}" fill="none" '
                     f'stroke="{color}" stroke-width="1.5"/>')
        legend.append(f'<span style="background:{color}"></span>{escape(name)}')
    parts.append(time_axis(base, left, scale_x, elapsed))
    parts.append("</svg>")
    return f'<div class="legend">{"".join(legend)}</div>' + "".join(parts)


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)
