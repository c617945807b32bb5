"""The conductor's pieces on their own: the wire decoded into engine events, swap
requests checked, processes retired, with a fake launcher and no stage process."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from podpipe.engine import events as ev
from podpipe.errors import InputError, SpecError
from podpipe.model import spec as specs
from podpipe.model.output import Output
from podpipe.runtime.plumbing import protocol, sockets
from podpipe.runtime.conductor.agents import Agents, to_event
from podpipe.runtime.conductor.processes import Processes
from podpipe.runtime.plumbing.launching import Process
from podpipe.runtime.conductor.requests.swaps import Swaps
from podpipe.runtime.plumbing.loop import EventLoop

SPEC = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
        "spec": {"source": {"uri": "x.parquet"},
                 "stages": [{"name": "a", "run": "m:f", "inputs": ["source"]}],
                 "sinks": [{"input": "a", "uri": "out/"}]}}


@pytest.mark.parametrize("message, event", [
    (protocol.Reserve(batch=3, nbytes=10), ev.SpaceRequested("a", 3, 10)),
    (protocol.Done(batch=3, output=Output("a", 3, "/p", 10, 2), stats=protocol.Stats()),
     ev.TaskDone("a", 3, Output("a", 3, "/p", 10, 2))),
    (protocol.Failed(batch=3, message="boom", input_error=True),
     ev.TaskFailed("a", 3, "boom", True)),
    (protocol.Hello(node="a", version="v", pid=1), None),
], ids=["reserve", "done", "failed", "hello-is-not-an-engine-event"])
def test_what_an_agent_says_becomes_the_engines_event(message, event):
    assert to_event("a", message, "spec.yaml") == event


def test_an_agent_that_cannot_start_names_the_spec_field_it_failed_on():
    event = to_event("a", protocol.Broken(node="a", message="cannot import 'm:f'",
                                          field="spec.stages[0].run"), "my.yaml")
    assert isinstance(event, ev.AgentBroken) and isinstance(event.error, SpecError)
    assert str(event.error) == "my.yaml: spec.stages[0].run: cannot import 'm:f'"
    plain = to_event("a", protocol.Broken(node="a", message="no such file"), "my.yaml")
    assert type(plain.error) is InputError


def test_a_message_of_the_wrong_shape_is_refused_at_the_socket():
    reader = protocol.Reader()
    body = b'{"type":"reserve","batch":"three","nbytes":1}'
    with pytest.raises(protocol.ProtocolError, match="batch"):
        reader.feed(len(body).to_bytes(4, "big") + body)


def test_an_agent_of_another_protocol_version_is_not_taken(tmp_path):
    import socket

    from podpipe.runtime.conductor.agents import Conn

    pairs = [socket.socketpair(), socket.socketpair()]
    with EventLoop(signals=()) as loop:
        agents = Agents(loop, sockets.listen(tmp_path / "c.sock"))
        old, fresh = Conn(pairs[0][0]), Conn(pairs[1][0])
        assert not agents.hello(old, protocol.Hello(node="a", version="v", pid=1, protocol=1))
        assert not agents.connected("a") and old.sock.fileno() < 0
        assert agents.hello(fresh, protocol.Hello(node="a", version="v", pid=7))
        assert agents.node_of(fresh) == "a" and agents.pids["a"] == 7
        agents.close()
    for a, b in pairs:
        a.close()
        b.close()


def test_a_connection_whose_other_end_closed_unread_is_stale(tmp_path):
    """A container restarted in place can say hello on a new connection before its
    old one's end is read: the old one is found stale (and read first), an open one
    is not, whether or not it has something to say."""
    import socket

    from podpipe.runtime.conductor.agents import Conn

    ends = [socket.socketpair() for _ in range(3)]
    with EventLoop(signals=()) as loop:
        agents = Agents(loop, sockets.listen(tmp_path / "c.sock"))
        for i, (ours, _theirs) in enumerate(ends):
            assert agents.hello(Conn(ours), protocol.Hello(node=f"n{i}", version="v", pid=i))
        ends[0][1].close()  # its process gone
        protocol.send(ends[1][1], protocol.Reserve(batch=0, nbytes=1))  # talking
        assert agents.stale("n0") is not None
        assert agents.stale("n1") is None and agents.stale("n2") is None  # open
        assert agents.stale("n9") is None  # no such agent
        agents.close()
    for ours, theirs in ends:
        ours.close()
        theirs.close()


def test_a_swap_to_an_invalid_version_or_an_unknown_stage_is_refused(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    pipeline = specs.load(tmp_path / "spec.yaml")
    with EventLoop(signals=()) as loop:
        agents = Agents(loop, sockets.listen(tmp_path / "c.sock"))
        swaps = Swaps(tmp_path, [], agents)
        def ask(stage: str, *overrides: str, local: bool = True, recompute: bool = False):
            said = swaps.check(protocol.SwapRequest(stage=stage, overrides=list(overrides),
                                                    recompute=recompute),
                               pipeline, local=local, shared_global=False)
            return said.message if isinstance(said, protocol.Refused) else said
        assert "no stage 'b'" in ask("b")
        assert "swap one by its image" in ask("a", local=False)
        assert "not valid" in ask("a", "stages.a.run=not a callable")
        assert ask("a", 'stages.a.run="m:g"') is None
        assert "being swapped already" in ask("a", 'stages.a.run="m:h"')
        assert swaps.replacing("a") == ['stages.a.run="m:g"']  # what the new one runs
        # a container: its new image awaited (answered at once), recomputing as asked
        swaps = Swaps(tmp_path, [], agents)
        awaited = ask("a", "stages.a.image=img:2", local=False, recompute=True)
        assert isinstance(awaited, protocol.Swapped) and awaited.pending
        assert swaps.image_updated("a") == ev.VersionChanged("a", recompute=True)
        assert swaps.image_updated("a") == ev.VersionChanged("a", recompute=False)
        agents.close()


class _FakeLauncher:
    """A `Launcher` that starts `sleep` in a session of its own for each node, as a
    launcher starts a stage process (the test does not need an agent, only a process
    to end)."""

    answers = None  # asked for now, answered later (as the fork server does): `answered`

    def __init__(self) -> None:
        self.started: list[tuple[str, list[str]]] = []
        self.popens: list[subprocess.Popen[bytes]] = []
        self.waiting: list[tuple[str, list[str]]] = []

    def start(self, name: str, overrides: tuple[str, ...] | list[str] = ()) -> Process:
        popen = subprocess.Popen(["sleep", "60"], start_new_session=True)
        self.started.append((name, list(overrides)))
        self.popens.append(popen)
        return Process(name, popen.pid, Path("/dev/null"), self)

    def early(self, name: str) -> None:
        self.ask(name)

    def ask(self, name: str, overrides: tuple[str, ...] | list[str] = ()) -> None:
        self.waiting.append((name, list(overrides)))

    def answered(self) -> list[Process]:
        asked, self.waiting = self.waiting, []
        return [self.start(node, overrides) for node, overrides in asked]

    def poll(self, process: Process) -> int | None:
        return next(p for p in self.popens if p.pid == process.pid).poll()

    def wait(self, process: Process, timeout: float | None) -> int | None:
        try:
            return next(p for p in self.popens if p.pid == process.pid).wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        for popen in self.popens:
            popen.kill()
            popen.wait()


def test_a_retired_process_exits_without_an_event_and_a_busy_one_is_killed():
    launcher = _FakeLauncher()
    with EventLoop(signals=()) as loop:
        processes = Processes(launcher, loop)
        processes.start("a", ["stages.a.run=x:y"])
        assert launcher.started == [("a", ["stages.a.run=x:y"])]
        first = launcher.popens[0]
        processes.retire("a", kill=True)  # mid-batch: its whole process group ends
        assert first.wait(10) == -signal.SIGKILL
        assert processes.exited(first.pid, "a") is None  # expected: not an event
        processes.start("b", [])
        second = launcher.popens[1]
        processes.retire("b", kill=False)  # told to stop over its socket: no signal
        assert second.poll() is None
        launcher.close()


def test_processes_asked_for_are_expected_at_once_and_none_is_asked_for_twice():
    launcher = _FakeLauncher()
    with EventLoop(signals=()) as loop:
        processes = Processes(launcher, loop)
        launcher.ask("source")  # asked for early, by the pod, before the conductor
        processes.begin("orders")  # takes in what has been answered: the source too
        assert processes.expects("orders") and processes.expects("source")
        processes.begin("source")  # already in: not asked for again
        processes.begin("a.1", ["stages.a.run=x:y"])
        assert launcher.started == [("source", []), ("orders", []),
                                    ("a.1", ["stages.a.run=x:y"])]
        assert sorted(processes.of("a")) == ["a.1"]
        processes.stop_all(terminate=True)
        assert all(p.poll() is not None for p in launcher.popens)
