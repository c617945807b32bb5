"""The run state machine: (state, event) -> actions, with no I/O.

The conductor turns what happens (an agent connects, a task finishes, a process
exits) into events, feeds them to `RunState.handle` one at a time, and carries out
the actions it returns (hand a task to an agent, grant RAM, delete a file, copy an
output to the node tier, replace a process, finish, fail). All the decisions of a
run live in this package, so they can be tested without processes:

- readiness (here): a per-batch task is ready once every input has that batch; a
  reduce task once every input has all the batches of its shard (a global reduce:
  every shard's output, some made by other pods and imported); a table is loaded
  first, beside the first source batches (while the tables load, the line keeps
  their share of the budget free), and stays for the run;
- keys (`keys.py`): which batches, shards and global keys this pod runs;
- the RAM budget (`budget.py`): bytes, backpressure; who gets them when
  (`grants.py`, RAM granted with a task among them); when the line jams
  (`jam.py`), giving up its newest batch, else spilling to the node tier;
- lifetime (here): an output is deleted as soon as every node that reads it has
  read it; what a resume would need is kept on the node tier (`Keep`);
- restarts of dead processes with backoff, swaps, holds (`lifecycle.py`), and the
  state a resumed run starts from
  (`restored`);
- swaps (here): a stage with a swap coming gets no new task and is replaced
  (`Replace`) once between batches; a swapped-in version that fails is *held*
  (`Hold`): it takes no task until swapped again, and the run waits;
- rework (`rework.py`): a recompute or an apply undoes what no longer stands.
"""

from __future__ import annotations

from podpipe.engine import grants, jam, lifecycle, rework, workers
from podpipe.engine.agent import IDLE, RUNNING, Agent
from podpipe.engine.budget import Budget
from podpipe.engine.grants import TABLE_SHARE
from podpipe.engine.events import (Action, AgentBroken, AgentExited, AgentReady, Delete,
                                   Dispatch, Event, Failed, Finished, Imported, Keep,
                                   Key, Kill, Recompute, Recycle, Reshaped, SpaceRequested,
                                   SwapRequested, TaskDone, TaskFailed, TaskTimedOut,
                                   Tick)
from podpipe.engine.workers import Pool
from podpipe.engine.keys import Keys
from podpipe.errors import DataError, PodpipeError, StageError
from podpipe.model.graph import BATCH, SINGLE, TABLE, Graph
from podpipe.model.output import Output
from podpipe.model.pipeline import SOURCE

AgentEvent = (AgentReady | SpaceRequested | TaskDone | TaskFailed | AgentExited |
              TaskTimedOut | AgentBroken)


class RunState:
    def __init__(self, graph: Graph, source_batches: int, budget: int, *,
                 retries: dict[str, int] | None = None, shards: int = 1,
                 owned: tuple[int, ...] | None = None, global_here: bool = True,
                 workers: dict[str, int | None] | None = None,
                 cpus: float = 1.0) -> None:
        self.graph = graph
        self.plan = Keys(graph, source_batches, shards=shards, owned=owned,
                         global_here=global_here)
        self.budget = Budget(budget, self.plan.per_batch_nodes)
        self.retries: dict[str, int] = dict(retries or {})
        self.restarts = {node: 0 for node in graph.order}
        self.outputs: dict[Key, Output] = {}
        self.unread: dict[Key, set[str]] = {}
        self.done: dict[str, set[int]] = {node: set() for node in graph.order}
        self.ready: dict[str, list[int]] = {node: [] for node in graph.order}
        # Each node's processes, by worker number: a fixed count, or (`workers: auto`,
        # None) one to start with, more while it holds the line back (`workers.py`).
        self.fixed: dict[str, int | None] = {n: (workers or {}).get(n, 1) for n in graph.order}
        self.agents: dict[str, dict[int, Agent]] = {
            node: {w: Agent() for w in range(self.fixed[node] or 1)} for node in graph.order}
        self.pool = Pool(cpus)
        self.keep = self.plan.kept()
        self.next_source = 0
        self.redo: list[int] = []     # source batches dropped, to load again
        self.stale: set[int] = set()  # on the line, to redo once off it (rework)
        self.obsolete: set[Key] = set()  # in-flight tasks whose result is void (rework)
        self.swapped: set[str] = set()   # stages running a swapped-in version
        self.pinned: set[Key] = set()    # outputs a stage's code still maps: not recycled
        self.outcome: Action | None = None
        for table in graph.tables:
            self.ready[table] = [0]

    def add_node(self, node: str, workers: int | None = 1) -> None:
        """A node new to the graph (an apply): nothing done, its processes to come."""
        self.done[node], self.ready[node] = set(), []
        self.fixed[node] = workers
        self.agents[node] = {w: Agent() for w in range(workers or 1)}
        self.restarts[node] = 0

    def in_containers(self) -> None:
        """Before the run starts: every node is a container the kubelet starts, which
        the conductor cannot add to: a fixed `workers: N` is N processes inside it
        (`podpipe agent --workers N`), `auto` one."""
        counts = {node: self.fixed[node] or 1 for node in self.graph.order}
        self.fixed = dict(counts)
        self.agents = {node: {w: Agent() for w in range(counts[node])} for node in counts}

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
        return self.restarts[node]

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
        return len(set(self.redo) | self.stale)

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

    # -- the transition -------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if self.outcome is not None:
            return []
        actions: list[Action] = []
        if isinstance(event, Reshaped):
            rework.reshape(self, event.graph, actions, event.workers)
            self.retries.update(event.retries)
        elif isinstance(event, Recompute):
            rework.recompute(self, event.node, actions)
        elif isinstance(event, SwapRequested):
            for each in self.agents[event.node].values():  # every worker is replaced
                each.swap = event
        elif isinstance(event, Tick):
            workers.rebalance(self, event.cpu, actions)
        elif isinstance(event, Imported):
            self._import(event)
        else:
            found = self.agents.get(event.node, {}).get(event.worker)
            if found is None:
                return actions  # a process taken back meanwhile (workers: auto)
            self._agent_event(event, found, actions)
        if self.outcome is not None:
            return actions
        lifecycle.between_batches(self, actions)
        grants.grant_waiting(self, actions)
        self.dispatch(actions)
        if isinstance(event, TaskDone) and event.wanted is not None:
            workers.after_task(self, event.node, event.wanted, event.busy, actions)
        if self.finished:
            self.budget.drain(actions)
            self.outcome = Finished()
            actions.append(self.outcome)
        elif jam.stuck(self):
            jam.relieve(self, actions)
        return actions

    def _agent_event(self, event: AgentEvent, agent: Agent, actions: list[Action]) -> None:
        node, worker = event.node, event.worker
        if isinstance(event, AgentReady):
            agent.status, agent.batch = IDLE, None
        elif isinstance(event, SpaceRequested):
            grants.request(self, agent, event, actions)
        elif isinstance(event, TaskDone):
            self._done(agent, event, actions)
        elif isinstance(event, TaskFailed) and node in self.swapped:
            lifecycle.hold(self, node, f"batch {event.batch}: {event.message}", actions)
        elif isinstance(event, TaskFailed):
            error: PodpipeError = (
                DataError(f"stage {node!r}, batch {event.batch}: {event.message}")
                if event.input_error else StageError(node, event.batch, event.message,
                                                     event.traceback))
            self.fail(error, actions)
        elif isinstance(event, AgentBroken) and node in self.swapped:
            lifecycle.hold(self, node, event.message, actions)
        elif isinstance(event, AgentBroken):
            self.fail(event.error, actions)
        elif isinstance(event, AgentExited) and node in self.swapped:
            lifecycle.hold(self, node, f"its process exited (code {event.returncode})", actions)
        elif isinstance(event, AgentExited):
            if not self.finished:
                lifecycle.restart(self, node, worker, agent, actions, "its container disconnected"
                              if event.returncode is None
                              else f"its process exited (code {event.returncode})")
        elif isinstance(event, TaskTimedOut):
            if agent.busy and agent.batch == event.batch:  # (else: done meanwhile)
                actions.append(Kill(node, worker))
                message = f"the batch took longer than its timeout of {event.seconds:g} s"
                if node in self.swapped:
                    lifecycle.hold(self, node, message, actions)
                else:
                    lifecycle.restart(self, node, worker, agent, actions, message)

    # -- pieces ----------------------------------------------------------------

    def _import(self, event: Imported) -> None:
        key = (event.node, event.shard)
        if event.shard in self.plan.in_domain(SINGLE) or key in self.outputs:
            return  # ours, or had already
        self.done[event.node].add(event.shard)
        self.outputs[key] = event.output
        self.unread[key] = self.readers(event.node, event.shard)
        for consumer in self.graph.consumers[event.node]:
            self.maybe_ready(consumer, self.plan.key_of(consumer, event.node, event.shard))

    def readers(self, node: str, key: int) -> set[str]:
        """The nodes of this pod that still have to read `node`'s output for `key`."""
        readers = set()
        for consumer in self.graph.consumers[node]:
            mine = self.plan.key_of(consumer, node, key)
            if mine in self.keys(consumer) and mine not in self.done[consumer]:
                readers.add(consumer)
        return readers

    def _done(self, agent: Agent, event: TaskDone, actions: list[Action]) -> None:
        node, batch, output = event.node, event.batch, event.output
        agent.status, agent.batch = IDLE, None
        grants.settle(self, agent)  # its output is counted below, on its own
        if (node, batch) in self.obsolete:  # undone while it ran (a recompute)
            self.obsolete.discard((node, batch))
            if output is not None and output.tier == "ram":
                actions.append(Delete(output.path))
            self.maybe_ready(node, batch)
            return
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
            return
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
                self.delete(key, actions)
        for key in self.input_keys(node, batch):
            if key in self.outputs and self.outputs[key].path in event.pinned:
                self.pinned.add(key)
            readers = self.unread.get(key)
            if readers is not None:
                readers.discard(node)
                if not readers:
                    self.delete(key, actions)
        if per_batch:
            self.one_less(batch, actions)
        for consumer in self.graph.consumers[node]:
            self.maybe_ready(consumer, self.plan.key_of(consumer, node, batch))

    def one_less(self, batch: int, actions: list[Action]) -> None:
        """One task fewer left for `batch` on the line; off the line after the last."""
        if self.budget.one_less(batch) and batch in self.stale:
            self.stale.discard(batch)  # made partly by a replaced version
            rework.invalidate(self, batch, actions)

    def delete(self, key: Key, actions: list[Action]) -> None:
        output = self.outputs.pop(key)
        self.unread.pop(key, None)  # (a table has no readers to count)
        pinned = key in self.pinned
        self.pinned.discard(key)
        if output.tier != "ram":  # the node tier keeps its copies for the run
            return
        if pinned or output.node in self.keep:  # someone else maps it: a stage's cache,
            self.budget.give(output.nbytes)    # a node-tier copy, a reader of what runs
            actions.append(Delete(output.path, held=True))  # once (undone by a recompute)
        else:
            pooled = self.budget.recycle(output.nbytes)  # its pages, for a later output
            actions.append(Delete(output.path) if pooled is None
                           else Recycle(output.path, pooled))

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
        return not (key in self.stale and self.graph.domain[name] == BATCH and
                    self.graph.reads_all(node, name))

    def dispatch(self, actions: list[Action]) -> None:
        for node, worker, agent in self.all_agents():
            if agent.status != IDLE or agent.swap is not None or agent.retire:
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
            inputs = tuple(tuple(self.outputs[(name, k)]
                                 for k in self.plan.reads(node, name, batch))
                           for name in self.graph.inputs[node])
            reserved, reuse = grants.with_task(self, node, agent, actions)
            actions.append(Dispatch(node, batch, inputs, worker, reserved, reuse,
                                    node in self.keep,
                                    any(i in self.keep for i in self.graph.inputs[node])))

    def can_admit(self) -> bool:
        """Is there a source batch to load, and room on the line for it (backpressure)?
        While the tables load, their share of the budget (all they may hold in RAM)
        is kept free: their RAM comes first."""
        if self.next_source >= len(self.plan.mine) and not self.redo:
            return False
        reserve = 0
        if any(0 not in self.done[t] for t in self.graph.tables):
            reserve = max(0, self.budget.limit // TABLE_SHARE - self.tables_held)
        first = [self.outputs[(SOURCE, b)].nbytes for b in self.budget.on_line
                 if (SOURCE, b) in self.outputs]
        return self.budget.has_room(first, reserve)

    def _admit(self) -> int | None:
        """The next source batch, if the line has room for it (backpressure)."""
        if not self.can_admit():
            return None
        mine = self.plan.mine
        if self.redo:
            batch = self.redo.pop(0)
        else:
            batch = mine[self.next_source]
            self.next_source += 1
        self.budget.enter(batch)
        return batch

    def fail(self, error: PodpipeError, actions: list[Action]) -> None:
        self.outcome = Failed(error)
        actions.append(self.outcome)
