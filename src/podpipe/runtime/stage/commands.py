"""`command:` stages: an executable started per batch (`RunCommand`, its task in its
environment), or started once per worker and served its tasks (`ServeCommand`,
`serve: true`: one JSON line per task on its stdin, one answer per line on its
stdout — the protocol in docs/spec.md, "Serving command stages"). Either writes its
output as an Arrow IPC file or stream, checked before it is trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from podpipe.runtime.data import arrowfile
from podpipe.runtime.plumbing import protocol
from podpipe.runtime.plumbing.lifetime import die_with_parent

# Environment of a `command:` stage, documented in docs/spec.md.
ENV_INPUT = "PODPIPE_INPUT"          # the first input's Arrow IPC file
ENV_INPUTS = "PODPIPE_INPUTS"        # every input, joined with ':'; reduce: all batches
ENV_OUTPUT = "PODPIPE_OUTPUT"        # where to write the output (Arrow IPC file or stream)
ENV_BATCH = "PODPIPE_BATCH"
ENV_STAGE = "PODPIPE_STAGE"
ENV_SERVE = "PODPIPE_SERVE"          # a serving stage's protocol version

SERVE_PROTOCOL = 1


def _inputs(task: protocol.Task) -> list[str]:
    return [p for group in task.inputs for p in group]


def _output(task: protocol.Task) -> Path:
    return Path(task.output).with_suffix(".cmd")


def _collected(name: str, output: Path) -> pa.Table | Path:
    """What the command wrote, checked: an Arrow IPC file is kept (mapped by the next
    stage), a stream is read; anything else is the task's failure."""
    keep = False
    try:
        if not output.exists():
            raise RuntimeError(f"command {name!r} wrote no output to ${ENV_OUTPUT}")
        with open(output, "rb") as f:
            is_file_format = f.read(6) == b"ARROW1"
        try:
            if is_file_format:
                arrowfile.read_table(output)  # validate before trusting it
                keep = True
                return output
            return arrowfile.read_any_ipc(output)
        except (pa.ArrowException, ValueError) as exc:  # ValueError: an empty file
            raise RuntimeError(f"command {name!r} wrote an invalid Arrow IPC output: "
                               f"{exc}") from exc
    finally:
        if not keep:
            output.unlink(missing_ok=True)


class RunCommand:
    """An executable started for each batch, its task in its environment."""

    def __init__(self, command: tuple[str, ...], node: str) -> None:
        self.command, self.node = list(command), node

    def run(self, batch: int, task: protocol.Task) -> pa.Table | Path:
        paths, output = _inputs(task), _output(task)
        env = {**os.environ, ENV_INPUT: paths[0], ENV_INPUTS: ":".join(paths),
               ENV_OUTPUT: str(output), ENV_BATCH: str(batch), ENV_STAGE: self.node}
        try:
            done = subprocess.run(self.command, env=env, stdin=subprocess.DEVNULL,
                                  stdout=sys.stderr, stderr=sys.stderr,
                                  preexec_fn=die_with_parent)  # it ends with the stage
        except OSError as exc:
            raise RuntimeError(f"cannot start {self.command[0]!r}: {exc.strerror}") from exc
        if done.returncode != 0:
            output.unlink(missing_ok=True)
            raise RuntimeError(f"command {self.command[0]!r} exited with code "
                               f"{done.returncode}")
        return _collected(self.command[0], output)

    def close(self) -> None:
        """Nothing is kept between batches."""


class ServeCommand:
    """An executable started once (for this process) and served every task: a JSON
    line `{"protocol": 1, "batch": B, "stage": S, "inputs": [...], "output": P}` on
    its stdin, answered by a line `{"batch": B}` (done: P written) or
    `{"batch": B, "error": "why"}` on its stdout. Other lines on its stdout, and its
    stderr, go to the stage's log. If it ends, the task it was on fails (naming the
    batch) and the next task starts it again."""

    def __init__(self, command: tuple[str, ...], node: str) -> None:
        self.command, self.node = list(command), node
        self.process: subprocess.Popen[str] | None = None

    def _started(self) -> subprocess.Popen[str]:
        if self.process is None:
            env = {**os.environ, ENV_STAGE: self.node, ENV_SERVE: str(SERVE_PROTOCOL)}
            try:
                self.process = subprocess.Popen(
                    self.command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=sys.stderr, text=True, bufsize=1, preexec_fn=die_with_parent)
            except OSError as exc:
                raise RuntimeError(f"cannot start {self.command[0]!r}: "
                                   f"{exc.strerror}") from exc
        return self.process

    def run(self, batch: int, task: protocol.Task) -> pa.Table | Path:
        process, output = self._started(), _output(task)
        request = {"protocol": SERVE_PROTOCOL, "batch": batch, "stage": self.node,
                   "inputs": _inputs(task), "output": str(output)}
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            pass  # it has ended: its answer below is the end of its stdout
        answer = self._answer(process.stdout, batch)
        if answer is None:
            code = process.wait()
            self.process = None  # started again for the next task
            output.unlink(missing_ok=True)
            raise RuntimeError(f"command {self.command[0]!r} (serving) exited with code "
                               f"{code} on batch {batch}")
        if answer.get("error") is not None:
            output.unlink(missing_ok=True)
            raise RuntimeError(f"command {self.command[0]!r} failed batch {batch}: "
                               f"{answer['error']}")
        return _collected(self.command[0], output)

    def _answer(self, stdout: IO[str], batch: int) -> dict[str, Any] | None:
        """The answer to `batch`; None if the process ended first."""
        for line in stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            if not isinstance(answer, dict) or "batch" not in answer:
                sys.stderr.write(line)  # the stage's own output: its log
                continue
            if answer["batch"] != batch:
                raise RuntimeError(f"command {self.command[0]!r} answered batch "
                                   f"{answer['batch']!r} while on batch {batch}")
            return answer
        return None

    def close(self) -> None:
        """Its stdin closed: it ends (killed if it has not within 10 s)."""
        process, self.process = self.process, None
        if process is None:
            return
        assert process.stdin is not None
        try:
            process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
