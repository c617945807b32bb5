"""podpipe from Python: run a pipeline, resume it, read its status and its output.

    import podpipe

    run = podpipe.run("examples/tpch/q1.yaml", overrides=["source.batchRows=100000"])
    run.state                    # 'succeeded'
    run.stages["prices"].rows_out
    run.to_arrow("sink-0")       # the sink's Parquet files as one pyarrow Table

A spec is a path, YAML text, a dict (the YAML as data) or a `Pipeline` from
`podpipe.validate`. A run whose stage fails raises `podpipe.RunError` naming the
stage and the batch, with the last frames of the stage's code in `.traceback`;
an invalid spec raises `podpipe.SpecError`. The run goes exactly as `podpipe run`
does: stage processes, RAM scratch, a run directory (`.podpipe/runs/<id>`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import yaml

from podpipe.errors import UsageError
from podpipe.model import spec as specs
from podpipe.model.pipeline import Pipeline
from podpipe.runtime.rundir.status import StageStatus, Status

if TYPE_CHECKING:
    import pyarrow as pa

Spec = Union[str, "os.PathLike[str]", dict[str, Any], Pipeline]


# One node's figures in a run (a stage, the source, a reduce or a sink): batches
# done and in all, rows in and out, busy seconds, bytes, restarts, workers, ...
# (`StageStatus`; `StageFigures` is its name before, kept as an alias)
StageFigures = StageStatus


class Run:
    """A run directory and what its status says (read when the `Run` was made;
    `refresh()` reads it again)."""

    def __init__(self, run_dir: str | os.PathLike[str],
                 status: Status | None = None) -> None:
        from podpipe.runtime.runs import following as runs

        self.run_dir = runs.resolve(str(run_dir))
        self.status = status if status is not None else _read_status(self.run_dir)

    def refresh(self) -> "Run":
        self.status = _read_status(self.run_dir)
        return self

    @property
    def state(self) -> str:
        """running, succeeded, failed or interrupted."""
        return self.status.state

    @property
    def error(self) -> str | None:
        return self.status.error

    @property
    def elapsed_seconds(self) -> float:
        return self.status.elapsed_seconds

    @property
    def stages(self) -> dict[str, StageStatus]:
        return dict(self.status.stages)

    def sink_files(self, name: str) -> list[str]:
        """The part files of sink `name`, in batch order (URLs for a remote sink)."""
        from podpipe.runtime.data import sink

        return sink.part_files(self._sink(name))

    def to_arrow(self, sink: str) -> "pa.Table":
        """Sink `sink`'s output as one table, its part files in batch order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = self.sink_files(sink)
        if not files:
            raise UsageError(f"sink {sink!r} holds no part files")
        return pa.concat_tables([pq.read_table(f) for f in files])

    def _sink(self, name: str) -> specs.Sink:
        pipeline = specs.load(self.run_dir / "spec.yaml", self._overrides())
        for target in pipeline.sinks:
            if target.name == name:
                return target
        raise UsageError(f"no sink {name!r}; the pipeline's sinks are "
                         f"{[s.name for s in pipeline.sinks]}")

    def _overrides(self) -> list[str]:
        from podpipe.runtime.rundir import layout as rundir

        return rundir.read(self.run_dir).overrides

    def __repr__(self) -> str:
        return f"<podpipe.Run {self.status.pipeline} {self.state} at {self.run_dir}>"


def validate(spec: Spec, *, overrides: Sequence[str] = ()) -> Pipeline:
    """The spec, parsed and checked (fields, names, graph); raises SpecError."""
    if isinstance(spec, Pipeline):
        if not overrides:
            return spec
        spec = spec.document
    if isinstance(spec, dict):
        return specs.parse(yaml.safe_dump(spec, sort_keys=False), file="the spec dict",
                           overrides=list(overrides), lines=False)
    if isinstance(spec, str) and "\n" in spec:
        return specs.parse(spec, file="<string>", overrides=list(overrides))
    if isinstance(spec, (str, os.PathLike)):
        return specs.load(os.fspath(spec), list(overrides))
    raise UsageError(f"spec: expected a path, YAML text, a dict or a Pipeline, got "
                     f"{type(spec).__name__}")


def run(spec: Spec, *, overrides: Sequence[str] = (), run_dir: str | None = None,
        replicas: int = 1, memory: str | None = None, fresh: bool = False,
        progress: bool = False) -> Run:
    """Run the pipeline to the end on this machine, as `podpipe run` does. Relative
    paths in a spec given as text or a dict resolve against the working directory."""
    from podpipe.runtime.runs import pod

    with _spec_file(spec) as path:
        with _shown(progress) as observer:
            final = pod.run(path, overrides=list(overrides), run_dir=run_dir,
                            replicas=replicas, memory=memory, fresh=fresh,
                            observer=observer, reaper=False)  # the caller's process
    return Run(final.run_dir, final)


def resume(run_dir: str | os.PathLike[str], *, progress: bool = False,
           accept_changed_source: bool = False) -> Run:
    """Finish a run whose conductor died or whose pod was lost (`podpipe resume`);
    `accept_changed_source`: over a source whose files changed, redo the whole run."""
    from podpipe.runtime.runs import pod, replicas, following as runs

    path = str(runs.resolve(str(run_dir)))
    cwd = os.getcwd()  # a resume works from the run's own directory; give it back
    try:
        with _shown(progress) as observer:
            if replicas.is_replicas(path):
                final = replicas.resume(path, replicas=None, observer=observer,
                                        accept_changed_source=accept_changed_source)
            else:
                final = pod.resume(path, observer=observer, reaper=False,
                                   accept_changed_source=accept_changed_source)
    finally:
        os.chdir(cwd)
    return Run(final.run_dir, final)


def status(run_dir: str | os.PathLike[str] = "latest") -> Run:
    """The run in `run_dir` (or the latest) as its status says it is now."""
    return Run(run_dir)


def _read_status(run_dir: Path) -> Status:
    from podpipe.runtime.rundir import status as statuses

    return statuses.read(run_dir)


@contextlib.contextmanager
def _spec_file(spec: Spec) -> Iterator[str]:
    """A path to the spec: the user's file, or a private temporary one."""
    if isinstance(spec, (str, os.PathLike)) and not (isinstance(spec, str) and "\n" in spec):
        yield os.fspath(spec)
        return
    pipeline = validate(spec)  # a clear SpecError before anything is written
    fd, path = tempfile.mkstemp(prefix="podpipe-spec-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(pipeline.document, f, sort_keys=False)
        yield path
    finally:
        os.unlink(path)


@contextlib.contextmanager
def _shown(progress: bool) -> Iterator[Any]:
    """The live progress (rich) as the run's observer, or none."""
    if not progress:
        yield None
        return
    from rich.console import Console

    from podpipe import console as terminal

    with terminal.LiveProgress(Console()) as live:
        yield live
