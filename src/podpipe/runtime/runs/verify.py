"""`podpipe verify`: a finished run's batches made again, and each stage's bytes
compared with what the run made of them.

A run records the xxh3 of every output it hashed (`tasks.jsonl`; every output, but
with `checks.determinism: off`). `verify` picks `batches` of the run's source
batches, spread over the run, and makes them again from the source, stage after
stage, in a throwaway process of its own (this module run as a program: the stages'
code never runs in the caller's process; its outputs in a private folder in RAM,
removed when it ends, its log in the run's `logs/verify.log`). Each output is
written as a stage process writes it (`arrowfile.write_table`) and hashed; the
same version of the stage making other bytes of the same batch is not deterministic
(what `checks.determinism` catches on a resume, looked for on purpose here).

What is not made again, and says why: a reduce (made of every batch), a call stage
(it would call its service again), a stage reading a table, a sink; a batch whose
recorded version is not the spec's now (swapped in the run). A source whose files
changed since the run is refused, as a resume refuses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec

from podpipe.errors import UsageError
from podpipe.model.graph import BATCH, Graph
from podpipe.model.pipeline import SOURCE, Pipeline
from podpipe.runtime.plumbing import files, lifetime
from podpipe.runtime.rundir import layout as rundir, records, status
from podpipe.runtime.runs import following


class Made(msgspec.Struct, forbid_unknown_fields=True):
    """What the throwaway process made of a stage's batch (or why it could not)."""

    stage: str
    batch: int
    version: str = ""
    checksum: str = ""
    error: str = ""    # it raised
    skipped: str = ""  # why it was not made again


class Verdict(msgspec.Struct):
    stage: str
    batch: int
    same: bool | None  # None: not compared
    why: str = ""


def verify(run_dir: str, *, stage: str | None, batches: int,
           timeout: float) -> list[Verdict]:
    """Make `batches` of the finished run at `run_dir` again (`stage`: report only
    that stage); each stage's verdict on each batch."""
    path = following.resolve(run_dir)
    current = status.read(path)  # (the run directory is this user's, checked)
    if current.state != "succeeded" or current.controller is not None:
        raise UsageError(f"{path}: the run is {current.state}" + (
            " (several replicas: verify each pod's run directory)"
            if current.controller is not None else "; verify makes a finished run's "
            "batches again"))
    recorded = rundir.read(path)
    pipeline = _pipeline(path, recorded)
    graph = Graph.of(pipeline)
    if stage is not None and stage not in {s.name for s in pipeline.stages}:
        raise UsageError(f"--stage {stage!r}: no such stage in {path} (its stages: "
                         f"{', '.join(s.name for s in pipeline.stages)})")
    if batches < 1:
        raise UsageError(f"--batches {batches}: expected 1 or more")
    made = {(t.node, t.batch): (t.version, t.checksum) for t in records.read(
        path / records.TASKS, records.TaskRecord) if t.state == "done"}
    if not any(checksum for _, checksum in made.values()):
        raise UsageError(f"{path}: the run recorded no checksums of its outputs "
                         "(checks.determinism: off, or an older podpipe): nothing to "
                         "compare with")
    total = current.source_batches or 0
    chosen = sorted({round(i * (total - 1) / max(1, batches - 1)) for i in range(batches)}
                    if total > batches else range(total))
    again = _recompute(path, recorded.cwd, chosen, timeout)
    wanted = [n for n in graph.order if n in {s.name for s in pipeline.stages}
              and (stage is None or n == stage)]
    return [_verdict(n, b, made.get((n, b)), again.get((n, b))) for n in wanted
            for b in chosen]


def _pipeline(path: Path, recorded: rundir.RunRecord) -> Pipeline:
    """The run's spec as it ran, its source refused if its files changed since (what
    the run made could not be made again from it)."""
    from podpipe.model import spec as specs
    from podpipe.runtime.data import source

    with contextlib.chdir(recorded.cwd):  # relative paths resolve as they did
        pipeline = specs.load(path / "spec.yaml", recorded.overrides)
        now = None if recorded.source is None else \
            source.identity(pipeline.source, source.plan(pipeline.source))
    changed = None if now is None else source.changes(recorded.source or {}, now)
    if changed is not None:
        raise UsageError(f"{path}: {changed}; its batches cannot be made again as they "
                         "were")
    return pipeline


def _verdict(node: str, batch: int, recorded: tuple[str | None, str] | None,
             again: Made | None) -> Verdict:
    if again is None or again.skipped:
        return Verdict(node, batch, None, again.skipped if again else "not made again")
    if again.error:
        return Verdict(node, batch, False, f"it raised {again.error}")
    if recorded is None or not recorded[1]:
        return Verdict(node, batch, None, "the run recorded no checksum of it")
    if recorded[0] != again.version:
        return Verdict(node, batch, None, f"the run made it with version {recorded[0]}, "
                                          f"the spec's is {again.version} now")
    same = recorded[1] == again.checksum
    return Verdict(node, batch, same, "" if same else "other bytes than the run made")


def _recompute(path: Path, cwd: str, batches: list[int],
               timeout: float) -> dict[tuple[str, int], Made]:
    """The batches made again by a throwaway process (this module's `main`)."""
    log = path / "logs" / "verify.log"
    with open(files.append_private(log), "ab") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "podpipe.runtime.runs.verify", str(path.resolve()),
             json.dumps(batches)], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=err, start_new_session=True, preexec_fn=lifetime.die_with_parent)
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        lifetime.kill_group(child.pid)
        child.wait()
        raise UsageError(f"verify: the batches were not made again within {timeout:g} s "
                         f"(--timeout; {log} says how far it got)") from None
    finally:
        lifetime.kill_group(child.pid)  # (and what its stages started)
    if child.returncode != 0:
        raise UsageError(f"verify: the throwaway process exited with code "
                         f"{child.returncode} (see {log})")
    decoder = msgspec.json.Decoder(Made)
    found = [decoder.decode(line) for line in out.splitlines() if line.strip()]
    return {(m.stage, m.batch): m for m in found}


def main(run_dir: str, batches: list[int]) -> int:
    """The throwaway process: each batch made from the source, stage after stage; a
    `Made` line on stdout for every stage and batch."""
    from podpipe.model import spec as specs
    from podpipe.runtime.data import arrowfile, source
    from podpipe.runtime.plumbing import protocol
    from podpipe.runtime.stage.work import version_of, work_for

    path = Path(run_dir)
    pipeline = specs.load(path / "spec.yaml", rundir.read(path).overrides)
    graph = Graph.of(pipeline)
    plan = source.plan(pipeline.source)
    stages = {s.name: s for s in pipeline.stages}
    why = {n: "a reduce: made of every batch" for n in stages if graph.domain[n] != BATCH}
    for name, s in stages.items():
        if s.call is not None:
            why[name] = "a call stage: it would call its service again"
        elif any(i in graph.tables for i in graph.inputs[name]):
            why[name] = "it reads a table"
    nodes = [n for n in graph.order if n == SOURCE or n in stages]
    works, versions = {}, {}
    for node in [n for n in nodes if n not in why]:
        works[node] = work_for(pipeline, node)
        versions[node] = version_of(pipeline, node, works[node])
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = Path(tempfile.mkdtemp(prefix="podpipe-verify-", dir=root))  # (0700)
    try:
        for batch in batches:
            outputs: dict[str, str] = {}
            for node in nodes:
                reason = why.get(node) or next(
                    (f"its input {i!r} was not made again" for i in graph.inputs.get(node, ())
                     if i not in outputs), None)
                if reason is not None:
                    _say(Made(node, batch, skipped=reason))
                    continue
                out = folder / f"{node}-{batch}.arrow"
                task = protocol.Task(batch=batch, inputs=[[outputs[i]] for i in
                                                          graph.inputs.get(node, ())],
                                     output=str(out), source=plan[batch]
                                     if node == SOURCE else None)
                try:
                    tables = [[arrowfile.read_any_ipc(p) for p in g] for g in task.inputs]
                    result = works[node].run(batch, tables, task)
                    if isinstance(result, Path):
                        checksum = arrowfile.checksum(result)
                    else:
                        checksum = arrowfile.write_table(arrowfile.to_arrow(result), out,
                                                         None, True)[1]
                except Exception as exc:
                    _say(Made(node, batch, versions[node], error=f"{type(exc).__name__}: "
                                                                  f"{exc}"))
                    continue
                outputs[node] = str(result if isinstance(result, Path) else out)
                _say(Made(node, batch, versions[node], checksum))
            for made in outputs.values():
                Path(made).unlink(missing_ok=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _say(made: Made) -> None:
    sys.stdout.write(msgspec.json.encode(made).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2])))
