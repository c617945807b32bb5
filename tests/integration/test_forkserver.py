"""The fork server forks an early spawn (the source's agent) before it imports
pandas, the others after, each answer naming its spawn."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import make_numbers, spec, write_spec
from podpipe.runtime.plumbing import protocol, sockets


def _spawn(node: str, tmp_path: Path, listening: Path, early: bool) -> protocol.Spawn:
    return protocol.Spawn(node=node, spec=str(tmp_path / "p.yaml"), overrides=[],
                          socket=str(listening), env={}, log=str(tmp_path / f"{node}.log"),
                          cwd=str(tmp_path), name=node, early=early)


def test_an_early_spawn_is_forked_before_pandas_the_others_after(tmp_path):
    make_numbers(tmp_path / "data", files=1, rows=100)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "double", "run": "pystages:double", "inputs": ["source"]}],
        [{"input": "double", "uri": "out/"}]))
    conductor = sockets.listen(tmp_path / "run.sock")
    ours, theirs = socket.socketpair()
    # both asked before the server has imported anything: the early one must not
    # wait for pandas, the other must have it
    protocol.send(ours, _spawn("double", tmp_path, tmp_path / "run.sock", early=False))
    protocol.send(ours, _spawn("source", tmp_path, tmp_path / "run.sock", early=True))
    server = subprocess.Popen([sys.executable, "-m", "podpipe.runtime.stage.forkserver",
                               str(theirs.fileno())], pass_fds=[theirs.fileno()],
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [str(Path(__file__).parents[1] / "stages"),
                                   os.environ.get("PYTHONPATH", "")])})
    theirs.close()
    hellos: dict[str, tuple[int, socket.socket]] = {}
    try:
        reader, answers = protocol.Reader(), []
        while len(answers) < 2:
            answers += [m for m in reader.feed(ours.recv(1 << 16))
                        if isinstance(m, protocol.Spawned)]
        for _ in answers:  # each says hello, then waits for a task that never comes
            conn, _ = conductor.accept()
            hello = protocol.recv(conn)
            hellos[hello.node] = (hello.pid, conn)
        # the early one answered first, though asked second; each answer names its own
        assert [(m.name, m.pid) for m in answers] == [
            ("source", hellos["source"][0]), ("double", hellos["double"][0])]
        maps = {node: Path(f"/proc/{pid}/maps").read_text() for node, (pid, _) in hellos.items()}
        assert "pandas" not in maps["source"]
        assert "pandas" in maps["double"]
    finally:
        for _, conn in hellos.values():
            conn.close()
        ours.close()  # the server ends, and its children with it
        server.wait(timeout=30)
        conductor.close()
