"""A standing line: one pod that stays up, warm, and takes one job after another.

`podpipe up` runs this process (detached, or in the terminal with `--foreground`;
either way under a supervisor that starts it again if it dies: `runs.upkeep`). It
starts every node's processes once and waits for each to say hello — imports
done, the stage modules loaded — then serves: jobs come as `submit` requests on its
socket, queue in order (`queue`: files that outlive the process; a job the line was
running when its process died is resumed by the next), and run one at a time — or
`jobs: N` at once, each station passing to the next job once the one before is done
with it (`conducting`) — each with the conductor of a `podpipe run` over the line's
`Floor`: the same warm processes, told of the job and saying hello for it. A job is
a run directory like any run's (journal, status, logs, report, sink output); a
failure is the job's, and the line takes the next.

The line reads every socket: what a job's processes say goes to its conductor, the
line's requests (a submit, a job's wait or stop, down) are answered here.

Reading this module, top to bottom: how a line is started (`Start`); the `Line`:
**up** (`open` lays it out, starts its processes and queues again what it had,
`warm` waits for them), **serving** (`serve` starts jobs and routes what happens,
`_idle` and `_heard` what is no job's, `_request` the line's requests: `_submit`,
`_resume`, `_job_request`, `_swap`, a candidate dropped, and a peek between jobs
refused), **a job** (`_begin` announces, plans and starts it, `_finish` closes it,
`_sweep` its RAM scratch, `_over` says how it ended), **down** (`close`, the record
`_publish`ed). SIGINT/SIGTERM or `podpipe down` stop the running jobs (resumable)
and end the line: every process stopped, the scratch removed, queued jobs kept in
`queue/` for the next `up` of the line.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
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
from podpipe.runtime.runs.line.conducting import Conducting
from podpipe.runtime.runs.line.queue import Job, Queue, sinks
from podpipe.runtime.runs.origin import Origin
from podpipe.runtime.runs.warmth import Warmth

RECENT = 20  # jobs over that the line's record lists


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
        self.queue = Queue(start.path / "queue")
        self.running: list[Job] = []  # oldest first (`jobs: N` at once)
        self.down = False
        self.broken: PodpipeError | None = None  # a process that could not start
        self.warmth = Warmth(self.pipeline)  # what the next job may find set up, or loaded

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
        self.floor = Floor(self.loop, agents, Processes(launcher, self.loop), standing=True)
        self.conducting = Conducting(self.floor, self._idle, self._heard, self._log)
        if self.start.metrics:  # one endpoint for the line's life, lent to each job
            from podpipe.runtime.conductor.metrics import Metrics

            self.floor.metrics = Metrics(self.start.metrics)
            self.floor.metrics.line = lambda: (
                self.record.name, len(self.queue), len(self.running),
                self.record.jobs.done, self.record.jobs.failed)
        self.launcher = launcher
        agents.listen()
        counts = workers(self.pipeline, self.graph)
        self.names = {protocol.agent_name(node, worker) for node in self.graph.order
                      for worker in range(counts[node] or 1)}
        if launcher is not None:
            for name in sorted(self.names):
                self.floor.processes.begin(name)
        self.queue.requeue((Path(self.pipeline.checkpoints.node) / "runs").absolute(),
                           self._log)
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

    # -- serving -------------------------------------------------------------------

    def serve(self) -> None:
        """Take jobs until down: up to `jobs` at once, in order; each happening handed
        to the job it is about (`Conducting`), the rest heard here."""
        conducting = self.conducting
        while not self.down or conducting.jobs:
            while self.queue and not self.down and conducting.may_take(self.pipeline.jobs):
                self._begin(self.queue.popleft())
            for conductor in conducting.settle():
                self._finish(conductor)
            if self.down and not conducting.jobs:
                break
            for happening in self.floor.loop.wait(conducting.timeout):
                conducting.route(happening)

    def _idle(self, happening: loops.Happening) -> None:
        """What happened that is no job's (between jobs, or while warming up)."""
        agents, processes = self.floor.agents, self.floor.processes
        if isinstance(happening, loops.Ready):
            if happening.tag == SPAWNED:
                return processes.settle()
            for conn, message in agents.read(happening.tag):
                self._heard(conn, message)
        elif isinstance(happening, loops.TimerDue) and isinstance(happening.tag, str):
            node = protocol.split_name(happening.tag)[0]  # a restart of a job over
            processes.start(happening.tag, self.floor.swapped.get(node, []))
        elif isinstance(happening, loops.ProcessExited):
            if processes.exited(happening.pid, happening.tag) is not None:
                agents.drop(happening.tag)  # started again for the next job
                if self.record.state == "starting" and self.broken is None:
                    self.broken = RunError(f"{happening.tag} exited while the line started; "
                                           f"see {self.path / 'logs' / happening.tag}.log")
        elif isinstance(happening, loops.Signalled):
            self.down = True

    def _heard(self, conn: Conn, message: protocol.Message | None) -> None:
        """What a connection said that is no job's (None: it closed)."""
        agents, processes = self.floor.agents, self.floor.processes
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

    def _request(self, conn: Conn, message: protocol.Message) -> None:
        """A request that is the line's, or one for a job when none is on the line
        (`Conducting` hands a running job its own); anything else goes unanswered."""
        if isinstance(message, (protocol.SubmitRequest, protocol.ResumeRequest)):
            try:
                job = self._submit(message) if isinstance(message, protocol.SubmitRequest) \
                    else self._resume(message)
            except PodpipeError as exc:
                self.floor.agents.answer(conn, protocol.Refused(message=str(exc)))
                return
            self.floor.agents.answer(conn, protocol.Submitted(job=job.job, run_dir=str(
                job.run_path), ahead=len(self.queue) - 1 + len(self.running)))
            if message.wait:
                job.waiters.append(conn)
        elif isinstance(message, protocol.JobRequest):
            self._job_request(conn, message)
        elif isinstance(message, protocol.SwapRequest):  # (no job on the line: from the
            self._swap(conn, message)                   # next one on)
        elif isinstance(message, protocol.ShadowRequest) and message.stop:
            self.floor.drop_candidate(conn, message.stage)  # (kept for the next jobs)
        elif isinstance(message, (protocol.PeekRequest, protocol.ShadowRequest,
                                  protocol.PromoteRequest, protocol.ApplyRequest)):
            self.floor.agents.answer(conn, protocol.Refused(message="no job is running on the "
                                     "line (peek, shadow, promote, apply: a running job's)"))
        elif isinstance(message, protocol.DownRequest):
            self.floor.agents.answer(conn, protocol.Downed(dropped=[j.job for j in self.queue],
                                     stopped=[j.job for j in self.running]))
            self.down = True
            for conductor in self.conducting.jobs:
                conductor.stop("the line went down")

    def _submit(self, request: protocol.SubmitRequest) -> Job:
        lines.job_overrides(request.overrides)
        overrides = [*self.start.overrides, *request.overrides]
        pipeline = specs.load(self.path / "spec.yaml", overrides)
        graph = Graph.of(pipeline)
        if graph.order != self.graph.order or graph.inputs != self.graph.inputs:
            raise UsageError("the job's --set changes the graph; the graph is the line's")
        writes = sinks(pipeline)
        for other in self._jobs:
            if other.sinks & writes:
                raise UsageError(f"job {other.job}, on the line already, writes to "
                                 f"{', '.join(sorted(other.sinks & writes))} too: give this "
                                 "job other sink folders (--set sinks.NAME.uri=...)")
        run_path = lines.job_dir(pipeline, request.job)
        rundir.make(run_path, str(self.path / "spec.yaml"), overrides,
                    placement=self.start.placement, line=str(self.path.absolute()))
        rundir.lock(run_path)
        return self.queue.add(run_path, overrides, pipeline)

    @property
    def _jobs(self) -> list[Job]:
        """The running job and those queued."""
        return [*self.running, *self.queue]

    def _resume(self, request: protocol.ResumeRequest) -> Job:
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
            return self.queue.add(run_path, recorded.overrides, pipeline)
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
        if request.stop and found in self.running:
            conductor = self._conductor(found)
            if conductor is not None:
                conductor.stop(f"stopped; finish it with 'podpipe resume {found.run_path}'")
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

    def _begin(self, job: Job) -> None:
        """The job starts: announced (the processes no older job holds load it while it
        is planned), planned, its conductor on the floor."""
        self.running.append(job)
        job.started = time.time()
        self._publish()
        if self.conducting.jobs:  # (the line's swaps so far, for the processes told)
            self.floor.swapped = dict(self.conducting.jobs[0].swaps.overrides)
        self.floor.announce(job.run_path, job.overrides, self.warmth.unchanged(job.pipeline),
                            frozenset(self.graph.order))
        self.floor.tables = self.warmth.offer(job.pipeline)
        self._sweep()  # (the tables it does not take: gone, unless an older job reads them)
        # a job the line's process was running when it died: resumed from what it kept
        begun = (job.run_path / status.FILE).exists()
        origin = Origin(journal=True, source_batches=status.read(job.run_path).source_batches
                        ) if begun else Origin(durable=True)
        scratch = self.scratch.child(job.job)
        job.scratch = scratch.path
        try:
            run, restored, tier = pod.prepare(
                job.pipeline, job.run_path, job.overrides, job.job, self.record.name,
                scratch, origin=origin, placement=self.start.placement, fresh=not begun,
                memos=self.path)
            following.mark_latest(job.run_path)
            job.conductor = Conductor(run, launcher=self.launcher, restored=restored,
                                      durable=tier, floor=self.floor)
            self.conducting.add(job.conductor)
        except PodpipeError as exc:
            if job.conductor is not None:  # (its start failed: it ends)
                return job.conductor.stop(str(exc), exc)
            self.floor.let_go(job.run_path)
            self.running.remove(job)
            if not (job.run_path / status.FILE).exists():  # it never started
                rundir.failed_before_start(job.run_path, str(exc))
            self._sweep()
            self._over(job, "failed", str(exc), time.time() - job.started)

    def _finish(self, conductor: Conductor) -> None:
        """A job's conductor ended: its sinks' output put in place, its records closed,
        what it had in RAM let go but its tables (the next job's, if unchanged)."""
        job = next(j for j in self.running if j.conductor is conductor)
        state, error = "succeeded", None
        try:
            conductor.end()
        except InterruptedRun as exc:
            state, error = "interrupted", str(exc)
        except PodpipeError as exc:
            state, error = "failed", str(exc)
        finally:
            self.running.remove(job)
            self.warmth.keep(job.pipeline, conductor.ledger.outputs, {
                n: s.version for n, s in conductor.counters.stages.items()
                if s.version is not None})
            self._sweep()
        self._over(job, state, error, time.time() - job.started)

    def _conductor(self, job: Job) -> Conductor | None:
        return job.conductor if job.conductor is not None and job.conductor.running else None

    def _sweep(self) -> None:
        """The RAM scratch of jobs over goes, but the tables kept for the next job and
        those a running job reads."""
        keep = {o.path for _, _, o in self.warmth.tables.values()}
        for job in self.running:
            if job.conductor is not None:
                outputs = job.conductor.ledger.outputs
                keep |= {o.path for t in self.graph.tables if (o := outputs.get((t, 0)))}
        self.scratch.sweep_jobs({j.scratch for j in self.running if j.scratch}, keep)

    def _over(self, job: Job, state: str, error: str | None,
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
        self.record.jobs.running = self.running[0].job if self.running else None
        self.record.jobs.beside = [j.job for j in self.running[1:]]
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

