"""`podpipe report`: where a run's time went, as one self-contained HTML page.

Read from the run directory alone (`status.json`, `tasks.jsonl`, `samples.jsonl`,
the spec, the logs), so it works for a finished run, a running one (a snapshot)
and a run of several replicas (a section per pod). The page has no script and
fetches nothing: inline CSS and SVG, to open from a laptop's disk. Its parts:
a stage's candidate (`podpipe shadow`) and how it compared, the graph (nodes
coloured by how busy they were; left to right, or top to bottom
when that is too wide for a laptop's screen), then per attempt of the run (its
first, then each resume, each on its own time axis) a timeline (a bar per task,
coloured by version, its wait for RAM drawn apart), RAM scratch against the budget,
the cores and resident memory of each process and each node's queue over
time (every chart with labelled axes), a table per node, and one sentence naming the
bottleneck once the run was long enough to have one. The same timeline, with
counter tracks for RAM, queues and cores, can be written as a Chrome trace
(`podpipe.trace`), for Perfetto.

Reading it, top to bottom: what a run is made of (`Attempt`, `Pod`, `pods_of`), the
page (`page`, then a section per pod: `_pod_section`), what its figures mean
(`_shares`, `_bottleneck`), and the data each chart is given (`_memory_svg`,
`_per_node_charts`, `_table`). The drawing itself is `podpipe.charts`.
"""

from __future__ import annotations

from pathlib import Path

from podpipe import charts
from podpipe.charts import escape as _e
from podpipe.model import spec as specs
from podpipe.model.graph import Graph
from podpipe.model.sizes import format_size
from podpipe.runtime.rundir import layout as rundir, status
from podpipe.runtime.rundir.status import StageStatus, Status
from podpipe.runtime.rundir import records
from podpipe.runtime.rundir.records import SAMPLES, TASKS

# a bottleneck is named only for a line that loaded this many source batches: with
# fewer, the shares say more about starting up (or a failure) than about the line
BOTTLENECK_BATCHES = 4


class Attempt:
    """One attempt of a run: its first, or a resume; times since its own start."""

    def __init__(self, number: int, tasks: list[records.TaskRecord],
                 samples: list[records.SampleRecord], elapsed: float,
                 setups: list[records.TaskRecord] | None = None) -> None:
        self.number, self.tasks, self.samples = number, tasks, samples
        self.setups = setups or []  # its processes setting their stages up
        ends = [t.ended for t in tasks + self.setups] + [x.t for x in samples]
        self.elapsed = max([elapsed, *ends, 1e-3])

    @property
    def peak(self) -> int:
        return max((x.peak for x in self.samples), default=0)


class Pod:
    """One pod's run as the report reads it."""

    def __init__(self, run_dir: Path, title: str) -> None:
        self.run_dir, self.title = run_dir, title
        self.status = status.read(run_dir)
        read = records.read(run_dir / TASKS, records.TaskRecord)
        self.tasks = [t for t in read if t.state != records.SETUP]
        self.setups = [t for t in read if t.state == records.SETUP]
        self.samples = records.read(run_dir / SAMPLES, records.SampleRecord)

    @property
    def attempts(self) -> list[Attempt]:
        """The run's attempts, first to last (the last one's length is the status's)."""
        numbers = sorted({t.attempt for t in self.tasks} | {x.attempt for x in self.samples}
                         or {1})
        return [Attempt(n, [t for t in self.tasks if t.attempt == n],
                        [x for x in self.samples if x.attempt == n],
                        self.status.elapsed_seconds if n == numbers[-1] else 0.0,
                        [t for t in self.setups if t.attempt == n])
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
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: {charts.WIDTH + 40}px }}
h1 {{ font-size: 20px }} h2 {{ font-size: 16px; margin-top: 28px }}
table {{ border-collapse: collapse; margin: 8px 0 }}
td, th {{ padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap }}
td:first-child, th:first-child, .shadow td, .shadow th {{ text-align: left }}
.shadow td {{ white-space: normal }}
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
    parts += [f'<p class="nondeterministic" data-node="{_e(name)}"><b>not deterministic:</b> '
              f"stage {_e(name)} made other bytes of batches {_e(str(st.nondeterministic))} "
              "when it made them again</p>" for name, st in s.stages.items()
              if st.nondeterministic]
    parts += [_shadow(name, st) for name, st in s.stages.items() if st.shadow is not None]
    attempts = pod.attempts
    last = attempts[-1]
    busy = _shares(last, graph)
    parts.append(f"<p class=\"bottleneck\">{_bottleneck(busy, s, last)}</p>")
    parts.append("<h2>The graph</h2>" + charts.pipeline_graph(graph, s, busy))
    for attempt in attempts:
        if len(attempts) > 1:
            what = "the first run" if attempt.number == 1 else "resumed"
            parts.append(f'<h2 class="attempt" data-attempt="{attempt.number}">Attempt '
                         f"{attempt.number} ({what}): {attempt.elapsed:.2f} s</h2>")
        parts.append("<h3>Timeline</h3>" + charts.timeline(attempt.tasks, attempt.elapsed, graph,
                                                               attempt.setups))
        parts.append("<h3>RAM scratch</h3>" + _memory_svg(attempt, s))
        parts.append(_per_node_charts(attempt, graph))
    parts.append("<h2>Per node</h2>" + _table(s, graph, busy))
    parts.append("</section>")
    return "\n".join(parts)


def _shadow(name: str, stage: StageStatus) -> str:
    """A stage's candidate (`podpipe shadow`): how its outputs compared with the live
    ones, batch by batch where they differed."""
    c = stage.shadow
    assert c is not None
    rows = "".join(f"<tr><td>{d.batch}</td><td>{_e(d.comparison.said())}</td></tr>"
                   for d in c.differences)
    return (f'<section class="shadow" data-node="{_e(name)}"><h2>Candidate of {_e(name)}: '
            f"{_e(c.state)}</h2><p>version {_e(c.version or '(not up)')} "
            f"({_e(' '.join(c.overrides))}): compared {c.compared} of the stage's "
            f"{stage.batches_done} batches, {c.equal} equal, {c.differing} differing, "
            f"{c.skipped} skipped, {c.failed} failed"
            + (f"; {_e(c.error)}" if c.error else "") + "</p>"
            + (f"<table><tr><th>batch</th><th>how it differed</th></tr>{rows}</table>"
               if rows else "")
            + "".join(f"<p class=\"failure\">{_e(f)}</p>" for f in c.failures)
            + "</section>")


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


def _memory_svg(attempt: Attempt, s: Status) -> str:
    budget = s.budget_bytes
    highest = attempt.peak
    chart = charts.lines("memory", attempt.elapsed, {"in use": [(x.t, x.peak) for x in attempt.samples]},
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
        parts.append(f"<h3>{title}</h3>" + (charts.lines(kind, attempt.elapsed, found, label, unit)
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
