"""Every replica of a pipeline on this machine, as a StatefulSet would run them.

`podpipe run SPEC --replicas N` without an ordinal starts N pods, each the command
a replica would run (`podpipe run SPEC --replicas N --pod-index I`): a conductor,
its stage processes and its own RAM scratch, in `RUN_DIR/pods/I`. Unless the spec
names a durable tier, they share one at `RUN_DIR/durable`: the shards' checkpoints,
and the handover of shard outputs to the pod of a global reduce.

`RUN_DIR/status.json` adds up the pods' own status files and lists the pods. One
pod failing does not stop the others; only the pod of the global reduce, when it
waits for shards of a pod that failed, is stopped (it could not finish). `resume`
starts the pods again, as many as asked: every shard resumes from its durable
checkpoints, whichever pod made them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from podpipe.errors import InterruptedRun, RunError, UsageError
from podpipe.model import shards as sharding
from podpipe.model import spec as specs
from podpipe.model.sizes import format_size
from podpipe.runtime.plumbing import files, lifetime
from podpipe.runtime.rundir import layout as rundir, status
from podpipe.runtime.runs import following as runs
from podpipe.runtime.data import sink
from podpipe.runtime.data import scratch as scratches
from podpipe.runtime.plumbing.loop import EventLoop, Signalled
from podpipe.runtime.data.scratch import process_start

POLL_SECONDS = 0.25
STOP_GRACE_SECONDS = 10.0


def run(spec_path: str, pipeline: specs.Pipeline, *, overrides: list[str],
        run_dir: str | None, replicas: int, fresh: bool,
        observer: Callable[[status.Status], None] | None) -> status.Status:
    run_id = f"{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}-x{replicas}"
    run_path = Path(run_dir) if run_dir else Path(pipeline.checkpoints.node) / "runs" / run_id
    durable = pipeline.checkpoints.durable or (run_path / "durable").resolve().as_uri()
    read = _check_sinks(pipeline)
    rundir.make(run_path, spec_path, overrides, run_id=run_id, replicas=replicas,
                durable=durable, attempt=1, source=read)
    rundir.lock(run_path)
    if not run_dir:
        runs.mark_latest(run_path)
    return _run_pods(run_path, pipeline, fresh=fresh, observer=observer)


def is_replicas(run_dir: str | Path) -> bool:
    """Is this the run directory of several replicas (not of one pod)?"""
    try:
        return rundir.read(Path(run_dir)).of_replicas
    except UsageError:
        return False


def resume(run_dir: str, *, replicas: int | None,
           observer: Callable[[status.Status], None] | None,
           accept_changed_source: bool = False) -> status.Status:
    """Start the pods of a stopped run again, `replicas` of them (default: as before).
    The previous pods' directories move to `pods.previous`. A source whose files or
    plan changed since the run started is refused (UsageError naming them) unless
    `accept_changed_source`: then the pods start from nothing, over the new source."""
    from podpipe.runtime.data import source

    run_path = Path(run_dir)
    rundir.claim_for_resume(run_path)
    for pod in sorted((run_path / "pods").glob("*")):  # a killed run's pods may still
        try:                                            # be stopping: not beside them
            live = status.read(pod).state == "running"
        except UsageError:
            continue
        if live:
            raise UsageError(f"{run_path}: pod {pod.name} of the run is still running "
                             f"({pod}); wait for it to stop, then resume")
    if replicas is not None and replicas < 1:
        raise UsageError(f"--replicas {replicas}: expected at least 1")
    recorded = rundir.read(run_path)
    os.chdir(recorded.cwd)  # relative paths in the spec resolve as they did
    recorded.replicas = replicas or recorded.replicas
    recorded.attempt = (recorded.attempt or 1) + 1
    pipeline = specs.load(run_path / "spec.yaml", recorded.overrides)
    now = source.identity(pipeline.source, source.plan(pipeline.source))
    changed = None if recorded.source is None else source.changes(recorded.source, now)
    if changed is not None and not accept_changed_source:
        raise UsageError(f"{run_path}: {changed}. The checkpoints kept were made from the "
                         "old one: resume with --accept-changed-source to redo the run "
                         "from the new source, or start a new run")
    recorded.source = now
    shutil.rmtree(run_path / "pods.previous", ignore_errors=True)
    if (run_path / "pods").exists():
        (run_path / "pods").rename(run_path / "pods.previous")
    rundir.write(run_path, recorded)
    return _run_pods(run_path, pipeline, fresh=changed is not None, observer=observer)


def _run_pods(run_path: Path, pipeline: specs.Pipeline, *, fresh: bool,
              observer: Callable[[status.Status], None] | None) -> status.Status:
    recorded = rundir.read(run_path)
    replicas = recorded.replicas or 1
    root = scratches.default_root()
    free = shutil.disk_usage(root).free
    if pipeline.memory * replicas > free:
        raise UsageError(f"{replicas} pods of spec.memory {format_size(pipeline.memory)} each "
                         f"need more than the {format_size(free)} free in {root}; lower "
                         "--memory or --replicas")
    overrides = recorded.overrides + [f"checkpoints.durable={recorded.durable}"]
    (run_path / "pods").mkdir(mode=0o700)
    pods: list[subprocess.Popen[bytes]] = []
    for index in range(replicas):
        command = [sys.executable, "-m", "podpipe", "run", str(run_path / "spec.yaml"),
                   "--replicas", str(replicas), "--pod-index", str(index), "--quiet",
                   "--run-dir", str(run_path / "pods" / str(index))]
        command += [arg for o in overrides for arg in ("--set", o)]
        command += ["--fresh"] if fresh else []
        log = open(files.append_private(run_path / "logs" / f"pod-{index}.log"), "ab")
        pods.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,  # this process killed,
                                     preexec_fn=lifetime.stop_with_parent))  # they stop
        log.close()
    started = time.time()
    interrupted = False
    # Pod exits wake the loop; their status files are read every POLL_SECONDS.
    with EventLoop() as loop:
        for index, process in enumerate(pods):
            loop.watch_exit(process.pid, index)
        try:
            while True:
                current = _aggregate(run_path, pipeline, recorded, pods, started)
                _write(run_path, current, observer)
                if all(p.poll() is not None for p in pods):
                    break
                _stop_hopeless_waits(current, pods)
                if any(isinstance(h, Signalled) for h in loop.wait(POLL_SECONDS)):
                    interrupted = True
                    for p in pods:
                        if p.poll() is None:
                            p.send_signal(signal.SIGTERM)
        finally:
            lifetime.reap(pods, STOP_GRACE_SECONDS, _ends, subprocess.Popen.kill)
    final = _aggregate(run_path, pipeline, recorded, pods, started, ended=time.time())
    if final.state == "succeeded":  # every pod's output is in place: mark the sinks
        try:
            final.sinks = _mark_sinks(pipeline, final.source_batches or 0)
        except RunError as exc:
            final.state, final.error = "failed", str(exc)
    _write(run_path, final, None)
    if interrupted:
        raise InterruptedRun(f"interrupted; the pods were stopped (resume: podpipe resume "
                             f"{run_path})")
    if final.state != "succeeded":
        raise RunError(final.error or final.state)
    return final


def _ends(pod: subprocess.Popen[bytes], seconds: float | None) -> bool:
    try:
        pod.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def _stop_hopeless_waits(current: status.Status, pods: list[subprocess.Popen[bytes]]) -> None:
    """Stop the pod of the global reduce when a shard it waits for is a failed pod's."""
    rows = current.pods or []
    failed = {s for pod in rows if pod.state in ("failed", "interrupted")
              and pods[pod.ordinal].poll() is not None for s in pod.shards}
    if rows and pods[0].poll() is None and failed & set(rows[0].waiting_for):
        pods[0].send_signal(signal.SIGTERM)


def _write(run_path: Path, current: status.Status,
           observer: Callable[[status.Status], None] | None) -> None:
    try:
        status.write(run_path, current)
    except OSError:
        pass
    if observer is not None:
        observer(current)


def _check_sinks(pipeline: specs.Pipeline) -> dict[str, Any]:
    """Check the sinks before any pod starts; what the run reads (`source.identity`)."""
    from podpipe.model.graph import Graph
    from podpipe.runtime.data import source

    plan = source.plan(pipeline.source)
    sink.check_run(pipeline, Graph.of(pipeline), len(plan))
    return source.identity(pipeline.source, plan)


def _mark_sinks(pipeline: specs.Pipeline, source_batches: int) -> dict[str, status.SinkInfo]:
    from podpipe.model.graph import Graph

    every = sink.every_batch(pipeline, Graph.of(pipeline), source_batches)
    marked = {}
    for target in pipeline.sinks:
        w = sink.mark(target, every[target.name])
        marked[target.name] = status.SinkInfo(w.uri, w.files, w.rows, w.nbytes)
    return marked


def _aggregate(run_path: Path, pipeline: specs.Pipeline, recorded: rundir.RunRecord,
               pods: list[subprocess.Popen[bytes]], started: float,
               ended: float | None = None) -> status.Status:
    """The run's status: the pods' own, merged field by field (`status.add_stage`),
    and a line per pod."""
    replicas = recorded.replicas or 1
    rows: list[status.PodRow] = []
    stages: dict[str, status.StageStatus] = {}
    processes: list[status.ProcessInfo] = []
    scratch_bytes = peak = spilled = 0
    notes: list[str] = []
    source_batches = None
    for index, process in enumerate(pods):
        owns = list(sharding.owned(pipeline.shards, replicas, index))
        try:
            own: status.Status | None = status.read(run_path / "pods" / str(index))
        except UsageError:
            own = None
        code = process.poll()
        row = status.PodRow(ordinal=index, shards=owns, state="starting", error=None,
                            pid=process.pid, run_dir=str(run_path / "pods" / str(index)))
        if own is None:
            if code is not None:
                row.state, row.error = "failed", (f"exited with code {code} before it ran "
                                                  f"(log: {run_path}/logs/pod-{index}.log)")
        else:
            row.state, row.error = own.state, own.error
            if code is not None and own.state == "running":
                row.state = "failed"
            row.waiting_for = own.pod.waiting_for if own.pod else []
            row.pids = [p.pid for p in own.processes]
            processes += own.processes
            scratch_bytes += own.scratch_bytes
            peak += own.peak_scratch_bytes  # each pod's own budget: the run's is their sum
            spilled += own.spilled_outputs
            notes += [f"pod {index}: {n}" for n in own.restore_notes]
            source_batches = own.source_batches
            for node, s in own.stages.items():
                stages[node] = status.add_stage(stages.get(node), s)
        rows.append(row)
    failed = [r for r in rows if r.state in ("failed", "interrupted")]
    if all(r.state == "succeeded" for r in rows):
        state = "succeeded"
    elif any(p.poll() is None for p in pods):
        state = "running"
    else:
        state = "failed"
    return status.Status(
        run_id=recorded.run_id or run_path.name, pipeline=pipeline.name, state=state,
        error="; ".join(f"pod {r.ordinal}: {r.error or r.state}" for r in failed)
        if state == "failed" else None,
        run_dir=str(run_path), scratch=None, started=started, ended=ended,
        elapsed_seconds=round((ended or time.time()) - started, 3),
        budget_bytes=pipeline.memory * replicas, scratch_bytes=scratch_bytes,
        peak_scratch_bytes=peak, spilled_outputs=spilled,
        source_batches=source_batches, shards=pipeline.shards, replicas=replicas,
        controller=status.Controller(os.getpid(), process_start(os.getpid())),
        durable=status.DurableInfo(url=recorded.durable) if recorded.durable else None,
        pods=rows, processes=processes, stages=stages, restore_notes=notes)
