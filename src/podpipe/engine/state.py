"""The run state machine: (state, event) -> actions, with no I/O.

The conductor turns what happens (an agent connects, a task finishes, a process
exits) into events, feeds them to `RunState.handle` one at a time, and carries out
the actions it returns (hand a task to an agent, grant RAM, delete a file, copy an
output to the node tier, replace a process, finish, fail). All the decisions of a
run live in this package, so they can be tested without processes. `RunState` is
the run's ledger (`ledger.py`: its data and primitive operations) with the one
dispatcher: `handle` routes each event (one `match`) and then asks the policies,
in order, what follows:

- readiness and lifetime (`ledger.py`): a per-batch task is ready once every input
  has that batch; a reduce task once every input has all the batches of its shard
  (a global reduce: every shard's output, some made by other pods and imported); an
  output is deleted as soon as every node that reads it has read it; what a resume
  would need is kept on the node tier (`Keep`);
- keys (`keys.py`): which batches, shards and global keys this pod runs;
- the RAM budget (`budget.py`): bytes, backpressure; who gets them and which task
  goes where when (`grants.py`); when the line jams (`jam.py`), giving up its
  newest batch, else spilling to the node tier;
- restarts of dead processes with backoff, swaps between batches, holds of a
  swapped-in version that fails (`lifecycle.py`);
- workers per node (`workers.py`); rework (`rework.py`): a recompute or an apply
  undoes what no longer stands; the state a resumed run starts from (`resume.py`).
"""

from __future__ import annotations

from typing import assert_never

from podpipe.engine import grants, jam, lifecycle, rework, workers
from podpipe.engine.agent import HELD, Agent
from podpipe.engine.events import (Action, AgentBroken, AgentExited, AgentReady, Event,
                                   HandedOver, Imported, Kill, Recompute, Reshaped, Shared,
                                   SpaceRequested, SwapRequested, TaskDone, TaskFailed,
                                   TaskTimedOut, Tick, TookOver, VersionChanged)
from podpipe.engine.ledger import Ledger
from podpipe.errors import DataError, PodpipeError, StageError
from podpipe.model.graph import Graph

AgentEvent = (AgentReady | SpaceRequested | TaskDone | TaskFailed | AgentExited |
              TaskTimedOut | AgentBroken)


class RunState:
    """A run's ledger, fed its events one at a time (`handle`)."""

    def __init__(self, graph: Graph, source_batches: int, budget: int, *,
                 retries: dict[str, int] | None = None, shards: int = 1,
                 owned: tuple[int, ...] | None = None, global_here: bool = True,
                 workers: dict[str, int | None] | None = None,
                 cpus: float = 1.0) -> None:
        self.ledger = Ledger(graph, source_batches, budget, retries=retries, shards=shards,
                             owned=owned, global_here=global_here, workers=workers,
                             cpus=cpus)

    def handle(self, event: Event) -> list[Action]:
        run = self.ledger
        if run.outcome is not None:
            return []
        actions: list[Action] = []
        match event:
            case Reshaped():
                actions += rework.reshape(run, event.graph, event.workers)
                run.allow_retries(event.retries)
            case Recompute():
                actions += rework.recompute(run, event.node)
            case VersionChanged():
                for each in run.agents[event.node].values():  # held: taken up again
                    if each.status == HELD:
                        each.replaced()
                run.swapped_in(event.node)
                if event.recompute:
                    actions += rework.recompute(run, event.node)
            case SwapRequested():
                for each in run.agents[event.node].values():  # every worker is replaced
                    each.swap_coming(event)
            case Tick():
                actions += workers.rebalance(run, event.cpu)
            case Imported():
                run.take_import(event)
            case Shared():  # a line's jobs at once (`jobs: N`): the budget the older
                run.budget.share(event.limit)  # leave, the processes passed on
            case HandedOver():
                for node in event.nodes:
                    run.hand_over(node)
            case TookOver():
                run.take_over(event.node, list(event.workers))
            case (AgentReady() | SpaceRequested() | TaskDone() | TaskFailed() | AgentExited()
                  | TaskTimedOut() | AgentBroken()):
                found = run.agents.get(event.node, {}).get(event.worker)
                if found is None:
                    return actions  # a process taken back meanwhile (workers: auto)
                actions += self._agent_event(event, found)
            case _:
                assert_never(event)
        if run.outcome is not None:
            return actions
        actions += lifecycle.between_batches(run)
        actions += grants.grant_waiting(run)
        actions += grants.dispatch(run)
        if isinstance(event, TaskDone) and event.wanted is not None:
            actions += workers.after_task(run, event.node, event.wanted, event.busy)
        if run.finished:
            actions += run.finish()
        elif jam.stuck(run):
            actions += jam.relieve(run)
        return actions

    def _agent_event(self, event: AgentEvent, agent: Agent) -> list[Action]:
        run, node, worker = self.ledger, event.node, event.worker
        swapped = node in run.swapped  # a swapped-in version that fails is held
        match event:
            case AgentReady():
                agent.ready()
                return []
            case SpaceRequested():
                return grants.request(run, agent, event)
            case TaskDone():
                agent.ready()
                grants.settle(run, agent)  # its output is counted on its own
                actions, stale = run.task_done(event)
                if stale:  # off the line, made partly by a replaced version: again
                    actions += rework.invalidate(run, event.batch)
                return actions
            case TaskFailed() if swapped:
                return lifecycle.hold(run, node, f"batch {event.batch}: {event.message}")
            case TaskFailed():
                error: PodpipeError = (
                    DataError(f"stage {node!r}, batch {event.batch}: {event.message}")
                    if event.input_error else StageError(node, event.batch, event.message,
                                                         event.traceback))
                return run.fail(error)
            case AgentBroken() if swapped:
                return lifecycle.hold(run, node, event.message)
            case AgentBroken():
                return run.fail(event.error)
            case AgentExited() if swapped:
                return lifecycle.hold(run, node, event.how)
            case AgentExited():
                if run.finished:
                    return []
                return lifecycle.restart(run, node, worker, agent, event.how, event.at)
            case TaskTimedOut():
                if not agent.busy or agent.batch != event.batch:
                    return []  # done meanwhile
                message = f"the batch took longer than its timeout of {event.seconds:g} s"
                return [Kill(node, worker)] + (
                    lifecycle.hold(run, node, message) if swapped
                    else lifecycle.restart(run, node, worker, agent, message, event.at))
            case _:
                assert_never(event)
