"""The conductor: the per-pod process that owns the run.

It starts one agent per node (or, in a Kubernetes pod, waits for the agents the
kubelet starts as containers), accepts their connections on a Unix socket in RAM
scratch, and blocks on events only: socket messages, process exits (pidfds; a
closed connection for containers), signals (a wakeup fd) and the timers of
restarts. Each event goes to the engine's `RunState`; the conductor carries out
the actions it returns and keeps `status.json` current. It never touches batch
data.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from podpipe.engine import state as st
from podpipe.errors import (InputError, InterruptedRun, PodpipeError, RunError, SpecError,
                            StageError)
from podpipe.model import shards as sharding
from podpipe.model.graph import BATCH, SINGLE, Graph
from podpipe.model.spec import DEFAULT_RETRIES, SOURCE, Pipeline
from podpipe.runtime import protocol, status
from podpipe.runtime.journal import Copy, Journal
from podpipe.runtime.launcher import ForkLauncher, Process, SpawnLauncher
from podpipe.runtime.scratch import Scratch, process_start
from podpipe.runtime import durable as durables
from podpipe.runtime.durable import DurableTier
from podpipe.runtime import tiers
from podpipe.runtime.tiers import NodeTier

FLUSH_SECONDS = 0.25
STOP_GRACE_SECONDS = 5.0
DURABLE_WAIT = 10.0  # at the end of a failed run, for its last checkpoint
HANDOVER_WAIT = 120.0  # at the end of a sharded run, for its shards' last checkpoints
IMPORT_SECONDS = 0.25  # how often a global reduce's pod looks for the others' shards


@dataclass
class _Conn:
    sock: socket.socket
    reader: protocol.Reader = field(default_factory=protocol.Reader)
    node: str | None = None


@dataclass
class _Swap:
    """A `podpipe swap` in progress: the new version's overrides, and who asked."""

    overrides: list[str]
    now: bool
    conn: "_Conn | None"  # None: part of an `apply`, which answers for itself
    recompute: bool = False
    started: bool = False  # the new version's process is started


@dataclass
class _Stats:
    rows_in: int = 0
    rows_out: int = 0
    busy: float = 0.0
    bytes_written: int = 0
    bytes_read: int = 0
    reused: int = 0


def retries(pipeline: Pipeline, graph: Graph) -> dict[str, int]:
    """Restarts each node's process may have (the spec's, else the default)."""
    allowed = {node: DEFAULT_RETRIES for node in graph.order}
    allowed.update({stage.name: stage.retries for stage in pipeline.stages})
    return allowed


@dataclass
class Restored:
    """What a resumed run starts from: the engine, and what it found where."""

    engine: st.RunState
    counts: dict[str, dict[str, int]]   # node -> tier -> batches restored from it
    finished: dict[str, set[int]]       # node -> batches the journal had finished
    notes: list[str]                    # what was found wrong (corrupt copies)
    on_disk: list[Copy]                 # kept copies on the node tier, for checkpoints


class Conductor:
    def __init__(self, *, pipeline: Pipeline, graph: Graph, plan: list,
                 scratch: Scratch, run_dir: Path,
                 launcher: ForkLauncher | SpawnLauncher | None, run_id: str, pod: str,
                 observer: Callable[[dict[str, Any]], None] | None = None,
                 restored: Restored | None = None,
                 durable: DurableTier | None = None,
                 placement: sharding.Placement = sharding.Placement()) -> None:
        self.pipeline, self.graph, self.plan = pipeline, graph, plan
        self.scratch, self.run_dir, self.launcher = scratch, run_dir, launcher
        self.run_id, self.pod, self.observer = run_id, pod, observer
        self.placement = placement
        self.engine = restored.engine if restored else st.RunState(
            graph, len(plan), pipeline.memory, retries=retries(pipeline, graph),
            shards=placement.shards, owned=placement.owned,
            global_here=placement.runs_global)
        self.restored = restored.counts if restored else {}
        self.previously = restored.finished if restored else {}
        self.notes = restored.notes if restored else []
        self.durable = durable
        self.on_disk: list[Copy] = list(restored.on_disk) if restored else []
        self.recomputed = {node: 0 for node in graph.order}
        self.journal = Journal(run_dir)
        self.node_tier = NodeTier(run_dir)
        self.copies = 0  # node-tier copies made and journaled by this conductor
        self.keep = set(graph.reduce_inputs()) | {  # and what runs once
            n for n in graph.order if graph.domain[n] != BATCH and n not in graph.sinks}
        self.looked_for_shards = 0.0  # when the durable tier was last read for them
        self.timers: list[tuple[float, str]] = []  # (when, node): processes to start
        self.processes: dict[str, Process] = {}  # empty when agents are containers
        self.pids: dict[str, int] = {}             # as each agent said in its hello
        self.conns: dict[str, _Conn] = {}    # by node, once it said hello
        self.accepted: list[_Conn] = []       # every connection, to close at the end
        self.pidfds: set[int] = set()         # process exit events still watched
        self.versions: dict[str, str] = {}
        self.version_counts: dict[str, dict[str, int]] = {n: {} for n in graph.order}
        self.made_by: dict[st.Key, str] = {}  # the version of the stage that made it
        self.stage_overrides: dict[str, list[str]] = {}  # swapped stages: their --set
        self.swaps: dict[str, _Swap] = {}     # requested, not yet carried out
        self.swapped: set[str] = set()        # stages running a swapped-in version
        self.retired: set[int] = set()        # pids of replaced processes
        self.reading: dict[str, int] = {}     # node -> bytes its current task maps
        self.stats = {node: _Stats() for node in graph.order}
        self.state: str = "running"
        self.error: PodpipeError | None = None
        self.started: float = time.time()
        self.ended: float | None = None
        self.sel = selectors.DefaultSelector()

    # -- the loop --------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run to the end; returns the final status, raises the run's error."""
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        old_handlers = {s: signal.signal(s, lambda *_: None)
                        for s in (signal.SIGINT, signal.SIGTERM)}
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for node in self.graph.order:
                self.scratch.output_dir(node).mkdir(exist_ok=True)
            self.scratch.socket.unlink(missing_ok=True)  # a dead conductor's, on resume
            listener.bind(str(self.scratch.socket))
            listener.listen(64)
            listener.setblocking(False)  # accept only when there is one (see _socket_event)
            self.sel.register(listener, selectors.EVENT_READ, ("listen", listener))
            self.sel.register(wake_r, selectors.EVENT_READ, ("signal", None))
            if self.engine.finished:  # resumed after everything was done: nothing to ask
                self._end("succeeded", None)
            elif self.launcher is not None:
                for node in self.graph.order:
                    self._start(node)
            self._loop(wake_r)
        finally:
            self._stop_all()
            signal.set_wakeup_fd(old_fd)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            listener.close()
            wake_r.close()
            wake_w.close()
            self.sel.close()
            for pidfd in self.pidfds:
                os.close(pidfd)
            self.node_tier.close()  # copies handed over are finished: a resume uses them
            self.scratch.remove()
            self.ended = time.time()
            self._flush()
            if self.durable is not None:
                self._last_checkpoint()
                self._flush()
            self.journal.close()
        if self.error is not None:
            raise self.error
        return self.snapshot()

    def _loop(self, wake: socket.socket) -> None:
        next_flush = time.monotonic()
        while self.state == "running":
            due = min([next_flush] + [when for when, _ in self.timers])
            for key, _ in self.sel.select(max(0.0, due - time.monotonic())):
                kind, data = key.data
                if kind in ("listen", "conn"):
                    self._socket_event(key)
                elif kind == "exit":
                    self._drain()  # what it said before dying counts first
                    if self.state == "running":
                        node, process = data
                        self._exited(node, process, key.fd)
                elif kind == "signal":
                    wake.recv(64)
                    self._end("interrupted", InterruptedRun("interrupted; the run was stopped"))
                if self.state != "running":
                    break
            for when, node in sorted(self.timers):
                if when <= time.monotonic() and self.state == "running":
                    self.timers.remove((when, node))
                    self._start(node)
            if time.monotonic() >= next_flush:
                self._flush()
                next_flush = time.monotonic() + FLUSH_SECONDS

    # -- events in ---------------------------------------------------------------

    def _start(self, node: str) -> None:
        assert self.launcher is not None
        try:
            process = self.launcher.start(node, self.stage_overrides.get(node, []))
        except OSError as exc:
            raise RunError(f"cannot start the process of stage {node!r}: {exc}") from exc
        self.processes[node] = process
        pidfd = os.pidfd_open(process.pid)
        self.pidfds.add(pidfd)
        self.sel.register(pidfd, selectors.EVENT_READ, ("exit", (node, process)))

    def _socket_event(self, key: selectors.SelectorKey) -> None:
        kind, data = key.data
        if kind == "listen":
            try:
                sock, _ = data.accept()
            except BlockingIOError:  # taken already (by `_drain`, in the same round)
                return
            conn = _Conn(sock)
            self.accepted.append(conn)
            self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))
        else:
            self._read(data)

    def _drain(self) -> None:
        """Accept and read everything already waiting on the sockets."""
        while self.state == "running":
            ready = [key for key, _ in self.sel.select(0) if key.data[0] in ("listen", "conn")]
            if not ready:
                return
            for key in ready:
                self._socket_event(key)

    def _read(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return  # closed earlier in this round of events (its process exited)
        try:
            # Not blocking: `_drain` may have read what made it ready, in the same round.
            data = conn.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            messages = conn.reader.feed(data) if data else []
        except BlockingIOError:
            return
        except (OSError, protocol.Closed):
            data, messages = b"", []
        for message in messages:
            self._message(conn, message)
            if self.state != "running":
                return
        if not data:
            self.sel.unregister(conn.sock)
            conn.sock.close()
            # Our own processes' exits arrive as pidfd events; a container's only so.
            if self.launcher is None and conn.node and self.conns.get(conn.node) is conn:
                del self.conns[conn.node]
                self._feed(st.AgentExited(conn.node, None))

    def _message(self, conn: _Conn, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "swap":  # `podpipe swap`
            self._swap_request(conn, message)
            return
        if kind == "apply":  # `podpipe apply`
            self._apply_request(conn, message)
            return
        if kind == "broken" and conn.node is None and message.get("node") in self.swapped:
            self._broken(message["node"], message["message"])  # the new version
            return
        if kind == "broken":  # an agent could not start, for the user's input
            field = message.get("field")
            self._end("failed", SpecError(message["message"], file=self.pipeline.file,
                                          field=field) if field else
                      InputError(message["message"]))
            return
        if kind == "probe":  # a startup probe: the conductor is up
            protocol.send(conn.sock, {"type": "ready"})
            return
        if kind == "hello":
            node = message["node"]
            expected = self.processes if self.launcher is not None else self.stats
            if node not in expected or node in self.conns:
                conn.sock.close()
                return
            conn.node = node
            self.conns[node] = conn
            self.pids[node] = int(message.get("pid") or 0)
            self.versions[node] = message.get("version", "")
            self._feed(st.AgentReady(node))
            if node in self.swapped:
                self._answer_swap(node, {"type": "swapped", "stage": node,
                                         "version": self.versions[node],
                                         "pid": self.pids[node]})
            return
        node = conn.node
        if node is None or self.conns.get(node) is not conn:
            return  # not an agent, or one replaced by a swap
        batch = int(message.get("batch") or 0)
        if kind == "reserve":
            self._feed(st.SpaceRequested(node, batch, int(message["nbytes"])))
        elif kind == "done":
            self._count(node, message.get("stats", {}))
            out = message.get("output")
            output = st.Output(**out) if out else None
            self._record(node, batch, output)
            self._feed(st.TaskDone(node, batch, output))
        elif kind == "failed" and node in self.swapped:
            self._broken(node, f"batch {batch}: {message['message']}")
        elif kind == "failed":
            self._feed(st.TaskFailed(node, batch, message["message"],
                                     bool(message.get("input_error"))))

    def _exited(self, node: str, process: Process, pidfd: int) -> None:
        self.sel.unregister(pidfd)
        self.pidfds.discard(pidfd)
        os.close(pidfd)
        returncode = process.wait()
        if process.pid in self.retired:  # replaced by a swap: expected to go
            return
        conn = self.conns.pop(node, None)  # a restarted process says hello anew
        if conn is not None and conn.sock.fileno() >= 0:
            self.sel.unregister(conn.sock)
            conn.sock.close()
        if node in self.swapped:  # a swapped-in version died: hold it, do not fail
            self._broken(node, f"its process exited (code {returncode})")
            return
        self._feed(st.AgentExited(node, returncode))

    def _record(self, node: str, batch: int, output: st.Output | None) -> None:
        """Journal what finished; copy to the node tier what a resume would need (what
        a reduce reads, and what runs once): the rest is cheaper to recompute."""
        version = self.versions.get(node, "")
        self.journal.finished(node, batch, version)
        counts = self.version_counts[node]
        counts[version] = counts.get(version, 0) + 1
        self.made_by[(node, batch)] = version
        if batch in self.previously.get(node, ()):
            self.recomputed[node] += 1
        if output is not None:
            self.journal.stored(Copy(node, batch, "ram", output.path, output.nbytes,
                                     output.rows, output.checksum))
            if output.tier == "node":  # spilled: on the node tier already
                copy = Copy(node, batch, "node", output.path, output.nbytes, output.rows,
                            output.checksum)
                self.journal.stored(copy)
                self.on_disk.append(copy)
            elif node in self.keep:
                self.node_tier.submit(node, batch, output.path, output.nbytes, output.rows,
                                      output.checksum)

    def _count(self, node: str, stats: dict[str, Any]) -> None:
        s = self.stats[node]
        s.rows_in += stats.get("rows_in", 0)
        s.rows_out += stats.get("rows_out", 0)
        s.busy += stats.get("busy", 0.0)
        s.bytes_read += self.reading.pop(node, 0)
        s.bytes_written += stats.get("bytes_out", 0)
        s.reused += stats.get("reused", 0)

    # -- actions out --------------------------------------------------------------

    def _feed(self, event: st.Event) -> None:
        self._carry_out(self.engine.handle(event))
        for node in list(self.swaps):
            if not isinstance(event, (st.AgentReplaced, st.StageBroken)):
                self._maybe_replace(node)  # (SwapRequested too: it may be idle now)

    def _carry_out(self, actions: list[st.Action]) -> None:
        for action in actions:
            if isinstance(action, st.Dispatch):
                self._dispatch(action)
            elif isinstance(action, st.Grant):
                self._send(action.node, {"type": "grant"})
            elif isinstance(action, st.Deny):
                self._send(action.node, {"type": "deny"})
            elif isinstance(action, st.Delete):
                try:
                    os.unlink(action.path)
                except FileNotFoundError:
                    pass
            elif isinstance(action, st.Spill):
                batch = self.engine.agents[action.node].batch or 0
                path = tiers.path_for(self.run_dir, action.node, batch)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._log(f"RAM budget full: stage {action.node!r} batch {batch} spills to "
                          f"the node tier ({path})")
                self._send(action.node, {"type": "grant", "path": str(path), "tier": "node"})
            elif isinstance(action, st.Restart):
                self._log(f"restarting stage {action.node!r} (restart {action.attempt}) "
                          f"in {action.delay:.1f} s")
                if self.launcher is not None:  # containers: the kubelet restarts them
                    self.timers.append((time.monotonic() + action.delay, action.node))
            elif isinstance(action, st.Forget):
                self.journal.forget(action.node, action.key)
                self.on_disk = [c for c in self.on_disk
                                if (c.node, c.batch) != (action.node, action.key)]
                self.made_by.pop((action.node, action.key), None)
            elif isinstance(action, st.Finished):
                self._end("succeeded", None)
            elif isinstance(action, st.Failed):
                error = action.error
                if isinstance(error, StageError) and error.stage in self.processes:
                    error.args = (f"{error.args[0]} (log: {self.processes[error.stage].log})",)
                self._end("failed", error)

    # -- swaps ---------------------------------------------------------------------

    def _swap_request(self, conn: _Conn, message: dict[str, Any]) -> None:
        """`podpipe swap`: check the new version, then replace the stage's process as
        soon as it is idle (at once with `now`); the answer goes back on `conn` once
        the new process says hello, or its version proves broken."""
        node = str(message.get("stage"))
        stages = [s.name for s in self.pipeline.stages]
        refuse = None
        if node not in stages:
            refuse = f"no stage {node!r} in this run; its stages are {stages}"
        elif self.launcher is None:
            refuse = ("this pod's stages are containers: swap them by patching the image "
                      "(podpipe swap RUN_DIR STAGE --image IMAGE --k8s prints the patch)")
        elif node in self.swaps:
            refuse = f"stage {node!r} is being swapped already"
        elif message.get("recompute") and self.graph.has_global and \
                self.placement.replicas > 1:
            refuse = ("--recompute in a run of several replicas with a global reduce is not "
                      "supported yet (the other pods' shards would need handing over again)")
        if refuse is None:
            overrides = [*self.stage_overrides.get(node, []), *message.get("overrides", [])]
            try:
                from podpipe.model import spec as specs

                specs.load(self.run_dir / "spec.yaml", [*self._base_overrides(), *overrides])
            except PodpipeError as exc:
                refuse = f"the new version is not valid: {exc}"
        if refuse is not None:
            protocol.send(conn.sock, {"type": "refused", "message": refuse})
            return
        self._log(f"swap of stage {node!r} requested: {' '.join(overrides)}")
        self.swaps[node] = _Swap(overrides, bool(message.get("now")), conn,
                                 bool(message.get("recompute")))
        self._feed(st.SwapRequested(node))  # no new task for it: replaced once idle

    def _base_overrides(self) -> list[str]:
        return list(self.launcher.where.overrides) if self.launcher is not None else []

    def _maybe_replace(self, node: str) -> None:
        """Carry out a requested swap once the stage is between batches (or at once
        with `now`: its batch is requeued and done again by the new version)."""
        swap = self.swaps.get(node)
        busy = self.engine.agents[node].status in (st.RUNNING, st.WAITING)
        if swap is None or swap.started or (busy and not swap.now):
            return
        swap.started = True
        old = self.processes.get(node)
        conn = self.conns.pop(node, None)
        self._feed(st.AgentReplaced(node))
        if old is not None and old.poll() is None:
            self.retired.add(old.pid)
            if conn is not None and not busy:
                self._send_to(conn, {"type": "stop"})
            else:
                old.signal(signal.SIGKILL)  # mid-batch: its output is never trusted
        self.stage_overrides[node] = swap.overrides
        self.swapped.add(node)
        if swap.recompute:  # what the old versions made is done again, and what follows
            self._log(f"recomputing what stage {node!r} had done: "
                      f"{len(self.engine.done[node])} batches")
            self._feed(st.Recompute(node))
        self._start(node)

    def _broken(self, node: str, message: str) -> None:
        """A swapped-in version failed: hold the stage until it is swapped again."""
        self._log(f"stage {node!r} held: the new version failed: {message}")
        conn = self.conns.pop(node, None)
        process = self.processes.get(node)
        if process is not None and process.poll() is None:
            self.retired.add(process.pid)
            if conn is not None:
                self._send_to(conn, {"type": "stop"})
        self._feed(st.StageBroken(node, message))
        self._answer_swap(node, {"type": "held", "stage": node, "message": message})

    def _answer_swap(self, node: str, message: dict[str, Any]) -> None:
        swap = self.swaps.pop(node, None)
        if swap is not None and swap.conn is not None:
            self._send_to(swap.conn, message)

    def _apply_request(self, conn: _Conn, message: dict[str, Any]) -> None:
        """`podpipe apply`: run the new spec from here on. Removed nodes stop, added
        ones start and run every key of theirs, changed ones are swapped; the rest
        goes on untouched."""
        from podpipe.model import change
        from podpipe.model import spec as specs

        refuse = None
        if self.launcher is None:
            refuse = ("this pod's stages are containers: render the new spec and apply the "
                      "manifests instead")
        elif self.graph.has_global and self.placement.replicas > 1:
            refuse = ("apply in a run of several replicas with a global reduce is not "
                      "supported yet")
        elif self.swaps:
            refuse = f"a swap of {sorted(self.swaps)} is in progress; apply once it is done"
        new_path = self.run_dir / ".spec.apply.yaml"
        if refuse is None:
            try:
                new_path.write_text(str(message.get("spec", "")))
                pipeline = specs.load(new_path, self._base_overrides())
                diff = change.diff(self.pipeline, pipeline)
            except PodpipeError as exc:  # named after the user's file, not our copy
                refuse = str(exc).replace(str(new_path), str(message.get("path", "")))
            except OSError as exc:
                refuse = f"cannot write {new_path}: {exc.strerror}"
        if refuse is not None:
            new_path.unlink(missing_ok=True)
            self._send_to(conn, {"type": "refused", "message": refuse})
            return
        self._log(f"apply: added {list(diff.added)}, removed {list(diff.removed)}, "
                  f"changed {list(diff.changed)}")
        for node in diff.removed:
            self._retire(node)
        os.replace(new_path, self.run_dir / "spec.yaml")  # what the run runs from now on
        graph = Graph.of(pipeline)
        self.pipeline, self.graph = pipeline, graph
        self.keep = set(graph.reduce_inputs()) | {
            n for n in graph.order if graph.domain[n] != BATCH and n not in graph.sinks}
        for node in diff.added:
            self.stats[node], self.version_counts[node] = _Stats(), {}
            self.recomputed[node] = 0
            self.scratch.output_dir(node).mkdir(exist_ok=True)
        self.engine.retries.update(retries(pipeline, graph))
        self._feed(st.Reshaped(graph))
        for node in diff.added:
            self._start(node)
        # Changed nodes, and swapped ones the spec now defines: a swap to the spec.
        swapped = [n for n in self.stage_overrides if n in graph.inputs and n not in diff.added]
        for node in sorted(set(diff.changed) | set(swapped)):
            self.stage_overrides.pop(node, None)
            self.swaps[node] = _Swap([], False, None)
            self._feed(st.SwapRequested(node))
        self._send_to(conn, {"type": "applied", "added": list(diff.added),
                             "removed": list(diff.removed), "changed": list(diff.changed),
                             "redo": len(set(self.engine.redo) | self.engine.stale)})

    def _retire(self, node: str) -> None:
        """Stop a node's process for good (removed by an apply)."""
        process = self.processes.pop(node, None)
        conn = self.conns.pop(node, None)
        self.timers = [(when, n) for when, n in self.timers if n != node]
        if process is None or process.poll() is not None:
            return
        self.retired.add(process.pid)
        if conn is not None and self.engine.agents[node].status == st.IDLE:
            self._send_to(conn, {"type": "stop"})
        else:
            process.signal(signal.SIGKILL)

    def _send_to(self, conn: _Conn, message: dict[str, Any]) -> None:
        try:
            protocol.send(conn.sock, message)
        except OSError:
            pass  # it went away

    def _dispatch(self, action: st.Dispatch) -> None:
        task: dict[str, Any] = {
            "type": "task", "batch": action.batch,
            "inputs": [[o.path for o in group] for group in action.inputs],
            "output": str(self.scratch.output_path(action.node, action.batch)),
        }
        if action.node == SOURCE:
            task["source"] = self.plan[action.batch].to_json()
        if self.pipeline.checkpoints.reuse and _kind(action.node, self.graph) != "sink" \
                and action.node != SOURCE:
            task["memo"] = self._memo(action)
        if action.node in self.graph.sinks:
            task["versions"] = self._versions_behind(action.node, action.batch)
        self.reading[action.node] = sum(o.nbytes for group in action.inputs for o in group)
        self._send(action.node, task)

    def _versions_behind(self, sink: str, key: int) -> dict[str, list[str]]:
        """The versions of the stages that made what `sink` writes for `key` (walked up
        the graph once per sink task, from the version recorded per output)."""
        versions: dict[str, set[str]] = {}
        todo, seen = list(self.engine.input_keys(sink, key)), set()
        while todo:
            node, k = todo.pop()
            if (node, k) in seen:
                continue
            seen.add((node, k))
            if _kind(node, self.graph) in ("stage", "reduce") and (node, k) in self.made_by:
                versions.setdefault(node, set()).add(self.made_by[(node, k)])
            todo.extend(self.engine.input_keys(node, k))
        return {stage: sorted(v) for stage, v in versions.items()}

    def _memo(self, action: st.Dispatch) -> str:
        """Where the output of this task is kept for reuse across runs: named by the
        stage, its version and the checksums of its inputs (what made it)."""
        made_by = [action.node, self.versions.get(action.node, "")]
        made_by += [o.checksum for group in action.inputs for o in group]
        key = hashlib.sha256("\0".join(made_by).encode()).hexdigest()[:32]
        url = (self.pipeline.checkpoints.durable or "").rstrip("/")
        return f"{url}/{self.pipeline.name}/memo/{action.node}/{key}.arrow"

    def _send(self, node: str, message: dict[str, Any]) -> None:
        try:
            protocol.send(self.conns[node].sock, message)
        except OSError:
            pass  # it died; its exit event, still queued, decides what happens

    def _end(self, state: str, error: PodpipeError | None) -> None:
        if self.state == "running":
            self.state, self.error = state, error

    def _stop_all(self) -> None:
        """Stop every agent: politely when idle, by signal when not, never waiting long.

        Containers are told to stop (and hold) only when the run succeeded: after a
        failure their connection just closes, they exit, and the kubelet restarts
        them to serve the restarted conductor's resume."""
        if self.launcher is not None or self.state == "succeeded":
            for node in self.conns:
                self._send(node, {"type": "stop"})
        if self.state != "succeeded":
            for process in self.processes.values():
                process.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in self.processes.values():
            if process.wait(timeout=max(0.0, deadline - time.monotonic())) is None:
                process.signal(signal.SIGKILL)  # it would not stop
                process.wait()
        if self.launcher is not None:
            self.launcher.close()
        for conn in self.accepted:
            conn.sock.close()

    # -- status ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        engine = self.engine
        processes = [{"role": "conductor", "stage": None, "pid": os.getpid(), "pod": self.pod,
                      "start": process_start(os.getpid())}]
        if self.launcher is not None:
            processes += [{"role": "stage", "stage": node, "pid": p.pid, "pod": self.pod,
                           "alive": p.returncode is None}
                          for node, p in self.processes.items()]
        else:  # containers: pids in their own namespaces, alive while connected
            processes += [{"role": "stage", "stage": node, "pid": pid, "pod": self.pod,
                           "container": node, "alive": node in self.conns}
                          for node, pid in self.pids.items()]
        stages = {}
        for node in self.graph.order:
            s = self.stats[node]
            stages[node] = {
                "kind": _kind(node, self.graph),
                "version": self.versions.get(node),
                "versions": self.version_counts[node],
                "held": engine.agents[node].broken,
                "batches_done": len(engine.done[node] & engine.keys(node)),
                "batches_total": engine.total(node),
                "rows_in": s.rows_in, "rows_out": s.rows_out,
                "busy_seconds": round(s.busy, 4),
                "bytes_written": s.bytes_written, "bytes_read": s.bytes_read,
                "restarts": engine.restarts[node],
                "restored": {tier: self.restored.get(node, {}).get(tier, 0)
                             for tier in ("ram", "node", "durable")},
                "recomputed": self.recomputed[node],
                "reused": s.reused,
            }
        return {
            "run_id": self.run_id, "pipeline": self.pipeline.name, "state": self.state,
            "error": str(self.error) if self.error else None,
            "run_dir": str(self.run_dir), "scratch": str(self.scratch.path),
            "started": self.started, "ended": self.ended,
            "elapsed_seconds": round((self.ended or time.time()) - self.started, 3),
            "budget_bytes": self.pipeline.memory, "scratch_bytes": engine.usage,
            "peak_scratch_bytes": engine.peak, "source_batches": len(self.plan),
            "spilled_outputs": engine.spills,
            "pod": {"ordinal": self.placement.ordinal, "replicas": self.placement.replicas,
                    "shards": engine.shards_here(), "waiting_for": engine.waiting_for()},
            "shards": self.placement.shards,
            "processes": processes, "stages": stages,
            "restore_notes": self.notes,
            "durable": self.durable.status() if self.durable else None,
            "node_tier": {"copies": self.copies,  # journaled
                          "errors": self.node_tier.errors[-5:]},
        }

    def _checkpoint(self) -> None:
        assert self.durable is not None
        groups = {durables.group_name(s): self.engine.complete(s)
                  for s in self.engine.shards_here()}
        if self.graph.has_global and self.placement.runs_global:
            groups[durables.group_name(None)] = self.engine.complete(None)
        self.durable.take(self.on_disk, {n: sorted(b) for n, b in self.engine.done.items()},
                          groups)

    def _last_checkpoint(self) -> None:
        """What a rescheduled pod would start from (a failed run), or what the other
        pods and a later rescaled run take over (a sharded run's finished shards). A
        pod whose shards a global reduce elsewhere reads must hand them over."""
        assert self.durable is not None
        if self.state != "succeeded":
            self._checkpoint()
            self.durable.close(wait=DURABLE_WAIT)
        elif self.placement.sharded:
            self._checkpoint()
            handover = self.graph.has_global and not self.placement.runs_global
            if not self.durable.close(wait=HANDOVER_WAIT if handover else DURABLE_WAIT) \
                    and handover:
                self.state = "failed"
                self.error = RunError(
                    f"pod {self.placement.ordinal}: its shards are done but could not be "
                    f"handed over to the pod of the global reduce through the durable tier "
                    f"{self.durable.url}: {self.durable.error or 'timed out'}; resume the run")
        else:
            self.durable.close(wait=0)

    def _import_shards(self) -> None:
        """A global reduce runs here: take the other pods' shard outputs it reads from
        their complete checkpoints on the durable tier."""
        waiting = self.engine.waiting_for()
        if not waiting or self.durable is None or \
                time.monotonic() - self.looked_for_shards < IMPORT_SECONDS:
            return
        self.looked_for_shards = time.monotonic()
        needed = [n for n in self.graph.reduce_inputs() if self.graph.domain[n] == SINGLE]
        for shard in waiting:
            found = durables.latest(self.durable.url, self.pipeline.name,
                                    self.durable.spec_digest, durables.group_name(shard))
            if found is None or not found.complete or found.shards != self.placement.shards \
                    or found.source_batches != len(self.plan):
                continue
            copies, notes = durables.fetch(found, self.run_dir, tiers.verified, needed)
            self.notes.extend(notes)
            for copy in copies:
                self._log(f"shard {shard}: {copy.node} imported from the durable tier")
                self._feed(st.Imported(copy.node, shard, st.Output(
                    copy.path, copy.nbytes, copy.rows, copy.checksum, "node")))

    def _log(self, message: str) -> None:
        """A line in the run's own log (RUN_DIR/logs/conductor.log)."""
        try:
            with open(self.run_dir / "logs" / "conductor.log", "a") as log:
                log.write(f"{time.strftime('%H:%M:%S')} {message}\n")
        except OSError:
            pass

    def _flush(self) -> None:
        for copy in self.node_tier.finished():
            self.journal.stored(copy)
            self.on_disk.append(copy)
            self.copies += 1
        self.journal.commit()
        if self.durable is not None and self.state == "running":
            if self.durable.due(len(self.on_disk)):
                self._checkpoint()
            self._import_shards()
        snapshot = self.snapshot()
        try:
            status.write(self.run_dir, snapshot)
        except OSError:
            pass  # the status file is a view; the run does not depend on it
        if self.observer is not None:
            self.observer(snapshot)


def _kind(node: str, graph: Graph) -> str:
    if node == SOURCE:
        return "source"
    if node in graph.sinks:
        return "sink"
    return "reduce" if node in graph.reduce else "stage"
