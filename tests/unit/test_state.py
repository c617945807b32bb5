"""The run state machine, driven by a simulated pod in every order hypothesis finds."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zlib

from podpipe.engine import events as S
from podpipe.engine import budget as budgets
from podpipe.engine import jam, state, workers
from podpipe.engine import agent as agents
from podpipe.engine.agent import ABSENT, HELD, WAITING
from podpipe.engine.state import RunState
from podpipe.errors import BudgetError, InputError, StageError
from podpipe.model import spec as specs
from podpipe.model.graph import Graph

from podsim import CHAIN, DIAMOND, JOINED, SHARDED, Pod, _pipeline, _with_tables, out


@pytest.fixture(autouse=True, scope="module")
def _bytes_not_pages():
    """These tests count scratch in bytes (sizes of 10 or 100); tmpfs's pages are
    tested on their own below."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budgets, "PAGE", 1)
        yield


@settings(max_examples=150, deadline=None)
@given(pipeline=st.sampled_from([CHAIN, DIAMOND, SHARDED, JOINED]), batches=st.integers(1, 12),
       seed=st.integers(0, 2**32), sizes=st.lists(st.integers(1, 100), min_size=1),
       tight=st.booleans(), crashes=st.integers(0, 3), workers=st.integers(1, 3))
def test_any_order_finishes_each_task_once_within_budget(pipeline, batches, seed, sizes, tight,
                                                         crashes, workers):
    """...and when up to `crashes` processes are killed mid-task and restarted, every
    task still finishes, with nothing left in scratch and the budget never exceeded."""
    def size(node, batch):
        return sizes[zlib.crc32(f"{node}/{batch}".encode()) % len(sizes)]

    graph = Graph.of(pipeline)
    everything = sum(size(n, b) for n in graph.order for b in RunState(graph, batches, 1).ledger.keys(n))
    budget = max(sizes) * 6 if tight else everything
    pod = Pod(pipeline, batches, budget, size, random.Random(seed), crashes, workers)
    outcome = pod.run()
    assert pod.max_live <= budget
    if not tight:
        assert isinstance(outcome, S.Finished)
    if isinstance(outcome, S.Failed):
        assert isinstance(outcome.error, BudgetError)
        return
    expected = sorted((n, b) for n in graph.order for b in pod.state.ledger.keys(n))
    if tight or crashes:  # a batch given up for lack of RAM runs again
        assert sorted(set(pod.processed)) == expected
    else:
        assert sorted(pod.processed) == expected
    tables = {path: n for path, n in pod.live.items() if path.split("/")[0] in graph.tables}
    assert pod.live == tables and pod.pool == {} and pod.held == {}, \
        "outputs left in scratch after the run"
    assert pod.state.ledger.budget.usage == sum(tables.values())  # tables stay for the whole run


def test_the_line_overlaps_batches_once_their_footprint_is_known():
    pod = Pod(CHAIN, 10, budget=10_000, size=lambda n, b: 10, rng=random.Random(1))
    assert isinstance(pod.run(), S.Finished)
    assert pod.state.ledger.budget.footprint == 30  # source + a + b, per batch
    assert pod.state.ledger.budget.peak > 30        # more than one batch was on the line at once


def test_the_second_batch_enters_as_soon_as_the_first_is_loaded():
    run = RunState(Graph.of(CHAIN), 3, 10_000)
    for node in ("a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    assert run.handle(S.AgentReady("source")) == [S.Dispatch("source", 0, ())]
    assert run.handle(S.SpaceRequested("source", 0, 100)) == [S.Grant("source")]
    actions = run.handle(S.TaskDone("source", 0, out("s0", 100)))
    # batch 0 has not crossed the line yet; the RAM its output took comes with the task
    assert S.Dispatch("source", 1, (), reserved=100) in actions
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
                if run.ledger.agents[node][0].status == agents.RUNNING:
                    step(S.TaskDone(node, task.batch,
                                    out(f"{node}/{task.batch}", sizes[node])))
    assert run.ledger.agents["a"][0].status == WAITING
    assert run.ledger.outcome is None
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
    # the source output stays; a's reservation is released (the source's next task came
    # with RAM for an output like its first)
    assert run.ledger.agents["source"][0].reserved == 10 and run.ledger.budget.usage == 10 + 10
    actions = run.handle(S.AgentReady("a"))
    assert actions == [S.Dispatch("a", 0, ((out("source/0", 10),),))]
    run.handle(S.SpaceRequested("a", 0, 10))
    assert run.handle(S.AgentExited("a", -9)) == [S.Failed(run.ledger.outcome.error)]
    assert str(run.ledger.outcome.error) == ("stage 'a', batch 0: its process exited (code -9) "
                                      "before finishing the batch, after 1 restarts")


def _two_workers_busy(retries: int) -> RunState:
    """`a` with two workers, each running a batch (0 and 1)."""
    run = RunState(Graph.of(CHAIN), 6, 10_000, retries={"a": retries}, workers={"a": 2})
    for node, worker in (("source", 0), ("a", 0), ("a", 1), ("b", 0), ("sink-0", 0)):
        run.handle(S.AgentReady(node, worker))
    for batch in (0, 1):
        run.handle(S.SpaceRequested("source", batch, 10))
        run.handle(S.TaskDone("source", batch, out(f"source/{batch}", 10)))
    assert {run.ledger.agents["a"][w].batch for w in (0, 1)} == {0, 1}
    return run


def _restart_both(run: RunState, at: float) -> None:
    for worker in (0, 1):
        actions = run.handle(S.AgentExited("a", -9, worker, at=at + worker * 0.01))
        assert not any(isinstance(a, S.Failed) for a in actions), run.ledger.outcome
    for worker in (0, 1):
        run.handle(S.AgentReady("a", worker))


def test_workers_of_a_node_dying_together_are_one_incident_and_retries_count_per_batch():
    """Every process of a node killed at once, twice (a container crashing twice), with
    `retries: 2`: two incidents, two deaths per batch — the run goes on; the third
    death of batch 0's processes fails it, naming the batch."""
    run = _two_workers_busy(retries=2)
    _restart_both(run, at=10.0)
    _restart_both(run, at=20.0)
    assert run.ledger.restart_count("a") == 4 and run.ledger.outcome is None
    worker = next(w for w, agent in run.ledger.agents["a"].items() if agent.batch == 0)
    run.handle(S.AgentExited("a", -9, worker, at=30.0))
    assert str(run.ledger.outcome.error) == ("stage 'a', batch 0: its process exited (code -9) "
                                             "before finishing the batch, after 2 restarts")


def test_a_batch_done_ends_a_crash_loop_count_but_not_its_batches_deaths():
    """Deaths without a batch done in between are a crash loop: `retries: 1` allows
    one; a batch finished in between starts the count afresh."""
    run = RunState(Graph.of(CHAIN), 4, 10_000, retries={"a": 1})
    for node in ("source", "a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    assert run.handle(S.AgentExited("a", 1, at=1.0)) == [S.Restart("a", 1, 0.1)]  # idle
    run.handle(S.AgentReady("a"))
    run.handle(S.SpaceRequested("source", 0, 10))
    run.handle(S.TaskDone("source", 0, out("source/0", 10)))
    run.handle(S.SpaceRequested("a", 0, 10))
    run.handle(S.TaskDone("a", 0, out("a/0", 10)))  # progress
    assert run.handle(S.AgentExited("a", 1, at=2.0)) == [S.Restart("a", 1, 0.1)]
    run.handle(S.AgentReady("a"))
    failed = run.handle(S.AgentExited("a", 1, at=3.0))  # twice without a batch done
    assert isinstance(failed[-1], S.Failed)
    assert "2 times without finishing a batch, after 1 restarts" in str(failed[-1].error)


def test_reduce_inputs_beyond_the_budget_spill_to_the_node_tier_and_the_run_finishes():
    """Every per-batch output a reduce reads must stay until the reduce runs: with a
    budget for three of ten, the rest go to the node tier instead of failing."""
    pipeline = _pipeline([{"name": "a", "run": "m:f", "inputs": ["source"]},
                          {"name": "r", "run": "m:f", "reduce": True, "inputs": ["a"]}],
                         [{"input": "r", "uri": "out/"}])
    pod = Pod(pipeline, 10, budget=100, size=lambda n, b: 30, rng=random.Random(3))
    assert isinstance(pod.run(), S.Finished)
    assert pod.state.ledger.budget.spills >= 6
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
    expected = sorted((n, k) for n in graph.order for k in one.ledger.keys(n))
    processed: list[tuple[str, int]] = []
    handed_over: list[S.Imported] = []
    for index in reversed(range(replicas)):  # the others first: pod 0 waits for them
        pod = Pod(SHARDED, batches, 10**9, lambda n, b: 1, rng, shards=shards,
                  owned=sharding.owned(shards, replicas, index), global_here=index == 0)
        if index == 0:
            assert pod.state.ledger.waiting_for() == sorted({e.shard for e in handed_over})
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
    assert run.ledger.agents["a"][0].status == agents.RUNNING and run.ledger.agents["a"][0].batch == 0
    # no restart, no failure: the busy process is killed and its batch requeued
    assert run.handle(S.SwapRequested("a", now=True)) == [S.Replace("a", kill=True)]
    assert run.ledger.agents["a"][0].status == ABSENT and run.ledger.ready["a"] == [0]
    assert run.ledger.restart_count("a") == 0
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
    assert run.ledger.held("a") and run.ledger.ready["a"] == [0] and run.ledger.outcome is None
    assert not jam.stuck(run.ledger)  # someone may come back: nothing is given up or spilled
    assert run.handle(S.SwapRequested("a")) == [S.Replace("a", kill=False)]  # swapped back
    assert run.ledger.held("a") is None
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
    assert run.ledger.agents["a"][0].status == agents.RUNNING and run.ledger.ready["a"] == [1]
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
            marker["before"] = {n: set(pod.state.ledger.done[n]) for n in graph.order}
            marker["processed"] = len(pod.processed)
        return original(event)

    pod.state.handle = handle
    pod.inject = (at, S.Recompute(node))
    assert isinstance(pod.run(), S.Finished)
    assert pod.live == {} and pod.state.ledger.budget.usage == 0
    if "before" not in marker:
        return  # the run ended before the recompute came
    after = pod.processed[marker["processed"]:]
    below = {node} | {n for n in graph.order if node in _upstream(graph, n)}
    for n in below:
        redone = marker["before"][node] if graph.domain[n] == graph.domain[node] else \
            (marker["before"][n] if graph.domain[n] != "batch" else set())
        for key in redone:
            assert (n, key) in after, (n, key, "not done again")
    assert all(k in pod.state.ledger.done[n] for n in graph.order for k in pod.state.ledger.keys(n))


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
    fired = _recompute_when(pod, node, lambda: 0 in state.ledger.done["r"] and not state.ledger.finished)
    assert isinstance(pod.run(), S.Finished)
    assert fired, "the reduce never ran before the end"
    after = pod.processed[fired["at"]:]
    assert ("after", 0) in after and (node == "after" or ("r", 0) in after)
    if node == "d":
        assert sorted(b for n, b in after if n == "source") == [0, 1, 2, 3]
    assert pod.live == {} and state.ledger.budget.usage == 0


def test_an_output_a_task_still_reads_is_deleted_but_not_emptied_under_it():
    """A recompute undoes the reduce's output while `after` reads it: the file is
    deleted `held` (its pages stay its reader's), not emptied at once."""
    pod = Pod(DIAMOND, 4, 10**6, lambda n, b: 1, random.Random(3))
    state = pod.state
    fired = _recompute_when(pod, "r",
                            lambda: any(a.busy for a in state.ledger.agents["after"].values()))
    assert isinstance(pod.run(), S.Finished)
    assert [a for a in fired["actions"] if isinstance(a, S.Delete) and a.path == "r/0"] \
        == [S.Delete(path="r/0", held=True)]
    assert pod.live == {} and state.ledger.budget.usage == 0


def _recompute_when(pod: Pod, node: str, condition) -> dict:
    """Recompute `node` the first time `condition()` holds after an event; what was
    seen then: the tasks processed so far (`at`), what the recompute answered."""
    original, fired = pod.state.handle, {}

    def handle(event):
        actions = original(event)
        if not fired and condition():
            fired["at"] = len(pod.processed)
            fired["actions"] = original(S.Recompute(node))
            actions = actions + fired["actions"]
        return actions

    pod.state.handle = handle
    return fired


def test_a_task_says_whether_its_output_and_its_inputs_are_kept_on_the_node_tier():
    """What the node tier keeps is hashed when written (its copy is checked against
    that), and not kept mapped by its readers (it is deleted whole, not emptied)."""
    pod = Pod(DIAMOND, 3, 10**6, lambda n, b: 1, random.Random(1))
    original, seen = pod.state.handle, {}

    def handle(event):
        actions = original(event)
        for a in actions:
            if isinstance(a, S.Dispatch):
                seen.setdefault(a.node, set()).add((a.kept, a.reads_kept))
        return actions

    pod.state.handle = handle
    assert isinstance(pod.run(), S.Finished)
    assert seen["d"] == {(True, False)} and seen["r"] == {(True, True)}  # r reads d
    assert seen["after"] == {(True, True)} and seen["b"] == {(False, False)}  # once
    assert seen["source"] == {(False, False)}


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
    assert pod.live == {} and pod.state.ledger.budget.usage == 0
    graph = Graph.of(new)
    if pod.steps < at:
        return  # the run ended before the change came
    for node in graph.order:
        assert pod.state.ledger.keys(node) <= pod.state.ledger.done[node], node
        if node not in Graph.of(CHAIN).order:
            assert {b for n, b in pod.processed if n == node} == pod.state.ledger.keys(node)


# -- workers ---------------------------------------------------------------------


def _ready_run(workers: dict, batches: int = 6, cpus: float = 2.0) -> RunState:
    run = RunState(Graph.of(CHAIN), batches, 10**6, workers=workers, cpus=cpus)
    for node in run.ledger.graph.order:
        for worker in sorted(run.ledger.agents[node]):
            run.handle(S.AgentReady(node, worker))
    return run


def test_each_worker_of_a_node_takes_its_own_batch():
    run = _ready_run({"source": 1, "a": 3, "b": 1, "sink-0": 1})
    for batch in range(3):  # the source loads three batches
        assert run.ledger.agents["source"][0].batch == batch
        run.handle(S.SpaceRequested("source", batch, 10))
        run.handle(S.TaskDone("source", batch, out(f"source/{batch}", 10)))
    assert sorted(run.ledger.agents["a"]) == [0, 1, 2]
    assert sorted(a.batch for a in run.ledger.agents["a"].values()) == [0, 1, 2]  # at once


def test_a_swap_replaces_every_worker_and_recomputes_once_the_last_is_gone():
    pod = Pod(CHAIN, 6, 10**6, lambda n, b: 1, random.Random(5), workers=3)
    pod.inject = (12, S.SwapRequested("a", recompute=True))
    assert isinstance(pod.run(), S.Finished)
    assert pod.state.ledger.swapped == {"a"}
    # every batch of `a` was (re)done by the new version after its last old worker went
    assert sorted({b for n, b in pod.processed if n == "a"}) == list(range(6))


def test_a_held_stage_holds_every_worker():
    run = _ready_run({"source": 1, "a": 3, "b": 1, "sink-0": 1})
    run.handle(S.SwapRequested("a"))
    for worker in range(3):
        run.handle(S.AgentReady("a", worker))  # the new version's processes
    actions = run.handle(S.AgentBroken("a", "cannot import", InputError("x"), 1))
    assert [a for a in actions if isinstance(a, S.Hold)] == [S.Hold("a", "cannot import")]
    assert {a.status for a in run.ledger.agents["a"].values()} == {HELD}


def test_auto_gives_the_bottleneck_a_worker_when_a_core_is_free():
    run = _ready_run({"source": None, "a": None, "b": None, "sink-0": None}, batches=20)
    run.ledger.ready["a"] = [5, 6, 7, 8]  # batches wait for `a`, whose one worker is busy
    run.ledger.agents["a"][0].status, run.ledger.agents["a"][0].batch = agents.RUNNING, 4
    actions = []
    for _ in range(4):  # a second of ticks: `a` uses a whole core, the rest little
        actions += run.handle(S.Tick({"source": 0.1, "a": 1.0, "b": 0.1}))
    assert S.AddWorker("a", 1) in actions
    assert run.ledger.worker_count("a") == 2


def test_auto_gives_a_waiting_node_as_many_workers_as_it_has_batches_waiting():
    run = _ready_run({"source": None, "a": None, "b": None, "sink-0": None}, batches=20)
    run.ledger.ready["a"] = [5, 6, 7, 8, 9]
    run.ledger.agents["a"][0].status, run.ledger.agents["a"][0].batch = agents.RUNNING, 4
    actions = []
    for _ in range(4):  # `a` mostly waits (I/O): little CPU per worker
        actions += run.handle(S.Tick({"a": 0.02}))
    assert [a for a in actions if isinstance(a, S.AddWorker)] == [
        S.AddWorker("a", w) for w in range(1, 6)]


def test_auto_takes_no_node_that_sat_waiting_for_its_input_for_io_bound():
    run = _ready_run({"source": None, "a": None, "b": None, "sink-0": None}, batches=20)
    for _ in range(3):  # `a` waits for its input: idle, no CPU
        run.handle(S.Tick({"b": 1.0}))
    run.ledger.ready["a"] = [5, 6, 7, 8, 9]  # then a backlog: it has just started on batch 4
    run.ledger.agents["a"][0].status, run.ledger.agents["a"][0].batch = agents.RUNNING, 4
    actions = run.handle(S.Tick({"a": 0.0, "b": 1.0}))
    assert not any(isinstance(a, S.AddWorker) for a in actions)


def test_auto_counts_the_cores_every_process_of_the_pod_uses():
    run = _ready_run({"source": None, "a": None, "b": None, "sink-0": None}, batches=20)
    run.ledger.ready["a"] = [5, 6, 7, 8]
    run.ledger.agents["a"][0].status, run.ledger.agents["a"][0].batch = agents.RUNNING, 4
    actions = []
    for _ in range(4):  # `a` uses a core, and a process off the line (a table's load,
        actions += run.handle(S.Tick({"a": 1.0, "dim": 1.0}))  # say) the other
    assert not any(isinstance(a, S.AddWorker) for a in actions)


def _tasks(fixed: int | None, cores: float, tick: dict[str, float] | None = None,
           ticks: int = 2, took: float = 0.05, tasks: int = 2) -> list[list[S.Action]]:
    """Batches wait for `a`, which does `tasks` of them taking `took` seconds and
    wanting `cores` of a core each (after `ticks` ticks in which the pod's processes
    wanted `tick`)."""
    run = _ready_run({"source": None, "a": fixed, "b": None, "sink-0": None}, batches=40)
    for _ in range(ticks):
        run.handle(S.Tick(tick or {}))
    for batch in range(tasks + 3):
        run.handle(S.SpaceRequested("source", batch, 10))
        run.handle(S.TaskDone("source", batch, out(f"source/{batch}", 10)))
    actions = []
    for batch in range(tasks):
        run.handle(S.SpaceRequested("a", batch, 10))
        actions.append(run.handle(S.TaskDone("a", batch, out(f"a/{batch}", 10),
                                             busy=took, wanted=cores * took)))
    return actions


def _added(actions: list[S.Action]) -> list[S.AddWorker]:
    return [a for a in actions if isinstance(a, S.AddWorker)]


def test_auto_gives_a_node_whose_task_waited_on_io_a_worker_per_batch_waiting_at_once():
    first, second = _tasks(None, cores=0.05)
    # batch 1 was handed to the worker that did 0; batches 2, 3 and 4 wait
    assert _added(first) == [S.AddWorker("a", w) for w in (1, 2, 3)]
    assert _added(second) == []  # each has its batch


def test_auto_judges_short_tasks_only_once_enough_of_them_are_seen():
    # 5 ms tasks: one that stalled says nothing; eight of them in a row are I/O
    outlier = _tasks(None, cores=0.05, took=0.005, tasks=1)
    assert not any(_added(actions) for actions in outlier)
    waits = _tasks(None, cores=0.05, took=0.005, tasks=8)
    assert not any(_added(actions) for actions in waits[:7]) and _added(waits[7])


def test_auto_gives_a_node_whose_tasks_used_their_core_one_worker_if_the_pod_has_a_core():
    first, second = _tasks(None, cores=0.95, tick={"a": 1.0, "source": 0.3})
    assert _added(first) == []  # one task says little
    assert _added(second) == [S.AddWorker("a", 1)]


@pytest.mark.parametrize("fixed,cores,tick,ticks", [
    (None, 0.9, {"a": 1.0, "source": 0.3}, 1), (None, 0.9, {"a": 1.0, "source": 0.9}, 2),
    (1, 0.05, None, 0)], ids=["cpu-bound-first-tick", "cpu-bound-cores-taken", "fixed"])
def test_no_worker_is_added_after_tasks_without_a_free_core_or_to_a_fixed_node(
        fixed, cores, tick, ticks):
    assert not any(_added(actions) for actions in _tasks(fixed, cores, tick, ticks))


def test_after_a_worker_is_added_the_cores_are_judged_again_from_a_whole_tick():
    run = _ready_run({"source": None, "a": None, "b": None, "sink-0": None}, batches=20)
    run.handle(S.Tick({"a": 1.0}))
    run.handle(S.Tick({"a": 1.0}))
    assert run.ledger.pool.free() == pytest.approx(1.25)
    assert workers.add(run.ledger, "b", 1) == [S.AddWorker("b", 1)]
    run.handle(S.Tick({"a": 1.0}))  # b's new worker ran for part of it
    assert run.ledger.pool.free() == 0.0
    run.handle(S.Tick({"a": 1.0, "b": 1.0}))
    assert run.ledger.pool.free() == pytest.approx(0.25)


def test_auto_takes_an_idle_worker_back_when_the_cores_are_taken():
    run = _ready_run({"source": None, "a": None, "b": None, "sink-0": None}, batches=20)
    run.handle(S.Tick({}))
    run.ledger.agents["b"][1] = agents.Agent(status=agents.IDLE)  # b had a second worker
    run.ledger.ready["a"] = [5, 6, 7]
    run.ledger.agents["a"][0].status, run.ledger.agents["a"][0].batch = agents.RUNNING, 4
    actions = []
    for _ in range(4):  # both cores busy: `a` and the source
        actions += run.handle(S.Tick({"source": 1.0, "a": 1.0, "b": 0.01}))
    assert S.RemoveWorker("b", 1) in actions and 1 not in run.ledger.agents["b"]
    assert not any(isinstance(a, S.AddWorker) for a in actions)


def test_fixed_workers_are_left_as_they_are():
    run = _ready_run({"source": 1, "a": 1, "b": 1, "sink-0": 1}, batches=20)
    run.ledger.ready["a"] = [5, 6, 7]
    run.ledger.agents["a"][0].status, run.ledger.agents["a"][0].batch = agents.RUNNING, 4
    actions = [a for _ in range(8) for a in run.handle(S.Tick({"a": 1.0}))]
    assert not any(isinstance(a, (S.AddWorker, S.RemoveWorker)) for a in actions)


def test_split_shares_cores_by_cost_and_predicts_the_pace():
    from podpipe.engine.workers import split

    workers, pace = split({"source": 0.3, "a": 0.1, "b": 0.2}, cpus=12)
    assert workers == {"source": 6, "a": 2, "b": 4}
    assert pace == pytest.approx(12 / 0.6)  # every core busy: 20 batches a second
    workers, pace = split({"source": 0.3, "a": 0.01}, cpus=2)
    assert workers == {"source": 2, "a": 1}  # at least one each
    assert pace == pytest.approx(2 / 0.31)


def test_the_budget_counts_whole_pages_as_tmpfs_holds_them(monkeypatch):
    monkeypatch.setattr(budgets, "PAGE", 4096)
    budget = budgets.Budget(5 * 4096, 1)
    for _ in range(3):
        budget.take(100)  # three small files: three pages of tmpfs
    budget.take(5000)  # and two
    assert budget.usage == 5 * 4096 and not budget.fits(1) and budget.fits(0)
    budget.give(100)
    assert budget.fits(4096) and not budget.fits(4097)
    budget.take(100)
    warm = budget.recycle(5000)  # no one reads it: pooled, its two pages kept
    assert budget.pool == {warm: 8192} and budget.usage == 5 * 4096
    assert budget.grant(4097) == ((warm, 8192), [])  # two pages, both warm already
    assert budget.usage == 5 * 4096
    budget.give(8192)
    budget.take(4097)  # written: the output's own two pages
    assert budget.usage == 5 * 4096


def test_the_pool_hands_out_the_smallest_warm_file_that_holds_an_output():
    from podpipe.engine.budget import Budget

    budget = Budget(1000, 1)
    budget.take(600)
    small, large = budget.recycle(100), budget.recycle(500)
    assert budget.pool == {small: 100, large: 500} and budget.usage == 600
    assert budget.reuse(80) == small and budget.reuse(300) == large
    assert budget.reuse(900) == large  # none holds it: the largest, all its pages reused
    assert budget.reuse(40) is None  # under half of the smallest: its pages would go
    given_up = budget.trim(600, keep=large)  # 600 more must fit: the small one goes
    assert given_up == [S.Unpool(small)] and budget.usage == 500
    assert budget.drain() == [S.Unpool(large)]
    assert budget.pool == {} and budget.usage == 0
    assert budget.has_room([]) is True


def test_a_pooled_file_is_written_over_by_the_next_output():
    pod = Pod(CHAIN, 6, 10**6, lambda n, b: 10, random.Random(2))
    reused = []
    apply = pod.apply

    def watching(actions):
        reused.extend(a.reuse for a in actions
                      if isinstance(a, (S.Grant, S.Dispatch)) and a.reuse)
        apply(actions)
    pod.apply = watching
    assert isinstance(pod.run(), S.Finished)
    assert reused, "no output was written over a warm file"
    assert pod.pool == {} and pod.state.ledger.budget.usage == 0


def _dispatched(actions) -> list[tuple[str, int]]:
    return [(a.node, a.batch) for a in actions if isinstance(a, S.Dispatch)]


def test_tables_load_beside_the_first_batches_and_stay_for_the_run_once_each():
    run = RunState(Graph.of(JOINED), 3, 10_000)
    dispatched = [d for node in run.ledger.graph.order for d in _dispatched(
        run.handle(S.AgentReady(node)))]
    assert dispatched == [("source", 0), ("dim", 0), ("codes", 0)]
    run.handle(S.SpaceRequested("source", 0, 10))
    actions = run.handle(S.TaskDone("source", 0, out("source/0", 10)))
    assert _dispatched(actions) == [("source", 1)]  # room beside the tables' share;
    run.handle(S.SpaceRequested("dim", 0, 10))       # `a` waits for dim
    actions = run.handle(S.TaskDone("dim", 0, out("dim/0", 10)))
    assert _dispatched(actions) == [("a", 0)]
    pod = Pod(JOINED, 3, 10_000, lambda node, batch: 10, random.Random(1))
    assert isinstance(pod.run(), S.Finished)
    assert sorted(o.path for o in pod.state.ledger.outputs.values()) == ["codes/0", "dim/0"]
    assert pod.state.ledger.budget.usage == 20


def test_while_the_tables_load_the_line_leaves_their_share_of_the_budget_free():
    run = RunState(Graph.of(JOINED), 3, 1000)
    for node in run.ledger.graph.order:
        run.handle(S.AgentReady(node))
    run.handle(S.SpaceRequested("source", 0, 100))
    # The next batch would take the line's guess to 2 x 100 x 4 nodes, beside the
    # tables' 500: it waits for them.
    assert _dispatched(run.handle(S.TaskDone("source", 0, out("source/0", 100)))) == []
    for table in ("dim", "codes"):
        run.handle(S.SpaceRequested(table, 0, 100))
        actions = run.handle(S.TaskDone(table, 0, out(f"{table}/0", 100)))
    assert ("source", 1) in _dispatched(actions)  # the tables are in: the rest is the line's


def test_every_task_of_a_reader_is_handed_the_table():
    graph = Graph.of(JOINED)
    run = RunState(graph, 2, 10_000)
    for node in graph.order:
        run.handle(S.AgentReady(node))
    for table in ("dim", "codes"):
        run.handle(S.SpaceRequested(table, 0, 10))
        run.handle(S.TaskDone(table, 0, out(f"{table}/0", 10)))
    run.handle(S.SpaceRequested("source", 0, 10))
    actions = run.handle(S.TaskDone("source", 0, out("source/0", 10)))
    task = next(a for a in actions if isinstance(a, S.Dispatch) and a.node == "a")
    assert [[o.path for o in group] for group in task.inputs] == [["source/0"], ["dim/0"]]


def test_a_table_larger_than_half_the_budget_is_loaded_on_the_node_tier():
    graph = Graph.of(JOINED)
    run = RunState(graph, 2, 1000)
    for node in graph.order:
        run.handle(S.AgentReady(node))
    assert S.Spill("dim", 0) in run.handle(S.SpaceRequested("dim", 0, 501))
    assert any(isinstance(a, S.Grant) and a.node == "codes"
               for a in run.handle(S.SpaceRequested("codes", 0, 400)))
    run.handle(S.TaskDone("dim", 0, out("dim/0", 501, tier="node")))
    run.handle(S.TaskDone("codes", 0, out("codes/0", 400)))
    assert run.ledger.budget.usage == 400  # the node tier's is not RAM budget


def test_an_apply_resizes_a_node_up_at_once_and_down_as_its_workers_come_free():
    graph = Graph.of(CHAIN)
    counts = {"source": 1, "a": 1, "b": 1, "sink-0": 1}
    run = RunState(graph, 6, 10_000, workers=counts)
    for node in graph.order:
        run.handle(S.AgentReady(node))
    actions = run.handle(S.Reshaped(graph, {}, {**counts, "a": 3}))
    assert [a.worker for a in actions if isinstance(a, S.AddWorker) and a.node == "a"] == [1, 2]
    for worker in (1, 2):
        run.handle(S.AgentReady("a", worker))
    for batch in (0, 1):  # two batches: workers 0 and 1 of `a` on them, 2 idle
        run.handle(S.SpaceRequested("source", batch, 10))
        run.handle(S.TaskDone("source", batch, out(f"source/{batch}", 10)))
    assert {w: agent.batch for w, agent in run.ledger.agents["a"].items()} == {0: 0, 1: 1, 2: None}
    actions = run.handle(S.Reshaped(graph, {}, counts))
    assert [a for a in actions if isinstance(a, S.RemoveWorker)] == [S.RemoveWorker("a", 2)]
    run.handle(S.SpaceRequested("a", 1, 10, 1))  # the busy one goes once its task is done
    actions = run.handle(S.TaskDone("a", 1, out("a/1", 10), 1))
    assert S.RemoveWorker("a", 1) in actions
    assert not [a for a in actions if isinstance(a, S.Dispatch) and a.worker == 1]
    assert sorted(run.ledger.agents["a"]) == [0] and run.ledger.pool.fixed["a"] == 1


def test_a_task_comes_with_the_ram_its_node_last_needed_and_asks_only_for_more():
    run = RunState(Graph.of(CHAIN), 4, 10_000, retries={"a": 1})
    for node in ("source", "a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    run.handle(S.SpaceRequested("source", 0, 100))  # its first output: asked for
    actions = run.handle(S.TaskDone("source", 0, out("source/0", 100)))
    assert S.Dispatch("source", 1, (), reserved=100) in actions
    assert S.Dispatch("a", 0, ((out("source/0", 100),),)) in actions  # `a`: none seen yet
    assert run.ledger.budget.usage == 100 + 100
    run.handle(S.SpaceRequested("a", 0, 50))
    run.handle(S.TaskDone("a", 0, out("a/0", 50)))  # source/0 read: pooled, warm
    assert run.ledger.budget.pool == {1: 100}
    # source's batch 1 is larger than what came with it: that goes back, the rest is
    # granted as asked (over the warm file, the largest there is)
    assert run.handle(S.SpaceRequested("source", 1, 120)) == [S.Grant("source", reuse=1)]
    assert run.ledger.budget.usage == 50 + 120 and run.ledger.budget.pool == {}
    actions = run.handle(S.TaskDone("source", 1, out("source/1", 120)))
    assert S.Dispatch("source", 2, (), reserved=120) in actions  # the most of its last
    assert S.Dispatch("a", 1, ((out("source/1", 120),),), reserved=50) in actions
    run.handle(S.SpaceRequested("b", 0, 10))
    actions = run.handle(S.TaskDone("b", 0, out("b/0", 10)))  # a/0 read: pooled
    assert run.ledger.budget.pool == {2: 50}
    # `a` dies holding what came with its task: the RAM goes back, and nothing is
    # granted with a task while someone waits for RAM
    before = run.ledger.budget.usage
    assert run.handle(S.AgentExited("a", -9)) == [S.Restart("a", 1, 0.1)]
    assert run.ledger.budget.usage == before - 50
    run.handle(S.SpaceRequested("source", 2, 10_000))  # all of it: it waits
    assert run.ledger.agents["source"][0].status == WAITING
    actions = run.handle(S.AgentReady("a"))
    assert S.Dispatch("a", 1, ((out("source/1", 120),),)) in actions  # no RAM with it


def test_a_warm_file_granted_with_a_task_is_deleted_if_its_process_dies():
    run = RunState(Graph.of(CHAIN), 4, 10_000, retries={"source": 1})
    for node in ("source", "a", "b", "sink-0"):
        run.handle(S.AgentReady(node))
    run.handle(S.SpaceRequested("source", 0, 100))
    run.handle(S.TaskDone("source", 0, out("source/0", 100)))
    run.handle(S.SpaceRequested("a", 0, 50))
    run.handle(S.TaskDone("a", 0, out("a/0", 50)))  # source/0 pooled
    actions = run.handle(S.TaskDone("source", 1, out("source/1", 100)))  # it fitted
    assert S.Dispatch("source", 2, (), reserved=100, reuse=1) in actions
    assert run.ledger.budget.pool == {} and run.ledger.agents["source"][0].reuse == 1
    before = run.ledger.budget.usage
    actions = run.handle(S.AgentExited("source", -9))
    assert S.Unpool(1) in actions and run.ledger.budget.usage == before - 100
