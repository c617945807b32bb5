"""`podpipe report`: where a run's time went, as one self-contained HTML page.

Read from the run directory alone (`status.json`, `tasks.jsonl`, `samples.jsonl`,
the spec, the logs), so it works for a finished run, a running one (a snapshot)
and a run of several replicas (a section per pod). The page has no script and
fetches nothing: inline CSS and SVG, to open from a laptop's disk. Its parts:
the graph (nodes coloured by how busy they were), a timeline (a bar per task,
coloured by version, its wait for RAM drawn apart), RAM scratch over time against
the budget, a table per node, and one sentence naming the bottleneck. The same
timeline can be written as a Chrome trace (`chrome_trace`), for Perfetto.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from podpipe.model import spec as specs
from podpipe.model.graph import Graph
from podpipe.model.sizes import format_size
from podpipe.runtime.rundir import layout as rundir, status
from podpipe.runtime.rundir.status import Status
from podpipe.runtime.rundir import records
from podpipe.runtime.rundir.records import SAMPLES, TASKS

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")
WIDTH = 960


class Pod:
    """One pod's run as the report reads it."""

    def __init__(self, run_dir: Path, title: str) -> None:
        self.run_dir, self.title = run_dir, title
        self.status = status.read(run_dir)
        self.tasks = records.read(run_dir / TASKS, records.TaskRecord)
        self.samples = records.read(run_dir / SAMPLES, records.SampleRecord)

    @property
    def elapsed(self) -> float:
        ends = [t.ended for t in self.tasks] + [s.t for s in self.samples]
        return max([self.status.elapsed_seconds, *ends, 1e-3])


def pods_of(run_dir: Path) -> list[Pod]:
    """The pods of the run in `run_dir`: itself, or each replica's."""
    if rundir.read(run_dir).of_replicas:
        found = sorted((p for p in (run_dir / "pods").glob("*") if (p / "status.json").exists()),
                       key=lambda p: int(p.name))
        return [Pod(p, f"pod {p.name}") for p in found]
    return [Pod(run_dir, "")]


def _graph(run_dir: Path) -> Graph:
    recorded = rundir.read(run_dir)
    return Graph.of(specs.load(run_dir / "spec.yaml", recorded.overrides))


# -- the page --------------------------------------------------------------------


def page(run_dir: Path) -> str:
    """The report of the run in `run_dir` as one HTML document."""
    top = status.read(run_dir)
    graph = _graph(run_dir)
    sections = [_pod_section(pod, graph) for pod in pods_of(run_dir)]
    title = (f"{top.pipeline}: {top.state} in {top.elapsed_seconds:.2f} s "
             f"(peak RAM scratch {format_size(top.peak_scratch_bytes)} of "
             f"{format_size(top.budget_bytes)})")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: {WIDTH + 40}px }}
h1 {{ font-size: 20px }} h2 {{ font-size: 16px; margin-top: 28px }}
table {{ border-collapse: collapse; margin: 8px 0 }}
td, th {{ padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap }}
td:first-child, th:first-child {{ text-align: left }}
.error {{ background: #fde8e8; border: 1px solid #e15759; padding: 8px 12px }}
.error pre {{ white-space: pre-wrap; margin: 6px 0 0 }}
.bottleneck {{ font-size: 15px; background: #eef4fb; padding: 8px 12px }}
svg text {{ font: 11px system-ui, sans-serif }}
.legend span {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px -2px 12px }}
</style></head><body>
<h1>{_e(title)}</h1>
<p>run <code>{_e(top.run_id)}</code> in <code>{_e(str(run_dir))}</code></p>
{''.join(sections)}
</body></html>
"""


def _pod_section(pod: Pod, graph: Graph) -> str:
    s = pod.status
    parts = [f"<section class=\"pod\" data-pod=\"{_e(pod.title)}\">"]
    if pod.title:
        parts.append(f"<h2>{_e(pod.title)}: {_e(s.state)}</h2>")
    if s.error:
        parts.append(_error(pod))
    if s.restore_notes or any(sum(n.restored.values()) for n in s.stages.values()):
        parts.append(_restored(s))
    busy = _shares(pod, graph)
    parts.append(f"<p class=\"bottleneck\">{_bottleneck(busy, s)}</p>")
    parts.append("<h2>The graph</h2>" + _graph_svg(graph, s, busy))
    parts.append("<h2>Timeline</h2>" + _timeline_svg(pod, graph))
    parts.append("<h2>RAM scratch</h2>" + _memory_svg(pod))
    parts.append("<h2>Per node</h2>" + _table(pod, graph, busy))
    parts.append("</section>")
    return "\n".join(parts)


def _error(pod: Pod) -> str:
    message = pod.status.error or ""
    tail = ""
    for name in sorted(pod.status.stages, key=len, reverse=True):
        if f"stage {name!r}" in message:
            logs = sorted((pod.run_dir / "logs").glob(f"{name}*.log"))
            lines = [line for log in logs for line in log.read_text(errors="replace")
                     .splitlines()][-20:]
            tail = f"<pre>{_e(chr(10).join(lines))}</pre>"
            break
    return f"<div class=\"error\"><b>error:</b> {_e(message)}{tail}</div>"


def _restored(s: Status) -> str:
    rows = "".join(f"<tr><td>{_e(n)}</td>" + "".join(f"<td>{v.get(t, 0)}</td>" for t in
                                                     ("ram", "node", "durable")) + "</tr>"
                   for n, v in ((n, st.restored) for n, st in s.stages.items())
                   if sum(v.values()))
    notes = "".join(f"<li>{_e(n)}</li>" for n in s.restore_notes)
    return ("<h2>Resumed</h2><table><tr><th>node</th><th>from RAM</th><th>node tier</th>"
            f"<th>durable tier</th></tr>{rows}</table>" + (f"<ul>{notes}</ul>" if notes else ""))


def _shares(pod: Pod, graph: Graph) -> dict[str, dict[str, float]]:
    """Per node, over the time the line ran (its first task's start to its last
    task's end): the share during which at least one of its workers was busy, the
    share during which one waited for RAM and none was busy, and the rest (waiting
    for input, or idle)."""
    if not pod.tasks:
        return {node: {"busy": 0.0, "ram": 0.0, "other": 1.0} for node in graph.order}
    start = min(t.handed for t in pod.tasks)
    line = max(1e-6, max(t.ended for t in pod.tasks) - start)
    out = {}
    for node in graph.order:
        tasks = [t for t in pod.tasks if t.node == node]
        waits = [(t.asked, t.granted) for t in tasks
                 if t.asked is not None and t.granted is not None]
        occupied = _union([(t.handed, t.ended) for t in tasks])
        waiting = _union(waits)
        busy = max(0.0, occupied - waiting)
        out[node] = {"busy": min(1.0, busy / line), "ram": min(1.0, waiting / line),
                     "other": max(0.0, 1 - occupied / line)}
    return out


def _union(spans: list[tuple[float, float]]) -> float:
    """The time covered by at least one of `spans`."""
    total, reach = 0.0, float("-inf")
    for begin, end in sorted(spans):
        if end > reach:
            total += end - max(begin, reach)
            reach = end
    return total


def _bottleneck(busy: dict[str, dict[str, float]], s: Status) -> str:
    per_batch = {n: b for n, b in busy.items()  # the line's stations (not what runs once)
                 if (st := s.stages.get(n)) is None or st.kind not in ("reduce", "table")}
    if not per_batch:
        return "No task ran."
    node = max(per_batch, key=lambda n: per_batch[n]["busy"])
    share = per_batch[node]["busy"]
    workers = st.workers_max if (st := s.stages.get(node)) else 1
    who = f"<code>{_e(node)}</code>" + (f" ({workers} workers)" if workers > 1 else "")
    if share >= 0.5:
        return (f"{who} was busy {share:.0%} of the time; the others waited for it: "
                "it holds the line back.")
    return (f"No node was busy half the time; the busiest, {who}, {share:.0%}: the line "
            "waited on starting up, on RAM, or on the source's files.")


def _graph_svg(graph: Graph, s: Status, busy: dict[str, dict[str, float]]) -> str:
    depth: dict[str, int] = {}
    for node in graph.order:
        depth[node] = 1 + max((depth[i] for i in graph.inputs[node]), default=-1)
    columns: dict[int, list[str]] = {}
    for node in graph.order:
        columns.setdefault(depth[node], []).append(node)
    box_w, box_h, gap_x, gap_y = 120, 44, 40, 16
    width = len(columns) * (box_w + gap_x)
    height = max(len(c) for c in columns.values()) * (box_h + gap_y) + gap_y
    where = {n: (d * (box_w + gap_x) + 10, i * (box_h + gap_y) + gap_y)
             for d, nodes in columns.items() for i, n in enumerate(nodes)}
    parts = [f'<svg class="graph" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">']
    for node in graph.order:
        for source in graph.inputs[node]:
            x1, y1 = where[source]
            x2, y2 = where[node]
            parts.append(f'<line class="edge" data-from="{_e(source)}" data-to="{_e(node)}" '
                         f'x1="{x1 + box_w}" y1="{y1 + box_h / 2}" x2="{x2}" '
                         f'y2="{y2 + box_h / 2}" stroke="#888" stroke-width="1.5"/>')
    for node in graph.order:
        x, y = where[node]
        share = busy[node]["busy"]
        shade = int(235 - 150 * min(1.0, share))
        st = s.stages.get(node)
        label = (st.kind if st else "") + (f" ×{st.workers_max}"
                                           if st and st.workers_max > 1 else "")
        parts.append(f'<g class="node" data-node="{_e(node)}">'
                     f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" '
                     f'fill="rgb({shade},{shade + 10 if shade < 245 else 255},255)" '
                     f'stroke="#4e79a7"/>'
                     f'<text x="{x + 8}" y="{y + 18}" font-weight="bold">{_e(node[:16])}</text>'
                     f'<text x="{x + 8}" y="{y + 34}">{_e(label)} · {share:.0%} busy</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _timeline_svg(pod: Pod, graph: Graph) -> str:
    lanes = sorted({(t.node, t.worker) for t in pod.tasks},
                   key=lambda lane: (graph.order.index(lane[0]) if lane[0] in graph.order
                                     else 99, lane[1]))
    if not lanes:
        return "<p>No task has ended yet.</p>"
    color: dict[tuple[str, str], str] = {}  # a node's first version, its next, ...
    for t in sorted(pod.tasks, key=lambda t: t.handed):
        key = (t.node, t.version or "")
        if key not in color:
            color[key] = PALETTE[sum(1 for n, _ in color if n == t.node) % len(PALETTE)]
    left, lane_h, scale = 110, 18, (WIDTH - 120) / pod.elapsed
    height = len(lanes) * lane_h + 30
    parts = [f'<svg class="timeline" width="{WIDTH}" height="{height}">']
    for i, (node, worker) in enumerate(lanes):
        y = i * lane_h
        name = node if worker == 0 else f"{node}.{worker}"
        parts.append(f'<text x="0" y="{y + 13}">{_e(name[:16])}</text>')
        for t in (t for t in pod.tasks if (t.node, t.worker) == (node, worker)):
            x = left + t.handed * scale
            w = max(1.0, (t.ended - t.handed) * scale)
            fill = color[(node, t.version or "")] if t.state == "done" else "#bbb"
            parts.append(f'<rect class="task" data-node="{_e(node)}" data-batch="{t.batch}" '
                         f'data-state="{_e(t.state)}" x="{x:.1f}" y="{y + 2}" '
                         f'width="{w:.1f}" height="{lane_h - 4}" fill="{fill}">'
                         f'<title>{_e(name)} batch {t.batch}: {t.state}, '
                         f'{t.ended - t.handed:.3f} s</title></rect>')
            if t.asked is not None and t.granted is not None:
                rx = left + t.asked * scale
                rw = max(0.5, (t.granted - t.asked) * scale)
                parts.append(f'<rect class="ram-wait" x="{rx:.1f}" y="{y + 2}" '
                             f'width="{rw:.1f}" height="{lane_h - 4}" fill="#e15759" '
                             f'opacity="0.6"><title>waiting for RAM</title></rect>')
    axis_y = len(lanes) * lane_h + 14
    for k in range(6):
        at = pod.elapsed * k / 5
        anchor = "end" if k == 5 else "start"
        parts.append(f'<text x="{left + at * scale:.0f}" y="{axis_y}" '
                     f'text-anchor="{anchor}">{at:.1f} s</text>')
    parts.append("</svg>")
    versions = max(sum(1 for n, _ in color if n == node) for node, _ in color)
    names = ["a stage's first version", "its second", "its third"]
    legend = "".join(f'<span style="background:{PALETTE[i % len(PALETTE)]}"></span>'
                     + (names[i] if i < len(names) else f"version {i + 1}")
                     for i in range(versions))
    return (f'<div class="legend">{legend}<span style="background:#e15759"></span>waiting for '
            'RAM<span style="background:#bbb"></span>not done (failed, denied, lost)</div>'
            + "".join(parts))


def _memory_svg(pod: Pod) -> str:
    s = pod.status
    samples = pod.samples
    budget = s.budget_bytes
    top = max([budget, *(x.peak for x in samples)]) or 1
    height, left = 160, 60
    scale_x, scale_y = (WIDTH - left - 10) / pod.elapsed, (height - 20) / top
    points = " ".join(f"{left + x.t * scale_x:.1f},{height - 10 - x.peak * scale_y:.1f}"
                      for x in samples)
    highest = max((x.peak for x in samples), default=0)
    budget_y = height - 10 - budget * scale_y
    return (f'<svg class="memory" data-max="{highest}" data-budget="{budget}" width="{WIDTH}" '
            f'height="{height}">'
            f'<line x1="{left}" x2="{WIDTH - 10}" y1="{budget_y:.1f}" y2="{budget_y:.1f}" '
            f'stroke="#e15759" stroke-dasharray="4 3"/>'
            f'<text x="0" y="{budget_y + 4:.1f}">budget</text>'
            f'<text x="0" y="{height - 10}">0</text>'
            f'<polyline points="{points}" fill="none" stroke="#4e79a7" stroke-width="1.5"/>'
            f'</svg><p>peak {format_size(highest)} of {format_size(budget)}; '
            f'{s.spilled_outputs} outputs spilled to the node tier.</p>')


def _table(pod: Pod, graph: Graph, busy: dict[str, dict[str, float]]) -> str:
    s = pod.status
    head = ("<tr><th>node</th><th>kind</th><th>workers</th><th>busy</th><th>waiting for "
            "RAM</th><th>waiting for input or idle</th><th>rows/s busy</th><th>written</th>"
            "<th>restarts</th><th>restored</th></tr>")
    rows = []
    for node in graph.order:
        st = s.stages.get(node)
        if st is None:
            continue
        b = busy[node]
        rate = st.rows_out / st.busy_seconds if st.busy_seconds else 0
        rows.append(f"<tr><td>{_e(node)}</td><td>{st.kind}</td><td>{st.workers_max}</td>"
                    f"<td>{b['busy']:.0%}</td><td>{b['ram']:.0%}</td><td>{b['other']:.0%}</td>"
                    f"<td>{rate:,.0f}</td><td>{format_size(st.bytes_written)}</td>"
                    f"<td>{st.restarts}</td><td>{sum(st.restored.values())}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


# -- a Chrome trace ------------------------------------------------------------------


def chrome_trace(run_dir: Path) -> dict[str, Any]:
    """The timeline in the Trace Event Format (Perfetto, chrome://tracing): a process
    per pod, a thread per node's worker, a complete event per task and per wait for
    RAM."""
    events: list[dict[str, Any]] = []
    for pid, pod in enumerate(pods_of(run_dir)):
        events.append({"ph": "M", "name": "process_name", "pid": pid,
                       "args": {"name": pod.title or pod.status.pipeline}})
        lanes = sorted({(t.node, t.worker) for t in pod.tasks})
        tid = {lane: i for i, lane in enumerate(lanes)}
        for (node, worker), i in tid.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": i,
                           "args": {"name": node if worker == 0 else f"{node}.{worker}"}})
        for t in pod.tasks:
            lane = tid[(t.node, t.worker)]
            events.append({"ph": "X", "name": f"batch {t.batch}", "cat": t.node,
                           "pid": pid, "tid": lane, "ts": round(t.handed * 1e6),
                           "dur": round((t.ended - t.handed) * 1e6),
                           "args": {"state": t.state, "version": t.version,
                                    "rows_out": t.rows_out}})
            if t.asked is not None and t.granted is not None:
                events.append({"ph": "X", "name": "waiting for RAM", "cat": "ram",
                               "pid": pid, "tid": lane, "ts": round(t.asked * 1e6),
                               "dur": round((t.granted - t.asked) * 1e6)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
