"""`podpipe shadow` and `promote`: a stage's candidate version run beside the live one.

A candidate is one more process of the stage that the engine never hears of
(`protocol.shadow_name`, `stage.shadow` on the other end): started here with the
candidate's overrides, or — in a pod of containers — an ephemeral container added
to the pod, awaited. Each batch the live version makes while it is up (every
`every`th) is offered to it once the live task is done: the batch's inputs and the
live output are opened here and passed to it open (`send_fds`), and held
(`ScratchWork.hold`), so that the run neither empties nor writes over them while it
maps them. It answers how its output compared with the live one's (`Compared`), or
that it failed. The run never waits for it:

- a batch is skipped when the candidate is `QUEUE` batches behind, or when the files
  it would hold open, with its output, do not fit in what the RAM budget has left
  (`room`); under pressure (the engine denies or spills an output) the batches
  waiting for it are dropped first (`pressure`), recorded as skipped;
- a candidate that fails a batch is recorded; one over the stage's `timeout` is
  killed and started again, as is one that dies, `MOST_DEATHS` times at most (a
  container is never started again: given up);
- it runs at the lowest priority (`stage.shadow`: idle class, nice 19, its autogroup).

Reading it, top to bottom: **requests** (`request`: start or stop, `_refused` says
why not; `promote`, a swap to it; `again`, a line's candidates for the job it
runs them beside, its oldest;
`_start`, `stop`); **the candidate's process** (`heard`: its hello, its answers, its
connection's end; `exited`, `timed_out`, then `_died` → started again or
`_give_up`); **the line's batches** (`dispatched` keeps a task's inputs, `offer`
opens and holds them with the live output, `_next` hands one over, `_done`,
`_let_go` and `_release` let go); **the end** (`statuses` for the status file,
`stop_all`, which returns the candidates a line starts again).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from podpipe.model.output import Output
from podpipe.model.pipeline import Pipeline, Stage
from podpipe.runtime.conductor.agents import Agents, Conn
from podpipe.runtime.conductor.processes import Processes
from podpipe.runtime.conductor.scratchwork import ScratchWork
from podpipe.runtime.data.scratch import Scratch
from podpipe.runtime.plumbing import logline, protocol
from podpipe.runtime.plumbing.loop import EventLoop
from podpipe.runtime.plumbing.protocol import shadow_name, shadow_of
from podpipe.runtime.rundir import status

QUEUE = 2        # batches waiting for a candidate at most (each holds its files open)
MOST_DEATHS = 3  # a candidate that died or hung this often is given up
KEPT = 10        # differences and failures the status keeps
Inputs = Sequence[Sequence[Output]]  # a task's, by input


@dataclass(frozen=True)
class ShadowTimeout:
    """A timer: the candidate of `node` is over the stage's timeout on its task `task`."""

    node: str
    task: int
    seconds: float


@dataclass
class _Offer:
    """A batch for a candidate: the open files of its inputs (`groups`: how many of
    them each input has) and of the live output, last."""

    batch: int
    groups: list[int]
    fds: list[int]
    paths: list[str]  # their files' (held: `ScratchWork.hold`)
    nbytes: int  # the files held open, and as much again for its output


@dataclass
class _Candidate:
    status: status.ShadowStatus
    process: list[str]        # the overrides its process runs with
    timeout: float | None     # the stage's
    asked_by: Conn | None     # answered once it says hello (or cannot start)
    conn: Conn | None = None
    seen: int = 0             # batches the live version made since it came up
    tasks: int = 0            # handed to it (a timer's identity)
    busy: _Offer | None = None
    queue: deque[_Offer] = field(default_factory=deque)
    deaths: int = 0

    @property
    def live(self) -> bool:
        return self.status.state in ("starting", "running")


class Shadows:
    def __init__(self, scratch: Scratch, agents: Agents, processes: Processes,
                 loop: EventLoop, files: ScratchWork, log: logline.Log) -> None:
        self._scratch, self._agents, self._processes = scratch, agents, processes
        self._loop, self._files, self._log = loop, files, log
        self._by_node: dict[str, _Candidate] = {}
        self._inputs: dict[tuple[str, int], Inputs] = {}  # the live stage's tasks
        self._held = 0  # bytes of the files offered to candidates, still open

    # -- requests -------------------------------------------------------------------

    def request(self, conn: Conn | None, request: protocol.ShadowRequest, pipeline: Pipeline,
                version: Callable[[str, list[str]], list[str] | str]) -> None:
        """`podpipe shadow`: start a candidate of the stage, answered once it says
        hello (`Shadowing`); or stop it. `version(stage, overrides)`: the overrides
        that make that version of the stage (after those it was swapped with), or why
        it is not valid. `conn` None: a line's candidate, started again for its next
        job."""
        node = request.stage
        if request.stop and conn is not None:
            self._agents.answer(conn, protocol.Shadowing(stage=node, stopped=True)
                                if self.stop(node) else protocol.Refused(
                                    f"stage {node!r} has no candidate running"))
            return
        stage = next((s for s in pipeline.stages if s.name == node), None)
        refused = self._refused(request, stage, [s.name for s in pipeline.stages])
        process = refused if refused is not None else version(node, request.overrides)
        if (isinstance(process, str) or stage is None) and conn is not None:
            self._agents.answer(conn, protocol.Refused(str(process)))
        elif isinstance(process, str) or stage is None:
            self._log(f"the line's candidate of stage {node!r} does not run in this job: "
                      f"{process}", "warning")
        else:
            self._start(conn, request, process, stage.policy.timeout)

    def _refused(self, request: protocol.ShadowRequest, stage: Stage | None,
                 stages: list[str]) -> str | None:
        """Why this stage cannot have a candidate now."""
        node, running = request.stage, self._by_node.get(request.stage)
        if stage is None:
            return f"no stage {node!r} in this run; its stages are {stages}"
        if stage.call is not None:
            return (f"stage {node!r} calls a service: its candidate would send every "
                    "request again")
        if not self._processes.local and not any(o.startswith(f"stages.{node}.image=")
                                                 for o in request.overrides):
            return ("this pod's stages are containers: give the candidate as an image "
                    "(--image IMAGE), and add its container to the pod (podpipe render "
                    f"... --shadow {node}=IMAGE prints the patch)")
        if request.every < 1:
            return f"--every must be at least 1, not {request.every}"
        if running is not None and running.live:
            return (f"stage {node!r} has a candidate already (stop it first: podpipe "
                    f"shadow RUN {node} --stop)")
        return None

    def promote(self, conn: Conn, node: str,
                swap: Callable[[Conn, protocol.SwapRequest], bool]) -> None:
        """`podpipe promote`: the candidate goes live from the next batch, by `swap`
        (answered as a swap is), recorded with how it compared; it stops."""
        candidate = self._by_node.get(node)
        if candidate is None or candidate.status.state != "running":
            self._agents.answer(conn, protocol.Refused(
                f"stage {node!r} has no candidate running (start one: podpipe shadow RUN "
                f"{node} --run MODULE:CALLABLE)"))
            return
        s = candidate.status
        if swap(conn, protocol.SwapRequest(stage=node, overrides=s.overrides)):
            self._log(f"promote of stage {node!r} to its candidate, version {s.version}: "
                      f"{s.compared} batches compared, {s.equal} equal, {s.differing} "
                      f"differing, {s.skipped} skipped, {s.failed} failed")
            self.stop(node, "promoted")

    def again(self, requests: dict[str, protocol.ShadowRequest], pipeline: Pipeline,
              version: Callable[[str, list[str]], list[str] | str]) -> None:
        """A line's job starts, or became its oldest (`jobs: N`): the candidates the
        line runs beside it, started for it."""
        for request in requests.values():
            self.request(None, request, pipeline, version)

    def _start(self, conn: Conn | None, request: protocol.ShadowRequest, process: list[str],
               timeout: float | None) -> None:
        node = request.stage
        (self._scratch.path / "shadow").mkdir(mode=0o700, exist_ok=True)
        self._by_node[node] = _Candidate(
            status.ShadowStatus(overrides=request.overrides, every=request.every),
            process, timeout, conn)
        self._log(f"shadow of stage {node!r} requested: {' '.join(request.overrides)}"
                  + (f" (every {request.every} batches)" if request.every > 1 else ""))
        if self._processes.local:
            self._processes.begin(shadow_name(node), process)
        elif conn is not None:  # its container, added to the pod, says hello
            self._by_node[node].asked_by = None
            self._agents.answer(conn, protocol.Shadowing(stage=node, pending=True))

    def stop(self, node: str, state: str = "stopped", *, standing: bool = True) -> bool:
        """End `node`'s candidate (False if it has none running): `state` says how.
        `standing`: its process is told to stop and let go of (a run that goes on, or a
        line's job); else the run's end stops it with the others."""
        candidate = self._by_node.get(node)
        if candidate is None or not candidate.live:
            return False
        candidate.status.state = state
        idle = candidate.conn is not None and candidate.busy is None  # (else killed)
        self._let_go(candidate, skipped=False)
        self._done(candidate)
        if candidate.asked_by is not None:
            self._agents.answer(candidate.asked_by, protocol.Refused(
                f"the candidate of {node!r} was {state} before it came up"))
            candidate.asked_by = None
        if idle and candidate.conn is not None and (standing or not self._processes.local):
            self._agents.answer(candidate.conn, protocol.Stop())  # (a container: it ends)
        if standing:
            self._processes.retire(shadow_name(node), kill=not idle)
        return True

    # -- the candidate's process ----------------------------------------------------

    def _hello(self, conn: Conn, hello: protocol.Hello) -> None:
        node = shadow_of(hello.node)
        candidate = self._by_node.get(node or "")
        if candidate is None or candidate.status.state != "starting" \
                or hello.protocol != protocol.PROTOCOL:
            return  # (a candidate stopped meanwhile: its connection ends with it)
        candidate.conn, candidate.status.state = conn, "running"
        candidate.status.version = hello.version
        self._log(f"shadow of stage {node!r} up: pid {hello.pid}, version {hello.version}")
        if candidate.asked_by is not None:
            self._agents.answer(candidate.asked_by, protocol.Shadowing(
                stage=node or "", version=hello.version, pid=hello.pid))
            candidate.asked_by = None

    def heard(self, conn: Conn, message: protocol.Message | None) -> bool:
        """What a candidate said (None: its connection closed); False if it is not a
        candidate's."""
        if isinstance(message, protocol.Hello) and shadow_of(message.node) is not None:
            self._hello(conn, message)
            return True
        if isinstance(message, protocol.Broken) and shadow_of(message.node) is not None:
            return self._broken(shadow_of(message.node) or "", message.message)
        node = next((n for n, c in self._by_node.items() if c.conn is conn), None)
        if node is None:
            return False
        candidate = self._by_node[node]
        busy = candidate.busy
        if message is None:  # a container's end (a process's: its exit says it)
            if not self._processes.local and candidate.live:
                self._died(node, candidate, "its container ended")
            return True
        if busy is None or getattr(message, "batch", None) != busy.batch:
            return True  # (of a batch it is no longer on)
        s = candidate.status
        if isinstance(message, protocol.Compared):
            s.compared += 1
            s.seconds = round(s.seconds + message.seconds, 6)
            if message.comparison.equal:
                s.equal += 1
            else:
                s.differing += 1
                if len(s.differences) < KEPT:
                    s.differences.append(status.ShadowDifference(busy.batch,
                                                                 message.comparison))
                    self._log(f"shadow of stage {node!r}: batch {busy.batch} differs: "
                              f"{message.comparison.said()}", "warning")
        elif isinstance(message, protocol.Failed):
            self._failed(candidate, node, f"batch {busy.batch}: {message.message}")
        self._done(candidate)
        self._next(node, candidate)
        return True

    def _broken(self, node: str, message: str) -> bool:
        candidate = self._by_node.get(node)
        if candidate is not None and candidate.live:
            self._give_up(node, candidate, f"it could not start: {message}")
        return True

    def exited(self, name: str, code: int | None) -> None:
        """The candidate's process ended (`code` None: as it was told to)."""
        node = shadow_of(name) or ""
        candidate = self._by_node.get(node)
        if code is None or candidate is None or not candidate.live:
            return
        why = f"its process exited with code {code}"
        self._died(node, candidate, f"batch {candidate.busy.batch}: {why}"
                   if candidate.busy else why)

    def timed_out(self, timer: ShadowTimeout) -> None:
        candidate = self._by_node.get(timer.node)
        if candidate is None or candidate.busy is None or candidate.tasks != timer.task \
                or not candidate.live:
            return
        self._died(timer.node, candidate, f"batch {candidate.busy.batch}: timed out after "
                                          f"{timer.seconds:g} s (the stage's timeout)")

    def _died(self, node: str, candidate: _Candidate, why: str) -> None:
        """Its process is gone (or hung: ended): the batch it was on failed; started
        again, or given up."""
        self._processes.retire(shadow_name(node), kill=True)
        candidate.conn, candidate.deaths = None, candidate.deaths + 1
        if candidate.busy is not None:
            self._failed(candidate, node, why)
            self._done(candidate)
        else:
            self._log(f"shadow of stage {node!r}: {why}", "warning")
        if not self._processes.local:  # an ephemeral container: never started again
            self._give_up(node, candidate, why)
            return
        if candidate.deaths >= MOST_DEATHS:
            self._give_up(node, candidate, f"{why}; it died or hung {candidate.deaths} "
                                           "times, and was given up")
            return
        candidate.status.state = "starting"
        self._let_go(candidate)
        self._processes.begin(shadow_name(node), candidate.process)

    def _give_up(self, node: str, candidate: _Candidate, why: str) -> None:
        candidate.status.error = why
        self._log(f"shadow of stage {node!r} failed: {why}", "warning")
        if candidate.asked_by is not None:
            self._agents.answer(candidate.asked_by, protocol.Refused(
                f"the candidate of {node!r} failed: {why}"))
            candidate.asked_by = None
        self.stop(node, "failed")

    def _failed(self, candidate: _Candidate, node: str, why: str) -> None:
        candidate.status.failed += 1
        if len(candidate.status.failures) < KEPT:
            candidate.status.failures.append(why)
            self._log(f"shadow of stage {node!r}: {why}", "warning")

    # -- the line's batches ---------------------------------------------------------

    def dispatched(self, node: str, batch: int, inputs: Inputs) -> None:
        """The live stage was handed `batch`: its inputs, to offer with its output."""
        candidate = self._by_node.get(node)
        if candidate is not None and candidate.live:  # (done once it is up: offered)
            self._inputs[(node, batch)] = inputs

    def offer(self, node: str, batch: int, live: Output | None,
              room: Callable[[int], bool]) -> None:
        """The live stage made `batch` (`live`: its output): the candidate's to
        compare, if it can take it now (else skipped). `room(n)`: do `n` more bytes fit
        in the RAM budget."""
        inputs = self._inputs.pop((node, batch), None)
        candidate = self._by_node.get(node)
        if candidate is None or candidate.status.state != "running" or live is None \
                or inputs is None:
            return
        candidate.seen += 1
        if (candidate.seen - 1) % candidate.status.every:
            return
        candidate.status.offered += 1
        files = [*(o for group in inputs for o in group), live]
        nbytes = sum(o.nbytes for o in files) + live.nbytes
        if len(files) > protocol.MOST_FDS or len(candidate.queue) >= QUEUE \
                or not room(self._held + nbytes):
            candidate.status.skipped += 1
            return
        fds: list[int] = []
        try:
            for output in files:
                fds.append(os.open(output.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
        except OSError:
            _close(fds)
            candidate.status.skipped += 1
            return
        paths = [output.path for output in files]
        for path in paths:
            self._files.hold(path)
        candidate.queue.append(_Offer(batch, [len(g) for g in inputs], fds, paths, nbytes))
        self._held += nbytes
        self._next(node, candidate)

    def pressure(self) -> None:
        """The line is short of RAM: the batches waiting for candidates go first."""
        for candidate in self._by_node.values():
            self._let_go(candidate)

    def _next(self, node: str, candidate: _Candidate) -> None:
        """Hand the candidate its next batch, if it is free."""
        if candidate.busy is not None or not candidate.queue or candidate.conn is None:
            return
        offer = candidate.queue.popleft()
        candidate.busy, candidate.tasks = offer, candidate.tasks + 1
        task = protocol.ShadowTask(batch=offer.batch, groups=offer.groups, output=str(
            self._scratch.path / "shadow" / f"{node}-{offer.batch}.arrow"))
        try:
            protocol.send_fds(candidate.conn.sock, task, offer.fds)
        except OSError:
            pass  # it went away: its exit says so
        _close(offer.fds)  # (it holds its own now)
        offer.fds = []
        if candidate.timeout is not None:
            self._loop.call_later(candidate.timeout, ShadowTimeout(node, candidate.tasks,
                                                                   candidate.timeout))

    def _done(self, candidate: _Candidate) -> None:
        """The batch the candidate was on is over: what it held is let go."""
        if candidate.busy is not None:
            self._release(candidate.busy)
            candidate.busy = None

    def _let_go(self, candidate: _Candidate, *, skipped: bool = True) -> None:
        """The batches waiting for the candidate are dropped."""
        while candidate.queue:
            self._release(candidate.queue.popleft())
            candidate.status.skipped += int(skipped)

    def _release(self, offer: _Offer) -> None:
        _close(offer.fds)
        for path in offer.paths:
            self._files.let_go(path)
        self._held -= offer.nbytes

    # -- what the status shows ------------------------------------------------------

    def statuses(self) -> dict[str, status.ShadowStatus]:
        return {node: c.status for node, c in self._by_node.items()}

    def stop_all(self, *, standing: bool) -> dict[str, protocol.ShadowRequest]:
        """The run (or a line's job) is over: every candidate stops with it. Those
        that were running: for a line to start again beside its next job (a process's;
        a container added to the pod ends with the job)."""
        going = {node: protocol.ShadowRequest(stage=node, overrides=c.status.overrides,
                                              every=c.status.every)
                 for node, c in self._by_node.items() if c.live and self._processes.local}
        for node in list(self._by_node):
            self.stop(node, standing=standing)
        self._inputs.clear()
        return going


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
