"""Carrying out what the engine decides about RAM scratch: a grant (over a warm file
or not), a denial, a file deleted, pooled or given up, an output spilled to the
node tier.

Like `crew` it works the run's scratch, the agents' connections and the task record
(`timeline`), so that the conductor's own `_carry_out` keeps to tasks, checkpoints and
the end. Its one state: the files a stage's candidate holds open (`hold`, `let_go`:
`podpipe shadow`). Those are never emptied or written over while held — deleted only
by name, their pages kept for the candidate — yet recycled as usual: one pooled while
held is not handed out to be written over (its name is deleted then, and the output
written anew), so a candidate costs the line no warm files it would otherwise have.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from typing import assert_never

from podpipe.engine import events as ev

ScratchAction = ev.Grant | ev.Deny | ev.Delete | ev.Recycle | ev.Unpool | ev.Spill
from podpipe.runtime.plumbing import files, logline, protocol
from podpipe.runtime.storage import tiers
from podpipe.runtime.conductor.agents import Agents
from podpipe.runtime.conductor.timeline import Timeline
from podpipe.runtime.plumbing.protocol import agent_name
from podpipe.runtime.data.scratch import Scratch, discard


class ScratchWork:
    def __init__(self, scratch: Scratch, run_dir: Path, agents: Agents, timeline: Timeline,
                 is_table: Callable[[str], bool], log: logline.Log) -> None:
        self.scratch, self.run_dir, self.agents, self.timeline = scratch, run_dir, agents, timeline
        self.is_table, self._log = is_table, log
        self._held: dict[str, int] = {}     # path -> candidates' batches holding it open
        self._held_pool: dict[int, str] = {}  # a pooled file that was such a path

    def hold(self, path: str) -> None:
        self._held[path] = self._held.get(path, 0) + 1

    def let_go(self, path: str) -> None:
        if self._held.get(path, 0) > 1:
            self._held[path] -= 1
            return
        self._held.pop(path, None)
        for pooled in [p for p, was in self._held_pool.items() if was == path]:
            del self._held_pool[pooled]  # a warm file like any other from now on

    def reusable(self, pooled: int | None) -> int | None:
        """`pooled`, to be written over by an output; None if a candidate still holds it
        (its name deleted now: the output is written anew)."""
        if pooled is not None and pooled in self._held_pool:
            del self._held_pool[pooled]
            Path(self.scratch.pool_path(pooled)).unlink(missing_ok=True)
            return None
        return pooled

    def carry_out(self, action: ScratchAction) -> None:
        """Carry out `action`, one about RAM scratch."""
        match action:
            case ev.Grant():
                pooled = self.reusable(action.reuse)
                reuse = None if pooled is None else str(self.scratch.pool_path(pooled))
                self.agents.send(agent_name(action.node, action.worker), protocol.Grant(reuse=reuse))
                self.timeline.granted(agent_name(action.node, action.worker))
            case ev.Deny():
                self.agents.send(agent_name(action.node, action.worker), protocol.Deny())
                self.timeline.ended(agent_name(action.node, action.worker), "denied")
            case ev.Delete() if action.held or action.path in self._held:
                Path(action.path).unlink(missing_ok=True)  # its pages go when the holder lets go
            case ev.Delete():
                discard(action.path)
            case ev.Recycle():
                try:
                    os.rename(action.path, self.scratch.pool_path(action.pooled))
                except FileNotFoundError:
                    pass  # (a grant of it then finds no file: the output is written anew)
                if action.path in self._held:  # (renamed: still the file it maps)
                    self._held_pool[action.pooled] = action.path
            case ev.Unpool() if action.pooled in self._held_pool:
                self.reusable(action.pooled)  # deleted by name only
            case ev.Unpool():
                discard(self.scratch.pool_path(action.pooled))
            case ev.Spill():
                self._spill(action)
            case _:
                assert_never(action)

    def _spill(self, action: ev.Spill) -> None:
        path = tiers.path_for(self.run_dir, action.node, action.batch)
        files.private_dirs(path.parent)
        if self.is_table(action.node):
            self._log(f"table {action.node!r} takes more than half the RAM budget: it "
                      f"is mapped from the node tier ({path})")
        else:
            self._log(f"RAM budget full: stage {action.node!r} batch {action.batch} "
                      f"spills to the node tier ({path})", "warning")
        self.agents.send(agent_name(action.node, action.worker),
                         protocol.Grant(path=str(path), tier="node"))
        self.timeline.granted(agent_name(action.node, action.worker))
