"""Talking to a running conductor: `podpipe swap`, `apply`, `peek`, `shadow`, `promote`.

The command connects to the conductor's socket in the run's RAM scratch (named in
`status.json`), sends one request and waits for the answer: the stage's new
process said hello (`swapped`), its version failed (`held`: the run waits for a
swap back), or the request was refused (why).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from podpipe.model import spec as specs
from podpipe.errors import RunError, UsageError
from podpipe.runtime.plumbing import protocol, sockets
from podpipe.runtime.rundir import status
from podpipe.runtime.runs import following, lines
from podpipe.runtime.data.scratch import Scratch

if TYPE_CHECKING:
    import socket

    import pyarrow as pa


def swap_overrides(stage: str, *, run: str | None, command: list[str] | None,
                   image: str | None, version: str | None) -> list[str]:
    """The spec overrides that make a stage's new version."""
    if sum(x is not None for x in (run, command, image)) != 1:
        raise UsageError("swap: give exactly one of --run MODULE:FUNCTION, --command "
                         "COMMAND or --image IMAGE")
    overrides = []
    if run is not None:
        overrides.append(f"stages.{stage}.run={json.dumps(run)}")
    if command is not None:
        if not command:
            raise UsageError("--command: expected an executable and its arguments")
        overrides.append(f"stages.{stage}.command={json.dumps(command)}")
    if image is not None:
        overrides.append(f"stages.{stage}.image={json.dumps(image)}")
    if version is not None:
        overrides.append(f"stages.{stage}.version={json.dumps(version)}")
    return overrides


def swap(run_dir: str, stage: str, overrides: list[str], *, now: bool, timeout: float,
         recompute: bool = False) -> list[Answer]:
    """Swap `stage` in the run at `run_dir` (in every pod of a multi-replica run), or
    on a standing line (its running job from the next batch, and every later job);
    returns each pod's answer."""
    if lines.is_line(run_dir):
        request = protocol.SwapRequest(stage=stage, overrides=overrides, now=now,
                                       recompute=recompute)
        return [Answer(str(lines.home(run_dir)), lines.ask(run_dir, request, timeout),
                       line=True)]
    return [_ask(pod, stage, overrides, now, timeout, recompute)
            for pod in _pods(run_dir, "nothing to swap (change the spec and run it again)")]


def _ask(run_dir: Path, stage: str, overrides: list[str], now: bool,
         timeout: float, recompute: bool) -> Answer:
    answer = _request(run_dir, protocol.SwapRequest(stage=stage, overrides=overrides, now=now,
                                                    recompute=recompute),
                      timeout, f"swap {stage!r}")
    if isinstance(answer.message, protocol.Held):
        raise RunError(f"stage {stage!r}: the new version failed: {answer.message.message}; the "
                       "stage is held and the run waits: swap it back (or to a fixed "
                       "version) to go on")
    return answer


def shadow(run_dir: str, request: protocol.ShadowRequest, *,
           timeout: float) -> list[Answer]:
    """Start (or `stop`) a candidate of a stage beside it in the running run at
    `run_dir` (every pod of it), or in a line's running job: each pod's answer,
    `Shadowing` once the candidate is up (UsageError if refused)."""
    return _each(run_dir, request, timeout, f"shadow {request.stage!r}",
                 "nothing to run a candidate beside (run it, and swap to it)")


def promote(run_dir: str, stage: str, *, timeout: float) -> list[Answer]:
    """Make the stage's candidate its live version from the next batch: each pod's
    answer, as a swap's (`Swapped`; RunError if the new version failed: held)."""
    answers = _each(run_dir, protocol.PromoteRequest(stage=stage), timeout,
                    f"promote {stage!r}", "nothing to promote")
    for answer in answers:
        if isinstance(answer.message, protocol.Held):
            raise RunError(f"stage {stage!r}: the promoted version failed: "
                           f"{answer.message.message}; the stage is held and the run "
                           "waits: swap it back to go on")
    return answers


def _each(run_dir: str, request: protocol.Message, timeout: float, what: str,
          otherwise: str) -> list[Answer]:
    """`request` to the running run's every pod, or to a line (its running job)."""
    if lines.is_line(run_dir):
        return [Answer(str(lines.home(run_dir)), lines.ask(run_dir, request, timeout),
                       line=True)]
    return [_request(pod, request, timeout, what) for pod in _pods(run_dir, otherwise)]


def apply(run_dir: str, spec_path: str, *, timeout: float) -> list[Answer]:
    """Have the running run at `run_dir` (every pod of a multi-replica run) go on with
    the spec at `spec_path`; returns each pod's answer."""
    text = specs.read(spec_path).decode("utf-8", errors="replace")  # (checked there)
    return [_request(pod, protocol.ApplyRequest(spec=text, path=spec_path), timeout, "apply")
            for pod in _pods(run_dir, "nothing to apply to (run the new spec instead)")]


def peek(run_dir: str, stage: str, batch: int | None, *,
         timeout: float = 10.0) -> tuple["pa.Table", protocol.Lent]:
    """A stage's output for `batch` (else its newest held) while the run goes, lent by
    its pod's conductor: the table maps the file's open descriptor, so it stays the
    batch asked for whatever the run does next, and the file's pages go when the
    table does. In a multi-replica run, the pod holding it (the newest of all); on a
    standing line, its running job."""
    refusals, found = [], []
    line = lines.is_line(run_dir)  # (its running job's conductor answers on its socket)
    for pod in [run_dir] if line else _pods(run_dir, "nothing to peek at (its sinks "
                                                     "hold its output)"):
        sock = lines.connect(run_dir)[1] if line else _conductor(Path(pod))
        if sock is None:
            continue  # (a pod that ended)
        try:
            with sock:
                sock.settimeout(timeout)
                protocol.send(sock, protocol.PeekRequest(  # (a job's: named)
                    stage=stage, batch=batch, run="" if line else status.read(pod).run_id))
                answer, fds = protocol.recv_fds(sock, 1)
        except (OSError, protocol.Closed) as exc:
            raise RunError(f"peek {stage!r}: {pod}: no answer ({exc})") from None
        if isinstance(answer, protocol.Refused):
            refusals.append(answer.message)
        elif isinstance(answer, protocol.Lent) and fds:
            found.append((answer, _mapped(fds[0])))
    if not found:
        raise UsageError(f"peek {stage!r}: " + ("; ".join(dict.fromkeys(refusals))
                                                 or "the run is not running"))
    lent, table = max(found, key=lambda pair: pair[0].batch)
    return table, lent


def _conductor(run_dir: Path) -> "socket.socket | None":
    """A connection to a running pod's conductor; None if the pod is not running."""
    current = status.read(run_dir)
    if current.state != "running" or current.scratch is None:
        return None
    path = Scratch(Path(current.scratch)).socket
    try:
        return sockets.connect(str(path), wait=0)
    except OSError as exc:
        raise UsageError(f"{run_dir}: cannot reach the conductor at {path}: {exc}") from None


def _mapped(fd: int) -> "pa.Table":
    """The Arrow IPC file behind `fd`, mapped read-only (the descriptor closed: the
    mapping holds the file)."""
    import mmap

    import pyarrow as pa

    from podpipe.runtime.data import arrowfile

    try:
        mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return arrowfile.read_ipc_buffer(pa.py_buffer(mapped))


def _pods(run_dir: str, otherwise: str) -> list[Path]:
    """The run directories of a running run's pods (one, unless it has replicas)."""
    run_dir = str(following.resolve(run_dir))  # a path, or `latest`
    current = status.read(run_dir)
    if current.state != "running":
        raise UsageError(f"{run_dir}: the run is {current.state}, not running; "
                         + otherwise)
    return ([Path(p.run_dir) for p in current.pods or []] if current.controller
            else [Path(run_dir)])


@dataclass(frozen=True)
class Answer:
    """A pod's answer: its run directory, and what its conductor said (None: the pod
    was not running any more, `state` says how it ended)."""

    run_dir: str
    message: protocol.Message | None
    state: str = "running"
    line: bool = False  # a standing line's answer


def _request(run_dir: Path, message: protocol.Message, timeout: float, what: str) -> Answer:
    current = status.read(run_dir)
    if current.state != "running" or current.scratch is None:
        return Answer(str(run_dir), None, current.state)
    path = Scratch(Path(current.scratch)).socket
    try:
        sock = sockets.connect(str(path), wait=0)
    except OSError as exc:
        raise UsageError(f"{run_dir}: cannot reach the conductor at {path}: {exc}") from None
    if isinstance(message, protocol.ApplyRequest):  # (for this run: a line's job, named)
        message = msgspec.structs.replace(message, run=current.run_id)
    with sock:
        return Answer(str(run_dir), sockets.ask(sock, message, timeout, what))
