"""The pipeline spec: YAML in the Kubernetes resource style, parsed into frozen data.

Parsing is strict. An unknown field is an error that names it, so that a typo is
never silently ignored; every error names the file, the field (as a path such as
`spec.stages[1].inputs[0]`), its line where the YAML has one, and what was
expected. Everything past this module sees typed objects only.

Reading it, top to bottom: `load`, `read` and `parse` (a file, its bytes, the YAML
with `--set` overrides applied), `_pipeline` (the document's fields, then the graph
checked), and one reader per part: `_source`, `_tables`, `_sinks`, `_determinism`
(`checks`), `_checkpoints`. A stage's fields are read by `model.stagespec`.
"""

from __future__ import annotations

import itertools
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import yaml

from podpipe.errors import SpecError, SpecWarning
from podpipe.model import locations
from podpipe.model import overrides as overrides_
from podpipe.model.graph import Graph
from podpipe.model import stagespec
from podpipe.model.pipeline import (SOURCE, Checkpoints, Pipeline, Call, Resources, Sink,
                                     Source, Stage, Table)
from podpipe.model.fields import MAX_BATCH_ROWS, Reader, kind
from podpipe.model.sizes import parse_size

API_VERSION = "podpipe.dev/v1alpha1"
OLD_API_VERSION = "podpipe/v1alpha1"  # before the DNS-style group: read, with a warning
KIND = "Pipeline"

# The spec's records are defined in `model.pipeline`; parsing them is this module's.
__all__ = ["API_VERSION", "KIND", "MAX_BATCH_ROWS", "SOURCE", "Call", "Checkpoints", "Pipeline", "Resources",
           "Sink", "Source", "Stage", "Table", "load", "parse", "read"]
DEFAULT_MEMORY = "1GiB"
DEFAULT_BATCH_ROWS = 500_000
SOURCE_FORMATS = ("parquet", "csv", "arrow")
# Bounds on what a spec may ask for: beyond them it is a mistake, not a workload.
MAX_SPEC_BYTES = 1 << 20
MAX_SHARDS = 100_000
MAX_JOBS = 16  # a line's jobs at once: each is a conductor, a journal, a status
DETERMINISM = ("warn", "fail", "off")  # `checks.determinism`


# libyaml's parser when PyYAML has it: ten times faster (a standing line's every job and
# every warm process reads its spec), with the same nodes and marks.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read, override (`--set KEY=VALUE`) and validate the spec at `path`."""
    return parse(read(path), file=str(path), overrides=overrides)


def read(path: str | Path) -> bytes:
    """The bytes of the spec file at `path`: a regular file (a FIFO, a device or a
    socket could block or never end), at most MAX_SPEC_BYTES (+1, to tell)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block the open
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise SpecError("is not a regular file (a FIFO, device or socket is "
                                "refused: it could block or never end), expected a YAML "
                                "file", file=str(path))
            return f.read(MAX_SPEC_BYTES + 1)  # never more
    except FileNotFoundError:
        raise SpecError("no such file", file=str(path)) from None
    except IsADirectoryError:
        raise SpecError("is a directory, expected a YAML file", file=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", file=str(path)) from exc


def parse(raw: bytes | str, *, file: str = "spec",
          overrides: list[str] | tuple[str, ...] = (), lines: bool = True) -> Pipeline:
    """Validate spec text; see `load`. `lines`: errors name the line (not for a spec
    given as a dict, whose text the user never saw: its key paths do)."""
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"is larger than {MAX_SPEC_BYTES // 2**20} MiB; a spec is a short "
                        "YAML document", file=file)
    if isinstance(raw, bytes):
        if b"\0" in raw:
            raise SpecError("is a binary file, expected YAML text", file=file)
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"is not UTF-8 text (byte {exc.start})", file=file) from None
    if not raw.strip():
        raise SpecError("is empty, expected a Pipeline spec", file=file)
    try:
        loader = _Loader(raw)
        try:
            root = loader.get_single_node()
            document = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"invalid YAML: {problem}", file=file,
                        line=mark.line + 1 if mark else None) from None
    reader = Reader(file, root if lines else None)
    for item in overrides:
        document = overrides_.apply(document, item, reader.file)
    return _pipeline(reader, document)


def _pipeline(r: Reader, doc: Any) -> Pipeline:
    doc = r.mapping("", doc, {"apiVersion", "kind", "metadata", "spec"},
                    {"apiVersion", "kind", "metadata", "spec"})
    if doc["apiVersion"] == OLD_API_VERSION:
        warnings.warn(SpecWarning(f"{r.file}: apiVersion {OLD_API_VERSION!r} is now "
                                  f"{API_VERSION!r}; the old one is read for now"))
    elif doc["apiVersion"] != API_VERSION:
        raise r.fail("apiVersion", f"expected {API_VERSION!r}, got {doc['apiVersion']!r}")
    if doc["kind"] != KIND:
        raise r.fail("kind", f"expected {KIND!r}, got {doc['kind']!r}")
    meta = r.mapping("metadata", doc["metadata"], {"name", "labels", "annotations"}, {"name"})
    spec = r.mapping("spec", doc["spec"],
                     {"source", "stages", "sinks", "memory", "checkpoints", "shards", "cpus",
                      "gpus", "tables", "checks", "jobs"},
                     {"source", "stages", "sinks"})
    tables = _tables(r, spec.get("tables", []))
    stages = stagespec.stages(r, spec["stages"], {t.name for t in tables})
    memory = spec.get("memory", DEFAULT_MEMORY)
    try:
        memory_bytes = parse_size(memory)
    except ValueError as exc:
        raise r.fail("spec.memory", str(exc)) from None
    source = _source(r, spec["source"])
    sinks = _sinks(r, spec["sinks"], stages, tables)
    for i, target in enumerate(sinks):
        for what, uri in [("the source", source.uri)] + [
                (f"table {t.name!r}", t.uri) for t in tables]:
            if locations.reads_back(uri, target.uri):
                raise r.fail(f"spec.sinks[{i}].uri", f"{target.uri!r} is inside {what} "
                             f"{uri!r}: the next run would read its output as input")
    pipeline = Pipeline(
        name=r.name("metadata.name", meta["name"]),
        source=source,
        stages=stages,
        sinks=sinks,
        memory=memory_bytes,
        checkpoints=_checkpoints(r, spec.get("checkpoints", {})),
        shards=r.integer("spec.shards", spec.get("shards", 1), minimum=1,
                         maximum=MAX_SHARDS),
        cpus=_cpus(r, spec.get("cpus")),
        gpus=r.integer("spec.gpus", spec["gpus"], minimum=0, maximum=stagespec.MAX_GPUS)
        if "gpus" in spec else None,
        tables=tables,
        jobs=r.integer("spec.jobs", spec.get("jobs", 1), minimum=1, maximum=MAX_JOBS),
        determinism=_determinism(r, spec.get("checks", {})),
        file=r.file,
        document=doc,
    )
    Graph.of(pipeline, fail=r.fail)
    return pipeline


def _source(r: Reader, value: Any) -> Source:
    src = r.mapping("spec.source", value, {"uri", "format", "batchRows", "columns", "workers"},
                    {"uri"})
    uri = r.string("spec.source.uri", src["uri"])
    fmt = src.get("format") or _guess_format(uri)
    if fmt not in SOURCE_FORMATS:
        raise r.fail("spec.source.format", f"expected one of {list(SOURCE_FORMATS)}, got "
                     f"{fmt!r}" + ("" if "format" in src else " (from the uri's extension)"))
    columns = src.get("columns")
    return Source(
        uri=uri, format=fmt,
        batch_rows=r.integer("spec.source.batchRows", src.get("batchRows", DEFAULT_BATCH_ROWS),
                             maximum=MAX_BATCH_ROWS),
        columns=r.strings("spec.source.columns", columns) if columns is not None else None,
        workers=r.workers("spec.source.workers", src.get("workers", "auto")),
    )


def _tables(r: Reader, value: Any) -> tuple[Table, ...]:
    if not isinstance(value, list):
        raise r.fail("spec.tables", f"expected a list of tables, got {kind(value)}")
    tables: list[Table] = []
    for i, item in enumerate(value):
        path = f"spec.tables[{i}]"
        tb = r.mapping(path, item, {"name", "uri", "format", "columns"}, {"name", "uri"})
        name = r.name(f"{path}.name", tb["name"])
        if name == SOURCE:
            raise r.fail(f"{path}.name", f"{SOURCE!r} is reserved for the pipeline's source")
        if any(t.name == name for t in tables):
            raise r.fail(f"{path}.name", f"duplicate table name {name!r}")
        uri = r.string(f"{path}.uri", tb["uri"])
        fmt = tb.get("format") or _guess_format(uri)
        if fmt not in SOURCE_FORMATS:
            raise r.fail(f"{path}.format", f"expected one of {list(SOURCE_FORMATS)}, got "
                         f"{fmt!r}" + ("" if "format" in tb else " (from the uri's extension)"))
        columns = tb.get("columns")
        tables.append(Table(name=name, uri=uri, format=fmt, columns=r.strings(
            f"{path}.columns", columns) if columns is not None else None))
    return tuple(tables)


def _guess_format(uri: str) -> str | None:
    suffix = uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else ""
    return {"parquet": "parquet", "pq": "parquet", "csv": "csv", "arrow": "arrow",
            "feather": "arrow", "ipc": "arrow"}.get(suffix, "parquet" if not suffix else suffix)


SINK_MODES = ("error", "overwrite")  # what a sink already holding other files does


def _cpus(r: Reader, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise r.fail("spec.cpus", f"expected the cores 'workers: auto' may use, a number "
                                  f"above 0 such as 4 or 1.5, got {value!r}")
    return float(value)


def _sinks(r: Reader, value: Any, stages: tuple[Stage, ...],
           tables: tuple[Table, ...]) -> tuple[Sink, ...]:
    if not isinstance(value, list) or not value:
        raise r.fail("spec.sinks", f"expected a non-empty list of sinks, got {kind(value)}")
    names = {s.name for s in stages} | {t.name for t in tables}
    sinks = []
    for i, item in enumerate(value):
        path = f"spec.sinks[{i}]"
        sk = r.mapping(path, item, {"name", "input", "uri", "mode", "workers"},
                       {"input", "uri"})
        name = r.name(f"{path}.name", sk.get("name", f"sink-{i}"))
        if name in names or name == SOURCE:
            raise r.fail(f"{path}.name", f"duplicate name {name!r}: sinks, stages and "
                                         "tables share one namespace")
        names.add(name)
        mode = sk.get("mode", "error")
        if mode not in SINK_MODES:
            raise r.fail(f"{path}.mode", f"expected one of {list(SINK_MODES)}, got {mode!r}")
        sinks.append(Sink(name=name, input=r.string(f"{path}.input", sk["input"]),
                          uri=r.string(f"{path}.uri", sk["uri"]), mode=mode,
                          workers=r.workers(f"{path}.workers", sk.get("workers", "auto"))))
    for (i, one), (j, other) in itertools.combinations(enumerate(sinks), 2):
        if locations.overlap(one.uri, other.uri):
            raise r.fail(f"spec.sinks[{j}].uri", f"{other.uri!r} overlaps sink "
                         f"{one.name!r} ({one.uri!r}, spec.sinks[{i}]): one sink's files "
                         "would replace or mix with the other's; give each its own folder")
    return tuple(sinks)


def _determinism(r: Reader, value: Any) -> str:
    checks = r.mapping("spec.checks", value, {"determinism"}, set())
    mode = checks.get("determinism", "warn")
    mode = "off" if mode is False else mode  # (YAML reads a bare `off` as false)
    if mode not in DETERMINISM:
        raise r.fail("spec.checks.determinism", f"expected one of {list(DETERMINISM)}, "
                     f"got {mode!r}")
    return str(mode)


def _checkpoints(r: Reader, value: Any) -> Checkpoints:
    ck = r.mapping("spec.checkpoints", value, {"node", "durable", "everyBatches", "interval",
                                               "keep", "reuse", "required"}, set())
    interval = r.seconds("spec.checkpoints.interval", ck.get("interval", 30.0))
    reuse = r.boolean("spec.checkpoints.reuse", ck.get("reuse", False))
    required = r.boolean("spec.checkpoints.required", ck.get("required", False))
    if required and "durable" not in ck:
        raise r.fail("spec.checkpoints.required", "needs spec.checkpoints.durable: the "
                                                  "checkpoints required go there")
    if reuse and "durable" not in ck:
        raise r.fail("spec.checkpoints.reuse", "needs spec.checkpoints.durable: the outputs "
                                               "to reuse are kept there")
    return Checkpoints(
        node=r.string("spec.checkpoints.node", ck.get("node", ".podpipe")),
        durable=r.string("spec.checkpoints.durable", ck["durable"]) if "durable" in ck else None,
        every_batches=(r.integer("spec.checkpoints.everyBatches", ck["everyBatches"])
                       if "everyBatches" in ck else None),
        interval=interval,
        keep=r.integer("spec.checkpoints.keep", ck.get("keep", 3), maximum=1000),
        reuse=reuse, required=required,
    )
