"""podpipe from Python: run a pipeline, resume it, read its status and its output.

    import podpipe

    run = podpipe.run("examples/tpch/q1.yaml", overrides=["source.batchRows=100000"])
    run.state                    # 'succeeded'
    run.stages["prices"].rows_out
    run.to_arrow("sink-0")       # the sink's Parquet files as one pyarrow Table

    with podpipe.up("examples/tpch/q1.yaml") as line:   # a standing line, warm
        job = line.submit(source="data/day-2/*.parquet", sinks={"0": "out/day-2/"})
        job.wait().to_arrow("sink-0")

A spec is a path, YAML text, a dict (the YAML as data) or a `Pipeline` from
`podpipe.validate`. A run whose stage fails raises `podpipe.RunError` naming the
stage and the batch, with the last frames of the stage's code in `.traceback`;
an invalid spec raises `podpipe.SpecError`. The run goes exactly as `podpipe run`
does: stage processes, RAM scratch, a run directory (`.podpipe/runs/<id>`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

from podpipe import shipping
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

    def peek(self, stage: str, batch: int | None = None) -> "pa.Table":
        """`stage`'s output for `batch` (else the newest the pod holds) while the run
        goes, as `podpipe peek` reads it: the table holds the file it was lent, whatever
        the run does next; its RAM goes when the table does."""
        from podpipe.runtime.runs import control

        return control.peek(str(self.run_dir), stage, batch)[0]

    def to_pandas(self, sink: str) -> Any:
        """Sink `sink`'s output as a pandas DataFrame (pandas installed)."""
        return _needing("pandas", "to_pandas", lambda: self.to_arrow(sink).to_pandas())

    def to_polars(self, sink: str) -> Any:
        """Sink `sink`'s output as a polars DataFrame (polars installed)."""
        def convert() -> Any:
            import polars

            return polars.from_arrow(self.to_arrow(sink))

        return _needing("polars", "to_polars", convert)

    def _repr_html_(self) -> str:
        """The run's summary in Jupyter: its state and a row per stage."""
        from podpipe import notebook

        return notebook.summary_html(self.status, str(self.run_dir))

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
        return shipping.parse_dict(spec, list(overrides))
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
    """Finish a run whose conductor died or whose pod was lost (`podpipe resume`; a
    standing line's job goes back on its line while the line is up);
    `accept_changed_source`: over a source whose files changed, redo the whole run."""
    from podpipe.runtime.plumbing import protocol
    from podpipe.runtime.runs import lines, pod, replicas, following as runs

    path = str(runs.resolve(str(run_dir)))
    line = lines.job_line(Path(path))
    if line is not None and lines.serving(line):  # a line's job: back on its line
        answer = next(lines.submit(line, [], resume=Path(path)))
        assert isinstance(answer, protocol.Submitted)
        return Job(answer.run_dir).wait()
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


class Job(Run):
    """A job on a standing line: a run directory like a run's (its status is read
    when the `Job` is made, `queued` until it starts; `wait` waits for its end)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        from podpipe.runtime.rundir import layout as rundir

        super().__init__(run_dir, rundir.status_of(Path(run_dir)))

    def refresh(self) -> "Job":
        from podpipe.runtime.rundir import layout as rundir

        self.status = rundir.status_of(self.run_dir)
        return self

    def wait(self, timeout: float | None = None) -> "Job":
        """Block until the job has ended; raises RunError if it failed (naming the
        stage and the batch), TimeoutError if it still runs after `timeout` s."""
        from podpipe.errors import RunError
        from podpipe.runtime.runs import following

        code, final = following.wait(str(self.run_dir), timeout)
        self.status = final
        if code == following.TIMED_OUT:
            raise TimeoutError(f"job {self.run_dir.name} still runs after {timeout} s")
        if final.state != "succeeded":
            raise RunError(f"job {self.run_dir.name} {final.state}: {final.error}")
        return self

    def __repr__(self) -> str:
        return f"<podpipe.Job {self.run_dir.name} {self.state}>"


class Line:
    """A standing line (`podpipe up`): warm processes that take one job after
    another. A context manager: `with podpipe.up(spec) as line:` downs it after."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def submit(self, *, source: str | None = None, sinks: dict[str, str] | None = None,
               overrides: Sequence[str] = ()) -> Job:
        """Queue a job: `source` its source URI, `sinks` each sink's URI by name (or
        index), `overrides` any other data field as `--set` takes it."""
        from podpipe.runtime.plumbing import protocol
        from podpipe.runtime.runs import lines

        items = [*([f"source.uri={source}"] if source else []),
                 *[f"sinks.{name}.uri={uri}" for name, uri in (sinks or {}).items()],
                 *overrides]
        answer = next(lines.submit(str(self.path), items))
        assert isinstance(answer, protocol.Submitted)
        return Job(answer.run_dir)

    def swap(self, stage: str, *, run: str | None = None, command: list[str] | None = None,
             version: str | None = None) -> None:
        """Swap `stage` in the running job, from its next batch, and every later job."""
        from podpipe.runtime.runs import control

        overrides = control.swap_overrides(stage, run=run, command=command, image=None,
                                           version=version)
        control.swap(str(self.path), stage, overrides, now=False, timeout=60)

    def status(self) -> Any:
        """The line's record now: its processes, queue, running and recent jobs."""
        from podpipe.runtime.runs import lines

        return lines.read(self.path)

    def down(self, timeout: float = 60.0) -> list[str]:
        """End the line; the queued jobs that did not run (they stay queued)."""
        from podpipe.errors import RunError
        from podpipe.runtime.plumbing import protocol
        from podpipe.runtime.runs import lines

        record = lines.read(self.path)
        if not record.up:
            return []
        answer = lines.ask(str(self.path), protocol.DownRequest())
        assert isinstance(answer, protocol.Downed)
        if not lines.gone(record, timeout):
            raise RunError(f"line {record.name}: still up after {timeout:g} s")
        return answer.dropped

    def __enter__(self) -> "Line":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"<podpipe.Line {self.path}>"


def up(spec: Spec, *, name: str | None = None, overrides: Sequence[str] = ()) -> Line:
    """Start a standing line (as `podpipe up`); returns once its processes are warm."""
    from podpipe.runtime.runs import line, lines, upkeep

    with _spec_file(spec) as path:
        home = lines.place(validate(path, overrides=overrides), name)
        upkeep.detach(line.Start(home, path, list(overrides), home.name))
    return Line(home)


def status(run_dir: str | os.PathLike[str] = "latest") -> Run:
    """The run in `run_dir` (or the latest) as its status says it is now."""
    return Run(run_dir)


def _read_status(run_dir: Path) -> Status:
    from podpipe.runtime.rundir import status as statuses

    return statuses.read(run_dir)


def _spec_file(spec: Spec) -> contextlib.AbstractContextManager[str]:
    """A path to the spec (a private temporary one unless it is a file already),
    stages defined in a notebook or script shipped beside it (`shipping`)."""
    return shipping.spec_file(spec, validate(spec))  # a SpecError before anything


def _needing(package: str, method: str, convert: Any) -> Any:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise UsageError(f"Run.{method} needs {package}: pip install {package}")
    return convert()


@contextlib.contextmanager
def _shown(progress: bool) -> Iterator[Any]:
    """The live progress as the run's observer (rich's; in Jupyter without
    ipywidgets, an HTML table updated in place), or none."""
    if not progress:
        yield None
        return
    from podpipe import notebook

    if notebook.in_notebook() and not notebook.has_widgets():
        with notebook.NotebookProgress() as shown:
            yield shown
        return
    from rich.console import Console

    from podpipe import console as terminal

    with terminal.LiveProgress(Console()) as live:
        yield live
