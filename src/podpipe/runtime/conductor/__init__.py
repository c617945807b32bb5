"""The conductor: the per-pod process that owns the run. It never touches batch data.

It starts each node's agents, one per worker (in a Kubernetes pod the kubelet starts
them as containers), accepts their connections on a Unix socket in RAM scratch, and
blocks on events only (`plumbing.loop`). One event, start to end:

    socket bytes -> protocol.Reader (typed message) -> _from_agent -> events queue
    events queue -> engine.handle (one at a time) -> actions -> _carry_out
    _carry_out -> a grant, a task handed out, a file freed, a process replaced, ...

An event is never fed to the engine while the previous one's actions are carried out.

Reading this module, top to bottom: **its life** (`start`: `open`, the floor's loop
`drive`s it, `leave`, `end`; a line drives several, `runs.line.conducting`);
**what happens** (`happened`: sockets, exits, signals, timers; `_pump` feeds the
engine); **what agents say** (`heard`, `_message`: requests, hellos, `_from_agent`:
a task's end judged by `checkpoints`, offered to a candidate); **what the engine
decides** (`_carry_out`, `_dispatch`); **swaps and apply**; **the end** (`stop`,
`_end`, the status `flush`ed). Its pieces, each owning its state: `agents`,
`processes`, `crew` and `scratchwork`, `requests` (`swaps`, `lending`, `shadows`),
`checkpoints`, `snapshot`, `timeline`, `metrics`, `run`, `floor`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from dataclasses import replace
from typing import Callable, assert_never

from podpipe.engine import events as ev
from podpipe.engine.events import Progress
from podpipe.engine.ledger import Ledger
from podpipe.engine.state import RunState
from podpipe.errors import InterruptedRun, PodpipeError, RunError, StageError
from podpipe.model.graph import Graph
from podpipe.runtime.plumbing import lifetime, logline, loop as loops, protocol
from podpipe.runtime.rundir import status
from podpipe.runtime.conductor.requests import lending
from podpipe.runtime.conductor.agents import Conn, to_event
from podpipe.runtime.conductor.checkpoints import Checkpoints, Restored
from podpipe.runtime.conductor.crew import Crew
from podpipe.runtime.conductor.floor import FLUSH_SECONDS, Floor
from podpipe.runtime.conductor.metrics import Watchers
from podpipe.runtime.conductor.processes import SPAWNED, Processes
from podpipe.runtime.plumbing.launching import Launcher
from podpipe.runtime.conductor.run import Run, Timeout, cpus, gpu_caps, retries, workers
from podpipe.runtime.conductor.scratchwork import ScratchWork
from podpipe.runtime.conductor.snapshot import Counters, snapshot
from podpipe.runtime.conductor.requests.shadows import Shadows, ShadowTimeout
from podpipe.runtime.conductor.requests.swaps import Change, Swaps
from podpipe.runtime.conductor.timeline import Timeline
from podpipe.runtime.storage.durable import DurableTier
from podpipe.runtime.plumbing.protocol import agent_name, split_name

__all__ = ["FLUSH_SECONDS", "Conductor", "Floor", "Restored", "Run"]


class Conductor:
    def __init__(self, run: Run, *, launcher: Launcher | None,
                 observer: Callable[[status.Status], None] | None = None,
                 restored: Restored | None = None,
                 durable: DurableTier | None = None, reaper: bool = True,
                 metrics: str | None = None, metrics_linger: float = 0.0,
                 listener: socket.socket | None = None, floor: Floor | None = None) -> None:
        """`floor`: a standing line's (its loop, processes, connections), else its own."""
        self.run = run
        logline.speaking_for(run=run.run_id)
        self.engine = restored.engine if restored else RunState(
            run.graph, len(run.plan), run.pipeline.memory,
            retries=retries(run.pipeline, run.graph), shards=run.placement.shards,
            owned=run.placement.owned, global_here=run.placement.runs_global,
            workers=workers(run.pipeline, run.graph), cpus=cpus(run.pipeline))
        if launcher is None:  # containers: one per node, started by the kubelet
            self.ledger.in_containers(run.pipeline.container_cpus)
        self.ledger.pool.caps.update(gpu_caps(run.pipeline, containers=launcher is None))
        self.floor = floor or Floor.of_run(launcher, listener, reaper, self._log)
        self.agents, self.processes = self.floor.agents, self.floor.processes
        self.swaps = Swaps(run.run_dir, run.overrides, self.agents, self.floor.swapped)
        self.crew = Crew(self.processes, self.agents, self.floor.loop, self.swaps, self._log)
        self.checkpoints = Checkpoints(run.run_dir, durable, restored, self._log, run.pipeline)
        self.counters = Counters(run.graph)
        self.timeline = Timeline(run.run_dir, self.counters.started)
        self.scratch_work = ScratchWork(run.scratch, run.run_dir, self.agents, self.timeline,
                                        lambda node: node in self.run.graph.tables, self._log)
        self.shadows = Shadows(run.scratch, self.agents, self.processes, self.floor.loop,
                               self.scratch_work, self._log)
        self.watchers = Watchers(run.run_id, observer, metrics, metrics_linger,
                                 self.floor.metrics)
        self.events: deque[ev.Event] = deque()
        self.outcome: tuple[str, PodpipeError | None] = ("running", None)

    @property
    def ledger(self) -> Ledger:
        """What the engine knows, read between events."""
        return self.engine.ledger

    @property
    def running(self) -> bool:
        return self.outcome[0] == "running"

    # -- its life --------------------------------------------------------------

    def start(self) -> status.Status:
        """Run to the end in its own loop (a line drives its jobs'); the status, or raise."""
        try:
            # signals are events from here on (a line's loop has them already)
            with self.floor.loop if not self.floor.standing else contextlib.nullcontext():
                try:
                    self.open()
                    self.floor.drive(self.happened, self.flush, lambda: self.running)
                finally:
                    self.leave()
        except BaseException:
            self._wrap_up()
            raise
        return self.end()

    def open(self) -> None:
        """Its start: scratch folders, its processes started (a line's: taken)."""
        self.watchers.open()  # Prometheus, if asked: from the start
        for node in self.run.graph.order:
            self.run.scratch.make_output_dir(node)
        if not self.floor.standing:
            self.agents.listen()
        if self.ledger.finished:  # resumed when all was done: nothing to do
            return self._end("succeeded", None)
        if self.floor.standing:  # a line's warm processes: told of it
            self.floor.take(self.ledger)
        elif self.processes.local and self.processes.reaper:
            lifetime.become_subreaper()  # what stages leave is ours
        for node, worker, _ in self.ledger.all_agents() if self.processes.local else []:
            self.processes.begin(agent_name(node, worker))  # (warm ones: left alone)

    def leave(self) -> None:
        """The loop is over: every process stops (a line's stay, but the busy ones)."""
        self.floor.candidates = self.shadows.stop_all(standing=self.floor.standing)
        self.floor.swapped = dict(self.swaps.overrides)  # (a line's next jobs')
        self.floor.stop(self.ledger, succeeded=self.outcome[0] == "succeeded")

    def end(self) -> status.Status:
        """After `leave`: sinks' output put in place, records closed; the status, or raise."""
        try:
            if self.outcome[0] == "succeeded":
                try:
                    self.counters.sinks = self.run.finish_sinks(self.ledger.keys)
                except RunError as exc:
                    self.outcome = ("failed", exc)
        finally:
            self._wrap_up()
        if self.outcome[1] is not None:
            raise self.outcome[1]
        return self._snapshot()

    def _wrap_up(self) -> None:
        if not self.floor.standing:  # (a line sweeps it, keeping its tables)
            self.run.scratch.remove()
        self.counters.ended = time.time()
        self.timeline.sample(self.ledger.progress(), {}, {})
        self.timeline.close()
        error = self.checkpoints.close(self.ledger, self.run.graph, self.run.placement,
                                       self.outcome[0] == "succeeded")
        if error is not None:
            self.outcome = ("failed", error)
        self.flush(final=True)
        self.watchers.close()  # (after the final values: a lingering endpoint has them)

    def happened(self, happening: loops.Happening | None = None,
                 event: ev.Event | None = None) -> None:
        """What happened (a socket, an exit, a timer), or what a line tells its engine."""
        if happening is not None:
            self._happened(happening)
        if event is not None:
            self.events.append(event)
        self._pump()

    def _happened(self, happening: loops.Happening) -> None:
        if isinstance(happening, loops.Ready):
            self._read(happening.tag)
        elif isinstance(happening, loops.ProcessExited):
            self._drain()  # what it said before dying counts first
            returncode = self.processes.exited(happening.pid, happening.tag)
            if protocol.shadow_of(happening.tag) is not None:  # a stage's candidate
                self.shadows.exited(happening.tag, returncode)
            elif returncode is not None and self.running:
                self.agents.drop(happening.tag)  # a restarted process says hello anew
                self.timeline.ended(happening.tag, "lost")
                node, worker = split_name(happening.tag)
                self.events.append(ev.AgentExited(node, returncode, worker, time.monotonic()))
        elif isinstance(happening, loops.Signalled):
            self._end("interrupted", InterruptedRun(
                f"interrupted; finish the run with 'podpipe resume {self.run.run_dir}'"))
        elif isinstance(happening, loops.TimerDue) and self.running:
            if isinstance(happening.tag, Timeout):
                timeout = happening.tag
                if self.counters.tasks.get(timeout.agent) == timeout.task:
                    node, worker = split_name(timeout.agent)
                    self.events.append(ev.TaskTimedOut(node, timeout.batch, timeout.seconds,
                                                       worker, time.monotonic()))
            elif isinstance(happening.tag, ShadowTimeout):
                self.shadows.timed_out(happening.tag)
            else:  # a restart's backoff is over
                self.crew.due(happening.tag)

    def _drain(self) -> None:
        """Accept and read everything already waiting on the sockets."""
        while self.running and (ready := self.floor.loop.drain_ready()):
            for happening in ready:
                self._read(happening.tag)
                self._pump()

    def _pump(self) -> None:
        """Hand the queued events to the engine, one at a time, carrying out each one's
        actions before the next."""
        while self.events and self.running:
            for action in self.engine.handle(self.events.popleft()):
                self._carry_out(action)

    # -- what agents say -------------------------------------------------------

    def _read(self, tag: object) -> None:
        if self.floor.reader is not None:  # a line's: it reads, and says it to its jobs
            return self.floor.reader(tag)
        if tag == SPAWNED:
            return self.processes.settle()
        for conn, message in self.agents.read(tag):
            if not self.running:
                return
            self.heard(conn, message)

    def heard(self, conn: Conn, message: protocol.Message | None) -> None:
        """What `conn` said (None: it closed)."""
        if self.shadows.heard(conn, message):  # a stage's candidate said it (or went)
            return
        if message is None:  # closed: our own processes' exits come as exits
            name = self.agents.forget(conn)
            if name is not None and not self.processes.local:  # a container's
                node, worker = split_name(name)
                self.events.append(ev.AgentExited(node, None, worker, time.monotonic()))
        else:
            self._message(conn, message)

    def _message(self, conn: Conn, message: protocol.Message) -> None:
        if isinstance(message, protocol.SwapRequest):
            self._swap(conn, message)
        elif isinstance(message, protocol.ApplyRequest):
            self._apply(conn, message)
        elif isinstance(message, protocol.Probe):  # the conductor is up; that agent too?
            self.agents.answer_probe(conn, message)
        elif isinstance(message, protocol.PeekRequest):  # an output lent to a reader:
            lending.lend(self.agents, conn, self.ledger, message, self.checkpoints.made_by)
        elif isinstance(message, protocol.ShadowRequest):  # a candidate beside a stage
            self.shadows.request(conn, message, self.run.pipeline, self.swaps.version)
        elif isinstance(message, protocol.PromoteRequest):  # ... made live: a swap to it
            self.shadows.promote(conn, message.stage, self._swap)
        elif isinstance(message, protocol.Hello):
            self._hello(conn, message)
        else:
            # A process that could not start never said hello: it names its node.
            name = agent_name(message.node, message.worker) if isinstance(
                message, protocol.Broken) and message.node in self.run.graph.inputs \
                else self.agents.node_of(conn)
            if name is not None:  # (else not an agent, or one replaced by a swap)
                self._from_agent(name, message)

    def _from_agent(self, name: str, message: protocol.Message) -> None:
        """What agent `name` says of its task: counted and recorded, then an event."""
        if isinstance(message, protocol.Calling):
            self.counters.calling(name, message.in_flight)
            return
        event = to_event(name, message, self.run.pipeline.file)
        if event is None:
            return
        if isinstance(message, protocol.Done):  # its schema; its bytes, if made before
            message, event = self.checkpoints.judged(
                name, message, event, self.counters.stages[split_name(name)[0]].version)
        if isinstance(message, protocol.Done):
            version = self.counters.done(name, message.batch, message.stats)
            node = split_name(name)[0]
            self.checkpoints.record(node, message.batch, version, message.output)
            self.shadows.offer(node, message.batch, message.output, self.ledger.budget.fits)
            self.timeline.ended(name, "done", message.stats,
                                message.output.checksum if message.output else "")
            self.watchers.task_done(split_name(name)[0], message.stats.busy)
        elif isinstance(message, protocol.Reserve):
            self.timeline.asked(name)
        elif isinstance(message, protocol.Failed):
            self.counters.failed(name, message.calls)
            self.timeline.ended(name, "failed")
        self.events.append(event)

    def _hello(self, conn: Conn, hello: protocol.Hello) -> None:
        node = hello.node
        expected = (self.processes.expects(agent_name(node, hello.worker))
                    if self.processes.local else node in self.run.graph.inputs)
        if self.floor.standing and not self.floor.serves(conn, hello, self.run):
            return  # told of this job: it says hello again
        if not self.processes.local and (old := self.agents.stale(
                agent_name(node, hello.worker))) is not None:
            self._read(old)  # the container's end before its new hello (a restart)
        if not self.agents.hello(conn, hello, expected=expected):
            return
        before = self.counters.stages[node].version
        self.counters.hello(node, hello.version, hello.setup)
        self.timeline.setup(agent_name(node, hello.worker), hello.version, hello.setup)
        if not self.processes.local and before not in (None, hello.version):
            self._log(f"stage {node!r} came back as version {hello.version} (was {before})")
            self.events.append(self.swaps.image_updated(node))
        self.swaps.hello(node, hello.version, hello.pid)
        self._log(f"{agent_name(node, hello.worker)} connected: pid {hello.pid}, version "
                  f"{hello.version}", "debug")
        self.events.append(ev.AgentReady(node, hello.worker))

    # -- what the engine decides -----------------------------------------------

    def _carry_out(self, action: ev.Action) -> None:
        match action:
            case ev.Dispatch():
                self._dispatch(action)
            case ev.Grant() | ev.Deny() | ev.Delete() | ev.Recycle() | ev.Unpool() | ev.Spill():
                if isinstance(action, (ev.Deny, ev.Spill)):  # short of RAM: candidates
                    self.shadows.pressure()                  # let go first
                self.scratch_work.carry_out(action)  # RAM granted, denied, freed, spilled
            case ev.Keep():
                self.checkpoints.keep(action.output)
            case (ev.Restart() | ev.Kill() | ev.Replace() | ev.Stop() | ev.Hold() | ev.AddWorker()
                  | ev.RemoveWorker()):
                self.crew.carry_out(action)  # a process restarted, killed, replaced, ...
            case ev.Forget():
                self.checkpoints.forget(action.node, action.key)
            case ev.Finished():
                self._end("succeeded", None)
            case ev.Failed():
                error = action.error
                if isinstance(error, StageError) and self.processes.log(error.stage):
                    error.args = (f"{error.args[0]} (log: {self.processes.log(error.stage)})",)
                self._end("failed", error)
            case _:
                assert_never(action)

    def _dispatch(self, action: ev.Dispatch) -> None:
        node, run = action.node, self.run
        if self.scratch_work.reusable(action.reuse) != action.reuse:  # a candidate holds
            action = replace(action, reuse=None)  # that pooled file: written anew
        task, stage = run.task(action), run.stage(node)
        self.checkpoints.fill(task, run.pipeline, run.graph, self.ledger, node, stage,
                              self.counters.stages[node].version, action.inputs)
        name = agent_name(node, action.worker)
        self.shadows.dispatched(node, action.batch, action.inputs)
        nbytes = sum(o.nbytes for g in action.inputs for o in g)
        seq = self.counters.dispatched(node, name, action.batch, nbytes)
        self.timeline.handed(name, action.batch, self.counters.stages[node].version, nbytes)
        if action.reserved:  # granted with the task
            self.timeline.granted(name)
        seconds = stage.policy.timeout if stage is not None else None
        if seconds is not None:
            self.floor.loop.call_later(seconds, Timeout(name, action.batch, seq, seconds,
                                                        self.run.run_id))
        self.agents.send(name, task)

    # -- swaps and apply -----------------------------------------------------------

    def _swap(self, conn: Conn, request: protocol.SwapRequest) -> bool:
        said = self.swaps.check(request, self.run.pipeline, local=self.processes.local,
                                shared_global=self.run.shared_global)
        if said is not None:  # refused; or a container's new image is awaited
            self.agents.answer(conn, said)
            return isinstance(said, protocol.Swapped)
        self.swaps.asked_by(request.stage, conn)
        self._log(f"swap of stage {request.stage!r} requested: {' '.join(request.overrides)}")
        self.events.append(ev.SwapRequested(request.stage, request.now, request.recompute))
        return True

    def _apply(self, conn: Conn, request: protocol.ApplyRequest) -> None:
        """`podpipe apply`: run the new spec from here on. Removed nodes stop, added
        ones start and run every key of theirs, changed ones are swapped; the rest
        goes on untouched."""
        accepted = self.swaps.check_apply(request, self.run.pipeline,
                                          local=self.processes.local,
                                          shared_global=self.run.shared_global)
        if not isinstance(accepted, Change):
            self.agents.answer(conn, protocol.Refused(message=accepted))
            return
        diff, graph = accepted.diff, Graph.of(accepted.pipeline)
        self._log(f"apply: {accepted.said()}")
        self.run = replace(self.run, pipeline=accepted.pipeline, graph=graph)
        for node in diff.added:
            self.counters.add(node)
            self.run.scratch.make_output_dir(node)
        self.events.append(ev.Reshaped(graph, retries(accepted.pipeline, graph),
                                       workers(accepted.pipeline, graph)))
        self._pump()  # the engine knows the new graph before the new processes say hello
        for node in diff.added:
            for worker in range(self.ledger.worker_count(node)):
                self.processes.start(agent_name(node, worker), [])
        # Changed nodes, and swapped ones the spec now defines: a swap to the spec.
        swapped = [n for n in self.swaps.overrides if n in graph.inputs and n not in diff.added]
        for node in sorted(set(diff.changed) | set(swapped)):
            self.swaps.to_spec(node)
            self.events.append(ev.SwapRequested(node))
        self._pump()
        self.agents.answer(conn, accepted.applied(redo=self.ledger.to_redo()))

    # -- the end, and what it looks like --------------------------------------------

    def stop(self, why: str, error: PodpipeError | None = None) -> None:
        """A line stops its job (`stop JOB`, `down`; `error`: it could not start)."""
        self._end("failed", error) if error else self._end("interrupted", InterruptedRun(why))

    def _end(self, state: str, error: PodpipeError | None) -> None:
        if self.running:
            self.outcome = (state, error)
            self._log(f"the run {state}" + (f": {error}" if error else ""),
                      "info" if state == "succeeded" else "error")

    def _snapshot(self, progress: Progress | None = None) -> status.Status:
        state, error = self.outcome
        # containers: their pids are in their own namespaces, alive while connected
        processes = self.processes.infos(self.run.pod) if self.processes.local else \
            self.agents.infos(self.run.pod)
        return snapshot(self.run, progress or self.ledger.progress(), self.counters,
                        self.checkpoints, processes, state, str(error) if error else None,
                        self.shadows.statuses())

    def flush(self, final: bool = False) -> None:
        if not final:
            self.events.extend(self.checkpoints.flush(self.ledger, self.run.graph,
                                                      self.run.placement, len(self.run.plan)))
        cpu, rss = self.processes.usage() if not final else ({}, {})
        if not final and None in self.ledger.pool.fixed.values():  # containers: as told
            self.events.append(ev.Tick(Processes.per_node(self.processes.cpu_use()) if
                                       self.processes.local else self.counters.cpu_wanted()))
        progress = self.ledger.progress()
        if not final:
            self.timeline.sample(progress, cpu, rss)
            self.timeline.flush()
        current = self._snapshot(progress)
        try:
            status.write(self.run.run_dir, current)
        except OSError:
            pass  # the status file is a view; the run does not depend on it
        self.watchers.show(current)
        if not final:
            self._pump()

    def _log(self, message: str, level: str = "info") -> None:
        """A line in the run's own log (RUN_DIR/logs/conductor.log)."""
        logline.append(self.run.run_dir / "logs" / "conductor.log", message, level)
