"""What the engine knows of each node's processes: each one's status, task and RAM
(`Agent`), and how many each node is to have (`Pool`: fixed, or `workers: auto`'s
measure of the cores they use)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from podpipe.engine.events import SwapRequested

IDLE, RUNNING, WAITING, ABSENT, HELD = "idle", "running", "waiting", "absent", "held"


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
        self.used = 0.0  # the cores the pod wanted at the last tick
        self.settled = 0  # ticks since a worker was last added (the first ran part of it)

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
