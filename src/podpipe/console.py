"""What a person sees: live progress while a run goes, tables after it and for status.

Everything here renders a typed status (`runtime.rundir.status.Status`); none of it
talks to processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from podpipe.model.sizes import format_size
from podpipe.runtime.rundir.status import RunRow, ShadowStatus, Status
from podpipe.runtime.runs.lines import LineRecord


WATCH_SECONDS = 0.5  # how often `status --watch` reads the status again

# Control characters but newline and tab, as a terminal would act on them (C0, DEL, C1).
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]
            if c not in (0x0A, 0x09)}


def printable(text: str) -> str:
    """`text` as a terminal should show it: a stage's escape sequences (colours,
    links, a cleared screen) written out as `\\x1b...` rather than acted on. (The
    consoles print with markup off: `[/x]` in a message is text too.)"""
    return text.translate(_CONTROL)


class LiveProgress:
    """A rich progress bar per node (batches done/total, rows/s), and one for the RAM
    scratch in use against the budget. Shown from the first status on (a run refused
    before it starts leaves the terminal as it was)."""

    def __init__(self, console: Console,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.fields[name]:<12}"), BarColumn(),
            TextColumn("{task.fields[count]:>19}"), TextColumn("{task.fields[rate]:>17}"),
            TimeElapsedColumn(), console=console, transient=False)
        self.tasks: dict[str, Any] = {}
        self.clock = clock
        self.started = clock()
        self.finished: dict[str, str] = {}  # node -> its rate when it finished
        self.shown = False

    def __enter__(self) -> "LiveProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.shown:
            self.progress.stop()
            self.shown = False

    def __call__(self, status: Status) -> None:
        if not self.shown:
            self.progress.start()
            self.shown = True
        elapsed = max(1e-9, self.clock() - self.started)
        for node, s in status.stages.items():
            rows = s.rows_out if s.kind == "source" else s.rows_in
            done = s.batches_done >= s.batches_total > 0
            rate = self.finished.get(node) or (f"{rows / elapsed:,.0f} rows/s" if rows else "")
            if done:  # a finished stage's rate stays what it was when it finished
                self.finished.setdefault(node, rate)
            self._show(node, s.batches_done, s.batches_total,
                       f"{s.batches_done}/{s.batches_total}", rate)
        used, budget = status.scratch_bytes, status.budget_bytes
        waited = holding_back(status)
        self._show("waiting on", 0, 0, waited[0] if waited else "-",
                   f"{waited[1]} queued" if waited else "")
        self._show("RAM scratch", used, budget,
                   f"{format_size(used)} / {format_size(budget)}",
                   f"peak {format_size(status.peak_scratch_bytes)}")

    def _show(self, name: str, done: int, total: int, count: str, rate: str) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task("", total=total, name=name, count="",
                                                      rate="")
        self.progress.update(self.tasks[name], completed=done, total=total, count=count,
                             rate=rate)


def holding_back(status: Status) -> tuple[str, int] | None:
    """The node the line waits on now, and its batches queued: the one with the most
    batches ready per worker while all its workers are busy; None if none has any."""
    queued = [(s.queued / max(1, s.workers), node) for node, s in status.stages.items()
              if s.queued and s.in_flight >= s.workers]
    if not queued:
        return None
    node = max(queued)[1]
    return node, status.stages[node].queued


def plural(count: int, noun: str) -> str:
    """`1 file`, `2 files`, `1 batch`, `2 batches`."""
    if count == 1:
        return f"1 {noun}"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return f"{count:,} {noun[:-1]}ies"
    return f"{count:,} {noun}" + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")


def summary(status: Status) -> Table:
    """Per node: batches, rows in and out, busy time, RAM written, read zero-copy.
    Fits 80 columns (short units, no vertical rules); a cell never wraps."""
    took = "for" if status.state == "running" else "in"  # running for 5.35 s so far
    table = Table(title=f"{status.pipeline}: {status.state} {took} "
                        f"{status.elapsed_seconds:.2f} s (peak RAM scratch "
                        f"{format_size(status.peak_scratch_bytes)} of "
                        f"{format_size(status.budget_bytes)})",
                  box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0),
                  caption="written: to RAM scratch; read: from it, zero-copy")
    table.add_column("stage", overflow="ellipsis", max_width=16, no_wrap=True)
    table.add_column("kind", no_wrap=True)
    for column in ("batches", "rows in", "rows out", "busy s", "written", "read"):
        table.add_column(column, justify="right", no_wrap=True)
    for node, s in status.stages.items():
        table.add_row(node, s.kind, f"{s.batches_done}/{s.batches_total}",
                      short_count(s.rows_in), short_count(s.rows_out),
                      f"{s.busy_seconds:.2f}", short_size(s.bytes_written),
                      short_size(s.bytes_read))
    return table


def resumed(status: Status) -> str | None:
    """A resumed run in a line: what it found done, what it kept and from where, what
    it did again; the details (`restore_notes`) are in the conductor's log."""
    if status.resumed_done is None:
        return None
    kept: dict[str, int] = {}
    for st in status.stages.values():
        for tier, count in st.restored.items():
            kept[tier] = kept.get(tier, 0) + count
    where = ", ".join(f"{count:,} from {'the ' + tier + ' tier' if tier != 'ram' else 'RAM'}"
                      for tier, count in kept.items() if count)
    done = sum(st.batches_done for st in status.stages.values())
    line = (f"{plural(status.resumed_done, 'task')} were done before"
            + (f" (outputs kept: {where})" if where else "")
            + f"; {plural(max(0, done - status.resumed_done), 'task')} done now")
    if status.restore_notes:
        line += (f"; {plural(len(status.restore_notes), 'note')} in "
                 f"{status.run_dir}/logs/conductor.log")
    return line


def calls(status: Status) -> list[str]:
    """A line per call stage: what its requests did."""
    lines = []
    for node, s in status.stages.items():
        c = s.calls
        if not c:
            continue
        latency = (f", p50 {c.latency_p50 * 1000:.0f} ms, p99 "
                   f"{c.latency_p99 * 1000:.0f} ms"
                   if c.latency_p50 is not None and c.latency_p99 is not None
                   else "")
        lines.append(f"{node}: {plural(c.requests, 'request')} sent, {c.memo_hits:,} "
                     f"kept answers used, {plural(c.retries, 'retry')}{latency}")
    return lines


def short_count(count: int) -> str:
    """`59,986` exactly; from a million on, `59.99M` (fits a narrow column)."""
    if count < 1_000_000:
        return f"{count:,}"
    for unit, scale in (("G", 10**9), ("M", 10**6)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def short_size(size: int) -> str:
    """Bytes as a Kubernetes quantity, three digits at most: `12B`, `2.2Ki`, `900Mi`."""
    value, unit = float(size), "B"
    for unit in ("B", "Ki", "Mi", "Gi", "Ti"):
        if value < 1000 or unit == "Ti":
            break
        value /= 1024
    if unit == "B":
        return f"{size}B"
    return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"


def durable_warning(status: Status) -> str | None:
    """A sentence when the durable tier did not keep up (said at the end of a run)."""
    durable = status.durable
    if durable is None or not durable.behind and not durable.error:
        return None
    return (f"the last checkpoint to {durable.url} was not written" +
            (f" ({durable.error})" if durable.error else "") +
            ": a node lost now would start over from an earlier one")


def nondeterministic(status: Status) -> list[str]:
    """A sentence per stage that made other bytes of a batch made again."""
    return [f"stage {name!r} is not deterministic: "
            f"{plural(len(s.nondeterministic), 'batch')} "
            f"({', '.join(map(str, s.nondeterministic[:5]))}"
            f"{', ...' if len(s.nondeterministic) > 5 else ''}) gave other bytes when made "
            "again; a resumed run's output is not what a clean run would write"
            for name, s in status.stages.items() if s.nondeterministic]


def shadow_lines(stage: str, shadow: ShadowStatus, made: int) -> list[str]:
    """A stage's candidate (`podpipe shadow`) and how its outputs compared with the
    live ones, as lines of text (`made`: the batches the stage made)."""
    said = [f"stage {stage!r}: candidate {shadow.version or '(not up)'} "
            f"({' '.join(shadow.overrides)}), {shadow.state}"
            + (f": {shadow.error}" if shadow.error else ""),
            f"compared {shadow.compared} of the stage's {plural(made, 'batch')}"
            + (f" (offered every {shadow.every})" if shadow.every > 1 else "")
            + f": {shadow.equal} equal, {shadow.differing} differing; {shadow.skipped} "
            f"skipped, {shadow.failed} failed; its time {shadow.seconds:.2f} s"]
    for i, difference in enumerate(shadow.differences):
        c = difference.comparison
        said.append(f"batch {difference.batch}: {c.said()}")
        said += [f"  row {e['row']}: " + ", ".join(f"{name} {v[0]!r} live, {v[1]!r} "
                                                   "candidate" for name, v in e.items()
                                                   if name != "row")
                 for e in (c.examples if i == 0 else [])]  # (the first batch's: --json
                                                           # has every batch's)
    if shadow.differing > len(shadow.differences):
        said.append(f"(and {shadow.differing - len(shadow.differences)} more batches "
                    "differing)")
    return said + [f"failed: {failure}" for failure in shadow.failures]


def status_table(status: Status) -> Table:
    """`podpipe status` without --json."""
    table = summary(status)
    held = [f"\nheld: stage {n!r} (version {s.version}): {s.held}; swap it to go on"
            for n, s in status.stages.items() if s.held]
    table.caption = (f"run {status.run_id}  state {status.state}  scratch "
                     f"{status.scratch}" + (f"\nerror: {printable(status.error)}"
                                                if status.error else "") + printable("".join(held))
                     + (f"\ndurable: {durable_warning(status)}"
                        if status.state != "running" and durable_warning(status) else ""))
    for line in calls(status):
        table.caption += f"\ncalls: {line}"
    waited = holding_back(status) if status.state == "running" else None
    if waited:
        table.caption += f"\nwaiting on: {waited[0]} ({waited[1]} queued)"
    pids = Table(title="processes", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                 padding=(0, 1, 0, 0))  # no rules: fits 80 columns whole
    for column in ("role", "stage", "worker", "pod", "pid", "alive"):
        pids.add_column(column, no_wrap=True)
    live = status.state == "running"
    for p in status.processes:
        alive = (live if p.alive is None else p.alive) if live else False
        pids.add_row(p.role, p.stage or "", str(p.worker) if p.stage else "",
                     p.pod, str(p.pid), "yes" if alive else "no")
    grid = Table.grid()
    grid.add_row(table)
    grid.add_row(pids)
    return grid


def runs_table(found: list[RunRow], where: str) -> Table:
    """`podpipe runs`: a row per run in the runs directory `where`, newest first."""
    table = Table(box=None, title=f"runs in {where}, newest first", title_justify="left",
                  pad_edge=False)
    # whole words, never cut: a state, a time; the run names its pipeline too, so the
    # pipeline is what gives way on a narrow terminal
    for column in ("run", "pipeline", "state", "started", "elapsed s"):
        table.add_column(column, justify="right" if column == "elapsed s" else "left",
                         no_wrap=column != "pipeline", overflow="fold",
                         min_width=len("interrupted") if column == "state" else None)
    for run in found:
        started = time.strftime("%m-%d %H:%M:%S", time.localtime(run.started))
        table.add_row(Path(run.run_dir).name, run.pipeline, run.state, started,
                      f"{run.elapsed_seconds:.1f}")
    return table


def lines_table(found: list[tuple[Path, LineRecord]], where: str) -> Table:
    """`podpipe lines`: a row per line of this user's in `where`."""
    table = Table(box=None, title=f"lines in {where}", title_justify="left", pad_edge=False)
    for column in ("line", "state", "pid", "queued", "running", "done", "failed"):
        table.add_column(column, justify="right" if column in ("pid", "queued", "done",
                                                               "failed") else "left",
                         no_wrap=column != "running", overflow="fold")
    for _, line in found:
        jobs = line.jobs
        table.add_row(line.name, line.state, str(line.pid) if line.state != "down" else "",
                      str(len(jobs.queued)), ", ".join(filter(None, [jobs.running,
                                                                      *jobs.beside])),
                      str(jobs.done),
                      str(jobs.failed))
    return table


def line_table(line: LineRecord, where: str) -> Table:
    """`podpipe status LINE`: its warm processes, its queue, its recent jobs."""
    up_for = f", up for {time.time() - line.started:.0f} s" if line.state == "up" else ""
    table = Table(box=None, pad_edge=False, title_justify="left", show_header=False,
                  title=f"line {line.name}: {line.state}{up_for} ({where})")
    table.add_column("what", no_wrap=True)
    table.add_column("", overflow="fold")
    warm = ", ".join(f"{name} {pid}" for name, pid in sorted(line.processes.items()))
    table.add_row("processes", warm or "none")
    table.add_row("tables", ", ".join(f"{name} ({version})" for name, version in
                                      sorted(line.tables.items())) or "none in RAM")
    table.add_row("running", line.jobs.running or "no job")
    if line.jobs.beside:  # (`jobs: N`: younger ones, on the stations it is done with)
        table.add_row("beside it", ", ".join(line.jobs.beside))
    table.add_row("queued", ", ".join(line.jobs.queued) or "none")
    table.add_row("jobs", f"{line.jobs.done} succeeded, {line.jobs.failed} failed")
    for job in reversed(line.jobs.recent[-5:]):
        took = f" in {job.seconds:.2f} s" if job.seconds is not None else ""
        table.add_row("", f"{job.job}: {job.state}{took}" +
                      (f": {job.error}" if job.error else ""))
    return table


def cores_table(cores: dict[str, Any]) -> Table:
    """`podpipe plan --cpus C --from RUN_DIR`: workers per node, the predicted pace."""
    table = Table(title=f"{cores['pipeline']} on {cores['cpus']:g} cores: "
                        f"{cores['batches_per_second']:g} batches/s, "
                        f"{cores['rows_per_second']:,} rows/s predicted",
                  caption=f"{plural(cores['batches'], 'batch')} in "
                          f"{cores['predicted_seconds']:.1f} s (the measured run: "
                          f"{cores['measured_seconds']:.1f} s); from {cores['from']}",
                  box=box.SIMPLE_HEAD)
    for column in ("node", "s per batch", "workers"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for n in cores["nodes"]:
        table.add_row(n["node"], f"{n['seconds_per_batch']:.4f}", str(n["workers"]))
    return table


def plan_table(planned: dict[str, Any]) -> Table:
    """`podpipe plan`: a row per replica."""
    pods = planned["pods"]
    table = Table(title=f"{planned['pipeline']}: "
                        f"{plural(planned['source_batches'], 'batch')} "
                        f"({format_size(planned['source_bytes'])} from "
                        f"{plural(planned['files'], 'file')}) in "
                        f"{plural(planned['shards'], 'shard')} over "
                        f"{plural(planned['replicas'], 'replica')}")
    for column in ("pod", "shards", "batches", "bytes pulled"):
        table.add_column(column, justify="left" if column == "shards" else "right")
    for p in pods:
        shards = p["shards"]
        shown = ", ".join(map(str, shards[:6])) + (f", ... ({len(shards)})"
                                                   if len(shards) > 6 else "")
        table.add_row(str(p["ordinal"]), shown or "(none: idles)", str(p["batches"]),
                      format_size(p["bytes"]))
    loads = [p["bytes"] for p in pods]
    if loads and max(loads):
        table.caption = (f"per pod: min {format_size(min(loads))}, max "
                         f"{format_size(max(loads))}; the slowest pod reads "
                         f"{max(loads) / (sum(loads) / len(loads)):.2f}x the mean")
    return table


def rows_table(table: Any, head: int, width: int) -> tuple[Table, list[str]]:
    """The first `head` rows of a pyarrow table, a column each, values as Python
    prints them (a long one cut, never wrapped), as many columns as fit in `width`;
    and the names of the columns left out."""
    rows = [[printable(repr(v) if isinstance(v, (str, bytes)) else str(v))
             for v in row.values()] for row in table.slice(0, head).to_pylist()]
    shown = Table(box=box.SIMPLE_HEAD)
    used, left_out = 0, list[str]()
    for i, name in enumerate(table.column_names):
        wanted = min(max([len(name)] + [len(r[i]) for r in rows]), 28)
        if left_out or (used + wanted + 3 > width and i > 0):
            left_out.append(name)
            continue
        used += wanted + 3
        shown.add_column(printable(name), no_wrap=True, overflow="ellipsis",
                         min_width=min(wanted, 12), max_width=28)
    for row in rows:
        shown.add_row(*row[:len(shown.columns)])
    return shown, left_out
