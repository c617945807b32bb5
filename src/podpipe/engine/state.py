"""The run state machine: (state, event) -> actions, with no I/O.

The conductor turns what happens (an agent connects, a task finishes, a process
exits) into events, feeds them to `RunState.handle`, and carries out the actions it
returns (hand a task to an agent, grant RAM, delete a file, finish, fail). All the
decisions of a run live here, so they can be tested without processes:

- readiness: a per-batch task is ready once every input has that batch; a reduce
  task once every input has all the batches of its shard (a global reduce: every
  shard's output, some made by other pods and imported);
- shards: a pod runs the batches of the shards it owns (`model.shards`); keys are
  source batch numbers for per-batch nodes, shard numbers for per-shard ones, 0 for
  global ones, which only the pod of the lowest ordinal runs;
- the RAM budget: an agent asks for the exact bytes of its output before writing
  it and waits for a grant, so scratch never exceeds the budget. New source batches
  are admitted only while the batches already on the line, at the largest footprint
  seen so far, still fit (backpressure). When that estimate proves too low (later
  batches are larger) and the line stops for lack of RAM, the newest batch on the
  line is given up and run again from the source later. What still cannot move
  (outputs that must stay, such as a reduce's inputs) spills to the node tier; an
  output larger than the whole budget fails with a BudgetError;
- lifetime: an output is deleted as soon as every node that reads it has read it;
- restarts of dead processes, and the state a resumed run starts from;
- swaps: a stage's process replaced by another version (its in-flight batch, if
  any, goes back to its queue), and a broken version *held*: the stage takes no
  task until it is swapped again, and the run waits instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from podpipe.errors import BudgetError, DataError, PodpipeError, StageError
from podpipe.model import shards as sharding
from podpipe.model.graph import BATCH, GLOBAL, SINGLE, Graph
from podpipe.model.sizes import format_size
from podpipe.model.spec import SOURCE

# --------------------------------------------------------------------- data

Key = tuple[str, int]  # (node, batch): a source batch, a shard, or 0 (global)


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


@dataclass(frozen=True)
class Imported:
    """Another pod's output for a shard this pod does not own, which a global reduce
    here reads (handed over through the durable tier)."""

    node: str
    shard: int
    output: Output


@dataclass(frozen=True)
class SwapRequested:
    """A new version of the stage is coming: give it no new task (it is replaced as soon
    as its current one is done)."""

    node: str


@dataclass(frozen=True)
class AgentReplaced:
    """The stage's process is being replaced by another version (a swap): it takes no
    more tasks; its in-flight batch, if any, is done again by the new one."""

    node: str


@dataclass(frozen=True)
class Recompute:
    """The batches `node` has done were made by a version now replaced: do them again
    (from the source, the one tier that holds every batch's inputs), and everything
    downstream of them, so the outputs are as if the new version had run from the
    start."""

    node: str


@dataclass(frozen=True)
class Reshaped:
    """The pipeline changed while it runs (`podpipe apply`): `graph` is the new one.
    Nodes gone are dropped with their outputs; nodes added run every key of theirs,
    their inputs made again from the source where they are gone."""

    graph: Graph
    node: str = SOURCE  # (every event names a node; this one is about the whole line)


@dataclass(frozen=True)
class StageBroken:
    """A swapped-in version failed (raised, died, or could not start): hold the stage."""

    node: str
    message: str


Event = (AgentReady | SpaceRequested | TaskDone | TaskFailed | AgentExited | Imported |
         SwapRequested | AgentReplaced | Recompute | Reshaped | StageBroken)

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
class Forget:
    """What `node` made for `key` no longer stands (a recompute): drop its records."""

    node: str
    key: int


@dataclass(frozen=True)
class Finished:
    pass


@dataclass(frozen=True)
class Failed:
    error: PodpipeError


Action = Dispatch | Grant | Deny | Delete | Spill | Restart | Forget | Finished | Failed

# -------------------------------------------------------------------- state

IDLE, RUNNING, WAITING, ABSENT, HELD = "idle", "running", "waiting", "absent", "held"


@dataclass
class _Agent:
    status: str = ABSENT
    broken: str | None = None  # why a held stage is held
    draining: bool = False     # a swap is coming: no new task
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
    stale: set[int] = field(default_factory=set)  # on the line, to redo once off it
    obsolete: set[Key] = field(default_factory=set)  # in-flight tasks whose result is void
    shards: int = 1
    owned: tuple[int, ...] | None = None  # the shards this pod runs; None: all
    global_here: bool = True  # this pod runs the global nodes (the lowest ordinal)

    def __post_init__(self) -> None:
        for node in self.graph.order:
            self.done.setdefault(node, set())
            self.ready.setdefault(node, [])
            self.agents.setdefault(node, _Agent())
            self.restarts.setdefault(node, 0)
        self._per_batch_nodes = sum(1 for n in self.graph.order if self.graph.domain[n] == BATCH)
        shards = sharding.nonempty(self.source_batches, self.shards)
        mine = set(shards if self.owned is None else self.owned) & set(shards)
        self.mine = [b for b in range(self.source_batches)
                     if sharding.shard_of(b, self.shards) in mine]
        self._keys = {BATCH: set(self.mine), SINGLE: mine,
                      GLOBAL: {0} if self.global_here else set()}
        self._all_shards = list(shards)

    @classmethod
    def restored(cls, graph: Graph, source_batches: int, budget: int, *,
                 retries: dict[str, int], kept: dict[Key, Output],
                 finished: dict[str, set[int]], shards: int = 1,
                 owned: tuple[int, ...] | None = None,
                 global_here: bool = True) -> "RunState":
        """A run that resumes. `kept`: outputs found intact in some tier; `finished`:
        what each node had finished (the journal).

        A source batch is not run again when everything it gave the rest of the run
        is kept: its outputs that a reduce reads, and its per-batch sinks' files.
        Other batches run again from the source. What runs once per shard (a reduce,
        and what follows it) runs again unless every sink of it had finished for that
        shard and its outputs a global reduce reads are kept; the same for what runs
        once globally.
        """
        run = cls(graph, source_batches, budget, retries=retries, shards=shards,
                  owned=owned, global_here=global_here)
        uses: list[Key] = []
        for domain in (BATCH, SINGLE, GLOBAL):
            nodes = [n for n in graph.order if graph.domain[n] == domain]
            needed = [n for n in graph.reduce_inputs() if graph.domain[n] == domain]
            for key in sorted(run._keys[domain]):
                if not (all((n, key) in kept for n in needed) and
                        all(key in finished.get(n, ()) for n in nodes if n in graph.sinks)):
                    if domain == BATCH:
                        run.redo.append(key)
                    continue
                for node in nodes:
                    run.done[node].add(key)
                uses.extend((node, key) for node in needed)
        for node, key in uses:  # once all is marked done: who still reads them
            readers = run._readers(node, key)
            if readers:
                output = run.outputs[(node, key)] = kept[(node, key)]
                run.unread[(node, key)] = readers
                if output.tier == "ram":
                    run.usage += output.nbytes
        run.next_source = len(run.mine)  # what is left comes through `redo`
        for node in graph.order:
            if graph.domain[node] != BATCH:
                for key in run._keys[graph.domain[node]]:
                    run._maybe_ready(node, key)
        run.peak = run.usage
        return run

    # -- queries --------------------------------------------------------------

    def keys(self, node: str) -> set[int]:
        """What `node` runs in this pod: source batches, shards, or {0} (global)."""
        return self._keys[self.graph.domain[node]]

    def total(self, node: str) -> int:
        return len(self.keys(node))

    @property
    def finished(self) -> bool:
        return all(self.keys(n) <= self.done[n] for n in self.graph.order)

    def shards_here(self) -> list[int]:
        """The shards this pod runs (those with at least one batch)."""
        return sorted(self._keys[SINGLE])

    def complete(self, shard: int | None) -> bool:
        """Has this pod finished everything of `shard` (None: the global nodes)?"""
        for node in self.graph.order:
            domain = self.graph.domain[node]
            keys: Iterable[int]
            if shard is None:
                keys = self._keys[GLOBAL] if domain == GLOBAL else ()
            elif domain == BATCH:
                keys = sharding.batches(shard, self.source_batches, self.shards)
            else:
                keys = (shard,) if domain == SINGLE else ()
            if any(k not in self.done[node] for k in keys):
                return False
        return True

    def waiting_for(self) -> list[int]:
        """The shards of other pods a global reduce here still needs."""
        needed = {n for n in self.graph.reduce_inputs() if self.graph.domain[n] == SINGLE}
        if not self.global_here or not needed:
            return []
        return [s for s in self._all_shards
                if any(s not in self.done[n] for n in needed) and s not in self._keys[SINGLE]]

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
        elif isinstance(event, Imported):
            self._import(event, actions)
        elif isinstance(event, SwapRequested):
            agent.draining = True
        elif isinstance(event, AgentReplaced):
            self._take_back(event.node, agent)
            agent.status, agent.broken, agent.draining = ABSENT, None, False
        elif isinstance(event, Recompute):
            self._recompute(event.node, actions)
        elif isinstance(event, Reshaped):
            self._reshape(event.graph, actions)
        elif isinstance(event, StageBroken):
            self._take_back(event.node, agent)
            agent.status, agent.broken = HELD, event.message
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
        self._take_back(node, agent)
        agent.status = ABSENT
        actions.append(Restart(node, attempt, min(0.1 * 4 ** (attempt - 1), 5.0)))
        return True

    def _recompute(self, node: str, actions: list[Action]) -> None:
        per_batch = self.graph.domain[node] == BATCH
        undone = self._undo_downstream(node, actions, include=not per_batch)
        if per_batch:
            for batch in sorted(self.done[node]):
                self._redo_batch(batch, actions)
        for other, key in undone:  # a reduce, and what follows it, runs again
            self._supply(other, key, actions)

    def _reshape(self, graph: Graph, actions: list[Action]) -> None:
        old = self.graph
        removed = [n for n in old.order if n not in graph.inputs]
        added = [n for n in graph.order if n not in old.inputs]
        for node in removed:
            agent = self.agents.pop(node)
            self.usage -= agent.reserved
            if old.domain[node] == BATCH:
                for batch in list(self.on_line):
                    if batch not in self.done[node]:
                        self._one_less(batch, actions)
        for output in [k for k in self.outputs if k[0] in removed]:
            self._delete(output, actions)
        for output in list(self.unread):
            self.unread[output] -= set(removed)
            if not self.unread[output]:
                self._delete(output, actions)
        for node in removed:
            del self.done[node], self.ready[node], self.restarts[node]
        self.graph = graph
        self._per_batch_nodes = sum(1 for n in graph.order if graph.domain[n] == BATCH)
        for node in added:
            self.done[node], self.ready[node] = set(), []
            self.agents[node], self.restarts[node] = _Agent(), 0
        admitted = set(self.mine[:self.next_source]) - set(self.redo)
        for node in added:
            for key in sorted(self.keys(node)):
                if graph.domain[node] != BATCH:
                    self._supply(node, key, actions)
                elif key in admitted:  # the batch came in before the node did
                    self._catch_up(node, key, actions)

    def _catch_up(self, node: str, batch: int, actions: list[Action]) -> None:
        """A per-batch node added after `batch` entered the line: it runs the batch
        from its inputs if they are there or still coming, else the batch runs down
        the whole line again (from the source)."""
        if batch in self.stale or batch in self.redo:
            return  # it runs down the whole line again: this node with it
        gone = [(name, batch) for name in self.graph.inputs[node]
                if batch in self.done[name] and (name, batch) not in self.outputs]
        if gone:
            self._redo_batch(batch, actions)
            return
        if batch in self.on_line:
            self.on_line[batch] += 1
        else:
            self.on_line[batch], self.produced[batch] = 1, 0
        self._supply(node, batch, actions)

    def _redo_batch(self, batch: int, actions: list[Action]) -> None:
        if batch in self.on_line:
            self.stale.add(batch)  # its later stages are at it: redo once they are done
        else:
            self._invalidate(batch, actions)

    def _supply(self, node: str, key: int, actions: list[Action]) -> None:
        """Make sure what `node`'s task `key` reads will be there: an output already
        read and deleted is made again — a batch from the source, a reduce's output by
        running the reduce again (and so on up)."""
        for name in self.graph.inputs[node]:
            for k in self._reads(node, name, key):
                if k not in self.done[name]:
                    continue  # still to come
                if (name, k) in self.outputs:
                    self.unread[(name, k)].add(node)
                elif self.graph.domain[name] == BATCH:
                    self._redo_batch(k, actions)
                else:
                    self.done[name].discard(k)
                    actions.append(Forget(name, k))
                    self._supply(name, k, actions)
        self._maybe_ready(node, key)

    def _invalidate(self, batch: int, actions: list[Action]) -> None:
        """Run source batch `batch` down the whole line again."""
        for node in self.graph.order:
            if self.graph.domain[node] == BATCH:
                if (node, batch) in self.outputs:
                    self._delete((node, batch), actions)
                if batch in self.done[node]:
                    self.done[node].discard(batch)
                    actions.append(Forget(node, batch))
        self.redo = sorted(set(self.redo) | {batch})

    def _undo_downstream(self, node: str, actions: list[Action],
                         include: bool) -> list[Key]:
        """What runs once per shard or globally, downstream of `node` (and `node` itself
        with `include`), is not done any more: it runs again when its inputs are.
        Returns what was undone."""
        undone: list[Key] = []
        below = {node} if include else set()
        for other in self.graph.order:
            if any(i in below or i == node for i in self.graph.inputs[other]):
                below.add(other)
        for other in self.graph.order:
            if other not in below or self.graph.domain[other] == BATCH:
                continue
            for key in sorted(self.done[other] & self.keys(other)):
                if (other, key) in self.outputs:
                    self._delete((other, key), actions)
                self.done[other].discard(key)
                actions.append(Forget(other, key))
                undone.append((other, key))
            agent = self.agents[other]
            if agent.status in (RUNNING, WAITING) and agent.batch is not None:
                self.obsolete.add((other, agent.batch))
        return undone

    def _take_back(self, node: str, agent: _Agent) -> None:
        """Put the agent's in-flight batch back in its queue and release its RAM."""
        if agent.status in (RUNNING, WAITING) and agent.batch is not None:
            self.ready[node] = sorted(self.ready[node] + [agent.batch])
        self.usage -= agent.reserved
        agent.batch, agent.want, agent.reserved = None, 0, 0

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

    def _import(self, event: Imported, actions: list[Action]) -> None:
        key = (event.node, event.shard)
        if event.shard in self._keys[SINGLE] or key in self.outputs:
            return  # ours, or had already
        self.done[event.node].add(event.shard)
        self.outputs[key] = event.output
        self.unread[key] = self._readers(event.node, event.shard)
        for consumer in self.graph.consumers[event.node]:
            self._maybe_ready(consumer, self._key_of(consumer, event.node, event.shard))

    def _readers(self, node: str, key: int) -> set[str]:
        """The nodes of this pod that still have to read `node`'s output for `key`."""
        readers = set()
        for consumer in self.graph.consumers[node]:
            mine = self._key_of(consumer, node, key)
            if mine in self.keys(consumer) and mine not in self.done[consumer]:
                readers.add(consumer)
        return readers

    def _done(self, agent: _Agent, event: TaskDone, actions: list[Action]) -> None:
        node, batch = event.node, event.batch
        if (node, batch) in self.obsolete:  # undone while it ran (a recompute)
            self.obsolete.discard((node, batch))
            agent.status, agent.batch = IDLE, None
            self.usage -= agent.reserved
            agent.reserved = 0
            if event.output is not None and event.output.tier == "ram":
                actions.append(Delete(event.output.path))
            self._maybe_ready(node, batch)
            return
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
            self.unread[key] = self._readers(node, batch)  # (resumed: some are done)
            if self.graph.domain[node] == BATCH and event.output.tier == "ram":
                self.produced[batch] = self.produced.get(batch, 0) + event.output.nbytes
            if not self.unread[key]:
                self._delete(key, actions)
        self._release_inputs(node, batch, actions)
        if self.graph.domain[node] == BATCH:
            self._one_less(batch, actions)
        for consumer in self.graph.consumers[node]:
            self._maybe_ready(consumer, self._key_of(consumer, node, batch))

    def _one_less(self, batch: int, actions: list[Action]) -> None:
        """One task fewer left for `batch` on the line; off the line after the last."""
        self.on_line[batch] -= 1
        if self.on_line[batch] == 0:
            del self.on_line[batch]
            self.footprint = max(self.footprint or 0, self.produced.pop(batch, 0))
            if batch in self.stale:  # made partly by a replaced version
                self.stale.discard(batch)
                self._invalidate(batch, actions)

    def _key_of(self, consumer: str, node: str, key: int) -> int:
        """The key of `consumer` that `node`'s output for `key` feeds."""
        domains = (self.graph.domain[consumer], self.graph.domain[node])
        if domains == (SINGLE, BATCH):
            return sharding.shard_of(key, self.shards)
        return 0 if domains[0] == GLOBAL else key

    def _release_inputs(self, node: str, batch: int, actions: list[Action]) -> None:
        for key in self.input_keys(node, batch):
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

    def input_keys(self, node: str, key: int) -> list[Key]:
        """The (node, key) outputs that `node`'s task `key` reads."""
        return [(name, k) for name in self.graph.inputs[node]
                for k in self._reads(node, name, key)]

    def _reads(self, node: str, name: str, key: int) -> list[int] | range:
        """The keys of input `name` that `node`'s task `key` reads."""
        if not self.graph.reads_all(node, name):
            return [key]
        if self.graph.domain[name] == BATCH:  # a per-shard reduce: the shard's batches
            return sharding.batches(key, self.source_batches, self.shards)
        return self._all_shards  # a global reduce: every shard's output

    def _maybe_ready(self, node: str, key: int) -> None:
        if key in self.done[node] or key in self.ready[node] or key not in self.keys(node):
            return
        if self.agents[node].batch == key:
            return
        if all(self._has(node, name, k) for name in self.graph.inputs[node]
               for k in self._reads(node, name, key)):
            self.ready[node].append(key)
            self.ready[node].sort()

    def _has(self, node: str, name: str, key: int) -> bool:
        """Is input `name`'s output for `key` there for `node`? A reduce does not take a
        batch made partly by a replaced version (stale), which is to be done again."""
        if key not in self.done[name]:
            return False
        return not (key in self.stale and self.graph.domain[name] == BATCH and
                    self.graph.reads_all(node, name))

    def _dispatch(self, actions: list[Action]) -> None:
        for node in self.graph.order:
            agent = self.agents[node]
            if agent.status != IDLE or agent.draining:
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
            inputs = tuple(tuple(self.outputs[(name, k)] for k in self._reads(node, name, batch))
                           for name in self.graph.inputs[node])
            actions.append(Dispatch(node, batch, inputs))

    def _admit(self) -> int | None:
        """The next source batch, if the line has room for it (backpressure)."""
        if self.next_source >= len(self.mine) and not self.redo:
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
            batch = self.mine[self.next_source]
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
        self.stale.discard(batch)
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
        return WAITING in statuses and not statuses & {RUNNING, ABSENT, HELD}

    def _fail(self, error: PodpipeError) -> list[Action]:
        self.outcome = Failed(error)
        return [self.outcome]
