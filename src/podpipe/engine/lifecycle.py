"""What happens to a node's processes: a dead one restarted with backoff (its batch
put back), a swap carried out between batches (or at once), a version held, the
workers an apply asks for (started, or taken back once idle).

Functions of the ledger; `state.RunState` calls them on the events that ask for them.
"""

from __future__ import annotations

from podpipe.engine import grants, rework
from podpipe.engine.agent import ABSENT, IDLE, Agent
from podpipe.engine.events import Action, Hold, RemoveWorker, Replace, Restart
from podpipe.engine.ledger import Ledger
from podpipe.errors import StageError


MAX_BACKOFF = 5.0


def backoff(attempt: int) -> float:
    """Seconds before the `attempt`-th restart: 0.1, 0.4, 1.6, ... up to 5."""
    return min(0.1 * 4.0 ** (attempt - 1), MAX_BACKOFF)


def restart(run: Ledger, node: str, worker: int, agent: Agent, gone: str,
            at: float) -> list[Action]:
    """A process the run needs died at `at` (`gone` says how): put its in-flight
    batch back and have it started again, with backoff, while the batch and the node
    have retries left (`Crashes`); else fail the run."""
    batch, busy = agent.batch, agent.busy
    crashes = run.crashes[node]
    deaths, incidents = crashes.death(worker, batch if busy else None, at)
    tries = run.retries.get(node, 0)
    if deaths > tries or incidents > tries:
        where = " before finishing the batch" if busy else " while the run needed it"
        if gone.startswith("the batch"):
            where = ""
        if tries and deaths <= tries:
            where += f", {incidents} times without finishing a batch"
        return run.fail(StageError(node, batch if busy else None, gone + where +
                                   (f", after {tries} restarts" if tries else "")))
    crashes.restarted()
    actions = take_back(run, node, agent)
    agent.gone()
    return actions + [Restart(node, max(deaths, incidents), backoff(max(deaths, incidents)),
                              worker)]


def between_batches(run: Ledger) -> list[Action]:
    """What waits for a worker to be between batches: a swap asked for (at once when
    asked `now`: its batch goes back to its queue, for the new version), and a worker
    to retire (fewer asked for by an apply)."""
    actions: list[Action] = []
    for node, worker, agent in run.all_agents():
        if agent.retire and agent.status in (IDLE, ABSENT):
            run.remove_worker(node, worker)
            actions.append(RemoveWorker(node, worker))
            continue
        swap = agent.swap
        if swap is None or (agent.busy and not swap.now):
            continue
        actions.append(Replace(node, kill=agent.busy, worker=worker))
        actions += take_back(run, node, agent)
        agent.replaced()
        run.swapped_in(node)
        if swap.recompute and all(a.swap is None for a in run.agents[node].values()):
            # the last worker of the old version is gone: what the old versions
            # made is done again, and what follows it
            actions += rework.recompute(run, node)
    return actions


def hold(run: Ledger, node: str, message: str) -> list[Action]:
    actions: list[Action] = []
    for agent in run.agents[node].values():  # every worker: the version is at fault
        actions += take_back(run, node, agent)
        agent.hold(message)
    return actions + [Hold(node, message)]


def take_back(run: Ledger, node: str, agent: Agent) -> list[Action]:
    """Put the agent's in-flight batch back in its queue and release its RAM."""
    batch = agent.put_down()
    if batch is not None:
        run.requeue(node, batch)
    return grants.release(run, agent)
