"""What one node does with a task: load a source batch, load a table, call a
function, run a command, call a service, write a sink file (`work_for`), and the
version that names what it does (`version_of`). Lives in the node's process; the
agent (`runtime.agent`) hands it each task's inputs and writes what it returns."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from podpipe.errors import SpecError
from podpipe.model import spec as specs
from podpipe.model.pipeline import Command as CommandSpec
from podpipe.model.spec import SOURCE, Pipeline
from podpipe.runtime.data import arrowfile
from podpipe.runtime.plumbing import protocol
from podpipe.runtime.stage import commands, shipped
from podpipe.runtime.stage.codeversion import CodeVersion
from podpipe.runtime.storage.answers import Answers, answers_store


class Work:
    """What one node does with a task; `run` returns a table, a written file or None.
    `setup_seconds`: what setting it up took (a class stage's; 0 until it is set up)."""

    setup_seconds = 0.0

    def run(self, batch: int, inputs: list[list[pa.Table]],
            task: protocol.Task) -> pa.Table | Path | None:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what it holds (a standing line's next job makes its own)."""


class LoadSource(Work):
    def __init__(self, pipeline: Pipeline) -> None:
        from podpipe.runtime.data import source  # spawned stage processes skip Parquet, fsspec

        self.source = source
        self.loader = source.Loader(pipeline.source)

    def run(self, batch: int, inputs: list[list[pa.Table]],
            task: protocol.Task) -> pa.Table | Path | None:
        assert task.source is not None
        return self.loader.load(task.source)


class LoadTable(Work):
    def __init__(self, pipeline: Pipeline, node: str) -> None:
        from podpipe.runtime.data import tables  # spawned stage processes skip Parquet, fsspec

        self.tables, self.table = tables, pipeline.table(node)

    def run(self, batch: int, inputs: list[list[pa.Table]],
            task: protocol.Task) -> pa.Table | Path | None:
        return self.tables.load(self.table)


class CallService(Work):
    """A `call:` stage: the batch sent to a service, the answers its output."""

    def __init__(self, pipeline: Pipeline, node: str) -> None:
        from podpipe.runtime.stage import call

        stage = pipeline.stage(node)
        assert stage.call is not None
        where = f"spec.stages[{pipeline.stages.index(stage)}].call"
        try:
            self.client = call.Client(stage.call, pipeline.workers(node) or 1,
                                      dict(os.environ), where)
        except KeyError as exc:  # a $(VAR) the stage's environment does not have
            raise SpecError(exc.args[0].partition(": ")[2], file=pipeline.file,
                            field=exc.args[0].partition(": ")[0]) from None
        self.durable = answers_store(pipeline, node)
        self.kept: Any = None

    def run(self, batch: int, inputs: list[list[pa.Table]],
            task: protocol.Task) -> pa.Table | Path | None:
        if task.answers and (self.kept is None or str(self.kept.folder) != task.answers):
            self.kept = Answers(Path(task.answers), self.durable)
        return self.client.send(_concat(inputs[0]), self.kept if task.answers else None)

    def close(self) -> None:
        self.client.close()

    def stats(self) -> protocol.CallStats:
        """What the last task's requests did (failed or not)."""
        figures = self.client.last
        return protocol.CallStats(
            requests=figures.requests, memo_hits=figures.memo_hits, retries=figures.retries,
            failures=figures.failures, in_flight_max=figures.in_flight_max,
            latencies=[round(x, 5) for x in figures.latencies])


class SetupFailed(Exception):
    """A class stage's setup (its `__init__`) raised: the process dies, a death like
    any other (restarted, then the run fails), the user's traceback in its log."""


def load_callable(target: str, file: str, field: str, params: dict[str, Any] | None,
                  node: str) -> tuple[Callable[..., Any], Any, str | None]:
    """`module:name` imported (or `__main__:name` loaded as shipped for stage `node`),
    checked callable and able to take `params` (a SpecError naming `field`
    otherwise); its module, and a shipped callable's version."""
    module, _, name = target.partition(":")
    imported, version = None, None
    try:
        if module == shipped.MAIN:
            function, version = shipped.load(file, node, target, field)
        else:
            imported = importlib.import_module(module)
            function = getattr(imported, name)
    except SpecError:
        raise
    except Exception as exc:  # any import-time failure of user code
        raise SpecError(f"cannot import {target!r}: {type(exc).__name__}: {exc}",
                        file=file, field=field) from exc
    if not callable(function):
        raise SpecError(f"{target!r} is not callable", file=file, field=field)
    try:
        inspect.signature(function).bind_partial(**(params or {}))
    except TypeError as exc:
        raise SpecError(f"{target!r} takes no such params: {exc}", file=file,
                        field=field.replace(".run", ".params")) from None
    except ValueError:
        pass  # (a builtin without a signature: its call says)
    return function, imported, version


class CallFunction(Work):
    """A `run:` stage: a function called per batch, or a class instantiated once per
    process (its setup, `params` its keyword arguments), called per batch and
    `close()`d when the process ends cleanly. A function takes `params` too."""

    def __init__(self, target: str, file: str, field: str,
                 params: dict[str, Any] | None = None, node: str = "",
                 setup_inputs: tuple[str, ...] = ()) -> None:
        self.function, imported, self.shipped = load_callable(target, file, field, params,
                                                              node)
        self.source = getattr(imported, "__file__", None)  # unparsable: its version
        module, _, name = target.partition(":")
        self.target = (module, name)
        self.instance: Any = None  # a class stage's, once set up
        self.params, self.setup_inputs = params or {}, len(setup_inputs)
        self.where = (target, file, field)
        if setup_inputs and not inspect.isclass(self.function):
            raise SpecError(f"{target!r} is not a class: setupInputs are handed to a "
                            "class's setup", file=file, field=field.replace(".run",
                                                                           ".setupInputs"))
        if inspect.isclass(self.function) and not setup_inputs:
            self._set_up([])
        elif self.params and not inspect.isclass(self.function):
            self.function = functools.partial(self.function, **self.params)

    def _set_up(self, tables: list[pa.Table]) -> None:
        """The class instantiated: its setupInputs' tables, then its params."""
        target, file, field = self.where
        started = time.perf_counter()
        try:
            self.instance = self.function(*tables, **self.params)
        except Exception as exc:
            raise SetupFailed(f"the setup of {target!r} raised "
                              f"{type(exc).__name__}: {exc}") from exc
        self.setup_seconds = time.perf_counter() - started
        if not callable(self.instance):
            raise SpecError(f"{target!r} is a class whose instances are not callable: "
                            "define __call__(self, *tables)", file=file, field=field)
        self.function = self.instance

    def run(self, batch: int, inputs: list[list[pa.Table]],
            task: protocol.Task) -> pa.Table | Path | None:
        if self.setup_inputs:  # its last inputs are the tables its setup takes
            inputs, tables = inputs[:-self.setup_inputs], inputs[-self.setup_inputs:]
            if self.instance is None:  # the first task: set up with them
                self._set_up([_concat(t) for t in tables])
        result = self.function(*[_concat(tables) for tables in inputs])
        if result is None:
            raise TypeError("returned None; expected a table")
        return arrowfile.to_arrow(result)

    def close(self) -> None:
        """A class stage's `close()`, if it has one (on a clean end only)."""
        close = getattr(self.instance, "close", None)
        if callable(close):
            close()


class Command(Work):
    """A `command:` stage: per batch, or served (`runtime.stage.commands`)."""

    def __init__(self, command: CommandSpec, node: str) -> None:
        self.command = (commands.ServeCommand if command.serve else
                        commands.RunCommand)(command.argv, node)

    def run(self, batch: int, inputs: list[list[pa.Table]],
            task: protocol.Task) -> pa.Table | Path | None:
        return self.command.run(batch, task)

    def close(self) -> None:
        self.command.close()


class WriteSink(Work):
    def __init__(self, target: specs.Sink) -> None:
        from podpipe.runtime.data import sink

        self.target, self.make = target, sink.Writer
        self.writer: sink.Writer | None = None  # for the run's staging token, from a task

    def run(self, batch: int, inputs: list[list[pa.Table]],
            task: protocol.Task) -> pa.Table | Path | None:
        if self.writer is None or self.writer.staging != task.staging:
            self.writer = self.make(self.target, task.staging)
        self.writer.write(_concat(inputs[0]), batch, task.versions or {})
        return None


class SchemaCheck:
    """A stage's output keeps one schema over the whole run, unless the spec says
    `schema: any`: the first output the conductor accepts fixes it (every worker's
    task carries it from then on, a resumed run's too); until then this process
    holds its own outputs to its first, and each output's schema goes with its Done
    for the conductor to fix or compare (`Checkpoints.schema_fixed`)."""

    def __init__(self, fixed: bool) -> None:
        self.fixed = fixed
        self.first: tuple[int, pa.Schema] | None = None
        self._run: tuple[bytes, pa.Schema] | None = None  # the run's, as last sent, read

    def check(self, batch: int, result: pa.Table | Path | None,
              task: protocol.Task) -> tuple[str | None, bytes | None]:
        """Why this output does not do, or None; and its schema to send, serialized,
        while the run's is not fixed."""
        if not self.fixed or result is None:
            return None, None
        schema = (result.schema if isinstance(result, pa.Table) else
                  arrowfile.read_table(result).schema).remove_metadata()
        if task.schema is not None:
            if self._run is None or self._run[0] != task.schema:  # read once, not per task
                self._run = (task.schema, pa.ipc.read_schema(pa.py_buffer(task.schema)))
            fixed = self._run[1]
            if schema.equals(fixed):
                return None, None
            return (f"its output schema differs from batch {task.schema_batch}'s, which "
                    f"fixed the stage's schema for the run: "
                    f"{arrowfile.schema_difference(fixed, schema)} (say 'schema: any' on "
                    "the stage if that is intended)"), None
        if self.first is None or self.first[0] == batch:
            self.first = (batch, schema)
        elif not schema.equals(self.first[1]):
            return (f"its output schema differs from batch {self.first[0]}'s: "
                    f"{arrowfile.schema_difference(self.first[1], schema)} (say 'schema: "
                    "any' on the stage if that is intended)"), None
        return None, schema.serialize().to_pybytes()


def _concat(tables: list[pa.Table]) -> pa.Table:
    """One table whose chunks are the batches: no copy."""
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def work_for(pipeline: Pipeline, node: str) -> Work:
    if node == SOURCE:
        return LoadSource(pipeline)
    if any(t.name == node for t in pipeline.tables):
        return LoadTable(pipeline, node)
    for target in pipeline.sinks:
        if target.name == node:
            return WriteSink(target)
    stage = pipeline.stage(node)
    if stage.call is not None:
        return CallService(pipeline, node)
    if stage.run:
        return CallFunction(stage.run, pipeline.file,
                            f"spec.stages[{pipeline.stages.index(stage)}].run", stage.params,
                            node, stage.setup_inputs)
    assert stage.command is not None
    return Command(stage.command, node)


def version_of(pipeline: Pipeline, node: str, work: Work) -> str:
    """The stage's `version:`, else a digest of what defines it: the code of the
    function or class and what it refers to (`src-…`, see `codeversion`), or the
    command, image and env (`cmd-…`); a table's is a digest of its files (`tbl-…`)."""
    if isinstance(work, LoadTable):
        version: str = work.tables.version(work.table)
        return version
    if node == SOURCE or node not in {s.name for s in pipeline.stages}:
        return "builtin"
    stage = pipeline.stage(node)
    if stage.version:
        return stage.version
    digest = hashlib.sha256()
    if stage.call is not None:  # what is sent, where, and how (`echo` only checks answers)
        sent = {k: v for k, v in dataclasses.asdict(stage.call).items() if k != "echo"}
        digest.update(json.dumps(sent, sort_keys=True).encode())
        return f"call-{digest.hexdigest()[:12]}"
    if isinstance(work, CallFunction):
        digest.update(stage.run.encode() if stage.run else b"")
        if stage.params:  # (none: the version as before params were)
            digest.update(json.dumps(stage.params, sort_keys=True, default=str).encode())
        code = work.shipped or CodeVersion().digest(*work.target)
        if code is not None:
            digest.update(code.encode())
        else:  # a module whose source cannot be parsed: all of it, if it can be read
            try:
                digest.update(Path(work.source).read_bytes() if work.source else b"")
            except OSError:
                pass  # no readable source (a builtin or a zip): the callable's name only
        return f"src-{digest.hexdigest()[:12]}"
    command = stage.command
    digest.update(json.dumps([command.argv if command else None, stage.image, stage.env] +
                             (["serve"] if command and command.serve else []),
                             sort_keys=True).encode())
    return f"cmd-{digest.hexdigest()[:12]}"
