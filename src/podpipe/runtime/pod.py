"""A pod on this machine: plan the source, lay out the run, run the conductor.

`run` is what `podpipe run` calls. It validates everything that can be checked
before a process starts (spec, source files, the budget against the tmpfs), sweeps
scratch left by crashed runs, creates the run directory and the RAM scratch, and
hands over to the conductor.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from podpipe.errors import RunError, UsageError
from podpipe.model import spec as specs
from podpipe.model.graph import Graph
from podpipe.model.sizes import format_size, parse_size
from podpipe.runtime import scratch as scratches
from podpipe.runtime.conductor import Conductor
from podpipe.runtime.launcher import launcher as make_launcher


def validate(spec_path: str, overrides: list[str] | tuple[str, ...] = ()) -> specs.Pipeline:
    """The spec, parsed and checked (fields, names, graph)."""
    return specs.load(spec_path, list(overrides))


def run(spec_path: str, *, overrides: list[str] | tuple[str, ...] = (),
        run_dir: str | None = None,
        replicas: int = 1, memory: str | None = None,
        observer: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the pipeline to the end in one pod; returns the final status."""
    overrides = list(overrides)
    if replicas != 1:
        raise UsageError(f"--replicas {replicas}: only 1 replica is supported so far; "
                         "sharding across replicas is not implemented yet")
    if memory is not None:
        try:
            parse_size(memory)
        except ValueError as exc:
            raise UsageError(f"--memory: {exc}") from None
        overrides.append(f"memory={memory}")
    pipeline = validate(spec_path, overrides)
    graph = Graph.of(pipeline)
    root = scratches.default_root()
    scratches.sweep(root)
    _check_budget(pipeline, root)
    run_id = f"{pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_path = Path(run_dir) if run_dir else Path(pipeline.checkpoints.node) / "runs" / run_id
    _make_run_dir(run_path, spec_path, overrides)
    pod = f"{pipeline.name}-0"
    scratch = launcher = None
    try:
        try:
            scratch = scratches.Scratch.create(run_id, root)
        except OSError as exc:
            raise RunError(f"cannot create the RAM scratch in {root}: {exc.strerror}") from exc
        # Start the stage processes' fork server first: it imports while we plan.
        launcher = make_launcher(run_path / "spec.yaml", overrides, scratch.socket,
                                 run_path / "logs", pod)
        from podpipe.runtime import source  # pyarrow: imported while the fork server starts

        plan = source.plan(pipeline.source)
    except BaseException:
        if launcher is not None:
            launcher.close()
        if scratch is not None:
            scratch.remove()
        shutil.rmtree(run_path, ignore_errors=True)  # nothing ran: leave no half a run
        raise
    conductor = Conductor(pipeline=pipeline, graph=graph, plan=plan, scratch=scratch,
                          run_dir=run_path, launcher=launcher, run_id=run_id, pod=pod,
                          observer=observer)
    return conductor.run()


def _check_budget(pipeline: specs.Pipeline, root: Path) -> None:
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        raise UsageError(f"RAM scratch {root}: {exc.strerror}") from None
    if pipeline.memory > free:
        raise UsageError(f"spec.memory {format_size(pipeline.memory)} is more than the "
                         f"{format_size(free)} free in {root}; lower it (--memory)")


def _make_run_dir(path: Path, spec_path: str, overrides: list[str]) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise UsageError(f"--run-dir {path}: already holds a run; choose an empty "
                             "directory")
        (path / "logs").mkdir()
        shutil.copyfile(spec_path, path / "spec.yaml")
        tmp = path / ".run.json.tmp"
        tmp.write_text(json.dumps({"spec": os.path.abspath(spec_path), "overrides": overrides,
                                   "cwd": os.getcwd()}))
        tmp.rename(path / "run.json")
    except OSError as exc:
        raise UsageError(f"--run-dir {path}: {exc.strerror}") from None

