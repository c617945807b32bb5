"""The jobs on a line at once (`jobs: N`, one by default): their conductors over the
line's one floor, oldest first.

The line's loop waits; `route` hands each thing that happened to the job it is
about: what a process said or did, to the job its node's processes serve (the
floor's `owners`); a candidate's (`podpipe shadow`), to the oldest job, which
candidates run beside; a request that changes a job (swap, apply, shadow,
promote), to the job it names or the one on the line — held while jobs overlap
(dropped if its asker gives up), taken up once the older ones are over; a peek, to
the job it names at once; a task's timer, to the job that set it; a signal, to
every job. What is no job's goes to the line (`idle`, `heard`).

After each, `settle`: a job whose conductor ended is taken off (returned, for the
line to close) and its nodes' processes pass to the next job; the processes of
every node an older job has no more tasks for pass to the next job
(`Ledger.spent`: `HandedOver` there, `TookOver` here, the floor's `hand_over`) —
the source first, once the older job's last batch is read, then each station as
the older job's last batch leaves it — so that a job's batches start while the one
before drains and the line does not stop between them; each job's share of the
line's RAM budget is what the older ones leave (`Shared`: the budget less what
they hold and may still make), so that an older job's batches come first; and each
job's status is written four times a second.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from podpipe.engine import events as ev
from podpipe.engine.ledger import Ledger
from podpipe.runtime.conductor import FLUSH_SECONDS, Conductor, Floor
from podpipe.runtime.conductor.agents import Conn
from podpipe.runtime.conductor.processes import SPAWNED
from podpipe.runtime.conductor.requests.shadows import ShadowTimeout
from podpipe.runtime.conductor.run import Timeout
from podpipe.runtime.plumbing import logline, loop as loops, protocol

# what changes a running job: its own, asked of the one job on the line
CHANGES = (protocol.SwapRequest, protocol.ApplyRequest, protocol.PeekRequest,
           protocol.ShadowRequest, protocol.PromoteRequest)
# the line's own: a job queued, waited for or stopped, the line down
LINES = (protocol.SubmitRequest, protocol.ResumeRequest, protocol.JobRequest,
         protocol.DownRequest)


class Conducting:
    def __init__(self, floor: Floor, idle: Callable[[loops.Happening], None],
                 heard: Callable[[Conn, protocol.Message | None], None],
                 log: logline.Log) -> None:
        """`idle`, `heard`: the line's own, for what is no job's; `log`: the line's."""
        self.floor, self._idle, self._heard, self._log = floor, idle, heard, log
        self.jobs: list[Conductor] = []  # oldest first
        self.held: list[tuple[Conn, protocol.Message]] = []  # changes waiting for one job
        self._flushed: dict[Path, float] = {}
        floor.reader = self.read

    @property
    def together(self) -> bool:
        """Do jobs overlap on the line (or has the one on it handed processes on)?"""
        return len(self.jobs) > 1 or any(bool(c.ledger.lent) for c in self.jobs)

    def may_take(self, most: int) -> bool:
        """May another job start now? Not while a change waits for the line to hold
        one job, nor while the newest job's swap is under way."""
        return (len(self.jobs) < most and not self.held
                and not (self.jobs and self.jobs[-1].swaps.busy))

    def add(self, conductor: Conductor) -> None:
        """A job's conductor, started (the line has announced the job)."""
        self.jobs.append(conductor)
        self._flushed[conductor.run.run_dir] = time.monotonic()
        conductor.open()
        if len(self.jobs) == 1:
            self._candidates(conductor)

    def _candidates(self, conductor: Conductor) -> None:
        """The stages' candidates (`podpipe shadow`) the line runs beside its oldest
        job: started for it."""
        if conductor.running and self.floor.candidates:
            conductor.shadows.again(self.floor.candidates, conductor.run.pipeline,
                                    conductor.swaps.version)
            self.floor.candidates = {}

    # -- what happened, to whom -------------------------------------------------

    def route(self, happening: loops.Happening) -> None:
        target: Conductor | None = None
        if isinstance(happening, loops.Ready):
            return self.read(happening.tag)
        if isinstance(happening, loops.Signalled):
            self._idle(happening)  # (the line goes down)
            for conductor in self.jobs:
                conductor.happened(happening)
            return
        if isinstance(happening, loops.ProcessExited):
            target = (self._oldest() if protocol.shadow_of(happening.tag) is not None
                      else self._owner(protocol.split_name(happening.tag)[0]))
        elif isinstance(happening.tag, Timeout):  # a task's: the job's that set it
            target = next((c for c in self.jobs if c.run.run_id == happening.tag.run), None)
        elif isinstance(happening.tag, ShadowTimeout):
            target = self._oldest()
        elif isinstance(happening.tag, str):  # a restart's backoff: the node's job's
            target = self._owner(protocol.split_name(happening.tag)[0])
        if target is not None:
            target.happened(happening)
        elif not isinstance(happening.tag, (Timeout, ShadowTimeout)):
            self._idle(happening)

    def read(self, tag: object) -> None:
        """A socket is readable: what it says, to whom it is said."""
        agents = self.floor.agents
        if tag == SPAWNED:
            return self.floor.processes.settle()
        for conn, message in agents.read(tag):
            if message is None and self.held:  # (its asker gave up waiting: dropped)
                self.held = [(c, m) for c, m in self.held if c is not conn]
            name = agents.node_of(conn)
            if name is not None:  # a process's, bound: its job's
                target = self._owner(protocol.split_name(name)[0])
            elif isinstance(message, (protocol.Hello, protocol.Broken)) and \
                    protocol.shadow_of(message.node) is None:
                target = self._owner(message.node)  # (a process saying hello)
            elif isinstance(message, CHANGES) and self.jobs:
                named = self._named(conn, message)
                if named is None:
                    continue  # (refused: the job it names is not on the line)
                if isinstance(message, protocol.PeekRequest) and named.running:
                    target = named  # (it only reads: no need to wait)
                elif self.together:
                    self._hold(conn, message)
                    continue
                else:
                    target = named
            elif isinstance(message, LINES):
                target = None
            else:  # a change, a probe, a candidate's, a connection closed
                target = self._oldest()
            if target is not None:
                target.heard(conn, message)
                target.happened()  # (its engine hears it before the next message)
            else:
                self._heard(conn, message)

    def _named(self, conn: Conn, message: protocol.Message) -> Conductor | None:
        """The job a change is for: the one it names (refused if that is not on the
        line), else the oldest."""
        run = getattr(message, "run", "")
        found = next((c for c in self.jobs if c.run.run_id == run and c.running), None) \
            if run else self._oldest()
        if found is None:
            self.floor.agents.answer(conn, protocol.Refused(
                message=f"job {run} is not running on the line" if run else
                "no job is running on the line"))
        return found

    def _hold(self, conn: Conn, message: protocol.Message) -> None:
        """A change while jobs overlap: it waits until one job is on the line."""
        self.held.append((conn, message))
        what = type(message).__name__.removesuffix("Request").lower()
        stage = getattr(message, "stage", None)
        self._log(what + (f" of stage {stage!r}" if stage else "") + " waits until one "
                  f"job is on the line ({len(self.jobs)} on it)")

    def _owner(self, node: str) -> Conductor | None:
        run_dir = self.floor.owners.get(node)
        return next((c for c in self.jobs if c.run.run_dir == run_dir and c.running), None)

    def _oldest(self) -> Conductor | None:
        return self.jobs[0] if self.jobs and self.jobs[0].running else None

    # -- after each --------------------------------------------------------------------

    def settle(self) -> list[Conductor]:
        """Jobs over taken off (returned: the line closes them), processes passed on,
        the budget shared, statuses written."""
        ended = [c for c in self.jobs if not c.running]
        for conductor in ended:
            self._off(conductor)
        if self.held and not self.together:  # to the one job left (or the line's)
            held, self.held = self.held, []
            for conn, message in held:
                if not self.jobs:
                    self._heard(conn, message)  # (the line's, between jobs)
                elif (target := self._named(conn, message)) is not None:
                    target.heard(conn, message)
                    target.happened()
        for older, newer in zip(self.jobs, self.jobs[1:]):
            spent = frozenset(n for n in older.ledger.spent()
                              if self.floor.owners.get(n) == older.run.run_dir)
            if spent:
                older.happened(event=ev.HandedOver(spent))
                self._give(spent, newer)
        self._share()
        now = time.monotonic()
        for conductor in self.jobs:
            if now - self._flushed[conductor.run.run_dir] >= FLUSH_SECONDS:
                self._flushed[conductor.run.run_dir] = now
                conductor.flush()
        return ended

    @property
    def timeout(self) -> float | None:
        """How long the line's loop may wait: until a status is due."""
        if not self.jobs:
            return None
        return max(0.0, min(self._flushed.values()) + FLUSH_SECONDS - time.monotonic())

    def _off(self, conductor: Conductor) -> None:
        """A job is over: off the floor, its nodes' processes the next job's."""
        conductor.leave()
        nodes = self.floor.let_go(conductor.run.run_dir)
        index = self.jobs.index(conductor)
        self.jobs.remove(conductor)
        del self._flushed[conductor.run.run_dir]
        if index < len(self.jobs) and nodes:
            self._give(nodes, self.jobs[index])
        if index == 0 and self.jobs:  # the next is the oldest now
            self._candidates(self.jobs[0])

    def _give(self, nodes: frozenset[str], to: Conductor) -> None:
        """The processes of `nodes` serve job `to` from now on: told of it, and those
        not running (killed with the job before) started."""
        self.floor.hand_over(nodes, to.run.run_dir)
        workers = self.floor.workers()
        for node in sorted(nodes):
            to.happened(event=ev.TookOver(node, tuple(workers.get(node, []))))
            for worker in to.ledger.agents[node] if self.floor.processes.local else []:
                self.floor.processes.begin(protocol.agent_name(node, worker))

    def _share(self) -> None:
        """Each job's budget: the line's, less what the older jobs hold and may still
        make (a table two jobs hold counted once)."""
        if len(self.jobs) == 1:  # (alone: the whole budget, as a run has it)
            budget = self.jobs[0].ledger.budget
            if budget.limit != budget.whole:
                self.jobs[0].happened(event=ev.Shared(budget.whole))
            return
        taken, tables = 0, set()  # (what the older jobs take; their tables' files)
        for conductor in self.jobs:
            budget = conductor.ledger.budget
            mine = _tables(conductor.ledger)
            shared = sum(n for path, n in mine.items() if path in tables)
            limit = min(budget.whole, max(0, budget.whole - taken + shared))
            if budget.limit != limit:
                conductor.happened(event=ev.Shared(limit))
            taken += budget.claim() - shared
            tables |= set(mine)


def _tables(ledger: Ledger) -> dict[str, int]:
    """The tables a job holds in RAM: file, bytes."""
    held = (ledger.outputs.get((table, 0)) for table in ledger.graph.tables)
    return {o.path: o.nbytes for o in held if o is not None and o.tier == "ram"}
