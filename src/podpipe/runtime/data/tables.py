"""Tables: side inputs loaded into the pod's RAM once (`spec.tables`).

A table is read as the source is (Parquet, CSV, Arrow IPC; a path, a glob, a
folder or an fsspec URL; `columns`), whole, by its own agent (the table's process,
a container on Kubernetes), which writes it to scratch once; every task of the
stages that list it maps that one file. Its *identity* is what it was loaded from:
the URI and each file's path, size and modification time. Its digest is the
table's version (`tbl-…`): the journal records it as it does a stage's, the sink
files carry it, and a run resumed over a table that changed is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from podpipe.errors import DataError, UsageError
from podpipe.model.pipeline import Pipeline, Source, Table
from podpipe.model.sizes import format_size
from podpipe.model.spec import MAX_BATCH_ROWS
from podpipe.runtime.data import source


def field(pipeline: Pipeline, table: Table) -> str:
    """Where the spec defines `table`, for messages."""
    return f"spec.tables[{pipeline.tables.index(table)}]"


def _named(table: Table) -> str:
    """The table in messages about its files, as `--set tables.NAME...` names it."""
    return f"spec.tables[{table.name}]"


def identity(table: Table) -> dict[str, Any]:
    """What the table is loaded from: its URI, columns and files (path, bytes,
    modification time), as the file system reports them."""
    where = _named(table)
    fs, paths = source.files(table.uri, f"{where}.uri")
    found = source.file_stats(fs, paths, f"{where}.uri")
    return {"uri": table.uri, "format": table.format,
            "columns": list(table.columns) if table.columns else None, "files": found}


def version(table: Table) -> str:
    """The table's version: a digest of its identity."""
    text = json.dumps(identity(table), sort_keys=True)
    return f"tbl-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def load(table: Table) -> pa.Table:
    """The whole table, read as a source of one batch per file."""
    read = Source(uri=table.uri, format=table.format, batch_rows=MAX_BATCH_ROWS,
                  columns=table.columns)
    loader = source.Loader(read)
    parts = [loader.load(batch) for batch in source.plan(read, _named(table))]
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts)


def estimate(table: Table) -> int:
    """The bytes the table will take in scratch, from what can be read without
    loading it: Parquet's uncompressed column sizes, else the files' sizes."""
    fs, paths = source.files(table.uri, f"{_named(table)}.uri")
    total = 0
    for path in paths:
        if table.format != "parquet":
            total += int(fs.size(path) or 0)
            continue
        wanted = set(table.columns) if table.columns else None
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                for i in range(meta.num_row_groups):
                    group = meta.row_group(i)
                    total += sum(group.column(j).total_uncompressed_size
                                 for j in range(group.num_columns)
                                 if wanted is None or group.column(j).path_in_schema in wanted)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: cannot read as parquet: {exc}") from exc
    return total


def check(pipeline: Pipeline, node_tier: Path) -> dict[str, str]:
    """Before anything runs: every table's files are there, and the tables fit (those
    RAM cannot hold, in half the budget, go to the node tier: it must have room).
    Returns each table's version."""
    versions, sizes = {}, {}
    for table in pipeline.tables:
        versions[table.name] = version(table)
        sizes[table.name] = estimate(table)
    total = sum(sizes.values())
    if total <= pipeline.memory // 2:
        return versions
    probe = node_tier if node_tier.exists() else next(
        (p for p in node_tier.absolute().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if total > pipeline.memory // 2 + free:
        name = max(sizes, key=lambda n: sizes[n])
        raise UsageError(
            f"{field(pipeline, pipeline.table(name))} ({name!r}): the tables take about "
            f"{format_size(total)} ({name!r} {format_size(sizes[name])}), more than half "
            f"the RAM budget ({format_size(pipeline.memory // 2)}) and the "
            f"{format_size(free)} free on the node tier ({probe}) together; raise "
            "spec.memory, or read fewer columns (columns:)")
    return versions


def changed(pipeline: Pipeline, recorded: dict[tuple[str, int], str],
            now: dict[str, str]) -> None:
    """A run resumed over a table that changed since it loaded it would mix two
    versions of it: refused (UsageError), naming the table."""
    for table in pipeline.tables:
        was = recorded.get((table.name, 0))
        if was is not None and was != now[table.name]:
            raise UsageError(
                f"{field(pipeline, table)} ({table.name!r}): its files changed since the "
                f"run loaded it ({table.uri}: sizes or modification times differ); the "
                "outputs kept were made with the old one: start a new run")
