"""The run state machine, driven by a simulated pod in every order hypothesis finds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zlib

from podpipe.engine import events as S
from podpipe.engine import jam, state
from podpipe.engine.state import RunState
from podpipe.errors import BudgetError, InputError, StageError
from podpipe.model import spec as specs
from podpipe.model.graph import Graph


def _pipeline(stages: list[dict], sinks: list[dict]):
    import yaml
    doc = {"apiVersion": "podpipe/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
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


def out(path: str, nbytes: int, tier: str = "ram") -> S.Output:
    """An output at `path` (named `node/key` in these tests)."""
    node, _, key = path.rpartition("/")
    return S.Output(node or path, int(key) if key.isdigit() else 0, path, nbytes, 1, tier=tier)


class Pod:
    """A fake pod: agents that take their tasks in an order chosen by `rng`."""

    def __init__(self, pipeline, batches: int, budget: int, size, rng: random.Random,
                 crashes: int = 0, **shards):
        self.graph = Graph.of(pipeline)
        self.state = RunState(self.graph, batches, budget,
                                retries={n: crashes for n in self.graph.order}, **shards)
        self.crashes = crashes                    # processes still to kill mid-task
        self.restarting: set[str] = set()
        self.size, self.rng = size, rng
        self.live: dict[str, int] = {}            # path -> bytes, as files in scratch
        self.tasks: dict[str, S.Dispatch] = {}    # node -> its current task
        self.granted: set[str] = set()
        self.spilled: set[str] = set()            # granted on the node tier
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
            if isinstance(action, S.Dispatch):
                assert action.node not in self.tasks, "two tasks at once for one agent"
                for group in action.inputs:
                    for output in group:
                        assert output.path in self.live or output.path in self.on_disk, \
                            f"input {output.path} is gone"
                self.tasks[action.node] = action
            elif isinstance(action, S.Grant):
                self.granted.add(action.node)
            elif isinstance(action, S.Spill):
                self.granted.add(action.node)
                self.spilled.add(action.node)
            elif isinstance(action, S.Deny):
                del self.tasks[action.node]  # the agent drops its result
            elif isinstance(action, S.Delete):
                del self.live[action.path]
            elif isinstance(action, S.Restart):
                self.restarting.add(action.node)
            elif isinstance(action, S.Forget):
                self.forgotten.append((action.node, action.key))
            elif isinstance(action, S.Keep):
                self.kept.append(action.output)
            elif isinstance(action, (S.Replace, S.Stop)):  # the process goes (and with
                self.tasks.pop(action.node, None)           # a swap, comes back)
                self.granted.discard(action.node)
                if isinstance(action, S.Replace):
                    self.restarting.add(action.node)
            else:
                self.outcome = action

    def run(self, imports: list[S.Imported] = ()) -> S.Action:
        for event in imports:  # other pods' shard outputs, on the node tier here
            self.on_disk.add(event.output.path)
            self.apply(self.state.handle(event))
        for node in self.graph.order:
            self.apply(self.state.handle(S.AgentReady(node)))
        while self.outcome is None:
            self.steps += 1
            if self.inject is not None and self.steps == self.inject[0]:
                event = self.inject[1]
                self.apply(self.state.handle(event))
                if isinstance(event, S.Reshaped):  # as the conductor does: stop the
                    gone = set(self.graph.order) - set(event.graph.order)  # removed,
                    for node in gone:                                       # start the
                        self.tasks.pop(node, None)                          # added
                        self.granted.discard(node)
                    added = [n for n in event.graph.order if n not in self.graph.order]
                    self.graph = event.graph
                    for node in added:
                        self.apply(self.state.handle(S.AgentReady(node)))
                if self.outcome is not None:
                    break
            waiting_for_grant = {n for n in self.tasks
                                 if n not in self.graph.sinks and n not in self.granted
                                 and self.state.agents[n].status == state.WAITING}
            movable = [n for n in self.tasks if n not in waiting_for_grant]
            movable += sorted(self.restarting)
            assert movable, "hung: no agent can move and the run neither ended nor failed"
            node = self.rng.choice(sorted(movable))
            if node in self.restarting:  # its new process says hello
                self.restarting.discard(node)
                self.apply(self.state.handle(S.AgentReady(node)))
                continue
            task = self.tasks[node]
            if self.crashes and node in self.tasks and self.rng.random() < 0.1:
                self.crashes -= 1  # killed mid-task: its result, if any, is lost
                del self.tasks[node]
                self.granted.discard(node)
                self.apply(self.state.handle(S.AgentExited(node, -9)))
                continue
            if node in self.graph.sinks:
                del self.tasks[node]
                self.processed.append((node, task.batch))
                self.apply(self.state.handle(S.TaskDone(node, task.batch, None)))
            elif node not in self.granted:
                self.apply(self.state.handle(S.SpaceRequested(node, task.batch,
                                                              self.size(node, task.batch))))
            else:
                self.granted.discard(node)
                del self.tasks[node]
                nbytes = self.size(node, task.batch)
                path = f"{node}/{task.batch}"
                tier = "node" if node in self.spilled else "ram"
                self.spilled.discard(node)
                if tier == "ram":
                    self.live[path] = nbytes
                else:
                    self.on_disk.add(path)
                self.max_live = max(self.max_live, sum(self.live.values()))
                self.processed.append((node, task.batch))
                self.apply(self.state.handle(S.TaskDone(
                    node, task.batch, out(path, nbytes, tier=tier))))
            assert self.state.budget.usage <= self.state.budget.limit
        return self.outcome


@settings(max_examples=150, deadline=None)
@given(pipeline=st.sampled_from([CHAIN, DIAMOND, SHARDED]), batches=st.integers(1, 12),
       seed=st.integers(0, 2**32), sizes=st.lists(st.integers(1, 100), min_size=1),
       tight=st.booleans(), crashes=st.integers(0, 3))
def test_any_order_finishes_each_task_once_within_budget(pipeline, batches, seed, sizes, tight,
                                                         crashes):
    """...and when up to `crashes` processes are killed mid-task and restarted, every
    task still finishes, with nothing left in scratch and the budget never exceeded."""
    def size(node, batch):
        return sizes[zlib.crc32(f"{node}/{batch}".encode()) % len(sizes)]

    graph = Graph.of(pipeline)
    everything = sum(size(n, b) for n in graph.order for b in RunState(graph, batches, 1).keys(n))
    budget = max(sizes) * 6 if tight else everything
    pod = Pod(pipeline, batches, budget, size, random.Random(seed), crashes)
    outcome = pod.run()
    assert pod.max_live <= budget
    if not tight:
        assert isinstance(outcome, S.Finished)
    if isinstance(outcome, S.Failed):
        assert isinstance(outcome.error, BudgetError)
        return
    expected = sorted((n, b) for n in graph.order for b in pod.state.keys(n))
    if tight or crashes:  # a batch given up for lack of RAM runs again
        assert sorted(set(pod.processed)) == expected
    else:
        assert sorted(pod.processed) == expected
    assert pod.live == {}, "outputs left in scratch after the run"
    assert pod.state.budget.usage == 0


def test_the_line_overlaps_batches_once_their_footprint_is_known():
    pod = Pod(CHAIN, 10, budget=10_000, size=lambda n, b: 10, rng=random.Random(1))
    assert isinstance(pod.run(), S.Finished)
    assert pod.state.budget.footprint == 30  # source + a + b, per batch
    assert pod.state.budget.peak > 30        # more than one batch was on the line at once


def test_the_second_batch_enters_as_soon_as_the_first_is_loaded():
    run = RunState(Graph.of(CHAIN), 3, 10_000)
    for node in ("a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    assert run.handle(S.AgentReady("source")) == [S.Dispatch("source", 0, ())]
    assert run.handle(S.SpaceRequested("source", 0, 100)) == [S.Grant("source")]
    actions = run.handle(S.TaskDone("source", 0, out("s0", 100)))
    assert S.Dispatch("source", 1, ()) in actions  # batch 0 has not crossed the line yet
    assert any(isinstance(a, S.Dispatch) and a.node == "a" and a.batch == 0 for a in actions)


def test_backpressure_keeps_a_small_budget_from_filling():
    sizes = lambda n, b: 100  # noqa: E731
    pod = Pod(CHAIN, 20, budget=350, size=sizes, rng=random.Random(7))
    assert isinstance(pod.run(), S.Finished)
    assert pod.max_live <= 350


def test_an_output_larger_than_the_budget_fails_with_a_clear_message():
    pod = Pod(CHAIN, 3, budget=50, size=lambda n, b: 80 if n == "a" else 10,
              rng=random.Random(0))
    outcome = pod.run()
    assert isinstance(outcome, S.Failed) and isinstance(outcome.error, BudgetError)
    assert "stage 'a', batch 0" in str(outcome.error)
    assert "more than the whole RAM budget" in str(outcome.error)


def test_a_failed_task_fails_the_run_naming_stage_and_batch():
    run = RunState(Graph.of(CHAIN), 2, 1000)
    for node in ("source", "a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    actions = run.handle(S.TaskFailed("a", 1, "ValueError: boom"))
    assert isinstance(actions[-1], S.Failed)
    assert isinstance(actions[-1].error, StageError)
    assert str(actions[-1].error) == "stage 'a', batch 1: ValueError: boom"
    assert run.handle(S.AgentReady("a")) == []  # a finished run takes no more events


def test_a_stage_process_that_dies_mid_batch_fails_the_run():
    run = RunState(Graph.of(CHAIN), 2, 1000)
    actions = run.handle(S.AgentReady("source"))
    assert actions == [S.Dispatch("source", 0, ())]
    actions = run.handle(S.AgentExited("source", -9))
    assert isinstance(actions[-1], S.Failed)
    assert "stage 'source', batch 0" in str(actions[-1].error)


@pytest.mark.parametrize("batches", [1, 5])
def test_a_reduce_is_handed_every_batch_of_its_input_at_once(batches):
    pipeline = _pipeline([{"name": "r", "run": "m:f", "reduce": True, "inputs": ["source"]}],
                         [{"input": "r", "uri": "o/"}])
    pod = Pod(pipeline, batches, budget=10_000, size=lambda n, b: 1, rng=random.Random(3))
    dispatched = []
    apply = pod.apply
    pod.apply = lambda actions: (dispatched.extend(
        a for a in actions if isinstance(a, S.Dispatch) and a.node == "r"), apply(actions))
    assert isinstance(pod.run(), S.Finished)
    assert len(dispatched) == 1
    assert [o.path for o in dispatched[0].inputs[0]] == [f"source/{b}" for b in range(batches)]


def test_batches_larger_than_those_seen_so_far_do_not_fail_the_run():
    """The footprint learned from small batches under-estimates big ones; the line
    must still finish when one big batch at a time fits the budget."""
    sizes = lambda n, b: 10 if b < 3 else 100  # noqa: E731
    for seed in range(20):
        pod = Pod(CHAIN, 8, budget=330, size=sizes, rng=random.Random(seed))
        outcome = pod.run()
        assert isinstance(outcome, S.Finished), (seed, outcome)
        assert pod.max_live <= 330
        assert set(pod.processed) == {(n, b) for n in ("source", "a", "b", "sink-0")
                                      for b in range(8)}


def test_a_stage_that_has_not_connected_yet_is_waited_for_not_given_up_on():
    """Outputs held for a slow-starting stage are not a jam: it will read them."""
    sizes = {"source": 10, "a": 100, "b": 10}
    run = RunState(Graph.of(CHAIN), 4, budget=150)
    files: dict[str, S.Dispatch] = {}

    def step(event):
        for action in run.handle(event):
            if isinstance(action, S.Dispatch):
                files[action.node] = action
            assert not isinstance(action, S.Failed), action.error
    for node in ("source", "a"):  # b and the sink are still starting
        step(S.AgentReady(node))
    for _ in range(3):  # the source and `a` work as far as the budget lets them
        for node in ("source", "a"):
            task = files.pop(node, None)
            if task is not None:
                step(S.SpaceRequested(node, task.batch, sizes[node]))
                if run.agents[node].status == state.RUNNING:
                    step(S.TaskDone(node, task.batch,
                                    out(f"{node}/{task.batch}", sizes[node])))
    assert run.agents["a"].status == state.WAITING
    assert run.outcome is None
    step(S.AgentReady("b"))
    assert files["b"].batch == 0


def test_a_process_killed_mid_batch_is_restarted_and_only_its_batch_is_redone():
    run = RunState(Graph.of(CHAIN), 2, 10_000, retries={"a": 1})
    for node in ("source", "a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    run.handle(S.SpaceRequested("source", 0, 10))
    assert S.Dispatch("a", 0, ((out("source/0", 10),),)) in \
        run.handle(S.TaskDone("source", 0, out("source/0", 10)))
    run.handle(S.SpaceRequested("a", 0, 10))  # granted, then killed before done
    assert run.handle(S.AgentExited("a", -9)) == [S.Restart("a", 1, 0.1)]
    assert run.budget.usage == 10  # the source output stays; a's reservation is released
    actions = run.handle(S.AgentReady("a"))
    assert actions == [S.Dispatch("a", 0, ((out("source/0", 10),),))]
    run.handle(S.SpaceRequested("a", 0, 10))
    assert run.handle(S.AgentExited("a", -9)) == [S.Failed(run.outcome.error)]
    assert str(run.outcome.error) == ("stage 'a', batch 0: its process exited (code -9) "
                                      "before finishing the batch, after 1 restarts")


def test_reduce_inputs_beyond_the_budget_spill_to_the_node_tier_and_the_run_finishes():
    """Every per-batch output a reduce reads must stay until the reduce runs: with a
    budget for three of ten, the rest go to the node tier instead of failing."""
    pipeline = _pipeline([{"name": "a", "run": "m:f", "inputs": ["source"]},
                          {"name": "r", "run": "m:f", "reduce": True, "inputs": ["a"]}],
                         [{"input": "r", "uri": "out/"}])
    pod = Pod(pipeline, 10, budget=100, size=lambda n, b: 30, rng=random.Random(3))
    assert isinstance(pod.run(), S.Finished)
    assert pod.state.budget.spills >= 6
    assert pod.max_live <= 100


@settings(max_examples=100, deadline=None)
@given(batches=st.integers(1, 12), shards=st.integers(1, 9), replicas=st.integers(1, 5),
       seed=st.integers(0, 2**32))
def test_pods_that_share_the_shards_do_every_task_once_and_the_lowest_runs_the_global_reduce(
        batches, shards, replicas, seed):
    """N pods, each running the shards it owns, the lowest ordinal importing the
    others' shard outputs for the global reduce: together they process exactly what
    one pod of one shard would, every batch once."""
    from podpipe.model import shards as sharding

    rng = random.Random(seed)
    graph = Graph.of(SHARDED)
    one = RunState(graph, batches, 10**9, shards=shards)
    expected = sorted((n, k) for n in graph.order for k in one.keys(n))
    processed: list[tuple[str, int]] = []
    handed_over: list[S.Imported] = []
    for index in reversed(range(replicas)):  # the others first: pod 0 waits for them
        pod = Pod(SHARDED, batches, 10**9, lambda n, b: 1, rng, shards=shards,
                  owned=sharding.owned(shards, replicas, index), global_here=index == 0)
        if index == 0:
            assert pod.state.waiting_for() == sorted({e.shard for e in handed_over})
        assert isinstance(pod.run(handed_over if index == 0 else []), S.Finished)
        processed += pod.processed
        handed_over += [S.Imported("r", k, out(f"r/{k}", 1, tier="node"))
                        for n, k in pod.processed if n == "r"]
        assert pod.live == {}
    assert sorted(processed) == expected
    assert ("g", 0) in expected


def test_a_swap_now_requeues_the_in_flight_batch_without_counting_a_restart():
    run = RunState(Graph.of(CHAIN), 2, 10_000, retries={})
    for node in ("source", "a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    run.handle(S.SpaceRequested("source", 0, 10))
    run.handle(S.TaskDone("source", 0, out("s0", 10)))
    assert run.agents["a"].status == state.RUNNING and run.agents["a"].batch == 0
    # no restart, no failure: the busy process is killed and its batch requeued
    assert run.handle(S.SwapRequested("a", now=True)) == [S.Replace("a", kill=True)]
    assert run.agents["a"].status == state.ABSENT and run.ready["a"] == [0]
    assert run.restarts["a"] == 0
    actions = run.handle(S.AgentReady("a"))  # the new version says hello
    assert S.Dispatch("a", 0, ((out("s0", 10),),)) in actions


@pytest.mark.parametrize("failure", [
    S.TaskFailed("a", 0, "boom"),
    S.AgentExited("a", 1),
    S.AgentBroken("a", "cannot import", InputError("cannot import")),
], ids=["raises", "dies", "cannot-start"])
def test_a_broken_version_holds_its_stage_and_the_run_waits_instead_of_failing(failure):
    run = RunState(Graph.of(CHAIN), 3, 10_000)
    for node in ("source", "a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    assert run.handle(S.SwapRequested("a")) == [S.Replace("a", kill=False)]  # idle: now
    run.handle(S.AgentReady("a"))
    run.handle(S.SpaceRequested("source", 0, 10))
    run.handle(S.TaskDone("source", 0, out("s0", 10)))
    actions = run.handle(failure)
    assert not any(isinstance(a, (S.Failed, S.Spill, S.Restart)) for a in actions)
    assert [a for a in actions if isinstance(a, S.Hold)][0].node == "a"
    assert run.held("a") and run.ready["a"] == [0] and run.outcome is None
    assert not jam.stuck(run)  # someone may come back: nothing is given up or spilled
    assert run.handle(S.SwapRequested("a")) == [S.Replace("a", kill=False)]  # swapped back
    assert run.held("a") is None
    actions = run.handle(S.AgentReady("a"))
    assert any(isinstance(a, S.Dispatch) and a.node == "a" and a.batch == 0 for a in actions)


def test_a_stage_that_cannot_start_fails_the_run_unless_it_was_swapped_in():
    run = RunState(Graph.of(CHAIN), 3, 10_000)
    error = InputError("cannot import 'm:f'")
    actions = run.handle(S.AgentBroken("a", "cannot import", error))
    assert actions == [S.Failed(error)]


def test_a_stage_with_a_swap_coming_gets_no_new_task_and_is_replaced_between_batches():
    run = RunState(Graph.of(CHAIN), 3, 10_000)
    for node in ("source", "a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    for batch in (0, 1):
        run.handle(S.SpaceRequested("source", batch, 10))
        run.handle(S.TaskDone("source", batch, out(f"s{batch}", 10)))
    assert run.agents["a"].status == state.RUNNING and run.ready["a"] == [1]
    assert run.handle(S.SwapRequested("a")) == []  # busy: not yet
    run.handle(S.SpaceRequested("a", 0, 10))
    actions = run.handle(S.TaskDone("a", 0, out("a0", 10)))
    assert not any(isinstance(x, S.Dispatch) and x.node == "a" for x in actions)
    assert S.Replace("a", kill=False) in actions  # between batches: the swap happens
    actions = run.handle(S.AgentReady("a"))
    assert any(isinstance(x, S.Dispatch) and x.node == "a" and x.batch == 1 for x in actions)


@settings(max_examples=100, deadline=None)
@given(batches=st.integers(1, 8), seed=st.integers(0, 2**32), at=st.integers(1, 80),
       node=st.sampled_from(["a", "c", "d", "r"]))
def test_a_recompute_redoes_what_the_stage_had_done_and_everything_after_it(
        batches, seed, at, node):
    """Whenever it comes, a recompute of `node` ends with every batch `node` had done
    done again by it and by everything downstream, the run finished and nothing left
    in scratch; what no longer stands is forgotten."""
    graph = Graph.of(DIAMOND)
    pod = Pod(DIAMOND, batches, 10**6, lambda n, b: 1 + b % 3, random.Random(seed))
    marker: dict = {}
    original = pod.state.handle

    def handle(event):
        if isinstance(event, S.Recompute):
            marker["before"] = {n: set(pod.state.done[n]) for n in graph.order}
            marker["processed"] = len(pod.processed)
        return original(event)

    pod.state.handle = handle
    pod.inject = (at, S.Recompute(node))
    assert isinstance(pod.run(), S.Finished)
    assert pod.live == {} and pod.state.budget.usage == 0
    if "before" not in marker:
        return  # the run ended before the recompute came
    after = pod.processed[marker["processed"]:]
    below = {node} | {n for n in graph.order if node in _upstream(graph, n)}
    for n in below:
        redone = marker["before"][node] if graph.domain[n] == graph.domain[node] else \
            (marker["before"][n] if graph.domain[n] != "batch" else set())
        for key in redone:
            assert (n, key) in after, (n, key, "not done again")
    assert all(k in pod.state.done[n] for n in graph.order for k in pod.state.keys(n))


def _upstream(graph, node):
    seen, todo = set(), list(graph.inputs[node])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(graph.inputs[n])
    return seen


@pytest.mark.parametrize("node", ["r", "after", "d"])
def test_a_recompute_after_the_reduce_ran_makes_its_inputs_again_from_the_source(node):
    """The reduce's inputs were deleted once it read them: recomputing it (or what
    feeds it) runs the batches down the line again, then the reduce and what follows
    (recomputing what follows it reuses its output while that is still there)."""
    pod = Pod(DIAMOND, 4, 10**6, lambda n, b: 1, random.Random(3))
    state = pod.state
    original = state.handle
    fired = {}

    def handle(event):
        actions = original(event)
        if not fired and 0 in state.done["r"] and not state.finished:
            fired["at"] = len(pod.processed)
            actions = actions + original(S.Recompute(node))
        return actions

    state.handle = handle
    assert isinstance(pod.run(), S.Finished)
    assert fired, "the reduce never ran before the end"
    after = pod.processed[fired["at"]:]
    assert ("after", 0) in after and (node == "after" or ("r", 0) in after)
    if node == "d":
        assert sorted(b for n, b in after if n == "source") == [0, 1, 2, 3]
    assert pod.live == {} and state.budget.usage == 0


GROWN = _pipeline([
    {"name": "a", "run": "m:f", "inputs": ["source"]},
    {"name": "b", "run": "m:f", "inputs": ["a"]},
    {"name": "c", "run": "m:f", "inputs": ["a"]},
    {"name": "r", "run": "m:f", "reduce": True, "inputs": ["c"]},
], [{"input": "b", "uri": "out/"}, {"name": "c-out", "input": "c", "uri": "c/"},
    {"name": "r-out", "input": "r", "uri": "r/"}])
SHRUNK = _pipeline([
    {"name": "a", "run": "m:f", "inputs": ["source"]},
    {"name": "c", "run": "m:f", "inputs": ["a"]},
], [{"name": "c-out", "input": "c", "uri": "c/"}])


@settings(max_examples=150, deadline=None)
@given(batches=st.integers(1, 8), seed=st.integers(0, 2**32), at=st.integers(1, 60),
       new=st.sampled_from([GROWN, SHRUNK]), tight=st.booleans())
def test_a_reshaped_line_runs_every_key_of_its_added_nodes_and_drops_the_removed(
        batches, seed, at, new, tight):
    """Whenever the pipeline changes (`podpipe apply`), the added stages and sinks
    still get every batch (from the source again where their inputs are gone), the
    removed ones get nothing more, and the run ends with nothing left in scratch."""
    sizes = lambda n, b: 1 + (b + len(n)) % 4  # noqa: E731
    pod = Pod(CHAIN, batches, 40 if tight else 10**6, sizes, random.Random(seed))
    pod.inject = (at, S.Reshaped(Graph.of(new), {}))
    outcome = pod.run()
    assert isinstance(outcome, S.Finished), outcome
    assert pod.live == {} and pod.state.budget.usage == 0
    graph = Graph.of(new)
    if pod.steps < at:
        return  # the run ended before the change came
    for node in graph.order:
        assert pod.state.keys(node) <= pod.state.done[node], node
        if node not in Graph.of(CHAIN).order:
            assert {b for n, b in pod.processed if n == node} == pod.state.keys(node)
