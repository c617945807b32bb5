"""What the engine knows of each node's processes: each one's status, task and RAM
(`Agent`), how many each node is to have (`Pool`: fixed, or `workers: auto`'s
measure of the cores they use), and how its processes died (`Crashes`)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from podpipe.engine.events import SwapRequested

IDLE, RUNNING, WAITING, ABSENT, HELD = "idle", "running", "waiting", "absent", "held"
INCIDENT_SECONDS = 1.0  # a node's workers dying this close together: one incident


class Crashes:
    """A node's process deaths as they count against its `retries`.

    Per batch: a batch whose processes died more than `retries` times fails the run
    (as Spark counts task failures and Ray task retries), however many workers the
    node has. Per incident: deaths of the node's workers within a moment of the
    first (one container's crash ends them all at once) are one, and a node with more
    incidents than its `retries` since it last finished a batch is crash-looping (a
    process that dies before it takes a batch is caught so)."""

    def __init__(self) -> None:
        self.restarts = 0        # processes restarted, for the status
        self.incidents = 0       # since the node last finished a batch
        self._deaths: dict[int, int] = {}  # batch -> deaths of the processes running it
        self._began = -math.inf  # when the latest incident began,
        self._ended: set[int] = set()  # and the workers it ended

    def death(self, worker: int, batch: int | None, at: float) -> tuple[int, int]:
        """`worker` died at `at` (monotonic seconds), running `batch` (None: none):
        the deaths of `batch`'s processes and the node's incidents since its last
        batch done, this one counted."""
        if at - self._began > INCIDENT_SECONDS or worker in self._ended:
            self.incidents += 1  # (a worker restarted since dying again: a new one)
            self._began, self._ended = at, set()
        self._ended.add(worker)
        if batch is None:
            return 0, self.incidents
        self._deaths[batch] = self._deaths.get(batch, 0) + 1
        return self._deaths[batch], self.incidents

    def restarted(self) -> None:
        self.restarts += 1

    def progress(self, batch: int) -> None:
        """The node finished `batch`: no crash loop."""
        self.incidents = 0
        self._deaths.pop(batch, None)


@dataclass
class Agent:
    status: str = ABSENT
    broken: str | None = None  # why a held stage is held
    swap: SwapRequested | None = None  # coming: no new task, replaced once idle
    batch: int | None = None
    want: int = 0        # bytes asked for while WAITING
    reserved: int = 0    # bytes granted, not yet an output
    reuse: int | None = None  # the warm file granted with them (`grants`)
    retire: bool = False  # taken back once its task is done (fewer workers asked for)

    @property
    def busy(self) -> bool:
        return self.status in (RUNNING, WAITING)

    # -- what happens to it (the policies call these; nothing else sets its fields) --

    def ready(self) -> None:
        """Connected (again), or done with its task: waiting for the next."""
        self.status, self.batch, self.want = IDLE, None, 0

    def start(self, batch: int) -> None:
        self.status, self.batch = RUNNING, batch

    def wait_for(self, nbytes: int) -> None:
        """Its output is written once `nbytes` of RAM are granted."""
        self.status, self.want = WAITING, nbytes

    def resume(self) -> None:
        """Granted (or sent to the node tier): it writes its output."""
        self.status, self.want = RUNNING, 0

    def granted(self, reserved: int, reuse: int | None) -> None:
        """RAM granted to it, over a warm file if `reuse`."""
        self.reserved, self.reuse = reserved, reuse

    def settle(self) -> tuple[int, int | None]:
        """What was granted to it, given back: (bytes, its warm file)."""
        given = self.reserved, self.reuse
        self.reserved, self.reuse = 0, None
        return given

    def put_down(self) -> int | None:
        """It leaves its task: the batch it was on (to go back to its queue), if any."""
        batch = self.batch if self.busy else None
        self.batch, self.want = None, 0
        return batch

    def gone(self) -> None:
        """Its process is gone: it is started again, or a new one comes."""
        self.status = ABSENT

    def replaced(self) -> None:
        """A new version's process comes in its place."""
        self.status, self.broken, self.swap = ABSENT, None, None

    def hold(self, why: str) -> None:
        self.status, self.broken = HELD, why

    def swap_coming(self, swap: SwapRequested) -> None:
        self.swap = swap

    def retire_when_idle(self) -> None:
        self.retire = True


WINDOW = 4           # ticks (a second) a node's pressure is averaged over, at most
SEEN = 2             # ticks seen before a node is judged (half a second)
SLACK = 0.25         # cores a pod may be over by when a worker is added (the ticks' noise)


class Pool:
    """Each node's workers asked for, and for `workers: auto`: the cores it may use,
    each node's recent pressure and CPU."""

    def __init__(self, cpus: float, fixed: dict[str, int | None]) -> None:
        self.cpus = cpus
        self.fixed = fixed  # each node's workers: a count, or None (`auto`)
        self.pressure: dict[str, deque[float]] = {}
        # Per tick: the cores a node used since the last, and its workers busy at the
        # last (a worker that has just started has used no CPU yet).
        self.cpu: dict[str, deque[tuple[float, int]]] = {}
        self.busy: dict[str, int] = {}  # workers busy at the last tick
        self.tasks: dict[str, deque[tuple[float, float]]] = {}  # its last tasks:
        # (seconds wanted of a core, seconds taken), since it last got a worker
        self.most: dict[str, int] = {}  # the most workers each node had
        self.caps: dict[str, int] = {}  # most workers of a node, whatever the cores (GPUs)
        self.used = 0.0  # the cores the pod wanted at the last tick
        self.settled = 0  # ticks since a worker was last added (the first ran part of it)

    # -- what happens to it --------------------------------------------------------

    def fix(self, node: str, count: int | None) -> None:
        """`node` runs as `count` workers (None: `auto`)."""
        self.fixed[node] = count

    def drop(self, node: str) -> None:
        self.fixed.pop(node, None)
        self.forget(node)

    def tick(self, used: float) -> None:
        """A tick: the pod wanted `used` cores since the last."""
        self.used = used
        self.settled += 1

    def had(self, node: str, workers: int) -> None:
        self.most[node] = max(self.most.get(node, 0), workers)

    def task(self, node: str, wanted: float, busy: float) -> deque[tuple[float, float]]:
        """A task of `node` wanted `wanted` seconds of a core and took `busy`; returns
        its last tasks."""
        seen = self.tasks.setdefault(node, deque(maxlen=64))
        seen.append((wanted, busy))
        return seen

    def resized(self, node: str) -> None:
        """`node` got workers: judged anew, and what they take shows in the next whole
        tick."""
        self.forget(node)
        self.settled = 0

    def shrunk(self, node: str) -> None:
        """`node` gave a worker back: its pressure is judged anew."""
        if node in self.pressure:
            self.pressure[node].clear()

    def forget(self, node: str) -> None:
        self.pressure.pop(node, None)
        self.tasks.pop(node, None)

    def limit(self, node: str, per_cpu: int) -> int:
        """The most workers `auto` gives `node`: `per_cpu` a core, and no more than
        its cap (a GPU stage: its workers with devices)."""
        return min(max(1, int(per_cpu * self.cpus)), self.caps.get(node, 1 << 30))

    def free(self) -> float:
        """The cores the pod had to spare at the last tick; none unless a whole tick
        has passed since a worker was last added (or the run began)."""
        return self.cpus + SLACK - self.used if self.settled >= 2 else 0.0

    def observe(self, node: str, pressure: float, cpu: float, busy: int) -> None:
        self.pressure.setdefault(node, deque(maxlen=WINDOW)).append(pressure)
        self.cpu.setdefault(node, deque(maxlen=WINDOW)).append((cpu, self.busy.get(node, 0)))
        self.busy[node] = busy

    def average(self, node: str) -> float:
        seen = self.pressure.get(node) or [0.0]
        return sum(seen) / len(seen)

    def full(self, node: str) -> bool:
        return len(self.pressure.get(node, ())) >= SEEN

    def per_worker(self, node: str) -> float | None:
        """The cores one busy worker of `node` used over the window; None if none of
        its workers was seen busy."""
        seen = [(c, b) for c, b in self.cpu.get(node, ()) if b]
        busy = sum(b for _, b in seen)
        return sum(c for c, _ in seen) / busy if busy else None
