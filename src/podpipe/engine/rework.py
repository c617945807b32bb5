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

These are functions of the run state (`state.RunState`): they decide what to undo
and use its primitives to do it (`delete`, `maybe_ready`, `one_less`).
"""

from __future__ import annotations

from podpipe.engine import grants, workers as worker_counts
from podpipe.engine.events import Action, Forget, Key, Stop
from podpipe.engine.ledger import Ledger
from podpipe.model.graph import BATCH, TABLE, Graph



def recompute(run: Ledger, node: str, actions: list[Action]) -> None:
    per_batch = run.graph.domain[node] == BATCH
    undone = _undo_downstream(run, node, actions, include=not per_batch)
    if per_batch:
        for batch in sorted(run.done[node]):
            redo_batch(run, batch, actions)
    for other, key in undone:  # a reduce, and what follows it, runs again
        supply(run, other, key, actions)


def reshape(run: Ledger, graph: Graph, actions: list[Action],
            workers: dict[str, int | None] | None = None) -> None:
    old = run.graph
    removed = [n for n in old.order if n not in graph.inputs]
    added = [n for n in graph.order if n not in old.inputs]
    for node in removed:
        agents = run.agents.pop(node).values()
        for agent in agents:
            grants.release(run, agent, actions)
        actions.append(Stop(node, kill=any(agent.busy for agent in agents)))
        if old.domain[node] == BATCH:
            for batch in list(run.budget.on_line):
                if batch not in run.done[node]:
                    if run.one_less(batch):
                        invalidate(run, batch, actions)
    for output in [k for k in run.outputs if k[0] in removed]:
        run.delete(output, actions)
    for output in list(run.unread):
        run.unread[output] -= set(removed)
        if not run.unread[output]:
            run.delete(output, actions)
    for node in removed:
        del run.done[node], run.ready[node], run.restarts[node], run.pool.fixed[node]
        run.swapped.discard(node)
    run.plan = run.plan.regraphed(graph)
    run.budget.per_batch_nodes = run.plan.per_batch_nodes
    for node in added:
        run.add_node(node, (workers or {}).get(node, 1))
    for node, count in (workers or {}).items():  # kept nodes given another count
        if node not in added and node in graph.inputs and count != run.pool.fixed.get(node):
            worker_counts.resize(run, node, count, actions)
    admitted = set(run.plan.mine[:run.line.next_source]) - set(run.line.redo)
    for node in added:
        for key in sorted(run.keys(node)):
            if graph.domain[node] != BATCH:
                supply(run, node, key, actions)
            elif key in admitted:  # the batch came in before the node did
                _catch_up(run, node, key, actions)


def _catch_up(run: Ledger, node: str, batch: int, actions: list[Action]) -> None:
    """A per-batch node added after `batch` entered the line: it runs the batch from
    its inputs if they are there or still coming, else the batch runs down the whole
    line again (from the source)."""
    if batch in run.line.stale or batch in run.line.redo:
        return  # it runs down the whole line again: this node with it
    gone = [(name, batch) for name in run.graph.inputs[node]
            if batch in run.done[name] and (name, batch) not in run.outputs]
    if gone:
        redo_batch(run, batch, actions)
        return
    run.budget.one_more(batch)
    supply(run, node, batch, actions)


def redo_batch(run: Ledger, batch: int, actions: list[Action]) -> None:
    if batch in run.budget.on_line:
        run.line.stale.add(batch)  # its later stages are at it: redo once they are done
    else:
        invalidate(run, batch, actions)


def supply(run: Ledger, node: str, key: int, actions: list[Action]) -> None:
    """Make sure what `node`'s task `key` reads will be there: an output already read
    and deleted is made again — a batch from the source, a reduce's output by running
    the reduce again (and so on up)."""
    for name in run.graph.inputs[node]:
        for k in run.plan.reads(node, name, key):
            if k not in run.done[name] or run.graph.domain[name] == TABLE:
                continue  # still to come, or a table (there for the whole run)
            if (name, k) in run.outputs:
                run.unread[(name, k)].add(node)
            elif run.graph.domain[name] == BATCH:
                redo_batch(run, k, actions)
            else:
                run.done[name].discard(k)
                actions.append(Forget(name, k))
                supply(run, name, k, actions)
    run.maybe_ready(node, key)


def invalidate(run: Ledger, batch: int, actions: list[Action]) -> None:
    """Run source batch `batch` down the whole line again."""
    for node in run.graph.order:
        if run.graph.domain[node] == BATCH:
            if (node, batch) in run.outputs:
                run.delete((node, batch), actions)
            if batch in run.done[node]:
                run.done[node].discard(batch)
                actions.append(Forget(node, batch))
    run.line.redo = sorted(set(run.line.redo) | {batch})


def _undo_downstream(run: Ledger, node: str, actions: list[Action],
                     include: bool) -> list[Key]:
    """What runs once per shard or globally, downstream of `node` (and `node` itself
    with `include`), is not done any more: it runs again when its inputs are.
    Returns what was undone."""
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
                run.delete((other, key), actions)
            run.done[other].discard(key)
            actions.append(Forget(other, key))
            undone.append((other, key))
        for agent in run.agents[other].values():
            if agent.busy and agent.batch is not None:
                run.line.obsolete.add((other, agent.batch))
    return undone
