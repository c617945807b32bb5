"""Rework: what a running run must do again when its line changes under it.

- A **recompute** (`swap --recompute`): the batches a stage had done were made by a
  version now replaced. Stage outputs leave RAM once read, so the source is the one
  tier that still holds every batch's inputs: each such batch runs down the whole
  line again (deterministic stages make the unchanged ones' outputs the same).
  Batches still on the line are marked *stale* and redone once off it; a reduce
  does not take a stale batch; a reduce already running has its result dropped
  (*obsolete*). What no longer stands is forgotten (`Forget`).
- A **reshape** (`podpipe apply`): removed nodes leave with their outputs and their
  claims on others'; added per-batch nodes catch up on batches already on the line
  or, where their inputs were read and deleted, the batch runs down the whole line
  again; added reduces get their shard's batches back the same way (`supply`).

These are functions of the ledger: they decide what to undo and do it through its
operations (`delete`, `undo`, `maybe_ready`, `one_less`, `load_again`, ...).
"""

from __future__ import annotations

from podpipe.engine import grants, workers as worker_counts
from podpipe.engine.events import Action, Forget, Key, Stop
from podpipe.engine.ledger import Ledger
from podpipe.model.graph import BATCH, TABLE, Graph



def recompute(run: Ledger, node: str) -> list[Action]:
    per_batch = run.graph.domain[node] == BATCH
    actions, undone = _undo_downstream(run, node, include=not per_batch)
    if per_batch:
        for batch in sorted(run.done[node]):
            actions += redo_batch(run, batch)
    for other, key in undone:  # a reduce, and what follows it, runs again
        actions += supply(run, other, key)
    return actions


def reshape(run: Ledger, graph: Graph,
            workers: dict[str, int | None] | None = None) -> list[Action]:
    actions: list[Action] = []
    old = run.graph
    removed = [n for n in old.order if n not in graph.inputs]
    added = [n for n in graph.order if n not in old.inputs]
    for node in removed:
        agents = run.take_agents(node)
        for agent in agents:
            actions += grants.release(run, agent)
        actions.append(Stop(node, kill=any(agent.busy for agent in agents)))
        if old.domain[node] == BATCH:
            for batch in list(run.budget.on_line):
                if batch not in run.done[node] and run.one_less(batch):
                    actions += invalidate(run, batch)
    for output in [k for k in run.outputs if k[0] in removed]:
        actions += run.delete(output)
    for node in removed:
        run.forget_node(node)
    for output in run.unclaimed():
        actions += run.delete(output)
    run.regraph(graph)
    for node in added:
        run.add_node(node, (workers or {}).get(node, 1))
    for node, count in (workers or {}).items():  # kept nodes given another count
        if node not in added and node in graph.inputs and count != run.pool.fixed.get(node):
            actions += worker_counts.resize(run, node, count)
    admitted = set(run.plan.mine[:run.line.next_source]) - set(run.line.redo)
    for node in added:
        for key in sorted(run.keys(node)):
            if graph.domain[node] != BATCH:
                actions += supply(run, node, key)
            elif key in admitted:  # the batch came in before the node did
                actions += _catch_up(run, node, key)
    return actions


def _catch_up(run: Ledger, node: str, batch: int) -> list[Action]:
    """A per-batch node added after `batch` entered the line: it runs the batch from
    its inputs if they are there or still coming, else the batch runs down the whole
    line again (from the source)."""
    if batch in run.line.stale or batch in run.line.redo:
        return []  # it runs down the whole line again: this node with it
    gone = [(name, batch) for name in run.graph.inputs[node]
            if batch in run.done[name] and (name, batch) not in run.outputs]
    if gone:
        return redo_batch(run, batch)
    run.budget.one_more(batch)
    return supply(run, node, batch)


def redo_batch(run: Ledger, batch: int) -> list[Action]:
    if batch in run.budget.on_line:
        run.mark_stale(batch)  # its later stages are at it: redo once they are done
        return []
    return invalidate(run, batch)


def supply(run: Ledger, node: str, key: int) -> list[Action]:
    """Make sure what `node`'s task `key` reads will be there: an output already read
    and deleted is made again — a batch from the source, a reduce's output by running
    the reduce again (and so on up)."""
    actions: list[Action] = []
    for name in run.graph.inputs[node]:
        for k in run.plan.reads(node, name, key):
            if k not in run.done[name] or run.graph.domain[name] == TABLE:
                continue  # still to come, or a table (there for the whole run)
            if (name, k) in run.outputs:
                run.read_again((name, k), node)
            elif run.graph.domain[name] == BATCH:
                actions += redo_batch(run, k)
            else:
                run.undo(name, k)
                actions.append(Forget(name, k))
                actions += supply(run, name, k)
    run.maybe_ready(node, key)
    return actions


def invalidate(run: Ledger, batch: int) -> list[Action]:
    """Run source batch `batch` down the whole line again."""
    actions: list[Action] = []
    for node in run.graph.order:
        if run.graph.domain[node] == BATCH:
            if (node, batch) in run.outputs:
                actions += run.delete((node, batch))
            if run.undo(node, batch):
                actions.append(Forget(node, batch))
    run.load_again(batch)
    return actions


def _undo_downstream(run: Ledger, node: str, include: bool) -> tuple[list[Action], list[Key]]:
    """What runs once per shard or globally, downstream of `node` (and `node` itself
    with `include`), is not done any more: it runs again when its inputs are.
    Returns the actions and what was undone."""
    actions: list[Action] = []
    undone: list[Key] = []
    below = {node} if include else set()
    for other in run.graph.order:
        if any(i in below or i == node for i in run.graph.inputs[other]):
            below.add(other)
    for other in run.graph.order:
        if other not in below or run.graph.domain[other] == BATCH:
            continue
        for key in sorted(run.done[other] & run.keys(other)):
            if (other, key) in run.outputs:
                actions += run.delete((other, key))
            run.undo(other, key)
            actions.append(Forget(other, key))
            undone.append((other, key))
        for agent in run.agents[other].values():
            if agent.busy and agent.batch is not None:
                run.void((other, agent.batch))
    return actions, undone
