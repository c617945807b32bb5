"""Sinks: Parquet files under a deterministic name, one per batch (one for a reduce).

A batch's file is `part-<batch>.parquet`; it is written under a temporary name and
renamed, so a repeated batch replaces its file and never duplicates output, and a
reader never trusts a half-written one. Its key-value metadata `podpipe.versions`
records which versions of which stages made it (JSON: stage -> versions).

A sink's `mode` says what happens to a folder that already holds output:
- `error` (the default): a part file this run would not write (another `batchRows`,
  another source) is refused before anything runs (`check`); files of the names this
  run writes are replaced as it goes.
- `overwrite`: the run writes into `_staging-<run>/` inside the sink (its own: the
  run's random `staging` token, kept in `run.json` for its resume), and only once it
  succeeded moves its files up, removes the part files it did not write and its
  staging folder (`commit`): a failed run leaves the previous output as it was, and
  two runs into one sink never touch each other's staged files.

Once every batch is in, `_SUCCESS.parquet` is written last (`mark`): a Parquet file
of no rows, with the parts' schema, whose key-value metadata `podpipe.manifest` is a
JSON manifest of the files, their rows and xxh3 checksums, and the versions behind
them (`manifest` reads it). So every usual reader reads the folder as it is: pandas,
pyarrow and Spark skip `_` files, DuckDB and polars read it as the empty file it is
(a JSON `_SUCCESS` made them fail). It is removed when a run starts writing into the
sink, so it is there only over a complete output.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from podpipe.engine.keys import Keys
from podpipe.errors import RunError, UsageError
from podpipe.model import locations
from podpipe.model.graph import Graph
from podpipe.model.pipeline import Pipeline, Sink
from podpipe.runtime.plumbing import files


VERSIONS = b"podpipe.versions"
MANIFEST = b"podpipe.manifest"
STAGING = "_staging-"  # and the run's token
MARKER = "_SUCCESS.parquet"


def file_name(batch: int) -> str:
    return f"part-{batch:06d}.parquet"


def _batch_of(name: str) -> int | None:
    if name.startswith("part-") and name.endswith(".parquet") and name[5:11].isdigit() \
            and len(name) == len("part-000000.parquet"):
        return int(name[5:11])
    return None


class _Folder:
    """A sink's folder on its filesystem: where its part files are and go.

    On a local filesystem, where another user may write in a shared folder, files are
    created exclusively without following links (`files.writing`), and the run's
    staging folder is used only if it is a directory of this user's (not a link
    someone planted). `staging`: the run's token (mode `overwrite`)."""

    def __init__(self, sink: Sink, staging: str = "") -> None:
        self.sink = sink
        self.fs, root = fsspec.core.url_to_fs(sink.uri)
        self.root = root.rstrip("/")
        self.staging = f"{self.root}/{STAGING}{staging}"
        self.local = isinstance(self.fs, LocalFileSystem)

    def check_staging(self) -> None:
        """The run's staging folder, there already, must be a directory of this user's
        that others cannot write to: one planted as a link would have the run write
        into, and delete part files from, wherever it points."""
        if not self.local or not os.path.lexists(self.staging):
            return
        try:
            if not stat.S_ISDIR(os.lstat(self.staging).st_mode):
                raise files.NotOurs(f"{self.staging} is not a directory (a link?)")
            files.check_ours(Path(self.staging))
        except files.NotOurs as exc:
            raise UsageError(f"sink {self.sink.name!r}: {exc}; not written through. "
                             "Remove it, or write elsewhere") from None

    def write(self, path: str, write: Callable[[BinaryIO], object]) -> None:
        """Publish the file `path`: written under a temporary name, renamed over it."""
        if self.local:
            with files.writing(Path(path), mode=0o666) as f:
                write(f)
            return
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/{files.temporary_name(name)}"
        try:
            with self.fs.open(tmp, "wb") as f:
                write(f)
            self.fs.mv(tmp, path)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def sweep(self) -> None:
        """Remove the temporary files of this user's processes that are gone (a sink
        process killed mid-write left them)."""
        if not self.local:
            return
        try:  # (a run's staging folder goes whole once the run is done)
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            of = files.temporary_of(name)
            if of is None or not (of[0] == MARKER or _batch_of(of[0]) is not None) \
                    or os.path.exists(f"/proc/{of[1]}"):
                continue  # not a sink's temporary file, or its writer still runs
            path = os.path.join(self.root, name)
            with contextlib.suppress(OSError):
                if os.lstat(path).st_uid == os.geteuid():
                    os.unlink(path)

    @property
    def writes_to(self) -> str:
        return self.staging if self.sink.mode == "overwrite" else self.root

    def parts(self, folder: str) -> dict[int, str]:
        """batch -> path of the part files in `folder` (none if it does not exist).
        A folder that cannot be listed is an error: its files must not count as missing."""
        try:
            paths = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RunError(f"sink {self.sink.name!r}: cannot list {folder}: {exc}") from exc
        found = {}
        for path in paths:
            batch = _batch_of(path.rstrip("/").rsplit("/", 1)[-1])
            if batch is not None:
                found[batch] = path
        return found

    def remove_marker(self) -> None:
        try:
            self.fs.rm(f"{self.root}/{MARKER}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self.fail(f"cannot remove {MARKER}", exc) from exc

    def fail(self, what: str, exc: Exception) -> RunError:
        return RunError(f"sink {self.sink.name!r} ({self.sink.uri}): {what}: {exc}")


class Writer:
    def __init__(self, sink: Sink, staging: str) -> None:
        self.staging = staging
        self.folder = _Folder(sink, staging)
        self.root = self.folder.writes_to
        if sink.mode == "overwrite" and self.folder.local:
            self.folder.check_staging()
            with contextlib.suppress(FileExistsError):
                os.makedirs(self.folder.root, exist_ok=True)
                os.mkdir(self.root, 0o700)  # the run's: a planted one was refused above
        else:
            self.folder.fs.makedirs(self.root, exist_ok=True)

    def write(self, table: pa.Table, batch: int,
              versions: dict[str, list[str]] | None = None) -> str:
        if versions:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   VERSIONS: json.dumps(versions)})
        final = f"{self.root}/{file_name(batch)}"
        self.folder.write(final, lambda f: pq.write_table(table, f))
        return final


def written(sink: Sink, staging: str) -> set[int]:
    """The batches whose files this run (its `staging` token) has written into the
    sink so far (a resume does not write them again)."""
    folder = _Folder(sink, staging)
    folder.check_staging()
    return set(folder.parts(folder.writes_to))


def part_files(sink: Sink) -> list[str]:
    """The sink's part files now, in batch order (URLs for a remote sink)."""
    folder = _Folder(sink)
    paths = [path for _, path in sorted(folder.parts(folder.root).items())]
    return [folder.fs.unstrip_protocol(p) for p in paths] if "://" in sink.uri else paths


def check(sink: Sink, batches: Iterable[int]) -> None:
    """Before a run writes into `sink` (its `batches`, over every replica): in mode
    `error`, a sink holding part files of other batches is refused, naming them, and
    the marker of an earlier run is removed (the folder is about to change). In mode
    `overwrite` the folder is left as it is until `commit`."""
    folder = _Folder(sink)
    folder.sweep()
    if sink.mode != "error":
        folder.check_staging()
        return
    stale = sorted(set(folder.parts(folder.root)) - set(batches))
    if stale:
        names = ", ".join(file_name(b) for b in stale[:4]) + \
            (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
        raise UsageError(f"sink {sink.name!r}: {sink.uri} holds part files this run would "
                         f"not write ({names}): they would mix with its output. Remove "
                         "them, write elsewhere, or set 'mode: overwrite' on the sink")
    folder.remove_marker()


def every_batch(pipeline: Pipeline, graph: Graph, source_batches: int) -> dict[str, frozenset[int]]:
    """Per sink, the part files the whole run writes (over all its replicas)."""
    keys = Keys(graph, source_batches, shards=pipeline.shards)
    return {target.name: keys.of(target.name) for target in pipeline.sinks}


def check_run(pipeline: Pipeline, graph: Graph, source_batches: int) -> None:
    """`check` every sink of a run before it writes anything; a sink that is inside
    the source or a table once links are followed is refused as the spec refuses one
    inside it as written."""
    every = every_batch(pipeline, graph, source_batches)
    for target in pipeline.sinks:
        for what, uri in [("the source", pipeline.source.uri)] + [
                (f"table {t.name!r}", t.uri) for t in pipeline.tables]:
            if locations.reads_back(locations.resolved(uri), locations.resolved(target.uri)):
                raise UsageError(f"sink {target.name!r}: {target.uri!r} is inside {what} "
                                 f"{uri!r} once links are followed: the next run would read "
                                 "its output as input")
        check(target, every[target.name])


def finish(pipeline: Pipeline, graph: Graph, source_batches: int,
           keys_here: Callable[[str], Iterable[int]], staging: str, *,
           whole: bool) -> dict[str, Written]:
    """A pod's run succeeded: `commit` each sink's output (the keys this pod ran,
    `keys_here(sink)`, staged under the run's `staging` token) and, when the pod ran
    every shard (`whole`), `mark` it."""
    every = every_batch(pipeline, graph, source_batches)
    written = {}
    for target in pipeline.sinks:
        commit(target, staging, keys_here(target.name), every[target.name])
        if whole:
            written[target.name] = mark(target, every[target.name])
    return written


def commit(sink: Sink, staging: str, mine: Iterable[int], every: Iterable[int]) -> None:
    """A pod's run succeeded: in mode `overwrite`, move its staged files (`mine`,
    under its `staging` token) up, remove the part files no replica of the run
    writes (`every` are theirs), then its staging folder."""
    if sink.mode != "overwrite":
        return
    folder = _Folder(sink, staging)
    folder.check_staging()
    staged = folder.parts(folder.staging)
    folder.remove_marker()
    try:
        for batch in sorted(set(mine)):
            if batch in staged:
                folder.fs.mv(staged.pop(batch), f"{folder.root}/{file_name(batch)}")
        every = set(every)
        for batch, path in folder.parts(folder.root).items():
            if batch not in every:  # an earlier run's
                folder.fs.rm(path)
        if folder.fs.exists(folder.staging):
            folder.fs.rm(folder.staging, recursive=True)  # the run's own, checked above
    except OSError as exc:
        raise folder.fail("cannot move the staged output in place", exc) from exc


@dataclass(frozen=True)
class Written:
    """What a sink holds at the end of a run: said to the user, kept in `_SUCCESS`."""

    uri: str
    files: int
    rows: int
    nbytes: int


def mark(sink: Sink, batches: Iterable[int]) -> Written:
    """The run's output in `sink` is complete: write `_SUCCESS.parquet` (last), no
    rows with the parts' schema, its metadata a manifest of the files (`batches`'),
    their rows, sizes, xxh3 checksums and versions."""
    folder = _Folder(sink)
    parts = folder.parts(folder.root)
    entries: list[dict[str, Any]] = []
    schema = pa.schema([])
    try:
        for batch in sorted(set(batches)):
            path = parts.get(batch)
            if path is None:
                raise FileNotFoundError(f"{file_name(batch)} is missing")
            digest, nbytes = xxhash.xxh3_64(), 0
            with folder.fs.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    nbytes += len(chunk)
            with folder.fs.open(path, "rb") as f:
                meta = pq.read_metadata(f)
            if not entries:
                schema = meta.schema.to_arrow_schema().remove_metadata()
            versions = (meta.metadata or {}).get(VERSIONS)
            entries.append({"file": file_name(batch), "rows": meta.num_rows, "bytes": nbytes,
                            "xxh3": digest.hexdigest(),
                            "versions": json.loads(versions) if versions else {}})
        manifest = json.dumps({"sink": sink.name, "uri": sink.uri, "files": entries,
                               "rows": sum(e["rows"] for e in entries)})
        # (not `schema.empty_table()`: it imports pandas, 0.2 s at the end of every run)
        empty = pa.Table.from_batches([], schema.with_metadata({MANIFEST: manifest}))
        folder.write(f"{folder.root}/{MARKER}", lambda f: pq.write_table(empty, f))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise folder.fail(f"cannot write {MARKER}", exc) from exc
    return Written(sink.uri, len(entries), sum(e["rows"] for e in entries),
                   sum(e["bytes"] for e in entries))


def manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete sink folder (its `_SUCCESS.parquet`); FileNotFoundError
    if it has none."""
    fs, root = fsspec.core.url_to_fs(str(folder))
    with fs.open(f"{root.rstrip('/')}/{MARKER}", "rb") as f:
        found: dict[str, Any] = json.loads(pq.read_schema(f).metadata[MANIFEST])
    return found
