"""A standing line: one pod that stays up, warm, and takes one job after another.

`podpipe up` runs this process (detached, or in the terminal with `--foreground`;
either way under a supervisor that starts it again if it dies: `runs.upkeep`). It
starts every node's processes once and waits for each to say hello — imports
done, the stage modules loaded — then serves: jobs come as `submit` requests on its
socket, queue in order (each a file under `queue/`, so the queue outlives the
process; a job the line was running when its process died is resumed by the next),
and run one at a time, each with the conductor of a `podpipe run` over
the line's `Floor`: the same loop, the same warm processes, told of the job and
saying hello for it. A job is a run directory like any run's (journal, status,
logs, report, sink output); a failure is the job's, and the line takes the next.

Between jobs the line answers requests itself; during a job its conductor hands
the line's requests (a submit, a job's wait or stop, down) back to it through the
floor.

Reading this module, top to bottom: how a line is started (`Start`); the `Line`:
**up** (`open` lays it out and starts its processes, `warm` waits for them,
`_requeue` takes the queue it had), **serving** (`serve` takes jobs, `_idle` hears
what happens between them, `_request` the line's requests: `_submit`, `_resume`,
`_job_request`, `_swap`, a candidate dropped, and a peek between jobs refused), **a job** (`_run`
announces, plans and conducts it, `_over` says how it ended), **down** (`close`,
the record `_publish`ed). SIGINT/SIGTERM or `podpipe down` stop the running job
(resumable) and end the line: every process stopped, the scratch removed, queued
jobs kept in `queue/` for the next `up` of the line.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from podpipe.errors import (InputError, InterruptedRun, PodpipeError, RunError, SpecError,
                            UsageError)
from podpipe.model import spec as specs
from podpipe.model.graph import Graph
from podpipe.model.shards import Placement
from podpipe.runtime.conductor import Conductor, Floor
from podpipe.runtime.conductor.agents import Agents, Conn
from podpipe.runtime.conductor.processes import SPAWNED, Processes
from podpipe.runtime.conductor.run import workers
from podpipe.runtime.data import scratch as scratches
from podpipe.runtime.plumbing import files, logline, protocol, sockets
from podpipe.runtime.plumbing import loop as loops
from podpipe.runtime.rundir import layout as rundir, status
from podpipe.runtime.runs import following, lines, pod
from podpipe.runtime.runs.launcher import launcher as make_launcher
from podpipe.runtime.runs.origin import Origin
from podpipe.runtime.runs.warmth import Warmth

RECENT = 20  # jobs over that the line's record lists


@dataclass
class _Job:
    job: str
    run_path: Path
    overrides: list[str]
    pipeline: specs.Pipeline
    sinks: frozenset[str]  # where it writes: no other job on the line may
    queued_as: Path        # its file in queue/
    waiters: list[Conn] = field(default_factory=list)
    stop: bool = False


@dataclass(frozen=True)
class Start:
    """How a line is started (`podpipe up`): where it lives, its spec and overrides,
    its name, where it serves its metrics (`[ADDR:]PORT`, or none). A pod's line on
    Kubernetes (`podpipe conductor --standing`) has its RAM scratch in the pod's
    memory volume (`volume`), no supervisor but the kubelet, and with one container
    per node does not `launch` the processes: the kubelet starts them."""

    path: Path
    spec: str
    overrides: list[str]
    name: str
    metrics: str | None = None
    volume: Path | None = None
    launch: bool = True
    supervised: bool = True
    placement: Placement = Placement()  # the shards each job runs: the pod's


class Line:
    def __init__(self, start: Start) -> None:
        self.start = start
        self.pipeline = specs.load(start.spec, start.overrides)
        self.graph = Graph.of(self.pipeline)
        self.record = lines.LineRecord(
            name=start.name, pid=os.getpid(), start=scratches.process_start(os.getpid()),
            supervisor=os.getppid() if start.supervised else None, socket="",
            spec=os.path.abspath(start.spec), cwd=os.getcwd(), overrides=start.overrides,
            started=time.time())
        self.loop = loops.EventLoop()  # signals are events once it is entered
        self.queue: deque[_Job] = deque()
        self.running: _Job | None = None
        self.down = False
        self.broken: PodpipeError | None = None  # a process that could not start
        self.warmth = Warmth(self.pipeline)  # what the next job may find set up, or loaded
        self._seq = 0

    @property
    def path(self) -> Path:
        """Where the line lives."""
        return self.start.path

    # -- up ----------------------------------------------------------------------

    def open(self) -> set[str]:
        """Lay out the line, start its processes; their names (`warm` waits for them)."""
        files.private_dirs(self.path / "queue")
        files.private_dirs(self.path / "logs")
        if (self.path / lines.RECORD).exists():  # the line before: what it did counts
            before = lines.read(self.path)
            self.record.jobs = before.jobs
            self.record.jobs.running = None
        self._publish()  # (starting)
        rundir.publish_spec(self.path, self.record.spec)
        if self.start.volume is not None:  # (what a conductor before left there goes)
            self.scratch = scratches.Scratch.at(self.start.volume)
        else:
            root = scratches.default_root()
            scratches.sweep(root)
            self.scratch = scratches.Scratch.create(f"line-{self.record.name}", root)
        self.record.socket = str(self.scratch.socket)
        listener = sockets.listen(self.scratch.socket)
        launcher = make_launcher(self.path / "spec.yaml", self.start.overrides,
                                 self.scratch.socket, self.path / "logs", self.record.name
                                 ) if self.start.launch else None
        agents = Agents(self.loop, listener, self._log)
        self.floor = Floor(self.loop, agents, Processes(launcher, self.loop), standing=True,
                           requests=self._request)
        if self.start.metrics:  # one endpoint for the line's life, lent to each job
            from podpipe.runtime.conductor.metrics import Metrics

            self.floor.metrics = Metrics(self.start.metrics)
            self.floor.metrics.line = lambda: (
                self.record.name, len(self.queue), int(self.running is not None),
                self.record.jobs.done, self.record.jobs.failed)
        self.launcher = launcher
        agents.listen()
        counts = workers(self.pipeline, self.graph)
        self.names = {protocol.agent_name(node, worker) for node in self.graph.order
                      for worker in range(counts[node] or 1)}
        if launcher is not None:
            for name in sorted(self.names):
                self.floor.processes.begin(name)
        self._requeue()
        return set(self.names)

    def warm(self, expected: set[str]) -> None:
        """Wait until every process `expected` has said hello (its imports done); raise
        what stopped one from starting."""
        while not self.down and not expected <= set(self.floor.agents.nodes()):
            for happening in self.floor.loop.wait(None):
                self._idle(happening)
            if self.broken is not None:
                raise self.broken
        self.record.state = "up"
        self._publish()

    def _requeue(self) -> None:
        """Jobs a line of this name had queued when it went down: queued again."""
        runs = (Path(self.pipeline.checkpoints.node) / "runs").absolute()
        for entry in sorted((self.path / "queue").iterdir()):
            seq, _, job = entry.name.partition("-")
            if not seq.isdigit():
                continue  # (a file being written when the line went)
            self._seq = max(self._seq, int(seq) + 1)
            try:
                run_path = Path(files.read_ours(entry).decode())
                if run_path.parent != runs or run_path.name != job:  # (its own, no other)
                    raise UsageError(f"names {run_path}, not a run directory in {runs}")
                recorded = rundir.read(run_path)
                pipeline = specs.load(run_path / "spec.yaml", recorded.overrides)
            except (OSError, files.NotOurs, PodpipeError) as exc:
                self._log(f"{entry.name}: not queued again ({exc})", "warning")
                entry.unlink(missing_ok=True)
                continue
            rundir.lock(run_path)
            self.queue.append(_Job(run_path.name, run_path, recorded.overrides, pipeline,
                                   _sinks(pipeline), entry))

    # -- serving -------------------------------------------------------------------

    def serve(self) -> None:
        """Take jobs until down."""
        while not self.down:
            if self.queue:
                self._run(self.queue.popleft())
                continue
            for happening in self.floor.loop.wait(None):
                self._idle(happening)

    def _idle(self, happening: loops.Happening) -> None:
        """Between jobs (or while warming up): what happened, answered by the line."""
        agents, processes = self.floor.agents, self.floor.processes
        if isinstance(happening, loops.Ready):
            if happening.tag == SPAWNED:
                return processes.settle()
            for conn, message in agents.read(happening.tag):
                if message is None:
                    agents.forget(conn)
                elif isinstance(message, protocol.Hello):
                    name = protocol.agent_name(message.node, message.worker)
                    agents.hello(conn, message, expected=processes.expects(name)
                                 if processes.local else name in self.names)
                elif isinstance(message, protocol.Broken):
                    self.broken = (SpecError(message.message, file=self.record.spec,
                                                   field=message.field)
                                   if message.field else InputError(message.message))
                elif isinstance(message, protocol.Probe):
                    agents.answer_probe(conn, message)
                else:
                    self._request(conn, message)
        elif isinstance(happening, loops.ProcessExited):
            if processes.exited(happening.pid, happening.tag) is not None:
                agents.drop(happening.tag)  # started again for the next job
                if self.record.state == "starting" and self.broken is None:
                    self.broken = RunError(f"{happening.tag} exited while the line started; "
                                           f"see {self.path / 'logs' / happening.tag}.log")
        elif isinstance(happening, loops.Signalled):
            self.down = True

    def _request(self, conn: Conn, message: protocol.Message) -> bool:
        """A request that is the line's: answered here (True), else the job's (False)."""
        if isinstance(message, (protocol.SubmitRequest, protocol.ResumeRequest)):
            try:
                job = self._submit(message) if isinstance(message, protocol.SubmitRequest) \
                    else self._resume(message)
            except PodpipeError as exc:
                self.floor.agents.answer(conn, protocol.Refused(message=str(exc)))
                return True
            self.floor.agents.answer(conn, protocol.Submitted(job=job.job, run_dir=str(
                job.run_path), ahead=len(self.queue) - 1 + (self.running is not None)))
            if message.wait:
                job.waiters.append(conn)
        elif isinstance(message, protocol.JobRequest):
            self._job_request(conn, message)
        elif isinstance(message, protocol.SwapRequest) and self.running is None:
            self._swap(conn, message)  # (during a job: its conductor's, then the line's)
        elif isinstance(message, protocol.ShadowRequest) and message.stop and not self.running:
            self.floor.drop_candidate(conn, message.stage)  # (kept for the next jobs)
        elif isinstance(message, (protocol.PeekRequest, protocol.ShadowRequest,
                                  protocol.PromoteRequest)) and self.running is None:
            self.floor.agents.answer(conn, protocol.Refused(message="no job is running on "
                                     "the line (peek, shadow, promote: the running job's)"))
        elif isinstance(message, protocol.DownRequest):
            self.floor.agents.answer(conn, protocol.Downed(dropped=[j.job for j in self.queue],
                                     stopped=[self.running.job] if self.running else []))
            self.down = True
            if self.running is not None:
                self.floor.interrupt = "the line went down"
        else:
            return False
        return True

    def _submit(self, request: protocol.SubmitRequest) -> _Job:
        lines.job_overrides(request.overrides)
        overrides = [*self.start.overrides, *request.overrides]
        pipeline = specs.load(self.path / "spec.yaml", overrides)
        graph = Graph.of(pipeline)
        if graph.order != self.graph.order or graph.inputs != self.graph.inputs:
            raise UsageError("the job's --set changes the graph; the graph is the line's")
        sinks = _sinks(pipeline)
        for other in self._jobs:
            if other.sinks & sinks:
                raise UsageError(f"job {other.job}, on the line already, writes to "
                                 f"{', '.join(sorted(other.sinks & sinks))} too: give this "
                                 "job other sink folders (--set sinks.NAME.uri=...)")
        run_path = lines.job_dir(pipeline, request.job)
        rundir.make(run_path, str(self.path / "spec.yaml"), overrides,
                    placement=self.start.placement, line=str(self.path.absolute()))
        rundir.lock(run_path)
        return self._enqueue(run_path, overrides, pipeline)

    def _enqueue(self, run_path: Path, overrides: list[str],
                 pipeline: specs.Pipeline) -> _Job:
        """The job at `run_path` last in the queue, and its file in queue/ (what the
        line's next `up` finds, and `status LINE` lists)."""
        queued_as = self.path / "queue" / f"{self._seq:08d}-{run_path.name}"
        self._seq += 1
        files.publish(queued_as, str(run_path))
        entry = _Job(run_path.name, run_path, overrides, pipeline, _sinks(pipeline),
                     queued_as)
        self.queue.append(entry)
        return entry

    @property
    def _jobs(self) -> list[_Job]:
        """The running job and those queued."""
        return [*([self.running] if self.running else []), *self.queue]

    def _resume(self, request: protocol.ResumeRequest) -> _Job:
        """A failed or stopped job of this line, queued again: it redoes only what it
        did not keep (its journal, the node tier), as `podpipe resume` does."""
        run_path = Path(request.run_dir)
        if any(j.run_path == run_path for j in self._jobs):
            raise UsageError(f"{run_path}: the job is on the line already")
        recorded = rundir.read(run_path)
        if recorded.line != str(self.path.absolute()):
            raise UsageError(f"{run_path}: not a job of line {self.record.name}")
        rundir.claim_for_resume(run_path)  # (refused if it succeeded; locked from here)
        try:
            pipeline = specs.load(run_path / "spec.yaml", recorded.overrides)
            return self._enqueue(run_path, recorded.overrides, pipeline)
        except BaseException:
            rundir.unlock(run_path)
            raise

    def _job_request(self, conn: Conn, request: protocol.JobRequest) -> None:
        """Wait for a job (answered once it is over), or stop it."""
        found = next((j for j in self._jobs if str(j.run_path) == request.run_dir), None)
        if found is None:  # over already: its status says how
            try:
                current = rundir.status_of(Path(request.run_dir))
            except UsageError as exc:
                self.floor.agents.answer(conn, protocol.Refused(message=str(exc)))
                return
            self.floor.agents.answer(conn, protocol.JobOver(
                job=current.run_id, run_dir=request.run_dir, state=current.state,
                error=current.error))
            return
        found.waiters.append(conn)
        found.stop = request.stop
        if request.stop and found is self.running:
            self.floor.interrupt = f"stopped; finish it with 'podpipe resume {found.run_path}'"
        elif request.stop:
            self.queue.remove(found)
            self._over(found, "interrupted", "stopped before it started")

    def _swap(self, conn: Conn, request: protocol.SwapRequest) -> None:
        """Between jobs: the stage runs its new version from the next job on."""
        swapped = [*self.floor.swapped.get(request.stage, []), *request.overrides]
        try:
            if request.stage not in {s.name for s in self.pipeline.stages}:
                raise UsageError(f"no stage {request.stage!r} on the line; its stages are "
                                 f"{[s.name for s in self.pipeline.stages]}")
            specs.load(self.path / "spec.yaml", [*self.start.overrides, *swapped])
        except PodpipeError as exc:
            self.floor.agents.answer(conn, protocol.Refused(message=str(exc)))
            return
        self.floor.swapped[request.stage] = swapped
        self._log(f"swap of stage {request.stage!r} from the next job: "
                  f"{' '.join(request.overrides)}")
        self.floor.agents.answer(conn, protocol.Swapped(stage=request.stage, version="",
                                                        pid=0, pending=True))

    # -- a job -----------------------------------------------------------------------

    def _run(self, job: _Job) -> None:
        self.running, self.record.jobs.running = job, job.job
        self._publish()
        state, error, started = "succeeded", None, time.time()
        self.floor.announce(job.run_path, job.overrides,  # they load it while we plan
                            self.warmth.unchanged(job.pipeline))
        self.floor.tables = self.warmth.offer(job.pipeline)
        # a job the line's process was running when it died: resumed from what it kept
        begun = (job.run_path / status.FILE).exists()
        origin = Origin(journal=True, source_batches=status.read(job.run_path).source_batches
                        ) if begun else Origin(durable=True)
        conductor = None
        try:
            run, restored, tier = pod.prepare(
                job.pipeline, job.run_path, job.overrides, job.job, self.record.name, self.scratch,
                origin=origin, placement=self.start.placement, fresh=not begun,
                memos=self.path)
            following.mark_latest(job.run_path)
            conductor = Conductor(run, launcher=self.launcher, restored=restored, durable=tier,
                                  floor=self.floor)
            conductor.start()
        except InterruptedRun as exc:
            state, error = "interrupted", str(exc)
            if self.floor.interrupt is None:  # a signal: the line goes down too
                self.down = True
        except PodpipeError as exc:
            state, error = "failed", str(exc)
            if not (job.run_path / status.FILE).exists():  # it never started
                rundir.failed_before_start(job.run_path, error)
        finally:  # what it had in RAM goes, but its tables: the next job's if unchanged
            self.scratch.clear(keep=frozenset(self.warmth.tables) if conductor is None else
                               self.warmth.keep(job.pipeline, conductor.ledger.outputs, {
                                   n: s.version for n, s in conductor.counters.stages.items()
                                   if s.version is not None}))
        self.floor.interrupt = None
        self.running = self.record.jobs.running = None
        self._over(job, state, error, time.time() - started)

    def _over(self, job: _Job, state: str, error: str | None,
              seconds: float | None = None) -> None:
        rundir.unlock(job.run_path)
        if state != "interrupted" or job.stop:  # (one the line's end stopped stays queued:
            job.queued_as.unlink(missing_ok=True)  # the line's next `up` goes on with it)
        self.record.jobs.recent = [*self.record.jobs.recent, lines.JobRow(
            job=job.job, run_dir=str(job.run_path), state=state, error=error,
            seconds=None if seconds is None else round(seconds, 4))][-RECENT:]
        self.record.jobs.done += state == "succeeded"
        self.record.jobs.failed += state == "failed"
        for conn in job.waiters:  # (its status is final: written as its conductor ended)
            self.floor.agents.answer(conn, protocol.JobOver(
                job=job.job, run_dir=str(job.run_path), state=state, error=error))
        self._log(f"job {job.job} {state}" + (f": {error}" if error else ""),
                  "info" if state == "succeeded" else "warning")
        self._publish()

    # -- down --------------------------------------------------------------------------

    def close(self) -> None:
        """Every process stopped, the scratch removed; queued jobs stay in queue/."""
        floor = getattr(self, "floor", None)
        if floor is not None:
            for name in floor.agents.nodes():
                floor.agents.send(name, protocol.Stop())
            floor.processes.stop_all(terminate=False, told=floor.agents.nodes())
            floor.agents.close()
            if floor.metrics is not None:
                floor.metrics.close()
        for job in self.queue:
            rundir.unlock(job.run_path)
        if hasattr(self, "scratch"):
            self.scratch.remove()
        self.record.state, self.record.processes = "down", {}
        self._publish()

    def _publish(self) -> None:
        self.record.jobs.queued = [j.job for j in self.queue]
        if self.record.state != "down" and hasattr(self, "floor"):  # its warm processes
            agents = self.floor.agents
            self.record.processes = {n: pid for n, pid in sorted(agents.pids.items())
                                     if agents.connected(n)}
        self.record.tables = {name: version for name, (_, version, _) in
                              self.warmth.tables.items()}
        try:
            lines.write(self.path, self.record)
        except OSError as exc:
            self._log(f"cannot write {self.path / lines.RECORD}: {exc}", "warning")

    def _log(self, message: str, level: str = "info") -> None:
        logline.append(self.path / "logs" / "line.log", message, level)


def _sinks(pipeline: specs.Pipeline) -> frozenset[str]:
    """Where a job's sinks write, as comparable as the spec lets them be."""
    return frozenset(s.uri if "://" in s.uri else os.path.abspath(s.uri) + "/"
                     for s in pipeline.sinks)
