"""What the engine knows of each node's process: its status, its task, its RAM."""

from __future__ import annotations

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
