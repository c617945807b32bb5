"""A line's jobs at once (`jobs: N`), as each job's engine sees it: the nodes it has
no more tasks for handed over (`Ledger.spent`, `HandedOver`), those taken over
(`TookOver`), its share of the budget (`Shared`), and a jam that must not give up a
batch once the source serves the next job."""

from __future__ import annotations

import pytest

from podpipe.engine import budget as budgets
from podpipe.engine import events as S
from podpipe.engine import jam
from podpipe.engine.agent import ABSENT
from podpipe.engine.state import RunState
from podpipe.model.graph import Graph

from podsim import CHAIN, JOINED, out


@pytest.fixture(autouse=True)
def _bytes_not_pages(monkeypatch):
    monkeypatch.setattr(budgets, "PAGE", 1)


def _task(run: RunState, node: str, batch: int, nbytes: int = 10) -> list[S.Action]:
    """`node`'s task of `batch`, from its RAM asked for to done."""
    actions = run.handle(S.SpaceRequested(node, batch, nbytes))
    return actions + run.handle(S.TaskDone(node, batch, out(f"{node}/{batch}", nbytes)))


def _ready(run: RunState, *nodes: str) -> list[S.Action]:
    return [a for node in nodes for a in run.handle(S.AgentReady(node))]


def test_a_job_has_its_nodes_spent_in_order_the_source_first():
    run = RunState(Graph.of(CHAIN), 2, 10_000)
    _ready(run, "a", "b", "sink-0", "source")
    _task(run, "source", 0)
    assert run.ledger.spent() == frozenset()  # a batch still to read
    _task(run, "source", 1)
    assert run.ledger.spent() == {"source"}
    _task(run, "a", 0)
    _task(run, "a", 1)
    assert run.ledger.spent() == {"source", "a"}
    run.handle(S.HandedOver(frozenset({"source"})))
    assert run.ledger.agents["source"] == {} and run.ledger.spent() == {"a"}
    for node in ("b", "sink-0"):
        for batch in (0, 1):
            actions = _task(run, node, batch)
    assert S.Finished() in actions  # the run ends with its source handed over


def test_a_node_whose_process_is_busy_or_whose_batch_must_run_again_is_not_spent():
    run = RunState(Graph.of(CHAIN), 1, 10_000)
    _ready(run, "a", "b", "sink-0", "source")
    _task(run, "source", 0)
    assert run.ledger.spent() == {"source"}
    run.ledger.line.redo.append(0)  # (given up for lack of RAM: the source again)
    assert run.ledger.spent() == frozenset()


def test_a_job_waits_for_the_nodes_the_older_job_holds_and_takes_their_workers():
    graph = Graph.of(CHAIN)
    run = RunState(graph, 2, 10_000, workers={n: None for n in graph.order})
    assert _ready(run, "a", "b", "sink-0") == []  # its source is still the older job's
    assert all(a.status == ABSENT for a in run.ledger.agents["source"].values())
    run.handle(S.TookOver("source", (0, 1)))  # two workers, as the older job grew it
    assert sorted(run.ledger.agents["source"]) == [0, 1]
    actions = run.handle(S.AgentReady("source", 0)) + run.handle(S.AgentReady("source", 1))
    assert [(a.worker, a.batch) for a in actions if isinstance(a, S.Dispatch)] == [(0, 0)]


def test_a_share_of_the_budget_holds_a_younger_jobs_writes_until_the_older_leaves_room():
    run = RunState(Graph.of(CHAIN), 2, 1_000)
    run.handle(S.Shared(50))  # what the older job leaves
    _ready(run, "b", "sink-0", "source")  # (its `a` still the older job's)
    assert run.handle(S.SpaceRequested("source", 0, 100)) == []  # waits: no jam, no failure
    assert run.ledger.outcome is None
    assert S.Grant("source") in run.handle(S.Shared(1_000))  # the older job is over


def test_a_jam_spills_rather_than_give_up_a_batch_once_the_source_is_handed_over():
    run = RunState(Graph.of(CHAIN), 2, 200)
    _ready(run, "a", "b", "sink-0", "source")
    _task(run, "source", 0, 20)
    _task(run, "source", 1, 20)  # (room for it: the footprint guessed from batch 0)
    assert run.ledger.spent() == {"source"}
    run.handle(S.HandedOver(frozenset({"source"})))
    actions = run.handle(S.SpaceRequested("a", 0, 170))  # more than is left: stuck
    assert S.Spill("a", 0) in actions  # to the node tier: batch 1 is not given up, to be
    assert run.ledger.line.redo == []   # read again by a source that is not this job's
    assert not jam.stuck(run.ledger)


class _Job:
    """A job's conductor as the line's `Conducting` shares the budget with it: its
    engine, fed what the line tells it."""

    def __init__(self, state: RunState) -> None:
        self.engine, self.ledger = state, state.ledger

    def happened(self, happening=None, event=None) -> None:
        self.engine.handle(event)


def test_each_job_may_use_what_the_older_jobs_leave_and_a_table_both_hold_counts_once():
    from types import SimpleNamespace

    from podpipe.runtime.runs.line.conducting import Conducting

    graph = Graph.of(JOINED)
    older, younger, third = (_Job(RunState(graph, 4, 1_000)) for _ in range(3))
    table = out("dim", 100)
    for job in (older, younger):  # the same table file, kept from the job before
        job.ledger.table_kept("dim", table)
    older.ledger.budget.take(200)              # ... and 200 bytes of its batches
    older.ledger.budget.footprint = 100        # one batch on its line, 40 made of 100
    older.ledger.budget.enter(3)
    older.ledger.budget.made("a", 3, 40)
    younger.ledger.budget.take(50)
    conducting = Conducting(SimpleNamespace(reader=None), print, print, print)
    conducting.jobs = [older, younger, third]  # type: ignore[list-item]
    conducting._share()
    assert older.ledger.budget.limit == 1_000                  # the oldest: the whole
    assert younger.ledger.budget.limit == 1_000 - 360 + 100    # less 100 + 200 + 60,
    assert third.ledger.budget.limit == 1_000 - 360 - 50       # but the table it holds too;
                                                               # the third, the table once
    conducting.jobs = [younger]  # type: ignore[list-item]  # the older ones over:
    conducting._share()
    assert younger.ledger.budget.limit == 1_000
