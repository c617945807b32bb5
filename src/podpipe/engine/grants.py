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


def request(run: Ledger, agent: Agent, event: SpaceRequested,
            actions: list[Action]) -> None:
    """`event`'s agent asks for its output's bytes: what came with its task, if any,
    was too little (its warm file it has deleted already) and is given back."""
    settle(run, agent)
    agent.status, agent.want = WAITING, event.nbytes
    if run.graph.domain[event.node] == TABLE:
        if run.tables_held + event.nbytes > run.budget.limit // TABLE_SHARE:
            agent.status, agent.want = RUNNING, 0  # too large to hold in RAM: mapped
            run.budget.spills += 1                 # from the node tier instead
            actions.append(Spill(event.node, event.batch, event.worker))
    elif pages(event.nbytes) > run.budget.limit:
        run.fail(BudgetError(
            f"stage {event.node!r}, batch {event.batch}: its output needs "
            f"{format_size(event.nbytes)}, more than the whole RAM budget of "
            f"{format_size(run.budget.limit)}; lower spec.source.batchRows or raise "
            "spec.memory (--memory)"), actions)


def grant_waiting(run: Ledger, actions: list[Action]) -> None:
    # Downstream first: granting them frees their inputs soonest.
    for node in reversed(run.graph.order):
        for worker, agent in sorted(run.agents[node].items()):
            if agent.status != WAITING:
                continue
            granted = run.budget.grant(agent.want, actions)
            if granted is None:
                continue
            agent.reuse, agent.reserved = granted
            agent.status, agent.want = RUNNING, 0
            actions.append(Grant(node, worker, agent.reuse))


def with_task(run: Ledger, node: str, agent: Agent,
              actions: list[Action]) -> tuple[int, int | None]:
    """RAM granted to `agent` with its next task of `node`: (bytes, warm file or
    None); (0, None) if none (no output of the node seen yet, someone waiting for
    RAM, or it does not fit)."""
    expected = run.budget.expect(node)
    if expected is None or run.graph.domain[node] != BATCH or any(
            a.status == WAITING for _, _, a in run.all_agents()):
        return 0, None
    granted = run.budget.grant(expected, actions)
    if granted is None:
        return 0, None
    agent.reuse, agent.reserved = granted
    return agent.reserved, agent.reuse


def settle(run: Ledger, agent: Agent) -> int | None:
    """What was granted to `agent` and is not an output goes back to the budget;
    returns the warm file that came with it (its agent wrote over it or deleted it,
    unless it is gone: `release`)."""
    run.budget.give(agent.reserved)
    warm, agent.reserved, agent.reuse = agent.reuse, 0, None
    return warm


def release(run: Ledger, agent: Agent, actions: list[Action]) -> None:
    """The RAM granted to `agent` goes back, its warm file (if unused) with it: its
    process is gone or taken away."""
    if (warm := settle(run, agent)) is not None:
        actions.append(Unpool(warm))


# -- tasks: who gets a batch when ------------------------------------------------


def dispatch(run: Ledger, actions: list[Action]) -> None:
    """Hand each idle agent the next batch ready for its node (the source: the next
    source batch, if the line has room for it), with RAM granted where its output's
    size is known (`with_task`)."""
    for node, worker, agent in run.all_agents():
        if agent.status != IDLE or agent.swap is not None or agent.retire:
            continue
        if node == SOURCE and not run.ready[node]:
            batch = _admit(run)
            if batch is None:
                continue
        elif run.ready[node]:
            batch = run.ready[node].pop(0)
        else:
            continue
        agent.status, agent.batch = RUNNING, batch
        inputs = tuple(tuple(run.outputs[(name, k)]
                             for k in run.plan.reads(node, name, batch))
                       for name in run.graph.inputs[node])
        reserved, reuse = with_task(run, node, agent, actions)
        actions.append(Dispatch(node, batch, inputs, worker, reserved, reuse,
                                node in run.keep,
                                any(i in run.keep for i in run.graph.inputs[node])))

def can_admit(run: Ledger) -> bool:
    """Is there a source batch to load, and room on the line for it (backpressure)?
    While the tables load, their share of the budget (all they may hold in RAM)
    is kept free: their RAM comes first."""
    if run.line.next_source >= len(run.plan.mine) and not run.line.redo:
        return False
    reserve = 0
    if any(0 not in run.done[t] for t in run.graph.tables):
        reserve = max(0, run.budget.limit // TABLE_SHARE - run.tables_held)
    first = [run.outputs[(SOURCE, b)].nbytes for b in run.budget.on_line
             if (SOURCE, b) in run.outputs]
    return run.budget.has_room(first, reserve)

def _admit(run: Ledger) -> int | None:
    """The next source batch, if the line has room for it (backpressure)."""
    if not can_admit(run):
        return None
    mine = run.plan.mine
    if run.line.redo:
        batch = run.line.redo.pop(0)
    else:
        batch = mine[run.line.next_source]
        run.line.next_source += 1
    run.budget.enter(batch)
    return batch
