"""Carrying out what the engine decides about processes: a restart after its delay, a
kill, a replacement (a swap), a stop, a hold, a worker added or taken back.

It owns no state of its own: it works the conductor's pieces that do — the
processes it starts (`processes`), the agents' connections (`agents`), the timers
(`loop`) and the swaps in progress (`swaps`) — so that the conductor's own
`_carry_out` keeps to the rest (space, data, the end).
"""

from __future__ import annotations

from typing import Callable

from typing import assert_never

from podpipe.engine import events as ev

ProcessAction = (ev.Restart | ev.Kill | ev.Replace | ev.Stop | ev.Hold | ev.AddWorker |
                 ev.RemoveWorker)
from podpipe.runtime.plumbing import logline, protocol
from podpipe.runtime.conductor.agents import Agents
from podpipe.runtime.conductor.processes import Processes
from podpipe.runtime.conductor.requests.swaps import Swaps
from podpipe.runtime.plumbing.loop import EventLoop
from podpipe.runtime.plumbing.protocol import agent_name


class Crew:
    def __init__(self, processes: Processes, agents: Agents, loop: EventLoop, swaps: Swaps,
                 log: logline.Log) -> None:
        self.processes, self.agents, self.loop, self.swaps = processes, agents, loop, swaps
        self._log = log

    def due(self, name: str) -> None:
        """A restart's backoff is over: process `name` starts (as swapped, if it was)."""
        self.processes.start(name, self.swaps.overrides.get(protocol.split_name(name)[0], []))

    def carry_out(self, action: ProcessAction) -> None:
        """Carry out `action`, one about a process."""
        match action:
            case ev.Restart():
                self._log(f"restarting stage {action.node!r} (restart {action.attempt}) "
                          f"in {action.delay:.1f} s", "warning")
                if self.processes.local:  # containers: the kubelet restarts them
                    self.loop.call_later(action.delay, agent_name(action.node, action.worker))
            case ev.Kill():
                name = agent_name(action.node, action.worker)
                self._log(f"stage {name!r} took longer than its timeout: killed", "warning")
                if self.processes.local:
                    self.retire(name, kill=True)
                else:  # a container: its connection closes, it exits, the kubelet restarts it
                    self.agents.drop(name)
            case ev.Replace():
                name = agent_name(action.node, action.worker)
                self.retire(name, kill=action.kill)
                self.processes.start(name, self.swaps.replacing(action.node))
            case ev.Stop():
                for name in self.processes.of(action.node) or [action.node]:
                    self.retire(name, kill=action.kill)
            case ev.Hold():
                self._log(f"stage {action.node!r} held: the new version failed: "
                          f"{action.message}", "error")
                for name in self.processes.of(action.node) or [action.node]:
                    self.retire(name, kill=False)
                self.swaps.held(action.node, action.message)
            case ev.AddWorker():
                self._log(f"stage {action.node!r} gets worker {action.worker}")
                if self.processes.local:
                    self.processes.begin(agent_name(action.node, action.worker),  # not
                                         self.swaps.overrides.get(action.node, []))  # waited
                elif not self.agents.fork(action.node, action.worker):  # (its container's)
                    self._log(f"stage {action.node!r}: no container to start worker "
                              f"{action.worker} in", "warning")
            case ev.RemoveWorker():
                self._log(f"stage {action.node!r} gives back worker {action.worker}")
                self.retire(agent_name(action.node, action.worker), kill=False)
                if not self.processes.local:
                    self.agents.shrink(action.node, action.worker)
            case _:
                assert_never(action)

    def retire(self, name: str, *, kill: bool) -> None:
        """Stop the agent `name`'s process for good: told to stop when it can hear it,
        else killed. Its exit is expected, not an event."""
        self.loop.cancel(name)  # a restart it had coming
        told = not kill and self.agents.send(name, protocol.Stop())
        self.agents.drop(name)
        self.processes.retire(name, kill=not told)
