"""Who gets RAM, and when: an agent's request for its output's bytes, the grants to
the agents waiting, and the RAM a task is handed out with.

An agent that has computed its output asks for exactly its bytes and waits for the
grant (`request`, `grant_waiting`: downstream first, as granting them frees their
inputs soonest). That is a round trip through the conductor per task, which on a
busy pod of small batches costs more than writing the output. So a task of a node
whose last outputs are known comes with RAM for the largest of them already
granted (`with_task`), over a warm file if the pool has one: an output that fits is
written at once. One that does not makes the agent delete the warm file and ask as
above, and what came with the task is given back (`request`). A grant with a task
never goes ahead of a request: it is made only while no one waits for RAM.

A warm file granted is the task's: written over or deleted by its agent. One whose
agent died or was taken away is deleted here (`release`).

Which idle process gets which ready batch is decided here too (`dispatch`), with
the source's admission onto the line (`can_admit`: backpressure).
"""

from __future__ import annotations

from podpipe.engine.agent import IDLE, RUNNING, WAITING, Agent
from podpipe.engine.events import Action, Dispatch, Grant, SpaceRequested, Spill, Unpool
from podpipe.engine.ledger import Ledger
from podpipe.engine.budget import pages
from podpipe.errors import BudgetError
from podpipe.model.graph import BATCH, TABLE
from podpipe.model.pipeline import SOURCE
from podpipe.model.sizes import format_size


TABLE_SHARE = 2  # tables may hold at most 1/TABLE_SHARE of the budget; beyond: node tier


def request(run: Ledger, agent: Agent, event: SpaceRequested) -> list[Action]:
    """`event`'s agent asks for its output's bytes: what came with its task, if any,
    was too little (its warm file it has deleted already) and is given back."""
    settle(run, agent)
    agent.wait_for(event.nbytes)
    if run.graph.domain[event.node] == TABLE:
        if run.tables_held + event.nbytes > run.budget.whole // TABLE_SHARE:
            agent.resume()        # too large to hold in RAM: mapped from the node tier
            run.budget.spilled()  # instead
            return [Spill(event.node, event.batch, event.worker)]
    elif pages(event.nbytes) > run.budget.whole:
        return run.fail(BudgetError(
            f"stage {event.node!r}, batch {event.batch}: its output needs "
            f"{format_size(event.nbytes)}, more than the whole RAM budget of "
            f"{format_size(run.budget.whole)}; lower spec.source.batchRows or raise "
            "spec.memory (--memory)"))
    return []


def grant_waiting(run: Ledger) -> list[Action]:
    actions: list[Action] = []
    # Downstream first: granting them frees their inputs soonest.
    for node in reversed(run.graph.order):
        for worker, agent in sorted(run.agents[node].items()):
            if agent.status != WAITING:
                continue
            granted, given_up = run.budget.grant(agent.want)
            actions += given_up
            if granted is None:
                continue
            reuse, reserved = granted
            agent.granted(reserved, reuse)
            agent.resume()
            actions.append(Grant(node, worker, reuse))
    return actions


def with_task(run: Ledger, node: str, agent: Agent) -> tuple[int, int | None, list[Action]]:
    """RAM granted to `agent` with its next task of `node`: (bytes, warm file or
    None, the pooled files given up to make room); no bytes if none (no output of
    the node seen yet, someone waiting for RAM, or it does not fit)."""
    expected = run.budget.expect(node)
    if expected is None or run.graph.domain[node] != BATCH or any(
            a.status == WAITING for _, _, a in run.all_agents()):
        return 0, None, []
    granted, given_up = run.budget.grant(expected)
    if granted is None:
        return 0, None, given_up
    reuse, reserved = granted
    agent.granted(reserved, reuse)
    return reserved, reuse, given_up


def settle(run: Ledger, agent: Agent) -> int | None:
    """What was granted to `agent` and is not an output goes back to the budget;
    returns the warm file that came with it (its agent wrote over it or deleted it,
    unless it is gone: `release`)."""
    reserved, warm = agent.settle()
    run.budget.give(reserved)
    return warm


def release(run: Ledger, agent: Agent) -> list[Action]:
    """The RAM granted to `agent` goes back, its warm file (if unused) with it: its
    process is gone or taken away."""
    warm = settle(run, agent)
    return [] if warm is None else [Unpool(warm)]


# -- tasks: who gets a batch when ------------------------------------------------


def dispatch(run: Ledger) -> list[Action]:
    """Hand each idle agent the next batch ready for its node (the source: the next
    source batch, if the line has room for it), with RAM granted where its output's
    size is known (`with_task`)."""
    actions: list[Action] = []
    for node, worker, agent in run.all_agents():
        if agent.status != IDLE or agent.swap is not None or agent.retire:
            continue
        if node == SOURCE and not run.ready[node]:
            batch = run.admit() if can_admit(run) else None
        else:
            batch = run.next_ready(node)
        if batch is None:
            continue
        agent.start(batch)
        inputs = tuple(tuple(run.outputs[(name, k)] for k in run.plan.reads(node, name, batch))
                       for name in run.graph.inputs[node])
        reserved, reuse, given_up = with_task(run, node, agent)
        actions += given_up
        actions.append(Dispatch(node, batch, inputs, worker, reserved, reuse,
                                node in run.keep,
                                any(i in run.keep for i in run.graph.inputs[node])))
    return actions


def can_admit(run: Ledger) -> bool:
    """Is there a source batch to load, and room on the line for it (backpressure)?
    While the tables load, their share of the budget (all they may hold in RAM)
    is kept free: their RAM comes first."""
    if not run.may_admit():
        return False
    reserve = 0
    if any(0 not in run.done[t] for t in run.graph.tables):
        reserve = max(0, run.budget.limit // TABLE_SHARE - run.tables_held)
    first = [run.outputs[(SOURCE, b)].nbytes for b in run.budget.on_line
             if (SOURCE, b) in run.outputs]
    return run.budget.has_room(first, reserve)
