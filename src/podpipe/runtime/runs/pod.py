"""A pod: plan the source, lay out the run, run the conductor.

`run` is what `podpipe run` calls, a pod on this machine; `serve` is what the
conductor container of a pod on Kubernetes runs (`podpipe conductor`). Both
validate everything that can be checked before a process starts (spec, source
files, the budget against the tmpfs), create the run directory and the RAM
scratch (`run` also sweeps scratch left by crashed runs), and hand over to the
conductor. A pod knows its ordinal among the replicas (`model.shards.ordinal`) and
runs the shards it owns; `run` with several replicas and no ordinal starts them
all on this machine (`runtime.replicas`).

Reading it, top to bottom: `validate` (a spec, and with a time limit its run:
targets imported); the three starts — `run` (here), `serve` (a Kubernetes pod's
conductor; `placing` works out which pod it is) and `resume`; then what they share:
`_conduct` (the conductor run to the end), `prepare` (what it needs first: the
source planned, tables and sinks checked, where the run starts from, the durable
tier), `_same_source`, `_durable_store`, `_hold` (a finished pod's conductor staying
up, telling agents that connect to stop) and `_check_budget`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from podpipe.errors import InterruptedRun, RunError, StoreError, UsageError
from podpipe.model import shards as sharding
from podpipe.model import spec as specs
from podpipe.model.graph import Graph
from podpipe.model.pipeline import SOURCE
from podpipe.model.sizes import format_size, parse_size
from podpipe.runtime.storage import durable
from podpipe.runtime.plumbing import protocol, sockets
from podpipe.runtime.rundir import layout as rundir, status
from podpipe.runtime.runs import following as runs
from podpipe.runtime.data import scratch as scratches
from podpipe.runtime.runs.launcher import ForkServer
from podpipe.runtime.runs.launcher import launcher as make_launcher
from podpipe.runtime.plumbing import lifetime, logline
from podpipe.runtime.plumbing.loop import EventLoop, Signalled
from podpipe.runtime.runs.origin import Origin, start_from

if TYPE_CHECKING:
    from podpipe.runtime.conductor import Restored, Run

# The conductor, the sinks and the replicas (pyarrow, fsspec) are imported where they
# are used: a run imports them while its fork server starts, not before.


def validate(spec_path: str, overrides: list[str] | tuple[str, ...] = (), *,
             import_seconds: float | None = None) -> specs.Pipeline:
    """The spec, parsed and checked (fields, names, graph); with `import_seconds`,
    its `run:` targets imported in a child process within that time
    (`runtime.stage.imports`)."""
    pipeline = specs.load(spec_path, list(overrides))
    if import_seconds is not None:
        from podpipe.runtime.stage import imports

        imports.check(pipeline, import_seconds)
    return pipeline


def run(spec_path: str, *, overrides: list[str] | tuple[str, ...] = (),
        run_dir: str | None = None, replicas: int = 1, pod_index: int | None = None,
        memory: str | None = None, fresh: bool = False,
        observer: Callable[[status.Status], None] | None = None,
        reaper: bool = True, metrics: str | None = None, metrics_linger: float = 0.0,
        server: ForkServer | None = None) -> status.Status:
    """Run the pipeline to the end on this machine; returns the final status.

    One pod, the replica `pod_index` (else POD_INDEX, else the StatefulSet hostname
    suffix) of `replicas`, running the shards it owns; with several replicas and no
    ordinal, every replica as a pod of its own (`runtime.replicas`). With a durable
    tier (`checkpoints.durable`), a run of the same spec starts each shard from its
    latest major checkpoint there, as a pod rescheduled on another node would, or a
    pod that took the shard over after a rescale; `fresh` ignores them. `server`: a
    fork server started early (`launcher.warm`), taken by the pod's launcher."""
    overrides = list(overrides)
    if replicas < 1:
        raise UsageError(f"--replicas {replicas}: expected at least 1")
    if pod_index is not None and pod_index < 0:
        raise UsageError(f"--pod-index {pod_index}: expected the pod's ordinal, 0 or more")
    if metrics:
        from podpipe.runtime.conductor.metrics import address

        address(metrics)  # a clear error before anything starts
    if memory is not None:
        try:
            parse_size(memory)
        except ValueError as exc:
            raise UsageError(f"--memory: {exc}") from None
        overrides.append(f"memory={memory}")
    pipeline = validate(spec_path, overrides)
    ordinal = _ordinal(pipeline, replicas, pod_index)
    if ordinal is None:
        most = 4 * (os.cpu_count() or 1)  # each a whole pod: more only thrashes
        if replicas > most:
            raise UsageError(f"--replicas {replicas}: at most {most} pods on this machine "
                             f"({os.cpu_count()} CPUs); on Kubernetes, render them instead")
        if metrics:
            raise UsageError("--metrics-port: each pod serves its own; with several replicas "
                             "here, run each with --pod-index I and a port of its own")
        from podpipe.runtime.runs import replicas as pods

        if server is not None:
            server.close()  # each pod is a process of its own, with its own
        return pods.run(spec_path, pipeline, overrides=overrides, run_dir=run_dir,
                        replicas=replicas, fresh=fresh, observer=observer)
    placement = sharding.Placement(ordinal, replicas, pipeline.shards)
    sharding.check_handover(pipeline, placement.replicas)
    root = scratches.default_root()
    scratches.sweep(root)
    _check_budget(pipeline, root)
    run_id = f"{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_path = Path(run_dir) if run_dir else Path(pipeline.checkpoints.node) / "runs" / run_id
    rundir.make(run_path, spec_path, overrides, placement=placement)
    rundir.lock(run_path)
    return _conduct(pipeline, run_path, overrides, run_id, f"{pipeline.name}-{ordinal}",
                    lambda: scratches.Scratch.create(run_id, root), launch=True,
                    observer=observer, origin=Origin(durable=not fresh),
                    placement=placement, fresh=True, latest=not run_dir, reaper=reaper,
                    metrics=metrics, metrics_linger=metrics_linger, server=server)


def _ordinal(pipeline: specs.Pipeline, replicas: int, pod_index: int | None) -> int | None:
    """This pod's ordinal; None: start every replica here. One replica is pod 0."""
    if replicas == 1 and pod_index is None:
        return 0
    try:
        ordinal = sharding.ordinal(pod_index, dict(os.environ), socket.gethostname(),
                                   pipeline.name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if ordinal is not None and ordinal >= replicas:
        raise UsageError(f"pod index {ordinal} is not below --replicas {replicas}: "
                         f"ordinals run from 0 to {replicas - 1}")
    return ordinal


def serve(spec_path: str, *, overrides: list[str] | tuple[str, ...] = (),
          scratch: str, run_dir: str, layout: str = "containers", hold: bool = True,
          replicas: int = 1, metrics: str | None = None, once: bool = False) -> int:
    """The conductor of a pod on Kubernetes (`podpipe conductor`); returns the exit code.

    The scratch is the pod's memory-backed volume at `scratch`, the run directory is
    on the node tier. With layout `containers` the kubelet starts the agents, one
    container per node; with `processes` this process starts them, as `run` does.
    With `hold`, a finished pod stays up (a StatefulSet restarts what exits),
    answering agents that reconnect with `stop`, until SIGTERM. (A pod rendered
    `--standing` runs `upkeep.stand` instead.) `once`: a Job's pod, whose run is not
    resumed once it failed; with `hold`, agents that reconnect are told how it ended
    (they exit 1 when it failed, and the pod fails).
    """
    overrides = list(overrides)
    placed = placing(spec_path, overrides, Path(scratch), replicas, hold)
    if placed is None:
        return 0
    pipeline, placement = placed
    scratch_path = Path(scratch)
    conductor_socket = scratches.Scratch(scratch_path, volume=True).socket
    run_path = Path(run_dir)
    pod = os.environ.get("POD_NAME") or socket.gethostname()
    failed = False
    try:
        if (run_path / status.FILE).exists():
            # A restarted conductor container: the memory volume outlived it, and the
            # run directory is on the node tier. Finish the run from them, unless it is
            # done (or, in a Job's pod, failed).
            state = status.read(run_path).state
            failed = once and state == "failed"
            if state != "succeeded" and not failed:
                resume(str(run_path), scratch=lambda: scratches.Scratch.adopt(
                           scratch_path, None, volume=True),
                       launch=layout == "processes", pod=pod)
        else:
            rundir.make(run_path, spec_path, overrides, placement=placement)
            rundir.lock(run_path)
            run_id = f"{pod}-{time.strftime('%Y%m%d-%H%M%S')}"
            # A shard that moved here, a pod rescheduled: from the durable tier.
            _conduct(pipeline, run_path, overrides, run_id, pod,
                     lambda: scratches.Scratch.at(scratch_path),
                     launch=layout == "processes", observer=None,
                     origin=Origin(durable=True), placement=placement, fresh=True,
                     metrics=metrics, metrics_linger=float("inf") if hold else 0.0)
    except RunError as exc:
        if not (once and hold) or isinstance(exc, InterruptedRun):  # (the pod goes)
            raise
        sys.stderr.write(logline.line(str(exc), "error"))
        failed = True
    if hold:
        _hold(conductor_socket, failed=failed)
    return int(failed)


def placing(spec_path: str, overrides: list[str], scratch_path: Path, replicas: int,
            hold: bool) -> tuple[specs.Pipeline, sharding.Placement] | None:
    """The spec and the shards this pod of a rendered StatefulSet owns (its ordinal
    from the env or its hostname), checked against its memory volume; None for a pod
    that owns none (after holding until SIGTERM, with `hold`)."""
    pipeline = validate(spec_path, overrides)
    try:
        ordinal = sharding.ordinal(None, dict(os.environ), socket.gethostname(),
                                   pipeline.name) or 0
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    placement = sharding.Placement(ordinal, replicas, pipeline.shards)
    if ordinal >= replicas or not placement.owned:
        # Replica i owns the shards s with s % replicas == i: a pod beyond the replicas
        # the manifests were rendered for, or more replicas than shards, owns none.
        print(f"pod index {ordinal} owns no shard: the pipeline has {pipeline.shards} "
              f"shard(s) over {replicas} replica(s) (rendered with --replicas {replicas})",
              file=sys.stderr)
        if hold:
            scratches.Scratch.at(scratch_path)  # nothing of an earlier conductor's left
            _hold(scratches.Scratch(scratch_path, volume=True).socket)
        return None
    sharding.check_handover(pipeline, placement.replicas)
    _check_budget(pipeline, scratch_path)
    return pipeline, placement


def resume(run_dir: str, *, observer: Callable[[status.Status], None] | None = None,
           scratch: Callable[[], scratches.Scratch] | None = None, launch: bool = True,
           pod: str | None = None, reaper: bool = True,
           accept_changed_source: bool = False) -> status.Status:
    """Finish a run whose conductor died, or whose pod was lost, from what survived:
    outputs still in its RAM scratch, else on the node tier (checked by checksum),
    else computed again. Returns the final status. `scratch`, `launch` and `pod`:
    as a pod on Kubernetes has them (see `serve`); by default the run's own scratch
    on this machine is taken over if it is still there."""
    run_path = Path(run_dir)
    before = rundir.claim_for_resume(run_path)
    if launch:  # what the killed run's stages started and left behind, gone with it
        lifetime.end_leftovers(run_path)
    recorded = rundir.read(run_path)
    os.chdir(recorded.cwd)  # relative paths in the spec resolve as they did
    overrides = recorded.overrides
    placement = recorded.placement or sharding.Placement()
    pipeline = validate(str(run_path / "spec.yaml"), overrides)
    run_id = before.run_id
    notes: list[str] = []
    if scratch is None:
        old = Path(before.scratch or "")
        root = scratches.default_root()
        adopt = old.parent == root and old.name.startswith(scratches.PREFIX)
        scratches.sweep(root, keep=old if adopt else None)
        _check_budget(pipeline, root)

        def scratch() -> scratches.Scratch:
            if adopt and os.path.lexists(old):
                try:
                    return scratches.Scratch.adopt(old, run_id)
                except scratches.UnsafeScratch as exc:
                    notes.append(f"the RAM scratch was not taken over ({exc}): resumed "
                                 "from the node tier")
            return scratches.Scratch.create(run_id, root)
    return _conduct(pipeline, run_path, overrides, run_id,
                    pod or f"{pipeline.name}-{placement.ordinal}",
                    scratch, launch=launch, observer=observer, placement=placement,
                    origin=Origin(journal=True, source_batches=before.source_batches),
                    notes=notes, reaper=reaper, accept_changed_source=accept_changed_source)


def _conduct(pipeline: specs.Pipeline, run_path: Path, overrides: list[str], run_id: str,
             pod: str, make_scratch: Callable[[], scratches.Scratch], *, launch: bool,
             observer: Callable[[status.Status], None] | None, origin: Origin,
             placement: sharding.Placement = sharding.Placement(),
             fresh: bool = False, notes: list[str] | None = None,
             latest: bool = False, reaper: bool = True,
             metrics: str | None = None, metrics_linger: float = 0.0,
             server: ForkServer | None = None,
             accept_changed_source: bool = False) -> status.Status:
    """Make the scratch, plan the source, find where the run starts from, and hand
    over to the conductor. `fresh`: the run directory is new (removed if nothing ran);
    `notes`: what making the scratch found wrong, for the status; `latest`: once it
    starts, the run is the runs directory's `latest`; `reaper`: this process is the
    run's alone (see `conductor.processes`); `metrics`: serve Prometheus metrics
    there (`[ADDR:]PORT`)."""
    scratch = launcher = listener = None
    try:
        try:
            scratch = make_scratch()
        except OSError as exc:
            raise RunError(f"cannot create the RAM scratch: {exc}") from exc
        listener = sockets.listen(scratch.socket)  # agents may connect while we plan
        if launch:  # start the fork server first: it imports while we plan; and the
            launcher = make_launcher(run_path / "spec.yaml", overrides, scratch.socket,
                                     run_path / "logs", pod, server)
            # source's agent, forked once pyarrow is in (not pandas, it needs none)
            launcher.early(protocol.agent_name(SOURCE, 0))
        run, restored, tier = prepare(pipeline, run_path, overrides, run_id, pod, scratch,
                                      origin=origin, placement=placement, fresh=fresh,
                                      notes=notes, accept_changed_source=accept_changed_source)
    except BaseException:
        if launcher is not None:
            launcher.close()
        if listener is not None:
            listener.close()
        if fresh:  # nothing ran: leave no half a run (a resumed one stays)
            if scratch is not None:
                scratch.remove()
            shutil.rmtree(run_path, ignore_errors=True)
        raise
    if latest:
        runs.mark_latest(run_path)
    from podpipe.runtime.conductor import Conductor

    return Conductor(run, launcher=launcher, observer=observer, restored=restored,
                     durable=tier, reaper=reaper, metrics=metrics,
                     metrics_linger=metrics_linger, listener=listener).start()


def prepare(pipeline: specs.Pipeline, run_path: Path, overrides: list[str], run_id: str,
            pod: str, scratch: scratches.Scratch, *, origin: Origin,
            placement: sharding.Placement = sharding.Placement(), fresh: bool = False,
            notes: list[str] | None = None, accept_changed_source: bool = False,
            memos: Path | None = None,
            ) -> tuple[Run, Restored | None, durable.DurableTier | None]:
    """What the conductor needs before it starts: the source planned (and checked
    against what a resumed run read), the tables and sinks checked, where the run
    starts from, the durable tier. A standing line's job starts from this too, its
    call stages' answers kept in the line's `memos` folder (shared by its jobs)."""
    from podpipe.runtime.conductor import Run
    from podpipe.runtime.data import sink, source, tables
    from podpipe.runtime.storage import answers

    graph = Graph.of(pipeline)
    digest = rundir.spec_digest(run_path)
    store = _durable_store(pipeline, digest)
    plan = source.plan(pipeline.source)
    identity = source.identity(pipeline.source, plan)
    origin = _same_source(run_path, identity, origin, fresh=fresh,
                          accept_changed=accept_changed_source)
    loaded = tables.check(pipeline, Path(pipeline.checkpoints.node))
    if fresh:
        sink.check_run(pipeline, graph, len(plan))
    restored = start_from(origin, pipeline, graph, plan, run_path, placement, digest,
                          source.digest(identity), scratch.path)
    if origin.durable or origin.journal:  # answers a lost node had kept, say
        for stage in pipeline.stages:
            if stage.call is not None and stage.call.memo:
                answers.fetch(pipeline, stage.name,
                              answers.folder(memos or run_path, stage.name))
    if restored is not None:
        tables.changed(pipeline, restored.made_by, loaded)
        restored.notes.extend(notes or [])
    checkpoints = pipeline.checkpoints
    tier = None if store is None else durable.DurableTier(
        store,
        every_batches=checkpoints.every_batches, interval=checkpoints.interval,
        keep=checkpoints.keep, source_batches=len(plan), shards=pipeline.shards,
        group_of=durable.grouping(graph, pipeline.shards), source=source.digest(identity))
    run = Run(pipeline, graph, plan, scratch, run_path, run_id, pod, placement, overrides,
              rundir.read(run_path).staging, memos or run_path)
    return run, restored, tier


def _same_source(run_path: Path, now: dict[str, Any], origin: Origin, *, fresh: bool,
                 accept_changed: bool) -> Origin:
    """A resume reads the source the run started from: one whose files or plan changed
    would mix old and new data, and is refused (UsageError naming the files) unless
    `accept_changed`: then the run starts over, from nothing, over the new source.
    A fresh run records what it reads."""
    from podpipe.runtime.data import source
    from podpipe.runtime.storage import journal

    recorded = rundir.read(run_path)
    if not fresh and origin.journal and recorded.source is not None:
        changed = source.changes(recorded.source, now)
        if changed is not None and not accept_changed:
            raise UsageError(f"{run_path}: {changed}. The outputs kept were made from the "
                             "old one: resume with --accept-changed-source to redo the "
                             "run from the new source, or start a new run")
        if changed is not None:  # start over: nothing of the old source is used
            for name in (journal.FILE, f"{journal.FILE}-wal", f"{journal.FILE}-shm"):
                (run_path / name).unlink(missing_ok=True)
            origin = Origin()
    if recorded.source != now:
        recorded.source = now
        rundir.write(run_path, recorded)
    return origin


def _durable_store(pipeline: specs.Pipeline, digest: str) -> durable.Store | None:
    """The durable tier's store, checked before any process starts: a scheme fsspec
    knows, credentials and a write that works; else the user's input is wrong."""
    url = pipeline.checkpoints.durable
    if url is None:
        return None
    try:
        store = durable.checkpoints(url, pipeline.name, digest)
        durable.probe(store)
    except StoreError as exc:
        raise UsageError(f"spec.checkpoints.durable {url!r}: cannot write there: "
                         f"{type(exc.cause).__name__}: {exc.cause}") from None
    return store


def _hold(socket_path: Path, failed: bool = False) -> None:
    """Stay up until SIGTERM or SIGINT, telling every agent that connects to stop (and
    that the run `failed`)."""
    sys.stderr.write(logline.line("the run is over; holding until SIGTERM"))
    sys.stderr.flush()
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(16)
    with EventLoop() as loop:
        loop.watch(listener, "listen")
        while not any(isinstance(h, Signalled) for h in loop.wait(None)):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                try:
                    protocol.recv(conn)  # its hello, or a probe
                    protocol.send(conn, protocol.Stop(failed=failed))
                except (OSError, protocol.Closed):
                    pass
    listener.close()
    socket_path.unlink(missing_ok=True)


def _check_budget(pipeline: specs.Pipeline, root: Path) -> None:
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        raise UsageError(f"RAM scratch {root}: {exc.strerror}") from None
    if pipeline.memory > free:
        raise UsageError(f"spec.memory {format_size(pipeline.memory)} is more than the "
                         f"{format_size(free)} free in {root}; lower it (--memory)")
