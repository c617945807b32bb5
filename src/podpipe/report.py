"""`podpipe report`: where a run's time went, as one self-contained HTML page.

Read from the run directory alone (`status.json`, `tasks.jsonl`, `samples.jsonl`,
the spec, the logs), so it works for a finished run, a running one (a snapshot)
and a run of several replicas (a section per pod). The page has no script and
fetches nothing: inline CSS and SVG, to open from a laptop's disk. Its parts:
the graph (nodes coloured by how busy they were; left to right, or top to bottom
when that is too wide for a laptop's screen), then per attempt of the run (its
first, then each resume, each on its own time axis) a timeline (a bar per task,
coloured by version, its wait for RAM drawn apart), RAM scratch against the budget,
the cores and resident memory of each process and each node's queue over
time (every chart with labelled axes), a table per node, and one sentence naming the
bottleneck once the run was long enough to have one. The same timeline, with
counter tracks for RAM, queues and cores, can be written as a Chrome trace
(`podpipe.trace`), for Perfetto.
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
WIDTH = 900  # the page fits a 1000 px window, margins and all
# a bottleneck is named only for a line that loaded this many source batches: with
# fewer, the shares say more about starting up (or a failure) than about the line
BOTTLENECK_BATCHES = 4


class Attempt:
    """One attempt of a run: its first, or a resume; times since its own start."""

    def __init__(self, number: int, tasks: list[records.TaskRecord],
                 samples: list[records.SampleRecord], elapsed: float) -> None:
        self.number, self.tasks, self.samples = number, tasks, samples
        ends = [t.ended for t in tasks] + [x.t for x in samples]
        self.elapsed = max([elapsed, *ends, 1e-3])

    @property
    def peak(self) -> int:
        return max((x.peak for x in self.samples), default=0)


class Pod:
    """One pod's run as the report reads it."""

    def __init__(self, run_dir: Path, title: str) -> None:
        self.run_dir, self.title = run_dir, title
        self.status = status.read(run_dir)
        self.tasks = records.read(run_dir / TASKS, records.TaskRecord)
        self.samples = records.read(run_dir / SAMPLES, records.SampleRecord)

    @property
    def attempts(self) -> list[Attempt]:
        """The run's attempts, first to last (the last one's length is the status's)."""
        numbers = sorted({t.attempt for t in self.tasks} | {x.attempt for x in self.samples}
                         or {1})
        return [Attempt(n, [t for t in self.tasks if t.attempt == n],
                        [x for x in self.samples if x.attempt == n],
                        self.status.elapsed_seconds if n == numbers[-1] else 0.0)
                for n in numbers]

    @property
    def peak(self) -> int:
        """The most RAM scratch any attempt held (what the page's title says)."""
        return max([self.status.peak_scratch_bytes, *(a.peak for a in self.attempts)])


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
    pods = pods_of(run_dir)
    sections = [_pod_section(pod, graph) for pod in pods]
    attempts = max(len(pod.attempts) for pod in pods)
    peak = max(top.peak_scratch_bytes, *(pod.peak for pod in pods))
    title = (f"{top.pipeline}: {top.state} in {top.elapsed_seconds:.2f} s"
             + (f" (attempt {attempts}, resumed)" if attempts > 1 else "")
             + f" — peak RAM scratch {format_size(peak)} of {format_size(top.budget_bytes)}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: {WIDTH + 40}px }}
h1 {{ font-size: 20px }} h2 {{ font-size: 16px; margin-top: 28px }}
table {{ border-collapse: collapse; margin: 8px 0 }}
td, th {{ padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap }}
td:first-child, th:first-child {{ text-align: left }}
th {{ white-space: normal; vertical-align: bottom }}
.error {{ background: #fde8e8; border: 1px solid #e15759; padding: 8px 12px }}
.error pre {{ white-space: pre-wrap; margin: 6px 0 0 }}
.bottleneck {{ font-size: 15px; background: #eef4fb; padding: 8px 12px }}
svg text {{ font: 11px system-ui, sans-serif }}
.legend span {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px -2px 12px }}
svg .axis {{ fill: #555 }} svg .tick {{ stroke: #ddd }}
h3 {{ font-size: 14px; margin: 18px 0 4px }}
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
    attempts = pod.attempts
    last = attempts[-1]
    busy = _shares(last, graph)
    parts.append(f"<p class=\"bottleneck\">{_bottleneck(busy, s, last)}</p>")
    parts.append("<h2>The graph</h2>" + _graph_svg(graph, s, busy))
    for attempt in attempts:
        if len(attempts) > 1:
            what = "the first run" if attempt.number == 1 else "resumed"
            parts.append(f'<h2 class="attempt" data-attempt="{attempt.number}">Attempt '
                         f"{attempt.number} ({what}): {attempt.elapsed:.2f} s</h2>")
        parts.append("<h3>Timeline</h3>" + _timeline_svg(attempt, graph))
        parts.append("<h3>RAM scratch</h3>" + _memory_svg(attempt, s))
        parts.append(_per_node_charts(attempt, graph))
    parts.append("<h2>Per node</h2>" + _table(s, graph, busy))
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


def _shares(pod: Attempt, graph: Graph) -> dict[str, dict[str, float]]:
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


def _bottleneck(busy: dict[str, dict[str, float]], s: Status, attempt: Attempt) -> str:
    per_batch = {n: b for n, b in busy.items()  # the line's stations (not what runs once)
                 if (st := s.stages.get(n)) is None or st.kind not in ("reduce", "table")}
    if not per_batch or not attempt.tasks:
        return "No task ran."
    line = max(t.ended for t in attempt.tasks) - min(t.handed for t in attempt.tasks)
    loaded = sum(1 for t in attempt.tasks if t.node == "source" and t.state == "done")
    if loaded < BOTTLENECK_BATCHES:
        return (f"Too short to name a bottleneck: {loaded} source "
                f"{'batch' if loaded == 1 else 'batches'} in {line:.2f} s"
                + (f"; the run {s.state}." if s.state != "succeeded" else "."))
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
            parts.append(f'<line class="edge" data-from="{_e(source)}" data-to="{_e(node)}" '
                         f'x1="{ends[0]}" y1="{ends[1]}" x2="{ends[2]}" y2="{ends[3]}" '
                         f'stroke="#888" stroke-width="1.5"/>')
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


def _timeline_svg(pod: Attempt, graph: Graph) -> str:
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
    height = len(lanes) * lane_h + 44
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
    parts.append(_time_axis(len(lanes) * lane_h, left, scale, pod.elapsed))
    parts.append("</svg>")
    versions = max(sum(1 for n, _ in color if n == node) for node, _ in color)
    names = ["a stage's first version", "its second", "its third"]
    legend = "".join(f'<span style="background:{PALETTE[i % len(PALETTE)]}"></span>'
                     + (names[i] if i < len(names) else f"version {i + 1}")
                     for i in range(versions))
    return (f'<div class="legend">{legend}<span style="background:#e15759"></span>waiting for '
            'RAM<span style="background:#bbb"></span>not done (failed, denied, lost)</div>'
            + "".join(parts))


def _time_axis(y: float, left: float, scale: float, elapsed: float) -> str:
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


def _chart(kind: str, attempt: Attempt, series: dict[str, list[tuple[float, float]]],
           label: str, unit: Any, extra: tuple[str, float] | None = None,
           attrs: str = "") -> str:
    """Lines over time: a labelled value axis (0, half, the top, in `unit`), the time
    axis, a legend; `extra`: a dashed line (a budget, say) and its name; `attrs`: the
    svg's own (data for a test, say)."""
    height, left, top_pad = 182, 78, 24  # (the value axis's title above its top)
    top = max([1e-9, *(v for points in series.values() for _, v in points),
               extra[1] if extra else 0.0])
    scale_x = (WIDTH - left - 10) / attempt.elapsed
    scale_y = (height - 20 - top_pad) / top
    base = height - 20

    def y_of(v: float) -> float:
        return base - v * scale_y
    parts = [f'<svg class="{kind}"{attrs} data-top="{top:g}" width="{WIDTH}" '
             f'height="{height + 30}">',
             f'<text class="axis axis-title" x="0" y="12">{_e(label)}</text>']
    for frac in (0.0, 0.5, 1.0):
        y = y_of(top * frac)
        parts.append(f'<line class="tick" x1="{left}" x2="{WIDTH - 10}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="axis" x="{left - 4}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{_e(unit(top * frac))}</text>')
    if extra:
        y = y_of(extra[1])
        parts.append(f'<line x1="{left}" x2="{WIDTH - 10}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#e15759" stroke-dasharray="4 3"/><text x="{WIDTH - 12}" '
                     f'y="{y - 3:.1f}" text-anchor="end">{_e(extra[0])}</text>')
    legend = []
    for i, (name, points) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        line = " ".join(f"{left + t * scale_x:.1f},{y_of(v):.1f}" for t, v in points)
        parts.append(f'<polyline data-series="{_e(name)}" points="{line}" fill="none" '
                     f'stroke="{color}" stroke-width="1.5"/>')
        legend.append(f'<span style="background:{color}"></span>{_e(name)}')
    parts.append(_time_axis(base, left, scale_x, attempt.elapsed))
    parts.append("</svg>")
    return f'<div class="legend">{"".join(legend)}</div>' + "".join(parts)


def _memory_svg(attempt: Attempt, s: Status) -> str:
    budget = s.budget_bytes
    highest = attempt.peak
    chart = _chart("memory", attempt, {"in use": [(x.t, x.peak) for x in attempt.samples]},
                   "RAM scratch in use", format_size, ("budget", budget),
                   f' data-max="{highest}" data-budget="{budget}"')
    return (chart + f"<p>peak {format_size(highest)} of {format_size(budget)}; "
            f"{s.spilled_outputs} outputs spilled to the node tier.</p>")


def _per_node_charts(attempt: Attempt, graph: Graph) -> str:
    """Each process's cores and resident memory, and each node's queue, over the
    attempt (a process is its node's name, `.N` for its worker N > 0)."""
    def rank(name: str) -> tuple[int, str]:
        node = name.partition(".")[0]
        return (graph.order.index(node) if node in graph.order else len(graph.order), name)

    def series(field: str) -> dict[str, list[tuple[float, float]]]:
        names = sorted({n for x in attempt.samples for n, v in getattr(x, field).items() if v},
                       key=rank)
        return {n: [(x.t, float(getattr(x, field).get(n, 0))) for x in attempt.samples]
                for n in names}
    parts = []
    for kind, field, title, label, unit in (
            ("cpu", "cpu", "Cores per process", "cores it ran on",
             lambda v: f"{v:.2f}"),
            ("rss", "rss", "Resident memory per process", "resident bytes of the process",
             format_size),
            ("queues", "queues", "Queue per node", "batches ready, not yet taken",
             lambda v: f"{v:.0f}")):
        found = series(field)
        parts.append(f"<h3>{title}</h3>" + (_chart(kind, attempt, found, label, unit)
                                             if found else "<p>None sampled.</p>"))
    return "".join(parts)


def _table(s: Status, graph: Graph, busy: dict[str, dict[str, float]]) -> str:
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
