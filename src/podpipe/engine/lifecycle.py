"""What happens to a node's processes: a dead one restarted with backoff (its batch
put back), a swap carried out between batches (or at once), a version held, the
workers an apply asks for (started, or taken back once idle).

Functions of the run state (`state.RunState`), which calls them on the events that
ask for them.
"""

from __future__ import annotations

from podpipe.engine import grants, rework
from podpipe.engine.agent import ABSENT, HELD, IDLE, Agent
from podpipe.engine.events import Action, Hold, RemoveWorker, Replace, Restart
from podpipe.engine.ledger import Ledger
from podpipe.errors import StageError


MAX_BACKOFF = 5.0


def backoff(attempt: int) -> float:
    """Seconds before the `attempt`-th restart: 0.1, 0.4, 1.6, ... up to 5."""
    return min(0.1 * 4.0 ** (attempt - 1), MAX_BACKOFF)


def restart(run: Ledger, node: str, worker: int, agent: Agent, actions: list[Action],
            gone: str) -> None:
    """A process the run needs died (`gone` says how): put its in-flight batch back
    and have it started again, with backoff, while it has restarts left; else fail
    the run."""
    batch, busy = agent.batch, agent.busy
    attempt = run.restarts[node] + 1
    tries = run.retries.get(node, 0)
    if attempt > tries:
        where = " before finishing the batch" if busy else " while the run needed it"
        if gone.startswith("the batch"):
            where = ""
        run.fail(StageError(node, batch if busy else None, gone + where +
                              (f", after {tries} restarts" if tries else "")), actions)
        return
    run.restarts[node] = attempt
    take_back(run, node, agent, actions)
    agent.status = ABSENT
    actions.append(Restart(node, attempt, backoff(attempt), worker))

def between_batches(run: Ledger, actions: list[Action]) -> None:
    """What waits for a worker to be between batches: a swap asked for (at once when
    asked `now`: its batch goes back to its queue, for the new version), and a worker
    to retire (fewer asked for by an apply)."""
    for node, worker, agent in run.all_agents():
        if agent.retire and agent.status in (IDLE, ABSENT):
            del run.agents[node][worker]
            actions.append(RemoveWorker(node, worker))
            continue
        swap = agent.swap
        if swap is None or (agent.busy and not swap.now):
            continue
        actions.append(Replace(node, kill=agent.busy, worker=worker))
        take_back(run, node, agent, actions)
        agent.status, agent.broken, agent.swap = ABSENT, None, None
        run.swapped.add(node)
        if swap.recompute and all(a.swap is None for a in run.agents[node].values()):
            # the last worker of the old version is gone: what the old versions
            # made is done again, and what follows it
            rework.recompute(run, node, actions)


def hold(run: Ledger, node: str, message: str, actions: list[Action]) -> None:
    for agent in run.agents[node].values():  # every worker: the version is at fault
        take_back(run, node, agent, actions)
        agent.status, agent.broken = HELD, message
    actions.append(Hold(node, message))

def take_back(run: Ledger, node: str, agent: Agent, actions: list[Action]) -> None:
    """Put the agent's in-flight batch back in its queue and release its RAM."""
    if agent.busy and agent.batch is not None:
        run.ready[node] = sorted(run.ready[node] + [agent.batch])
    grants.release(run, agent, actions)
    agent.batch, agent.want = None, 0
