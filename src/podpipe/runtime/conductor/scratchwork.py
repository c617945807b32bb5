"""Carrying out what the engine decides about RAM scratch: a grant (over a warm file
or not), a denial, a file deleted, pooled or given up, an output spilled to the
node tier.

Like `crew` it owns no state of its own: it works the run's scratch, the agents'
connections and the task record (`timeline`), so that the conductor's own
`_carry_out` keeps to tasks, checkpoints and the end.
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

    def carry_out(self, action: ScratchAction) -> None:
        """Carry out `action`, one about RAM scratch."""
        match action:
            case ev.Grant():
                reuse = None if action.reuse is None else str(self.scratch.pool_path(action.reuse))
                self.agents.send(agent_name(action.node, action.worker), protocol.Grant(reuse=reuse))
                self.timeline.granted(agent_name(action.node, action.worker))
            case ev.Deny():
                self.agents.send(agent_name(action.node, action.worker), protocol.Deny())
                self.timeline.ended(agent_name(action.node, action.worker), "denied")
            case ev.Delete() if action.held:
                Path(action.path).unlink(missing_ok=True)  # its pages go when the holder lets go
            case ev.Delete():
                discard(action.path)
            case ev.Recycle():
                try:
                    os.rename(action.path, self.scratch.pool_path(action.pooled))
                except FileNotFoundError:
                    pass  # (a grant of it then finds no file: the output is written anew)
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
