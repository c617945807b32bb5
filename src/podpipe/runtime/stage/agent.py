"""A stage process: connects to the conductor, takes tasks, hands back metadata.

One long-lived agent runs per node of the pipeline (the source, each stage, each
sink): on Kubernetes it is a container, locally an OS process. For every task it
memory-maps its inputs from RAM scratch, does the work, asks the conductor for the
exact RAM its output needs, writes the output once and reports its path, rows,
bytes and checksum. Data never crosses the socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from podpipe.engine.events import SETUP_FAILED
from podpipe.errors import DataError, InputError, SpecError, StoreError
from podpipe.model import spec as specs
from podpipe.model.output import Output
from podpipe.runtime.data import arrowfile
from podpipe.runtime.plumbing import cputime, files, logline, protocol, sockets
from podpipe.runtime.plumbing.lifetime import RUN_ENV
from podpipe.runtime.data.scratch import discard
from podpipe.runtime.storage.store import Store, open_store
from podpipe.runtime.stage.work import (CallService, SchemaCheck, SetupFailed, Work, WriteSink,
                                        version_of, work_for)

_NOT_THE_USERS = (str(Path(__file__).resolve().parent.parent),  # podpipe's own package
                  sysconfig.get_paths()["stdlib"])


def user_frames(exc: BaseException, most: int = 5) -> str:
    """The last frames of the traceback that are the user's own code (not podpipe's,
    the standard library's or an installed library's: where a stage author looks),
    as Python prints them; else the last that are not podpipe's; "" if none."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_NOT_THE_USERS[0])]
    own = [f for f in frames if os.path.isabs(f.filename)
           and not f.filename.startswith(_NOT_THE_USERS)
           and "-packages/" not in f.filename]
    frames = own or frames
    if not frames:
        return ""
    return "".join(traceback.format_list(frames[-most:])).rstrip()


# The agent's exit codes: 0 the run is over (or it was told to stop), 1 the run
# failed (as the conductor said: a Job's pod fails), 2 its spec or input is wrong;
# AGAIN: the conductor went away or could not be reached, a process started again
# connects again (what the kubelet and a container's supervisor do).
AGAIN = 75


def serve(spec_path: str, overrides: list[str], node: str, socket_path: str, *,
          hold: bool = False, wait: float = 0.0) -> int:
    """The agent's main loop; returns the process exit code.

    `wait`: seconds to wait for the conductor's socket to come up. `hold`: once told
    to stop, stay up until SIGTERM instead of exiting (a container of a StatefulSet
    pod that exits is restarted).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the conductor decides when we stop
    run = os.environ.get(RUN_ENV)
    logline.speaking_for(run=Path(run).name if run else None, stage=node,
                         worker=int(os.environ.get(protocol.WORKER_ENV, "0")))
    if hold:  # a container: SIGTERM is the pod going away, a clean end at any point
        signal.signal(signal.SIGTERM, _exit_now)
    sys.path.insert(0, os.getcwd())
    try:
        sock = sockets.connect(socket_path, wait)
    except OSError as exc:
        sys.stderr.write(logline.line(f"cannot reach the conductor at {socket_path}: {exc}",
                                      "error"))
        return AGAIN
    started_with = dict(os.environ)  # a job's stage env is its own, not the last job's
    served = _serve(sock, spec_path, overrides, node)
    while isinstance(served, tuple):  # a standing line's next job, this process warm
        job, setup = served
        if not job.keep:
            _environment(started_with)
        _log_to(job.log)
        logline.speaking_for(run=Path(job.run).name, stage=node,
                             worker=int(os.environ.get(protocol.WORKER_ENV, "0")))
        served = _serve(sock, job.spec, job.overrides, node, setup if job.keep else None)
    code = served
    if hold and code == 0:
        sock.close()
        sys.stderr.write(logline.line("stopped by the conductor; holding until SIGTERM"))
        sys.stderr.flush()
        while True:
            signal.pause()
    return code


def _log_to(log: str) -> None:
    """From now on, what this process prints goes to `log` (a job's own, on a line)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = files.append_private(Path(log))
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _environment(env: dict[str, str]) -> None:
    """The process's environment as `env` again (what changed only: each change is a
    system call)."""
    for name in [name for name in os.environ if name not in env]:
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _exit_now(*_: Any) -> None:
    sys.stderr.flush()
    os._exit(0)  # outputs are written under temporary names: nothing half-done is trusted


@dataclass
class Setup:
    """What a process sets up for its node, kept across a standing line's jobs that
    leave the node's definition as it was (`Job.keep`)."""

    pipeline: specs.Pipeline
    work: Work
    version: str

    @classmethod
    def of(cls, spec_path: str, overrides: list[str], node: str) -> Setup:
        pipeline = specs.load(spec_path, overrides)
        if node in {s.name for s in pipeline.stages}:  # this process is the stage's own:
            os.environ.update(pipeline.stage(node).env)  # before its module is imported
        os.environ.update(_devices(pipeline, node))
        work = work_for(pipeline, node)
        return cls(pipeline, work, version_of(pipeline, node, work))


def _devices(pipeline: specs.Pipeline, node: str) -> dict[str, str]:
    """This worker's GPUs, when a stage of the pipeline asks for any: its own set of
    the pod's devices (`Pipeline.gpu_slots`; in a node's own container, of those
    visible to it — the device plugin's, for its node alone — not `spec.gpus`), none
    for a worker beyond them or a node that asks for none."""
    if not any(s.resources.gpu for s in pipeline.stages):
        return {}
    stated = pipeline.gpus
    if os.environ.get(protocol.CONTAINER_ENV):  # what the device plugin gave it alone
        pipeline, stated = replace(pipeline, stages=tuple(
            s for s in pipeline.stages if s.name == node)), None
    slots = pipeline.gpu_slots(cputime.gpus(stated)).get(node, [])
    worker = int(os.environ.get(protocol.WORKER_ENV, "0"))
    return {cputime.GPUS_ENV: ",".join(slots[worker]) if worker < len(slots) else ""}


def _serve(sock: socket.socket, spec_path: str, overrides: list[str], node: str,
           kept: Setup | None = None) -> int | tuple[protocol.Job, Setup]:
    """Serve the spec's node until told to stop (the exit code) or, on a standing
    line, to serve the next job (the `Job`, and what was set up: this process stays,
    warm). `kept`: what the job before set up, still right for this one."""
    try:
        setup = kept or Setup.of(spec_path, overrides, node)
    except SpecError as exc:  # the conductor names the user's file, not our copy
        protocol.send(sock, protocol.Broken(node=node, field=exc.field, message=exc.detail,
                                            worker=int(os.environ.get(protocol.WORKER_ENV, "0"))))
        return 2
    except InputError as exc:
        protocol.send(sock, protocol.Broken(node=node, message=str(exc),
                                            worker=int(os.environ.get(protocol.WORKER_ENV, "0"))))
        return 2
    except SetupFailed as exc:  # a death: the user's traceback in this log
        sys.stderr.write(logline.line(f"{exc}\n{user_frames(exc.__cause__ or exc)}", "error"))
        return SETUP_FAILED  # a death: restarted, as a crash is
    pipeline, work = setup.pipeline, setup.work
    setup_seconds = work.setup_seconds if kept is None else 0.0
    if setup_seconds:
        sys.stderr.write(logline.line(f"set up in {setup_seconds:.3f} s"))
    protocol.send(sock, protocol.Hello(node=node, pid=os.getpid(), version=setup.version,
                                       worker=int(os.environ.get(protocol.WORKER_ENV, "0")),
                                       spec=spec_path, setup=setup_seconds))
    if isinstance(work, CallService):  # the conductor hears of its requests in flight
        work.client.notify = lambda n: protocol.send(sock, protocol.Calling(in_flight=n))
    stages = {s.name: s for s in pipeline.stages}
    schemas = SchemaCheck(node in stages and stages[node].policy.schema == "fixed")
    mappings = arrowfile.Mappings()  # what it read, kept mapped from task to task
    try:
        while True:
            message = protocol.recv(sock)
            if isinstance(message, protocol.Stop):  # the run is over (failed: exit 1)
                _close(work)
                return int(message.failed)
            if isinstance(message, protocol.Job):
                if not message.keep:
                    work.close()
                return message, setup
            if isinstance(message, protocol.Task):
                _task(sock, work, message, node, schemas, mappings)
    except SetupFailed as exc:  # set up at its first task (its setupInputs): a death
        sys.stderr.write(logline.line(f"{exc}\n{user_frames(exc.__cause__ or exc)}", "error"))
        return SETUP_FAILED
    except _Stopped:
        _close(work)
        return 0
    except (protocol.Closed, ConnectionError):
        sys.stderr.write(logline.line("the conductor went away", "warning"))
        return AGAIN  # in a pod, the restarted container reconnects to the new conductor


def _close(work: Work) -> None:
    """The clean end: what the node set up let go (a class stage's `close()`); a close
    that raises is logged, the run's outputs stand."""
    try:
        work.close()
    except Exception as exc:
        sys.stderr.write(logline.line(f"close() raised {type(exc).__name__}: {exc}\n"
                                      f"{user_frames(exc)}", "warning"))


class _Stopped(Exception):
    """Told to stop in the middle of a task."""


def _task(sock: socket.socket, work: Work, task: protocol.Task, node: str,
          schemas: SchemaCheck, mappings: arrowfile.Mappings) -> None:
    batch, started, memo = task.batch, time.perf_counter(), task.memo
    cpu = cputime.wanted()
    reused = False
    watched = arrowfile.Watched(mappings, task.keep_mapped)
    sys.stderr.write(logline.task_line(batch, "started"))
    set_up = work.setup_seconds  # 0: not yet (a class with setupInputs sets up at a task)
    try:
        inputs = [[watched(p) for p in group] for group in task.inputs]
        result = _reuse(memo, Path(task.output)) if memo else None
        reused = result is not None
        if not reused:
            result = work.run(batch, inputs, task)
        wrong, schema = schemas.check(batch, result, task)
        if wrong is not None:
            if isinstance(result, Path):
                result.unlink(missing_ok=True)
            _logged(batch, "failed", wrong)
            protocol.send(sock, protocol.Failed(batch=batch, message=wrong))
            return
    except SetupFailed:
        raise  # a death, not the batch's failure (`_serve`)
    except Exception as exc:
        calls = work.stats() if isinstance(work, CallService) else None
        if calls is None:
            traceback.print_exc(file=sys.stderr)
        _logged(batch, "failed", f"{type(exc).__name__}: {exc}")
        protocol.send(sock, protocol.Failed(
            batch=batch, input_error=isinstance(exc, (DataError, InputError)),
            message=f"{type(exc).__name__}: {exc}", traceback=user_frames(exc), calls=calls))
        return
    stats = protocol.Stats(rows_in=sum(t.num_rows for group in inputs for t in group))
    if work.setup_seconds and not set_up:  # set up in this task (a class with setupInputs)
        stats.setup = work.setup_seconds
        sys.stderr.write(logline.line(f"set up in {stats.setup:.3f} s (at batch {batch})"))
    if isinstance(work, CallService) and not reused:
        stats.calls = work.stats()
    output = None
    if result is None and task.reuse is not None:
        discard(task.reuse)  # the warm file that came with it: unused
    if result is not None:
        written = result if isinstance(result, Path) else None  # a command's own file
        nbytes = written.stat().st_size if written else arrowfile.ipc_size(result)
        grant = protocol.Grant(reuse=task.reuse)  # what came with the task, if it does
        if nbytes > task.granted:  # more than came with the task (if any): asked for
            if task.reuse is not None:  # what came with it is given back, this first
                discard(task.reuse)
            asked = time.perf_counter()
            answer = _reserve(sock, batch, nbytes)
            if answer is None:
                if written:
                    written.unlink()
                return
            grant = answer
            started += time.perf_counter() - asked  # waiting for RAM is not work
        path, tier = Path(grant.path or task.output), grant.tier
        if grant.reuse is not None and (written or tier != "ram"):
            discard(grant.reuse)  # a file of its own: not used
        if written and tier == "ram":
            os.rename(written, path)
        elif written:  # spilled to the node tier: another filesystem
            with files.publishing(path) as tmp:
                shutil.move(written, tmp)
        hashed = task.checksum or tier != "ram"  # what a copy of it is checked by
        if written:
            rows = arrowfile.read_table(path).num_rows
            checksum = arrowfile.checksum(path) if hashed else ""
        elif isinstance(result, pa.Table):
            try:
                nbytes, checksum = arrowfile.write_table(
                    result, path, grant.reuse if tier == "ram" else None, hashed)
            except OSError as exc:
                protocol.send(sock, protocol.Failed(
                    batch=batch, message=f"cannot write {path}: {exc.strerror or exc}"))
                return
            rows = result.num_rows
        output = Output(node, batch, str(path), nbytes, rows, checksum, tier)
        stats.rows_out, stats.bytes_out = rows, nbytes
        if memo and not reused:
            _keep(memo, path)
    elif isinstance(work, WriteSink):
        stats.rows_out = stats.rows_in  # a sink's rows out are the rows it wrote
    stats.reused = int(reused)
    stats.busy = time.perf_counter() - started
    if cpu is not None and (now := cputime.wanted()) is not None:
        stats.wanted = now - cpu
    _logged(batch, "done", f"{stats.rows_out:,} rows, {stats.busy:.3f} s")
    del inputs, result  # what the task mapped is let go here (`Watched`)
    protocol.send(sock, protocol.Done(batch=batch, output=output, stats=stats,
                                      pinned=watched.pinned(), schema=schema))


def _logged(batch: int, what: str, detail: str) -> None:
    """The task's last line in the log, after anything the stage printed."""
    sys.stdout.flush()
    sys.stderr.write(logline.task_line(batch, what, detail))
    sys.stderr.flush()


def _memo_store(memo: str) -> tuple[Store, str]:
    """The store of a memo's folder, and the memo's key in it."""
    folder, _, name = memo.rpartition("/")
    return open_store(folder), name


def _reuse(memo: str, output: Path) -> Path | None:
    """The output an earlier run kept at `memo` (same stage version, same inputs),
    fetched next to where ours goes; None if there is none, or the store fails
    (reuse only saves work: the stage computes instead)."""
    local = output.with_suffix(".memo")
    try:
        store, key = _memo_store(memo)
        if not store.download(key, local):
            return None
        arrowfile.read_table(local)  # whole and readable, or not used
    except (StoreError, OSError, pa.ArrowException, ValueError) as exc:
        sys.stderr.write(logline.line(f"cannot reuse the output kept at {memo}: {exc}",
                                      "warning"))
        local.unlink(missing_ok=True)
        return None
    return local


def _keep(memo: str, output: Path) -> None:
    """Keep this output at `memo` for later runs (one PUT: it appears whole or not at
    all); a store that fails only costs the reuse."""
    try:
        store, key = _memo_store(memo)
        store.upload(key, output)
    except StoreError as exc:
        sys.stderr.write(logline.line(f"cannot keep the output for reuse at {memo}: {exc}",
                                      "warning"))


def _reserve(sock: socket.socket, batch: int, nbytes: int) -> protocol.Grant | None:
    """Ask for the RAM the output needs; the grant (which may name a path on the node
    tier instead: a spill), or None if the conductor wants the output dropped."""
    protocol.send(sock, protocol.Reserve(batch=batch, nbytes=nbytes))
    reply = protocol.recv(sock)
    if isinstance(reply, protocol.Stop):
        raise _Stopped()
    return reply if isinstance(reply, protocol.Grant) else None
