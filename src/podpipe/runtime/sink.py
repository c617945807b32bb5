"""Sinks: Parquet files under a deterministic name, one per batch (one for a reduce).

A batch's file is `part-<batch>.parquet`; it is written under a temporary name and
renamed, so a repeated batch replaces its file and never duplicates output, and a
reader never trusts a half-written one. Its key-value metadata `podpipe.versions`
records which versions of which stages made it (JSON: stage -> versions).
"""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from podpipe.errors import RunError
from podpipe.model.pipeline import Sink
from podpipe.runtime import files


VERSIONS = b"podpipe.versions"


def file_name(batch: int) -> str:
    return f"part-{batch:06d}.parquet"


class Writer:
    def __init__(self, sink: Sink) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(sink.uri)
        self.fs.makedirs(self.root, exist_ok=True)

    def write(self, table: pa.Table, batch: int,
              versions: dict[str, list[str]] | None = None) -> str:
        if versions:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   VERSIONS: json.dumps(versions)})
        final = f"{self.root.rstrip('/')}/{file_name(batch)}"
        tmp = f"{self.root.rstrip('/')}/{files.temporary_name(file_name(batch))}"
        try:
            with self.fs.open(tmp, "wb") as f:
                pq.write_table(table, f)
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise
        return final


def written(sink: Sink) -> set[int]:
    """The batches whose files are in the sink now (none if it does not exist yet).
    A sink that cannot be listed is an error: its files must not count as missing."""
    try:
        fs, root = fsspec.core.url_to_fs(sink.uri)
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as exc:
        raise RunError(f"sink {sink.name!r}: cannot list {sink.uri}: {exc}") from exc
    return {int(n[5:11]) for n in names
            if n.startswith("part-") and n.endswith(".parquet") and n[5:11].isdigit()}
