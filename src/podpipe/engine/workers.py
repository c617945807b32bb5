"""`workers: auto`: more processes for the node that holds the line back.

Every tick (four times a second) the conductor says how much CPU each node's
processes used; the engine knows what each node has to do: tasks running, and
batches ready that no worker of it has taken (for the source: workers of the
nodes it feeds sitting idle, while the line has room for another batch). A node
whose *pressure* — that work per worker, averaged over the last `WINDOW` ticks,
judged once `SEEN` are in — stays above 1 holds the line back. It gets a worker
if the pod has a core for it (the cores every process of the pod wants now, plus
what one busy worker of the node wants, fit in `cpus`), or at once as many as it
has batches waiting, up to `MOST_PER_CPU` per core (and its cap: a GPU stage's
devices), when its busy workers want
little of a core (I/O bound, as the seed says: more workers than cores). What a
process *wants* is the time it ran plus the time it waited for a core
(`runtime.cputime`), so a stage starved of CPU is not taken for one waiting on I/O;
what a busy worker wants is measured over the window while its workers ran, so a
node that sat waiting for its input and now has a backlog is not either. When the
cores are taken, an idle worker of another auto node is taken back, so that a later tick can give
its core to the bottleneck. Reduces and nodes with a fixed `workers` are left as
they are. A node with batches waiting need not wait for the ticks either: each
agent says what of a core its task wanted (`after_task`). Tasks that mostly
waited (40 ms of them at least: a stall of a few ms in a short task is not I/O)
give the node a worker per batch waiting at once; two or more that used their
core give it one more worker if the pod had that core free at the last tick (a
whole tick since a worker was last added: it says what that one takes).

Which process runs a batch never changes what it makes: batch numbers, sink
files and a reduce's input order do not depend on the workers.
"""

from __future__ import annotations

from podpipe.engine.agent import ABSENT, HELD, IDLE, RUNNING
from podpipe.engine import grants
from podpipe.engine.events import Action, AddWorker, RemoveWorker
from podpipe.engine.ledger import Ledger
from podpipe.model.graph import BATCH
from podpipe.model.pipeline import SOURCE


IO_BOUND = 0.35      # a worker using less CPU than this (cores) mostly waits
JUDGED = 0.04        # seconds of a node's tasks that judge it between ticks, at least
MOST_PER_CPU = 4     # workers of one node per core, at most


def rebalance(run: Ledger, cpu: dict[str, float]) -> list[Action]:
    pool = run.pool
    line = [n for n in run.graph.order if run.graph.domain[n] == BATCH]
    pool.tick(sum(cpu.values()))  # every process of the pod: tables and reduces too
    for node in line:
        agents = run.agents[node].values()
        running = sum(1 for a in agents if a.status == RUNNING)
        waiting = len(run.ready[node]) if node != SOURCE else _starving(run)
        pool.observe(node, (running + waiting) / max(1, len(agents)), cpu.get(node, 0.0),
                     running)
        pool.had(node, len(agents))
    auto = [n for n in line if _resizable(run, n) and pool.full(n)]
    pressing = sorted((n for n in auto if pool.average(n) > 1.0
                       and pool.per_worker(n) is not None),
                      key=lambda n: (-pool.average(n), run.graph.order.index(n)))
    if not pressing:
        return []
    node = pressing[0]
    count = len(run.agents[node])
    per_worker = pool.per_worker(node) or 0.0
    most = pool.limit(node, MOST_PER_CPU)
    if per_worker < IO_BOUND:  # it mostly waits: as many as it has batches waiting
        waiting = len(run.ready[node]) if node != SOURCE else 1
        return add(run, node, min(max(1, waiting), most - count))
    if per_worker <= pool.free() and count < most:
        return add(run, node, 1)
    for other in auto:  # no core free: take back an idle worker of a node that does not
        idle = [w for w, a in run.agents[other].items() if a.status == IDLE and w > 0]
        if other != node and idle and pool.average(other) < 0.5:  # need it
            run.remove_worker(other, max(idle))
            pool.shrunk(other)  # judge it anew with fewer workers
            return [RemoveWorker(other, max(idle))]
    return []


def after_task(run: Ledger, node: str, wanted: float, busy: float) -> list[Action]:
    """A task of `node` took `busy` seconds and wanted `wanted` of them, and the
    worker has its next batch if one was ready. With batches still waiting, rather
    than once the ticks have judged the node (half a second: most of a short run),
    its last tasks, `JUDGED` seconds of them at least, judge it: if they mostly
    waited (I/O bound), as many workers as there are batches waiting; if two or more
    used their core, one more worker if the pod has that core."""
    seen = run.pool.task(node, wanted, busy)
    if not _resizable(run, node):
        return []
    took = used = 0.0
    tasks = 0
    for task_wanted, task_busy in reversed(seen):
        used, took, tasks = used + task_wanted, took + task_busy, tasks + 1
        if took >= JUDGED and tasks >= 2:
            break
    if took < JUDGED:
        return []  # too little seen yet: a stall of a few ms would decide
    cores = used / took
    waiting = len(run.ready[node]) if node != SOURCE else _starving(run)
    room = run.pool.limit(node, MOST_PER_CPU) - len(run.agents[node])
    if cores < IO_BOUND:
        more = min(waiting, room)
    elif tasks >= 2 and waiting and room and cores <= run.pool.free():
        more = 1
    else:
        return []
    return add(run, node, more) if more > 0 else []


def _resizable(run: Ledger, node: str) -> bool:
    """May `auto` resize `node` now: its workers are `auto`, it runs per batch, and
    every worker is up (none starting, held or being swapped; on a line with `jobs:
    N`, none still the older job's, nor handed over to the next)?"""
    return (run.pool.fixed.get(node) is None and run.graph.domain[node] == BATCH
            and bool(run.agents[node]) and all(a.status not in (ABSENT, HELD) and a.swap is None
                    for a in run.agents[node].values()))


def _starving(run: Ledger) -> int:
    """The source's backlog: workers of the nodes it feeds that sit idle with nothing
    to do, while the line has room for another batch (loading ahead of a slow stage
    helps nobody)."""
    if not grants.can_admit(run):
        return 0
    return sum(1 for consumer in run.graph.consumers[SOURCE] if not run.ready[consumer]
               for a in run.agents[consumer].values() if a.status == IDLE)


def add(run: Ledger, node: str, how_many: int) -> list[Action]:
    added: list[Action] = [AddWorker(node, run.add_worker(node)) for _ in range(how_many)]
    run.pool.resized(node)  # judged anew; what they take shows in the next whole tick
    return added


def split(costs: dict[str, float], cpus: float) -> tuple[dict[str, int], float]:
    """How `cpus` cores would be shared among per-batch nodes that each take
    `costs[node]` seconds of work per batch (measured: busy seconds / batches):
    the workers each gets, and the batches per second that predicts.

    A line moving X batches a second keeps X * cost workers of each node busy, and as
    many cores if its work is CPU: at most `cpus / sum(costs)` batches a second. Each
    node gets its share of the cores, rounded, at least one worker; the slowest node
    for its workers sets the pace."""
    total = sum(costs.values())
    if total <= 0:
        return {node: 1 for node in costs}, float("inf")
    workers = {node: max(1, round(cpus * cost / total)) for node, cost in costs.items()}
    pace = min(cpus / total, *(workers[n] / c for n, c in costs.items() if c > 0))
    return workers, pace


def resize(run: Ledger, node: str, count: int | None) -> list[Action]:
    """`node` is to run as `count` workers from now on (None: `auto`, from the ones it
    has): more are started; those beyond it go once idle (the highest first)."""
    run.pool.fix(node, count)
    have = sorted(run.agents[node])
    if count is None or count == len(have):
        return []
    if count > len(have):
        return add(run, node, count - len(have))
    for worker in have[count:]:  # taken back between batches (`between_batches`)
        run.agents[node][worker].retire_when_idle()
    return []
