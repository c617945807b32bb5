"""The ledger: the run's data, and the only code that changes it.

Everything the engine knows of a run lives here: the keys each node runs (`plan`),
the RAM budget, the outputs on hand and who has still to read them, what each node
has done and has ready, each node's processes (`agents`, each an `Agent` record
that changes only through its own methods) and their restarts, the source batches
on and off the line (`line`), and the outcome. The policies (`grants`, `jam`,
`lifecycle`, `rework`, `workers`) read it and change it only through the operations
below (and the `Agent`, `Budget` and `Pool` methods); what they emit they return as
actions. `state.RunState` routes each event to them. Views (the status, the
timeline) read `progress()`, a frozen record, never the ledger itself.

Below, in order: the records it holds (`Line`), construction and nodes; queries;
then the operations, by what they change: outputs (`delete`, `task_done`,
`take_import`, `restore`), what is done and ready (`undo`, `maybe_ready`,
`requeue`, `next_ready`), the line (`admit`, `one_less`, `load_again`, ...), and
processes and nodes (`add_worker`, `take_agents`, `forget_node`, `regraph`,
`fail`, `finish`). Before a run starts: `in_containers`, and a standing line's job
taking its warm processes and tables (`warm`, `table_kept`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from podpipe.engine.agent import ABSENT, HELD, Agent, Crashes, Pool
from podpipe.engine.budget import Budget
from podpipe.engine.events import (Action, Delete, Failed, Finished, Imported, Keep, Key,
                                   NodeProgress, Progress, Recycle, TaskDone)
from podpipe.engine.keys import Keys
from podpipe.errors import PodpipeError
from podpipe.model.graph import BATCH, SINGLE, TABLE, Graph
from podpipe.model.output import Output


@dataclass
class Line:
    """Source batches on their way: the next to load, those to load again, and what
    a rework voided."""

    next_source: int = 0
    redo: list[int] = field(default_factory=list)  # source batches dropped, to load again
    stale: set[int] = field(default_factory=set)   # on the line, to redo once off it
    obsolete: set[Key] = field(default_factory=set)  # in-flight tasks whose result is void


class Ledger:
    def __init__(self, graph: Graph, source_batches: int, budget: int, *,
                 retries: dict[str, int] | None = None, shards: int = 1,
                 owned: tuple[int, ...] | None = None, global_here: bool = True,
                 workers: dict[str, int | None] | None = None,
                 cpus: float = 1.0) -> None:
        self.plan = Keys(graph, source_batches, shards=shards, owned=owned,
                         global_here=global_here)
        self.budget = Budget(budget, self.plan.per_batch_nodes)
        self.retries: dict[str, int] = dict(retries or {})
        self.crashes = {node: Crashes() for node in graph.order}
        self.outputs: dict[Key, Output] = {}
        self.unread: dict[Key, set[str]] = {}
        self.done: dict[str, set[int]] = {node: set() for node in graph.order}
        self.ready: dict[str, list[int]] = {node: [] for node in graph.order}
        # Each node's processes, by worker number: a fixed count, or (`workers: auto`,
        # None) one to start with, more while it holds the line back (`workers.py`).
        self.pool = Pool(cpus, {n: (workers or {}).get(n, 1) for n in graph.order})
        self.agents: dict[str, dict[int, Agent]] = {
            node: {w: Agent() for w in range(self.pool.fixed[node] or 1)}
            for node in graph.order}
        self.line = Line()
        self.swapped: set[str] = set()   # stages running a swapped-in version
        self.pinned: set[Key] = set()    # outputs a stage's code still maps: not recycled
        self.lent: set[str] = set()      # nodes whose processes serve the next job (a line's)
        self.outcome: Action | None = None
        for table in graph.tables:
            self.ready[table] = [0]

    @property
    def graph(self) -> Graph:
        return self.plan.graph

    @property
    def keep(self) -> frozenset[str]:
        """The nodes whose outputs the node tier keeps (`Keys.kept`)."""
        return self.plan.kept

    def add_node(self, node: str, workers: int | None = 1) -> None:
        """A node new to the graph (an apply): nothing done, its processes to come."""
        self.done[node], self.ready[node] = set(), []
        self.pool.fixed[node] = workers
        self.agents[node] = {w: Agent() for w in range(workers or 1)}
        self.crashes[node] = Crashes()

    def in_containers(self, cpus: float) -> None:
        """Before the run starts: every node is a container the kubelet starts: a fixed
        `workers: N` is N processes inside it (`podpipe agent --workers N`), `auto`
        starts as one, and grows in its container (which starts the workers asked
        for) within `cpus` (what the conductor cannot see from its own container)."""
        counts = {node: self.pool.fixed[node] or 1 for node in self.graph.order}
        self.pool.cpus = cpus
        self.agents = {node: {w: Agent() for w in range(counts[node])} for node in counts}

    def table_kept(self, node: str, output: Output) -> None:
        """Before the run starts: table `node` is in RAM already (a standing line kept
        it from the job before, its files unchanged): held, read by every task."""
        self.ready[node] = []
        self.done[node].add(0)
        self.outputs[(node, 0)] = output
        if output.tier == "ram":
            self.budget.take(output.nbytes)

    def warm(self, workers: dict[str, list[int]]) -> None:
        """Before the run starts: a standing line's processes, warm from its last job
        (each node's worker numbers); a `workers: auto` node starts with those it has."""
        for node, numbers in workers.items():
            if numbers and node in self.agents and self.pool.fixed[node] is None:
                self.agents[node] = {w: Agent() for w in numbers}

    @property
    def tables_held(self) -> int:  # bytes of RAM the tables hold (the node tier's: none)
        held = (self.outputs.get((table, 0)) for table in self.graph.tables)
        return sum(o.nbytes for o in held if o is not None and o.tier == "ram")

    def all_agents(self) -> list[tuple[str, int, Agent]]:
        """(node, worker, agent) of every process the run has, in graph order."""
        return [(node, w, agent) for node in self.graph.order
                for w, agent in sorted(self.agents[node].items())]

    def worker_count(self, node: str) -> int:
        return len(self.agents[node])

    # -- queries --------------------------------------------------------------

    def keys(self, node: str) -> frozenset[int]:
        """What `node` runs in this pod: source batches, shards, or {0} (global)."""
        return self.plan.of(node)

    def total(self, node: str) -> int:
        return len(self.keys(node))

    def done_count(self, node: str) -> int:
        return len(self.done[node] & self.keys(node))

    def restart_count(self, node: str) -> int:
        return self.crashes[node].restarts

    def done_keys(self) -> dict[str, list[int]]:
        """What each node has finished (for a checkpoint's manifest)."""
        return {node: sorted(keys) for node, keys in self.done.items()}

    def kept(self) -> list[Output]:
        """The outputs the run holds now (a resumed run: those it restored)."""
        return list(self.outputs.values())

    def shards_here(self) -> list[int]:
        return self.plan.shards_here()

    def to_redo(self) -> int:
        """Source batches still to run down the line again (given up or stale)."""
        return len(set(self.line.redo) | self.line.stale)

    def held(self, node: str) -> str | None:
        """Why `node` is held (a swapped-in version failed), or None."""
        return next((a.broken for a in self.agents[node].values() if a.broken), None)

    @property
    def finished(self) -> bool:
        return all(self.keys(n) <= self.done[n] for n in self.graph.order)

    def complete(self, shard: int | None) -> bool:
        """Has this pod finished everything of `shard` (None: the global nodes)?"""
        return all(k in self.done[node] for node in self.graph.order
                   for k in self.plan.in_group(node, shard))

    def waiting_for(self) -> list[int]:
        """The shards of other pods a global reduce here still needs."""
        needed = [n for n in self.graph.reduce_inputs() if self.graph.domain[n] == SINGLE]
        if not self.plan.global_here or not needed:
            return []
        here = self.plan.in_domain(SINGLE)
        return [s for s in self.plan.all_shards
                if s not in here and any(s not in self.done[n] for n in needed)]

    def input_keys(self, node: str, key: int) -> list[Key]:
        return self.plan.input_keys(node, key)

    def progress(self) -> Progress:
        """A frozen record of the run now, for views; starts the next record's window
        for `recent_peak`."""
        nodes = {}
        for node in self.graph.order:
            loaded = self.outputs.get((node, 0)) if node in self.graph.tables else None
            nodes[node] = NodeProgress(
                done=self.done_count(node), total=self.total(node),
                restarts=self.crashes[node].restarts, workers=self.worker_count(node),
                workers_max=max(self.worker_count(node), self.pool.most.get(node, 0)),
                queued=len(self.ready[node]),
                in_flight=sum(a.busy for a in self.agents[node].values()),
                held=self.held(node), tier=loaded.tier if loaded is not None else None)
        budget = self.budget
        return Progress(scratch=budget.usage, peak=budget.peak,
                        recent_peak=budget.since_last(), budget=budget.whole,
                        spills=budget.spills, on_line=len(budget.on_line), nodes=nodes,
                        shards_here=self.shards_here(), waiting_for=self.waiting_for())

    # -- operations: outputs ------------------------------------------------------

    def readers(self, node: str, key: int) -> set[str]:
        """The nodes of this pod that still have to read `node`'s output for `key`."""
        readers = set()
        for consumer in self.graph.consumers[node]:
            mine = self.plan.key_of(consumer, node, key)
            if mine in self.keys(consumer) and mine not in self.done[consumer]:
                readers.add(consumer)
        return readers

    def delete(self, key: Key) -> list[Action]:
        """`key`'s output is read by all who will: its file goes (its pages to the pool
        of warm files, unless someone else maps it)."""
        output = self.outputs.pop(key)
        self.unread.pop(key, None)  # (a table has no readers to count)
        pinned = key in self.pinned
        self.pinned.discard(key)
        if output.tier != "ram":  # the node tier keeps its copies for the run
            return []
        if pinned or output.node in self.keep:  # someone else maps it: a stage's cache,
            self.budget.give(output.nbytes)    # a node-tier copy, a reader of what runs
            return [Delete(output.path, held=True)]  # once (undone by a recompute)
        pooled = self.budget.recycle(output.nbytes)  # its pages, for a later output
        return [Delete(output.path) if pooled is None else Recycle(output.path, pooled)]

    def read_again(self, key: Key, node: str) -> None:
        """`node` is to read `key`'s output (again: a rework)."""
        self.unread[key].add(node)

    def task_done(self, event: TaskDone) -> tuple[list[Action], bool]:
        """A task's output is in: kept, its inputs read (deleted by the last reader),
        what follows made ready. True with the actions if its batch left the line
        stale (made partly by a replaced version): to be done again."""
        node, batch, output = event.node, event.batch, event.output
        actions: list[Action] = []
        self.crashes[node].progress(batch)
        if (node, batch) in self.line.obsolete:  # undone while it ran (a recompute)
            self.line.obsolete.discard((node, batch))
            if output is not None and output.tier == "ram":
                actions.append(Delete(output.path))
            self.maybe_ready(node, batch)
            return actions, False
        self.done[node].add(batch)
        per_batch = self.graph.domain[node] == BATCH
        if self.graph.domain[node] == TABLE:  # held for the run, read by every task
            if output is not None:
                self.outputs[(node, batch)] = output
                if output.tier == "ram":
                    self.budget.take(output.nbytes)
            for consumer in self.graph.consumers[node]:
                for mine in sorted(self.keys(consumer)):
                    self.maybe_ready(consumer, mine)
            return actions, False
        if output is not None:
            key = (node, batch)
            self.outputs[key] = output
            if output.tier == "ram":
                self.budget.take(output.nbytes)
                if per_batch:
                    self.budget.made(node, batch, output.nbytes)
            if node in self.keep or output.tier != "ram":
                actions.append(Keep(output))
            self.unread[key] = self.readers(node, batch)  # (resumed: some are done)
            if not self.unread[key]:
                actions += self.delete(key)
        for key in self.input_keys(node, batch):
            if key in self.outputs and self.outputs[key].path in event.pinned:
                self.pinned.add(key)
            readers = self.unread.get(key)
            if readers is not None:
                readers.discard(node)
                if not readers:
                    actions += self.delete(key)
        stale = per_batch and self.one_less(batch)
        for consumer in self.graph.consumers[node]:
            self.maybe_ready(consumer, self.plan.key_of(consumer, node, batch))
        return actions, stale

    def take_import(self, event: Imported) -> None:
        """Another pod's output of a shard, for a global reduce here."""
        key = (event.node, event.shard)
        if event.shard in self.plan.in_domain(SINGLE) or key in self.outputs:
            return  # ours, or had already
        self.done[event.node].add(event.shard)
        self.outputs[key] = event.output
        self.unread[key] = self.readers(event.node, event.shard)
        for consumer in self.graph.consumers[event.node]:
            self.maybe_ready(consumer, self.plan.key_of(consumer, event.node, event.shard))

    def restore(self, key: Key, output: Output, readers: set[str]) -> None:
        """An output a resumed run found kept, still to be read by `readers`."""
        self.outputs[key] = output
        self.unread[key] = readers
        if output.tier == "ram":
            self.budget.take(output.nbytes)

    # -- operations: what is done and ready ---------------------------------------

    def mark_done(self, node: str, key: int) -> None:
        self.done[node].add(key)

    def undo(self, node: str, key: int) -> bool:
        """`node`'s `key` is not done (nor ready) any more; was it done?"""
        was = key in self.done[node]
        self.done[node].discard(key)
        if key in self.ready[node]:
            self.ready[node].remove(key)
        return was

    def maybe_ready(self, node: str, key: int) -> None:
        if key in self.done[node] or key in self.ready[node] or key not in self.keys(node):
            return
        if any(a.batch == key for a in self.agents[node].values()):
            return  # in flight
        if all(self._has(node, name, k) for name in self.graph.inputs[node]
               for k in self.plan.reads(node, name, key)):
            self.ready[node].append(key)
            self.ready[node].sort()

    def _has(self, node: str, name: str, key: int) -> bool:
        """Is input `name`'s output for `key` there for `node`? A reduce does not take a
        batch made partly by a replaced version (stale), which is to be done again."""
        if key not in self.done[name]:
            return False
        return not (key in self.line.stale and self.graph.domain[name] == BATCH and
                    self.graph.reads_all(node, name))

    def requeue(self, node: str, batch: int) -> None:
        """A batch taken back from a process goes back to its node's queue."""
        self.ready[node] = sorted(self.ready[node] + [batch])

    def next_ready(self, node: str) -> int | None:
        return self.ready[node].pop(0) if self.ready[node] else None

    # -- operations: the line --------------------------------------------------------

    def admit(self) -> int:
        """The next source batch onto the line: one to load again first."""
        if self.line.redo:
            batch = self.line.redo.pop(0)
        else:
            batch = self.plan.mine[self.line.next_source]
            self.line.next_source += 1
        self.budget.enter(batch)
        return batch

    def may_admit(self) -> bool:
        """Is there a source batch still to load?"""
        return self.line.next_source < len(self.plan.mine) or bool(self.line.redo)

    def one_less(self, batch: int) -> bool:
        """One task fewer left for `batch` on the line; off the line after the last.
        True if it left the line stale (made partly by a replaced version): to be
        undone and redone (`rework.invalidate`)."""
        if self.budget.one_less(batch) and batch in self.line.stale:
            self.line.stale.discard(batch)
            return True
        return False

    def load_again(self, batch: int) -> None:
        """Source batch `batch` runs down the whole line again, from the source."""
        self.line.stale.discard(batch)
        self.line.redo = sorted(set(self.line.redo) | {batch})

    def mark_stale(self, batch: int) -> None:
        """`batch` is on the line, made partly by a replaced version: redone once off."""
        self.line.stale.add(batch)

    def void(self, key: Key) -> None:
        """The result of the task `key`, in flight, is void (a recompute undid it)."""
        self.line.obsolete.add(key)

    def all_loaded(self) -> None:
        """A resumed run: what is left of the source comes through `load_again`."""
        self.line.next_source = len(self.plan.mine)

    # -- operations: processes and nodes --------------------------------------------

    def add_worker(self, node: str) -> int:
        worker = max(self.agents[node]) + 1
        self.agents[node][worker] = Agent()
        return worker

    def remove_worker(self, node: str, worker: int) -> None:
        del self.agents[node][worker]

    def swapped_in(self, node: str) -> None:
        self.swapped.add(node)

    def allow_retries(self, retries: dict[str, int]) -> None:
        self.retries.update(retries)

    def take_agents(self, node: str) -> list[Agent]:
        """A node an apply removed: its processes, to be stopped."""
        return list(self.agents.pop(node).values())

    def forget_node(self, node: str) -> None:
        """A node an apply removed (its processes taken, its outputs deleted): gone,
        with its claims on others' outputs."""
        for readers in self.unread.values():
            readers.discard(node)
        del self.done[node], self.ready[node], self.crashes[node]
        self.pool.drop(node)
        self.swapped.discard(node)

    def unclaimed(self) -> list[Key]:
        """Outputs nobody is to read any more (after nodes were removed)."""
        return [key for key, readers in self.unread.items() if not readers]

    def regraph(self, graph: Graph) -> None:
        """The graph changed (an apply): the same pod's keys over it."""
        self.plan = self.plan.regraphed(graph)
        self.budget.regraphed(self.plan.per_batch_nodes)

    # -- operations: a line's jobs at once (`jobs: N`) ---------------------------------

    def spent(self) -> frozenset[str]:
        """The nodes this job has no more tasks for, whose processes may serve the next
        job: every key done, none of its processes busy or held, and nothing to run
        down the line again (a batch given up or stale would need them)."""
        if self.line.redo or self.line.stale or self.outcome is not None:
            return frozenset()
        return frozenset(
            n for n in self.graph.order if n not in self.lent and self.agents[n]
            and self.keys(n) <= self.done[n]
            and not any(a.busy or a.status == HELD for a in self.agents[n].values()))

    def hand_over(self, node: str) -> None:  # its processes: the next job's from now on
        self.lent.add(node)
        self.agents[node] = {}

    def take_over(self, node: str, workers: list[int]) -> None:
        """The older job handed over `node`'s processes (these worker numbers): a
        `workers: auto` node has those it has, as a job starting warm does."""
        if workers and self.pool.fixed[node] is None and all(
                a.status == ABSENT for a in self.agents[node].values()):
            self.agents[node] = {w: Agent() for w in workers}

    def fail(self, error: PodpipeError) -> list[Action]:
        self.outcome = Failed(error)
        return [self.outcome]

    def finish(self) -> list[Action]:
        drained = self.budget.drain()
        self.outcome = Finished()
        return drained + [self.outcome]
