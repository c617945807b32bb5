"""The run state machine: (state, event) -> actions, with no I/O.

The conductor turns what happens (an agent connects, a task finishes, a process
exits) into events, feeds them to `RunState.handle`, and carries out the actions it
returns (hand a task to an agent, grant RAM, delete a file, finish, fail). All the
decisions of a run live here, so they can be tested without processes:

- readiness: a per-batch task is ready once every input has that batch; a reduce
  task once every input has all its batches;
- the RAM budget: an agent asks for the exact bytes of its output before writing
  it and waits for a grant, so scratch never exceeds the budget. New source batches
  are admitted only while the batches already on the line, at the largest footprint
  seen so far, still fit (backpressure). When that estimate proves too low (later
  batches are larger) and the line stops for lack of RAM, the newest batch on the
  line is given up and run again from the source later. What still cannot move
  (outputs that must stay, such as a reduce's inputs) spills to the node tier; an
  output larger than the whole budget fails with a BudgetError;
- lifetime: an output is deleted as soon as every node that reads it has read it;
- restarts of dead processes, and the state a resumed run starts from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from podpipe.errors import BudgetError, DataError, PodpipeError, StageError
from podpipe.model.graph import BATCH, Graph
from podpipe.model.sizes import format_size
from podpipe.model.spec import SOURCE

# --------------------------------------------------------------------- data

Key = tuple[str, int]  # (node, batch)


@dataclass(frozen=True)
class Output:
    """A batch output: in RAM scratch, or (restored on resume) on the node tier."""

    path: str
    nbytes: int
    rows: int
    checksum: str = ""
    tier: str = "ram"


# ------------------------------------------------------------------- events


@dataclass(frozen=True)
class AgentReady:
    node: str


@dataclass(frozen=True)
class SpaceRequested:
    node: str
    batch: int
    nbytes: int


@dataclass(frozen=True)
class TaskDone:
    node: str
    batch: int
    output: Output | None  # None for sinks


@dataclass(frozen=True)
class TaskFailed:
    node: str
    batch: int
    message: str
    input_error: bool = False  # the data, not the code, is at fault


@dataclass(frozen=True)
class AgentExited:
    node: str
    returncode: int | None


Event = AgentReady | SpaceRequested | TaskDone | TaskFailed | AgentExited

# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Dispatch:
    node: str
    batch: int
    inputs: tuple[tuple[Output, ...], ...]  # per input in spec order; all batches for a reduce


@dataclass(frozen=True)
class Grant:
    node: str


@dataclass(frozen=True)
class Deny:
    """Refuse a waiting request for RAM: the agent drops its result, the batch is redone."""

    node: str


@dataclass(frozen=True)
class Delete:
    path: str


@dataclass(frozen=True)
class Spill:
    """Let `node` write its waiting output to the node tier instead of RAM scratch."""

    node: str


@dataclass(frozen=True)
class Restart:
    """Start `node`'s process again after `delay` seconds (its `attempt`-th restart)."""

    node: str
    attempt: int
    delay: float


@dataclass(frozen=True)
class Finished:
    pass


@dataclass(frozen=True)
class Failed:
    error: PodpipeError


Action = Dispatch | Grant | Deny | Delete | Spill | Restart | Finished | Failed

# -------------------------------------------------------------------- state

IDLE, RUNNING, WAITING, ABSENT = "idle", "running", "waiting", "absent"


@dataclass
class _Agent:
    status: str = ABSENT
    batch: int | None = None
    want: int = 0        # bytes asked for while WAITING
    reserved: int = 0    # bytes granted, not yet an output


@dataclass
class RunState:
    graph: Graph
    source_batches: int
    budget: int
    retries: dict[str, int] = field(default_factory=dict)  # node -> restarts allowed
    restarts: dict[str, int] = field(default_factory=dict)  # node -> restarts so far
    outputs: dict[Key, Output] = field(default_factory=dict)
    unread: dict[Key, set[str]] = field(default_factory=dict)
    done: dict[str, set[int]] = field(default_factory=dict)
    ready: dict[str, list[int]] = field(default_factory=dict)
    agents: dict[str, _Agent] = field(default_factory=dict)
    usage: int = 0           # bytes in scratch plus bytes granted
    peak: int = 0
    next_source: int = 0
    on_line: dict[int, int] = field(default_factory=dict)  # batch -> tasks left on the line
    produced: dict[int, int] = field(default_factory=dict)  # batch -> bytes made so far
    footprint: int | None = None  # most bytes one batch has made over the whole line
    redo: list[int] = field(default_factory=list)  # source batches dropped, to load again
    outcome: Action | None = None
    spills: int = 0          # outputs written to the node tier for lack of RAM

    def __post_init__(self) -> None:
        for node in self.graph.order:
            self.done.setdefault(node, set())
            self.ready.setdefault(node, [])
            self.agents.setdefault(node, _Agent())
            self.restarts.setdefault(node, 0)
        self._per_batch_nodes = sum(1 for n in self.graph.order if self.graph.domain[n] == BATCH)

    @classmethod
    def restored(cls, graph: Graph, source_batches: int, budget: int, *,
                 retries: dict[str, int], kept: dict[Key, Output],
                 finished: dict[str, set[int]]) -> "RunState":
        """A run that resumes. `kept`: outputs found intact in some tier; `finished`:
        what each node had finished (the journal).

        A source batch is not run again when everything it gave the rest of the run
        is kept: its outputs that a reduce reads, and its per-batch sinks' files.
        Other batches run again from the source. What runs once (a reduce, and what
        follows it) runs again unless every sink of it had finished.
        """
        run = cls(graph, source_batches, budget, retries=retries)
        per_batch = [n for n in graph.order if graph.domain[n] == BATCH]
        for_reduce = graph.reduce_inputs()
        batch_sinks = [n for n in per_batch if n in graph.sinks]
        for batch in range(source_batches):
            if not (all((n, batch) in kept for n in for_reduce) and
                    all(batch in finished.get(n, ()) for n in batch_sinks)):
                run.redo.append(batch)
                continue
            for node in per_batch:
                run.done[node].add(batch)
            for node in for_reduce:
                output = kept[(node, batch)]
                run.outputs[(node, batch)] = output
                run.unread[(node, batch)] = {c for c in graph.consumers[node]
                                             if graph.domain[c] != BATCH}
                if output.tier == "ram":
                    run.usage += output.nbytes
        run.next_source = source_batches  # what is left comes through `redo`
        once = [n for n in graph.order if graph.domain[n] != BATCH]
        if once and all(0 in finished.get(n, ()) for n in once if n in graph.sinks):
            for node in once:
                run.done[node].add(0)
        for node in once:
            run._maybe_ready(node, 0)
        run.peak = run.usage
        return run

    # -- queries --------------------------------------------------------------

    def total(self, node: str) -> int:
        return self.graph.batches(node, self.source_batches)

    @property
    def finished(self) -> bool:
        return all(len(self.done[n]) == self.total(n) for n in self.graph.order)

    # -- the transition -------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if self.outcome is not None:
            return []
        actions: list[Action] = []
        agent = self.agents[event.node]
        if isinstance(event, AgentReady):
            agent.status, agent.batch = IDLE, None
        elif isinstance(event, SpaceRequested):
            self._request(agent, event, actions)
        elif isinstance(event, TaskDone):
            self._done(agent, event, actions)
        elif isinstance(event, TaskFailed):
            if event.input_error:
                return self._fail(DataError(f"stage {event.node!r}, batch {event.batch}: "
                                            f"{event.message}"))
            return self._fail(StageError(event.node, event.batch, event.message))
        elif isinstance(event, AgentExited):
            if not self.finished and not self._restart(event, agent, actions):
                return actions
        if self.outcome is not None:
            return actions
        self._grant_waiting(actions)
        self._dispatch(actions)
        if self.finished:
            self.outcome = Finished()
            actions.append(self.outcome)
        elif self._stuck():
            while self._stuck() and self._evict(actions):  # each gives up one batch
                self._grant_waiting(actions)
                self._dispatch(actions)
            if self._stuck():
                self._spill(actions)
        return actions

    # -- pieces ----------------------------------------------------------------

    def _restart(self, event: AgentExited, agent: _Agent, actions: list[Action]) -> bool:
        """A process the run needs died: put its in-flight batch back and have it started
        again, with backoff, while it has restarts left; else fail the run."""
        node, batch = event.node, agent.batch
        busy = agent.status in (RUNNING, WAITING)
        attempt = self.restarts[node] + 1
        if attempt > self.retries.get(node, 0):
            gone = ("its container disconnected" if event.returncode is None
                    else f"its process exited (code {event.returncode})")
            where = "before finishing the batch" if busy else "while the run needed it"
            tries = self.retries.get(node, 0)
            actions.extend(self._fail(StageError(
                node, batch if busy else None,
                f"{gone} {where}" + (f", after {tries} restarts" if tries else ""))))
            return False
        self.restarts[node] = attempt
        self.usage -= agent.reserved
        agent.status, agent.batch, agent.want, agent.reserved = ABSENT, None, 0, 0
        if busy and batch is not None:
            self.ready[node] = sorted(self.ready[node] + [batch])
        actions.append(Restart(node, attempt, min(0.1 * 4 ** (attempt - 1), 5.0)))
        return True

    def _request(self, agent: _Agent, event: SpaceRequested, actions: list[Action]) -> None:
        agent.status, agent.want = WAITING, event.nbytes
        if event.nbytes > self.budget:
            actions.extend(self._fail(BudgetError(
                f"stage {event.node!r}, batch {event.batch}: its output needs "
                f"{format_size(event.nbytes)}, more than the whole RAM budget of "
                f"{format_size(self.budget)}; lower spec.source.batchRows or raise "
                "spec.memory (--memory)")))

    def _grant_waiting(self, actions: list[Action]) -> None:
        # Downstream first: granting them frees their inputs soonest.
        waiting = [n for n in reversed(self.graph.order) if self.agents[n].status == WAITING]
        for node in waiting:
            agent = self.agents[node]
            if self.usage + agent.want > self.budget:
                continue
            self.usage += agent.want
            self.peak = max(self.peak, self.usage)
            agent.status, agent.reserved, agent.want = RUNNING, agent.want, 0
            actions.append(Grant(node))

    def _done(self, agent: _Agent, event: TaskDone, actions: list[Action]) -> None:
        node, batch = event.node, event.batch
        agent.status, agent.batch = IDLE, None
        self.usage -= agent.reserved
        agent.reserved = 0
        self.done[node].add(batch)
        if event.output is not None:
            key = (node, batch)
            self.outputs[key] = event.output
            if event.output.tier == "ram":
                self.usage += event.output.nbytes
                self.peak = max(self.peak, self.usage)
            self.unread[key] = {c for c in self.graph.consumers[node]  # (resumed: some
                                if self._batch_of(c, batch) not in self.done[c]}  # are done)
            if self.graph.domain[node] == BATCH and event.output.tier == "ram":
                self.produced[batch] = self.produced.get(batch, 0) + event.output.nbytes
            if not self.unread[key]:
                self._delete(key, actions)
        self._release_inputs(node, batch, actions)
        if self.graph.domain[node] == BATCH:
            self.on_line[batch] -= 1
            if self.on_line[batch] == 0:
                del self.on_line[batch]
                self.footprint = max(self.footprint or 0, self.produced.pop(batch, 0))
        for consumer in self.graph.consumers[node]:
            self._maybe_ready(consumer, batch if self.graph.domain[consumer] == BATCH else 0)

    def _batch_of(self, node: str, batch: int) -> int:
        return batch if self.graph.domain[node] == BATCH else 0

    def _release_inputs(self, node: str, batch: int, actions: list[Action]) -> None:
        for key in self._input_keys(node, batch):
            readers = self.unread.get(key)
            if readers is None:
                continue
            readers.discard(node)
            if not readers:
                self._delete(key, actions)

    def _delete(self, key: Key, actions: list[Action]) -> None:
        output = self.outputs.pop(key)
        del self.unread[key]
        if output.tier == "ram":  # the node tier keeps its copies for the run
            self.usage -= output.nbytes
            actions.append(Delete(output.path))

    def _input_keys(self, node: str, batch: int) -> list[Key]:
        keys: list[Key] = []
        for name in self.graph.inputs[node]:
            if self._reads_all(node, name):
                keys.extend((name, b) for b in range(self.source_batches))
            else:
                keys.append((name, batch))
        return keys

    def _reads_all(self, node: str, name: str) -> bool:
        """Does `node` read every batch of `name` at once (a reduce over batches)?"""
        return self.graph.domain[node] != BATCH and self.graph.domain[name] == BATCH

    def _maybe_ready(self, node: str, batch: int) -> None:
        if batch in self.done[node] or batch in self.ready[node]:
            return
        if self.agents[node].batch == batch:
            return
        if all(len(self.done[name]) == self.source_batches if self._reads_all(node, name)
               else batch in self.done[name] for name in self.graph.inputs[node]):
            self.ready[node].append(batch)
            self.ready[node].sort()

    def _dispatch(self, actions: list[Action]) -> None:
        for node in self.graph.order:
            agent = self.agents[node]
            if agent.status != IDLE:
                continue
            if node == SOURCE and not self.ready[node]:
                batch = self._admit()
                if batch is None:
                    continue
            elif self.ready[node]:
                batch = self.ready[node].pop(0)
            else:
                continue
            agent.status, agent.batch = RUNNING, batch
            inputs = tuple(
                tuple(self.outputs[(name, b)] for b in
                      (range(self.source_batches) if self._reads_all(node, name)
                       else (batch,)))
                for name in self.graph.inputs[node])
            actions.append(Dispatch(node, batch, inputs))

    def _admit(self) -> int | None:
        """The next source batch, if the line has room for it (backpressure)."""
        if self.next_source >= self.source_batches and not self.redo:
            return None
        if self.on_line:
            footprint = self._footprint()
            if footprint is None:
                return None
            coming = sum(max(0, footprint - self.produced.get(b, 0)) for b in self.on_line)
            if self.usage + coming + footprint > self.budget:
                return None
        if self.redo:
            batch = self.redo.pop(0)
        else:
            batch = self.next_source
            self.next_source += 1
        self.on_line[batch] = self._per_batch_nodes
        self.produced[batch] = 0
        return batch

    def _footprint(self) -> int | None:
        """Bytes one batch makes over the whole line: the most seen, else a first guess
        once the source has written a batch (that size at every per-batch node). A
        guess too low only costs time: a jammed line gives up its newest batch."""
        if self.footprint is not None:
            return self.footprint
        sizes = [self.outputs[(SOURCE, b)].nbytes for b in self.on_line
                 if (SOURCE, b) in self.outputs]
        return max(sizes) * self._per_batch_nodes if sizes else None

    def _evict(self, actions: list[Action]) -> bool:
        """Give up the newest batch on the line so that an older one waiting for RAM can
        move: refuse its waiting requests, delete its outputs, and run it again from
        the source later (stages are deterministic, sink files idempotent). A batch
        with a task still computing is left alone."""
        line = [(n, a) for n, a in self.agents.items() if self.graph.domain[n] == BATCH]
        waiting = [a.batch for _, a in line if a.status == WAITING and a.batch is not None]
        if not waiting:
            return False
        for batch in sorted(self.on_line, reverse=True):
            if batch <= min(waiting):
                return False
            if any(a.status == RUNNING and a.batch == batch for _, a in line):
                continue
            for node, agent in line:
                if agent.status == WAITING and agent.batch == batch:
                    agent.status, agent.batch, agent.want = IDLE, None, 0
                    actions.append(Deny(node))
            for node in self.graph.order:
                if self.graph.domain[node] != BATCH:
                    continue
                if (node, batch) in self.outputs:
                    self._delete((node, batch), actions)
                self.done[node].discard(batch)
                if batch in self.ready[node]:
                    self.ready[node].remove(batch)
            return self._redo(batch)
        return False

    def _redo(self, batch: int) -> bool:
        del self.on_line[batch]
        self.produced.pop(batch, None)
        self.redo = sorted(self.redo + [batch])
        # The footprint was under-estimated: the line holds no more batches than now.
        self.footprint = max(self.footprint or 0, self.budget // (len(self.on_line) + 1))
        return True

    def _spill(self, actions: list[Action]) -> None:
        """Nothing in RAM can move and nothing can be given up (what waits must stay,
        such as a reduce's inputs): the most downstream waiting output goes to the
        node tier, memory-mapped from there by its readers. It is not RAM budget."""
        node = next(n for n in reversed(self.graph.order)
                    if self.agents[n].status == WAITING)
        agent = self.agents[node]
        agent.status, agent.want = RUNNING, 0
        self.spills += 1
        actions.append(Spill(node))

    def _stuck(self) -> bool:
        """Someone waits for RAM and nothing can free any: no task is running, and no
        agent is still to connect (it would read what it is owed)."""
        statuses = {a.status for a in self.agents.values()}
        return WAITING in statuses and not statuses & {RUNNING, ABSENT}

    def _fail(self, error: PodpipeError) -> list[Action]:
        self.outcome = Failed(error)
        return [self.outcome]
