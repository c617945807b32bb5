"""A conductor's floor: its event loop, its processes and their connections.

A conductor of a `podpipe run` makes its own (`of_run`), which `drive`s it (its
loop: what happens, its status written four times a second) and ends with the run.
On a standing line (`runs.line`) the floor outlives every job: the line `announce`s
the next job before it plans it (each connected agent is told of the job and says
hello again for it, its imports and modules warm; processes the line starts from
then on serve the job's spec), the job's conductor `take`s it, and at the job's end
`give_back` returns it, idle. A process still busy when its job ended (the job
failed, or the line went down) is killed: its next task would come from another
job, and what it is writing is no one's. A stage's candidate (`podpipe shadow`)
started during a job is started again for each later job (`candidates`) until it
is stopped, promoted or given up.

With `jobs: N`, several jobs are on the line at once, oldest first: each node's
processes serve one job at a time (`owners`), and pass to the next job once the
older one has no more work for them (`hand_over`): the source first, then each
station as the older job's last batch leaves it. The line reads every socket
(`reader`) and hands what it read to the job whose processes said it.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from podpipe.engine.ledger import Ledger
from podpipe.model.output import Output
from podpipe.runtime.conductor.agents import Agents, Conn
from podpipe.runtime.conductor.metrics import Metrics
from podpipe.runtime.conductor.processes import Processes
from podpipe.runtime.conductor.run import Run
from podpipe.runtime.plumbing import logline, protocol
from podpipe.runtime.plumbing.launching import Launcher
from podpipe.runtime.plumbing.loop import EventLoop, Happening

FLUSH_SECONDS = 0.25  # a run's status written, and its engine ticked, this often


@dataclass
class Floor:
    loop: EventLoop
    agents: Agents
    processes: Processes
    standing: bool = False  # a line's, lent to one job after another
    swapped: dict[str, list[str]] = field(default_factory=dict)  # on the line: later jobs' too
    tables: dict[str, Output] = field(default_factory=dict)  # kept in RAM for the next job
    metrics: Metrics | None = None  # the line's endpoint (`up --metrics-port`), lent to jobs
    # stages' candidates (`podpipe shadow`) the line runs beside every job until dropped
    candidates: dict[str, protocol.ShadowRequest] = field(default_factory=dict)
    # with `jobs: N`: which job each node's processes serve (its run directory), and
    # who reads the sockets (the line, which hands what it read to that job)
    owners: dict[str, Path] = field(default_factory=dict)
    reader: Callable[[object], None] | None = None
    _swapped_before: dict[str, list[str]] = field(default_factory=dict)  # at the last job
    _told: list[str] = field(default_factory=list)  # the agents told of the job (containers')
    _later: dict[Path, tuple[list[str], frozenset[str]]] = field(default_factory=dict)

    @classmethod
    def of_run(cls, launcher: Launcher | None, listener: socket.socket | None, reaper: bool,
               log: logline.Log) -> Floor:
        """A `podpipe run`'s own, ended with it."""
        assert listener is not None
        loop = EventLoop()
        return cls(loop, Agents(loop, listener, log), Processes(launcher, loop, reaper=reaper))

    def drive(self, happened: Callable[[Happening], None], flush: Callable[[], None],
              running: Callable[[], bool]) -> None:
        """A run's own loop (a line's is the line's): each thing that happens, to its
        conductor (`happened`), its status written four times a second, to its end."""
        next_flush = time.monotonic()
        while running():
            for happening in self.loop.wait(max(0.0, next_flush - time.monotonic())):
                happened(happening)
                if not running():
                    break
            if time.monotonic() >= next_flush and running():
                flush()
                next_flush = time.monotonic() + FLUSH_SECONDS

    def announce(self, run_dir: Path, overrides: list[str],
                 unchanged: frozenset[str], nodes: frozenset[str]) -> None:
        """The next job is the one at `run_dir`: processes the line starts from now on
        serve its spec, and each connected one of the nodes no other job holds is told
        of it now — they load it while the job is planned, and say hello for it once
        its conductor listens (the others when they are handed over). Those of the
        `unchanged` nodes (defined as for the job before, not swapped since) keep what
        they set up."""
        if self.processes.local:
            self.processes.serve(run_dir / "spec.yaml", overrides, run_dir / "logs")
        unchanged = frozenset(n for n in unchanged
                              if self.swapped.get(n) == self._swapped_before.get(n))
        self._swapped_before = dict(self.swapped)
        self._told = self.agents.nodes()
        self._later[run_dir] = (overrides, unchanged)
        self.hand_over(frozenset(nodes) - frozenset(self.owners), run_dir)

    def hand_over(self, nodes: frozenset[str], run_dir: Path) -> None:
        """The processes of `nodes` serve the job at `run_dir` from now on: each
        connected one is told of it (and says hello for it)."""
        overrides, unchanged = self._later[run_dir]
        for node in nodes:
            self.owners[node] = run_dir
        for name in self.agents.nodes():
            node = protocol.split_name(name)[0]
            if node in nodes and (conn := self.agents.unbind(name)) is not None:
                self.tell(conn, run_dir, overrides, name, keep=node in unchanged)

    def let_go(self, run_dir: Path) -> frozenset[str]:
        """The job at `run_dir` is over: the nodes it held, no one's now."""
        self._later.pop(run_dir, None)
        nodes = frozenset(n for n, owner in self.owners.items() if owner == run_dir)
        for node in nodes:
            del self.owners[node]
        return nodes

    def take(self, ledger: Ledger) -> None:
        """The job starts: its engine counts the line's warm processes as its own, and
        the tables the line kept in RAM as loaded."""
        ledger.warm(self.workers())
        for node, output in self.tables.items():
            ledger.table_kept(node, output)

    def workers(self) -> dict[str, list[int]]:
        """Each node's worker numbers: its processes (a container's: those told)."""
        return self.processes.workers() if self.processes.local else _by_node(self._told)

    def serves(self, conn: Conn, hello: protocol.Hello, run: Run) -> bool:
        """Does this hello say the agent serves the job's spec? Else (a process that
        started for the job before, or at the line's start) it is told of this one."""
        if hello.spec == str(run.run_dir / "spec.yaml"):
            return True
        self.tell(conn, run.run_dir, run.overrides,
                  protocol.agent_name(hello.node, hello.worker))
        return False

    def tell(self, conn: Conn, run_dir: Path, overrides: list[str], name: str,
             keep: bool = False) -> None:
        node = protocol.split_name(name)[0]
        self.agents.answer(conn, protocol.Job(
            spec=str(run_dir / "spec.yaml"), overrides=[*overrides, *self.swapped.get(node, [])],
            log=str(run_dir / "logs" / f"{name}.log"), run=str(run_dir), keep=keep))

    def drop_candidate(self, conn: Conn, stage: str) -> None:
        """Between jobs: `podpipe shadow LINE STAGE --stop`."""
        self.agents.answer(conn, protocol.Shadowing(stage=stage, stopped=True)
                           if self.candidates.pop(stage, None) is not None else
                           protocol.Refused(f"the line runs no candidate of {stage!r}"))

    def stop(self, ledger: Ledger, *, succeeded: bool) -> None:
        """The run (a job) is over. A run's agents stop: politely when idle, by signal
        when not, never waiting long; containers are told to stop only when the run
        succeeded (after a failure they exit, for a restarted conductor's resume). A
        line's stay, but the busy ones (`give_back`)."""
        if self.standing:
            return self.give_back(ledger)
        if self.processes.local or succeeded:
            for node in self.agents.nodes():
                self.agents.send(node, protocol.Stop())
        self.processes.stop_all(terminate=not succeeded, told=self.agents.nodes())
        self.agents.close()

    def give_back(self, ledger: Ledger) -> None:
        """The job is over: idle processes stay, warm; busy ones are killed (a
        container's agent is let go: it exits, and the kubelet starts it again)."""
        for node, worker, agent in ledger.all_agents():
            name = protocol.agent_name(node, worker)
            if agent.busy and self.processes.expects(name):
                self.agents.drop(name)
                self.processes.retire(name, kill=True)
            elif agent.busy and not self.processes.local:
                self.agents.drop(name)


def _by_node(names: list[str]) -> dict[str, list[int]]:
    """Agent names (`node`, `node.N`) as each node's worker numbers."""
    found: dict[str, list[int]] = {}
    for name in sorted(names):
        node, worker = protocol.split_name(name)
        found.setdefault(node, []).append(worker)
    return found
