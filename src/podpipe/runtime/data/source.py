"""The source: which batches a dataset splits into, and how to load one.

Numbering is deterministic: files in sorted order, batches in file order.
- Parquet: whole row groups are packed into batches of at most `batchRows` rows; a
  row group larger than `batchRows` is cut into equal slices, consecutive batches.
- Arrow IPC files: the same, over record batches.
- CSV: each file cut into equal slices of at most `batchRows` rows.
Planning reads only footers (a CSV file, which has none, is read once to count
its rows); loading reads the columns the spec asks for. A row group (a CSV file)
cut into slices is decoded once by the process that loads its first slice, which
keeps it for the next (a source with several workers may decode it once per
worker that gets a slice of it).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import fsspec
import msgspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from podpipe.errors import DataError
from podpipe.model.batch import SourceBatch
from podpipe.model.pipeline import Source
from podpipe.runtime.data import arrowfile

_GLOB = set("*?[")


def files(uri: str, field: str = "spec.source.uri",
          ) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The files `uri` names, sorted (`field`: where the spec says it, for errors)."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if _GLOB & set(path):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
        elif fs.exists(path):
            found = [path]
        else:
            found = []
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"{field} {uri!r}: {exc}") from exc
    found = sorted(p for p in found if not fs.isdir(p))
    if not found:
        raise DataError(f"{field} {uri!r} matches no files")
    return fs, found


def identity(source: Source, batches: list[SourceBatch]) -> dict[str, Any]:
    """What a run reads: the source's files (path, bytes, modification time, as the
    file system reports them) and the batches planned from them. A resume over a
    source whose identity changed would mix old and new data (`changes`)."""
    fs, _ = fsspec.core.url_to_fs(source.uri)
    found = file_stats(fs, sorted({b.file for b in batches}), "spec.source.uri")
    planned = hashlib.sha256(msgspec.json.encode(batches)).hexdigest()[:16]
    return {"uri": source.uri, "format": source.format, "files": found, "batches": planned}


def digest(identity: dict[str, Any]) -> str:
    """A short name for a source's `identity` (a durable checkpoint records the one it
    was made from)."""
    return hashlib.sha256(msgspec.json.encode(identity)).hexdigest()[:16]


def file_stats(fs: fsspec.AbstractFileSystem, paths: list[str],
               field: str) -> list[list[Any]]:
    """[path, bytes, modification time] of each file, as its file system reports them
    (an object store: its LastModified or ETag)."""
    found = []
    for path in paths:
        try:
            info = fs.info(path)
        except OSError as exc:
            raise DataError(f"{field}: {path}: {exc}") from exc
        found.append([path, int(info.get("size") or 0),
                      str(info.get("mtime") or info.get("LastModified") or info.get("ETag")
                          or "")])
    return found


def changes(was: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What changed between two identities of a source, in words; None if nothing."""
    if was == now:
        return None
    before = {f[0]: f[1:] for f in was.get("files", [])}
    after = {f[0]: f[1:] for f in now.get("files", [])}
    said = [f"{p} (bytes or modification time)" for p in sorted(before.keys() & after.keys())
            if before[p] != after[p]]
    said += [f"{p} (gone)" for p in sorted(before.keys() - after.keys())]
    said += [f"{p} (new)" for p in sorted(after.keys() - before.keys())]
    if not said:
        said = ["its batches plan differently (rows per file or row group)"]
    shown = ", ".join(said[:4]) + (f" and {len(said) - 4} more" if len(said) > 4 else "")
    return f"the source changed since the run started: {shown}"


def plan(source: Source, field: str = "spec.source") -> list[SourceBatch]:
    """Every batch of the source (or of a table read as one), in order."""
    fs, paths = files(source.uri, f"{field}.uri")
    batches: list[SourceBatch] = []
    first: tuple[str, pa.Schema] | None = None
    for path in paths:
        try:
            if source.format == "csv":  # no footer: read once, streaming (its types as
                sizes, schema = _csv_rows(fs, path)   # the first block infers them)
                part_bytes = [int(fs.size(path) or 0)]
            else:
                sizes, schema, part_bytes = _footer(fs, path, source.format, source.columns)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: cannot read as {source.format}: {exc}") from exc
        missing = [c for c in source.columns or () if c not in schema.names]
        if missing:  # pyarrow would silently leave them out
            raise DataError(f"{path}: {field}.columns names {missing}, which the file "
                            f"does not have; it has {schema.names}")
        read = pa.schema([schema.field(c) for c in source.columns]) if source.columns \
            else schema
        if first is None:
            first = (path, read)
        elif not read.equals(first[1]):  # one dataset, one schema: the sinks' too
            raise DataError(f"{path} and {first[0]} have different schemas: "
                            f"{arrowfile.schema_difference(first[1], read)}")
        batches.extend(_pack(path, sizes, source.batch_rows, part_bytes,
                             whole=source.format == "csv"))
    if not batches:
        raise DataError(f"{field}.uri {source.uri!r}: the files hold no rows")
    return batches


def _footer(fs: fsspec.AbstractFileSystem, path: str, fmt: str, columns: tuple[str, ...] | None,
            ) -> tuple[list[int], pa.Schema, list[int]]:
    """Rows per row group (or record batch), the schema, and the bytes a load
    reads per row group (compressed, of the columns read; for Arrow files, the
    file's size shared out by rows)."""
    with fs.open(path, "rb") as f:
        if fmt == "parquet":
            parquet = pq.ParquetFile(f)
            meta = parquet.metadata
            rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            wanted = set(columns) if columns else None
            part_bytes = []
            for i in range(meta.num_row_groups):
                group = meta.row_group(i)
                part_bytes.append(sum(
                    group.column(j).total_compressed_size for j in range(group.num_columns)
                    if wanted is None or group.column(j).path_in_schema in wanted))
            return rows, parquet.schema_arrow, part_bytes
        reader = pa.ipc.open_file(f)
        rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
    size = int(fs.size(path) or 0)
    return rows, reader.schema, [size * r // max(1, sum(rows)) for r in rows]


def _csv_rows(fs: fsspec.AbstractFileSystem, path: str) -> tuple[list[int], pa.Schema]:
    """The rows of a CSV file (its one part) and its schema as read (the types the
    first block infers, as the loader's)."""
    with fs.open(path, "rb") as f:
        reader = pacsv.open_csv(f)
        return [sum(b.num_rows for b in reader)], reader.schema


def _pack(path: str, sizes: list[int], batch_rows: int,
          part_bytes: list[int], whole: bool = False) -> list[SourceBatch]:
    """Batches of whole parts (row groups, record batches) up to `batch_rows`; a part
    larger than that cut into slices. `whole`: the one part is the whole file (CSV)."""
    def nbytes(parts: list[int]) -> int:
        return sum(part_bytes[p] for p in parts)

    batches: list[SourceBatch] = []
    group: list[int] = []
    rows = 0
    for part, size in enumerate(sizes):
        if size == 0:
            continue
        if size > batch_rows:
            if group:
                batches.append(SourceBatch(path, tuple(group), nbytes=nbytes(group)))
                group, rows = [], 0
            slices = math.ceil(size / batch_rows)
            step = math.ceil(size / slices)
            # The part is read once, for its first slice: the others read nothing.
            parts = () if whole else (part,)
            batches.extend(SourceBatch(path, parts, off, min(step, size - off),
                                       part_bytes[part] if off == 0 else 0)
                           for off in range(0, size, step))
            continue
        if rows + size > batch_rows and group:
            batches.append(SourceBatch(path, tuple(group), nbytes=nbytes(group)))
            group, rows = [], 0
        group.append(part)
        rows += size
    if group:
        batches.append(SourceBatch(path, () if whole else tuple(group), nbytes=nbytes(group)))
    return batches


class Loader:
    """Loads one planned batch; lives in the source's agent process."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.fs, _ = fsspec.core.url_to_fs(source.uri)
        self.kept: tuple[tuple[str, tuple[int, ...]], pa.Table] | None = None  # a sliced part
        self.opened: tuple[str, Any, pq.ParquetFile] | None = None  # the file it reads now

    def load(self, batch: SourceBatch) -> pa.Table:
        if batch.length is None:
            return self._decode(batch)
        what = (batch.file, batch.parts)
        if self.kept is None or self.kept[0] != what:  # a slice of a part: decode it once
            self.kept = (what, self._decode(batch))
        table = self.kept[1]
        if batch.offset + batch.length >= table.num_rows:
            self.kept = None  # its last slice: let it go
        return table.slice(batch.offset, batch.length)

    def _parquet(self, path: str) -> pq.ParquetFile:
        """`path` opened, its footer parsed: kept while its batches come (consecutive,
        for one worker), closed for the next file."""
        if self.opened is None or self.opened[0] != path:
            if self.opened is not None:
                self.opened[1].close()
            f = self.fs.open(path, "rb")
            self.opened = (path, f, pq.ParquetFile(f))
        return self.opened[2]

    def _decode(self, batch: SourceBatch) -> pa.Table:
        columns = list(self.source.columns) if self.source.columns else None
        try:
            if self.source.format == "parquet":  # the footer parsed once per file
                return self._parquet(batch.file).read_row_groups(list(batch.parts),
                                                                 columns=columns)
            with self.fs.open(batch.file, "rb") as f:
                if self.source.format == "arrow":
                    reader = pa.ipc.open_file(f)
                    table = pa.Table.from_batches([reader.get_batch(i) for i in batch.parts],
                                                  schema=reader.schema)
                    table = table.select(columns) if columns else table
                else:
                    options = pacsv.ConvertOptions(include_columns=columns) if columns else None
                    table = pacsv.read_csv(f, convert_options=options)
        except (KeyError, pa.ArrowException, OSError) as exc:
            raise DataError(f"{batch.file}: {exc}") from exc
        return table
