"""A simulated pod for the engine: `Pod` drives a `RunState` through the events a real
pod would send, in whatever order a test (or hypothesis) picks, with crashes,
restarts and shards, and checks what the engine must never do (a task read after
its input was emptied or recycled, RAM over the budget, a task done twice). Used
by the engine's tests; the pipelines it is usually run on are here too.
"""

from __future__ import annotations

import random
import zlib

from podpipe.engine import events as S
from podpipe.engine.agent import ABSENT, HELD, WAITING
from podpipe.engine.state import RunState
from podpipe.errors import BudgetError, InputError, StageError
from podpipe.model import spec as specs
from podpipe.model.graph import Graph


def _pipeline(stages: list[dict], sinks: list[dict]):
    import yaml
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
           "spec": {"source": {"uri": "x.parquet"}, "stages": stages, "sinks": sinks}}
    return specs.parse(yaml.safe_dump(doc))


CHAIN = _pipeline([{"name": "a", "run": "m:f", "inputs": ["source"]},
                   {"name": "b", "run": "m:f", "inputs": ["a"]}],
                  [{"input": "b", "uri": "out/"}])
DIAMOND = _pipeline([
    {"name": "a", "run": "m:f", "inputs": ["source"]},
    {"name": "b", "run": "m:f", "inputs": ["a"]},
    {"name": "c", "run": "m:f", "inputs": ["a"]},
    {"name": "d", "run": "m:f", "inputs": ["b", "c"]},
    {"name": "r", "run": "m:f", "reduce": True, "inputs": ["d"]},
    {"name": "after", "run": "m:f", "inputs": ["r"]},
], [{"input": "after", "uri": "out/"}, {"name": "per-batch", "input": "d", "uri": "o2/"}])


SHARDED = _pipeline([
    {"name": "a", "run": "m:f", "inputs": ["source"]},
    {"name": "r", "run": "m:f", "reduce": True, "inputs": ["a"]},
    {"name": "g", "run": "m:f", "reduce": True, "scope": "global", "inputs": ["r"]},
], [{"input": "g", "uri": "out/"}, {"name": "per-shard", "input": "r", "uri": "o2/"},
    {"name": "per-batch", "input": "a", "uri": "o3/"}])


def _with_tables(stages: list[dict], sinks: list[dict], tables: list[str]):
    import yaml
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
           "spec": {"source": {"uri": "x.parquet"}, "stages": stages, "sinks": sinks,
                    "tables": [{"name": t, "uri": f"{t}.parquet"} for t in tables]}}
    return specs.parse(yaml.safe_dump(doc))


JOINED = _with_tables([
    {"name": "a", "run": "m:f", "inputs": ["source", "dim"]},
    {"name": "b", "run": "m:f", "inputs": ["a", "dim", "codes"]},
    {"name": "r", "run": "m:f", "reduce": True, "inputs": ["b", "codes"]},
], [{"input": "r", "uri": "out/"}, {"name": "per-batch", "input": "a", "uri": "o2/"}],
    ["dim", "codes"])


def out(path: str, nbytes: int, tier: str = "ram") -> S.Output:
    """An output at `path` (named `node/key` in these tests)."""
    node, _, key = path.rpartition("/")
    return S.Output(node or path, int(key) if key.isdigit() else 0, path, nbytes, 1, tier=tier)


class Pod:
    """A fake pod: agents (one per worker of each node) that take their tasks in an
    order chosen by `rng`. An agent is (node, worker)."""

    def __init__(self, pipeline, batches: int, budget: int, size, rng: random.Random,
                 crashes: int = 0, workers: int = 1, **shards):
        self.graph = Graph.of(pipeline)
        fixed = {n: (workers if self.graph.domain[n] == "batch" else 1)
                 for n in self.graph.order}
        self.state = RunState(self.graph, batches, budget,
                              retries={n: crashes for n in self.graph.order},
                              workers=fixed, **shards)
        self.crashes = crashes                    # processes still to kill mid-task
        self.restarting: set[tuple[str, int]] = set()
        self.size, self.rng = size, rng
        self.live: dict[str, int] = {}            # path -> bytes, as files in scratch
        self.pool: dict[int, int] = {}            # pooled (warm) files: id -> bytes
        self.held: dict[tuple[str, int], tuple[int, int]] = {}  # agent -> warm file granted
        self.prepaid: dict[tuple[str, int], int] = {}  # agent -> RAM granted with its task
        self.tasks: dict[tuple[str, int], S.Dispatch] = {}  # agent -> its current task
        self.granted: set[tuple[str, int]] = set()
        self.spilled: set[tuple[str, int]] = set()  # granted on the node tier
        self.on_disk: set[str] = set()            # paths written there
        self.processed: list[tuple[str, int]] = []
        self.outcome = None
        self.max_live = 0
        self.forgotten: list[tuple[str, int]] = []
        self.kept: list[S.Output] = []            # what the node tier was asked to keep
        self.inject: tuple[int, S.Event] | None = None  # (after how many steps, event)
        self.steps = 0

    def apply(self, actions):
        for action in actions:
            agent = (getattr(action, "node", None), getattr(action, "worker", 0))
            if isinstance(action, S.Dispatch):
                assert agent not in self.tasks, "two tasks at once for one agent"
                assert not any(t.node == action.node and t.batch == action.batch
                               for t in self.tasks.values()), "one task given twice"
                for group in action.inputs:
                    for output in group:
                        assert output.path in self.live or output.path in self.on_disk, \
                            f"input {output.path} is gone"
                self.tasks[agent] = action
                if action.reserved:  # granted with the task
                    self.prepaid[agent] = action.reserved
                if action.reuse is not None:  # the task's, until written over or deleted
                    self.held[agent] = (action.reuse, self.pool.pop(action.reuse))
            elif isinstance(action, S.Grant):
                self.granted.add(agent)
                if action.reuse is not None:  # to be written over: the task's
                    self.held[agent] = (action.reuse, self.pool.pop(action.reuse))
            elif isinstance(action, S.Spill):
                self.granted.add(agent)
                self.spilled.add(agent)
            elif isinstance(action, S.Deny):
                del self.tasks[agent]  # the agent drops its result
            elif isinstance(action, S.Delete):
                # emptied at once unless held: then nobody may be reading it
                assert action.held or not self.reading(action.path), action
                del self.live[action.path]
            elif isinstance(action, S.Recycle):
                # never a file the node tier is copying (it reads the same pages), nor
                # one a task still reads (the next output is written over it)
                assert action.path.rpartition("/")[0] not in self.state.ledger.keep, action
                assert not self.reading(action.path), action
                self.pool[action.pooled] = self.live.pop(action.path)
            elif isinstance(action, S.Unpool):  # pooled, or held by a task taken away
                held = [a for a, (i, _) in self.held.items() if i == action.pooled]
                assert held or action.pooled in self.pool, action
                if held:
                    del self.held[held[0]]
                else:
                    del self.pool[action.pooled]
            elif isinstance(action, S.Restart):
                self.restarting.add(agent)
            elif isinstance(action, S.Forget):
                self.forgotten.append((action.node, action.key))
            elif isinstance(action, S.Keep):
                self.kept.append(action.output)
            elif isinstance(action, S.Replace):  # the worker's process goes, and comes back
                self.tasks.pop(agent, None)
                self.granted.discard(agent)
                self.prepaid.pop(agent, None)
                self.restarting.add(agent)
            elif isinstance(action, (S.Stop, S.Hold)):  # every worker of the node goes
                for gone in [a for a in self.tasks if a[0] == action.node]:
                    del self.tasks[gone]
                    self.granted.discard(gone)
                    self.prepaid.pop(gone, None)
                if isinstance(action, S.Hold):
                    self.outcome = action
            else:
                self.outcome = action

    def reading(self, path: str) -> bool:
        """Does a task in flight read the file at `path`?"""
        return any(o.path == path for task in self.tasks.values()
                   for group in task.inputs for o in group)

    def hello(self, node: str) -> None:
        for worker in sorted(self.state.ledger.agents[node]):
            self.apply(self.state.handle(S.AgentReady(node, worker)))

    def run(self, imports: list[S.Imported] = ()) -> S.Action:
        for event in imports:  # other pods' shard outputs, on the node tier here
            self.on_disk.add(event.output.path)
            self.apply(self.state.handle(event))
        for node in self.graph.order:
            self.hello(node)
        while self.outcome is None:
            self.steps += 1
            if self.inject is not None and self.steps == self.inject[0]:
                event = self.inject[1]
                self.apply(self.state.handle(event))
                if isinstance(event, S.Reshaped):  # as the conductor does: start the added
                    added = [n for n in event.graph.order if n not in self.graph.order]
                    self.graph = event.graph
                    for node in added:
                        self.hello(node)
                if self.outcome is not None:
                    break
            waiting_for_grant = {a for a in self.tasks
                                 if a[0] not in self.graph.sinks and a not in self.granted
                                 and self.state.ledger.agents[a[0]][a[1]].status == WAITING}
            movable = [a for a in self.tasks if a not in waiting_for_grant]
            movable += sorted(self.restarting)
            assert movable, "hung: no agent can move and the run neither ended nor failed"
            agent = self.rng.choice(sorted(movable))
            node, worker = agent
            if agent in self.restarting:  # its new process says hello
                self.restarting.discard(agent)
                self.apply(self.state.handle(S.AgentReady(node, worker)))
                continue
            task = self.tasks[agent]
            if self.crashes and self.rng.random() < 0.1:
                self.crashes -= 1  # killed mid-task: its result, if any, is lost
                del self.tasks[agent]
                self.granted.discard(agent)
                self.prepaid.pop(agent, None)  # (its warm file stays until unpooled)
                self.apply(self.state.handle(S.AgentExited(node, -9, worker)))
                continue
            if node in self.graph.sinks:
                del self.tasks[agent]
                self.processed.append((node, task.batch))
                self.apply(self.state.handle(S.TaskDone(node, task.batch, None, worker)))
            elif agent not in self.granted and self.prepaid.get(agent, 0) < self.size(
                    node, task.batch):  # (what came with the task is too little, if any)
                if self.prepaid.pop(agent, 0):
                    self.held.pop(agent, None)  # the agent deletes its warm file first
                self.apply(self.state.handle(S.SpaceRequested(
                    node, task.batch, self.size(node, task.batch), worker)))
            else:
                self.granted.discard(agent)
                self.prepaid.pop(agent, None)
                self.held.pop(agent, None)  # written over, or deleted (spilled)
                del self.tasks[agent]
                nbytes = self.size(node, task.batch)
                path = f"{node}/{task.batch}"
                tier = "node" if agent in self.spilled else "ram"
                self.spilled.discard(agent)
                if tier == "ram":
                    self.live[path] = nbytes
                else:
                    self.on_disk.add(path)
                self.max_live = max(self.max_live, sum(self.live.values()) + sum(
                    self.pool.values()) + sum(n for _, n in self.held.values()))
                self.processed.append((node, task.batch))
                self.apply(self.state.handle(S.TaskDone(
                    node, task.batch, out(path, nbytes, tier=tier), worker)))
            assert self.state.ledger.budget.usage <= self.state.ledger.budget.limit
        return self.outcome
