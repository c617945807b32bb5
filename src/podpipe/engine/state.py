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
from podpipe.engine.agent import IDLE, Agent
from podpipe.engine.events import (Action, AgentBroken, AgentExited, AgentReady, Delete,
                                   Event, Finished, Imported, Keep, Kill, Recompute,
                                   Reshaped, SpaceRequested, SwapRequested, TaskDone,
                                   TaskFailed, TaskTimedOut, Tick)
from podpipe.engine.ledger import Ledger
from podpipe.errors import DataError, PodpipeError, StageError
from podpipe.model.graph import BATCH, SINGLE, TABLE

AgentEvent = (AgentReady | SpaceRequested | TaskDone | TaskFailed | AgentExited |
              TaskTimedOut | AgentBroken)


class RunState(Ledger):
    """The ledger of a run, fed its events one at a time (`handle`)."""

    # -- the transition -------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if self.outcome is not None:
            return []
        actions: list[Action] = []
        match event:
            case Reshaped():
                rework.reshape(self, event.graph, actions, event.workers)
                self.retries.update(event.retries)
            case Recompute():
                rework.recompute(self, event.node, actions)
            case SwapRequested():
                for each in self.agents[event.node].values():  # every worker is replaced
                    each.swap = event
            case Tick():
                workers.rebalance(self, event.cpu, actions)
            case Imported():
                self._import(event)
            case (AgentReady() | SpaceRequested() | TaskDone() | TaskFailed() | AgentExited()
                  | TaskTimedOut() | AgentBroken()):
                found = self.agents.get(event.node, {}).get(event.worker)
                if found is None:
                    return actions  # a process taken back meanwhile (workers: auto)
                self._agent_event(event, found, actions)
            case _:
                assert_never(event)
        if self.outcome is not None:
            return actions
        lifecycle.between_batches(self, actions)
        grants.grant_waiting(self, actions)
        grants.dispatch(self, actions)
        if isinstance(event, TaskDone) and event.wanted is not None:
            workers.after_task(self, event.node, event.wanted, event.busy, actions)
        if self.finished:
            self.budget.drain(actions)
            self.outcome = Finished()
            actions.append(self.outcome)
        elif jam.stuck(self):
            jam.relieve(self, actions)
        return actions

    def _agent_event(self, event: AgentEvent, agent: Agent, actions: list[Action]) -> None:
        node, worker = event.node, event.worker
        swapped = node in self.swapped  # a swapped-in version that fails is held
        match event:
            case AgentReady():
                agent.status, agent.batch = IDLE, None
            case SpaceRequested():
                grants.request(self, agent, event, actions)
            case TaskDone():
                self._done(agent, event, actions)
            case TaskFailed() if swapped:
                lifecycle.hold(self, node, f"batch {event.batch}: {event.message}", actions)
            case TaskFailed():
                error: PodpipeError = (
                    DataError(f"stage {node!r}, batch {event.batch}: {event.message}")
                    if event.input_error else StageError(node, event.batch, event.message,
                                                         event.traceback))
                self.fail(error, actions)
            case AgentBroken() if swapped:
                lifecycle.hold(self, node, event.message, actions)
            case AgentBroken():
                self.fail(event.error, actions)
            case AgentExited() if swapped:
                lifecycle.hold(self, node, f"its process exited (code {event.returncode})",
                               actions)
            case AgentExited():
                if not self.finished:
                    lifecycle.restart(self, node, worker, agent, actions,
                                      "its container disconnected" if event.returncode is None
                                      else f"its process exited (code {event.returncode})")
            case TaskTimedOut():
                if agent.busy and agent.batch == event.batch:  # (else: done meanwhile)
                    actions.append(Kill(node, worker))
                    message = f"the batch took longer than its timeout of {event.seconds:g} s"
                    if swapped:
                        lifecycle.hold(self, node, message, actions)
                    else:
                        lifecycle.restart(self, node, worker, agent, actions, message)
            case _:
                assert_never(event)

    # -- pieces ----------------------------------------------------------------

    def _import(self, event: Imported) -> None:
        key = (event.node, event.shard)
        if event.shard in self.plan.in_domain(SINGLE) or key in self.outputs:
            return  # ours, or had already
        self.done[event.node].add(event.shard)
        self.outputs[key] = event.output
        self.unread[key] = self.readers(event.node, event.shard)
        for consumer in self.graph.consumers[event.node]:
            self.maybe_ready(consumer, self.plan.key_of(consumer, event.node, event.shard))

    def _done(self, agent: Agent, event: TaskDone, actions: list[Action]) -> None:
        node, batch, output = event.node, event.batch, event.output
        agent.status, agent.batch = IDLE, None
        grants.settle(self, agent)  # its output is counted below, on its own
        if (node, batch) in self.line.obsolete:  # undone while it ran (a recompute)
            self.line.obsolete.discard((node, batch))
            if output is not None and output.tier == "ram":
                actions.append(Delete(output.path))
            self.maybe_ready(node, batch)
            return
        self.done[node].add(batch)
        per_batch = self.graph.domain[node] == BATCH
        if self.graph.domain[node] == TABLE:  # held for the run, read by every task
            if output is not None:
                self.outputs[(node, batch)] = output
                if output.tier == "ram":
                    self.budget.take(output.nbytes)
            for consumer in self.graph.consumers[node]:
                for mine in sorted(self.keys(consumer)):
                    self.maybe_ready(consumer, mine)
            return
        if output is not None:
            key = (node, batch)
            self.outputs[key] = output
            if output.tier == "ram":
                self.budget.take(output.nbytes)
                if per_batch:
                    self.budget.made(node, batch, output.nbytes)
            if node in self.keep or output.tier != "ram":
                actions.append(Keep(output))
            self.unread[key] = self.readers(node, batch)  # (resumed: some are done)
            if not self.unread[key]:
                self.delete(key, actions)
        for key in self.input_keys(node, batch):
            if key in self.outputs and self.outputs[key].path in event.pinned:
                self.pinned.add(key)
            readers = self.unread.get(key)
            if readers is not None:
                readers.discard(node)
                if not readers:
                    self.delete(key, actions)
        if per_batch and self.one_less(batch):  # off the line, made partly by a
            rework.invalidate(self, batch, actions)  # replaced version: done again
        for consumer in self.graph.consumers[node]:
            self.maybe_ready(consumer, self.plan.key_of(consumer, node, batch))
