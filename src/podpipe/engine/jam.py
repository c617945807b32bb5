"""When the line jams for lack of RAM: give up its newest batch, else spill.

The line is *stuck* when someone waits for RAM and nothing can free any: no task is
running and no agent is still to connect. The footprint that admitted the batches
on the line was then too low (later batches are larger). First the newest batch on
the line is given up — its waiting writes refused (`Deny`), its outputs deleted,
its batch loaded again later (stages are deterministic, sink files idempotent) —
as often as that lets an older batch move. What still cannot move (outputs that
must stay, such as a reduce's inputs) goes to the node tier: the most downstream
waiting output is granted there (`Spill`), and is not RAM budget.

Functions of the ledger; `state.RunState` calls `relieve` when `stuck`.
"""

from __future__ import annotations

from podpipe.engine import grants
from podpipe.engine.agent import ABSENT, HELD, RUNNING, WAITING
from podpipe.engine.events import Action, Deny, Spill
from podpipe.engine.ledger import Ledger
from podpipe.model.graph import BATCH
from podpipe.model.pipeline import SOURCE


def relieve(run: Ledger) -> list[Action]:
    actions: list[Action] = []
    while stuck(run):  # each eviction gives up one batch
        evicted = _evict(run)
        if evicted is None:
            break
        actions += evicted
        actions += grants.grant_waiting(run)
        actions += grants.dispatch(run)
    if stuck(run):
        actions += _spill(run)
    return actions


def _evict(run: Ledger) -> list[Action] | None:
    """Give up the newest batch on the line so that an older one waiting for RAM can
    move: refuse its waiting requests, delete its outputs, and run it again from
    the source later (stages are deterministic, sink files idempotent). A batch
    with a task still computing is left alone. None if there is none to give up, or
    if the source's processes serve the line's next job already (`jobs: N`)."""
    if SOURCE in run.lent:
        return None
    line = [(n, w, a) for n, w, a in run.all_agents() if run.graph.domain[n] == BATCH]
    batch = run.budget.victim(
        [a.batch for _, _, a in line if a.status == WAITING and a.batch is not None],
        {a.batch for _, _, a in line if a.status == RUNNING and a.batch is not None})
    if batch is None:
        return None
    actions: list[Action] = []
    for node, worker, agent in line:
        if agent.status == WAITING and agent.batch == batch:
            agent.ready()
            actions.append(Deny(node, worker))
    for node in run.graph.order:
        if run.graph.domain[node] != BATCH:
            continue
        if (node, batch) in run.outputs:
            actions += run.delete((node, batch))
        run.undo(node, batch)
    run.budget.give_up(batch)
    run.load_again(batch)
    return actions


def _spill(run: Ledger) -> list[Action]:
    """Nothing in RAM can move and nothing can be given up (what waits must stay,
    such as a reduce's inputs): the most downstream waiting output goes to the
    node tier, memory-mapped from there by its readers. It is not RAM budget."""
    node, worker, agent = next(found for found in reversed(run.all_agents())
                               if found[2].status == WAITING)
    agent.resume()
    run.budget.spilled()
    return [Spill(node, agent.batch or 0, worker)]


def stuck(run: Ledger) -> bool:
    """Someone waits for RAM and nothing can free any: no task is running, and no
    agent is still to connect (it would read what it is owed)."""
    statuses = {a.status for _, _, a in run.all_agents()}
    return WAITING in statuses and not statuses & {RUNNING, ABSENT, HELD}
