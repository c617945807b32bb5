"""Batch outputs as uncompressed Arrow IPC files: written once, memory-mapped by readers.

The writer learns the exact size before writing (so the conductor can grant that
much RAM first), hashes while writing (xxh3, no second pass) and renames a
temporary name into place, so a reader never sees a half-written file. Readers
map the file: the table's buffers point into the page cache of the tmpfs, no bytes
are copied however large the batch, and an agent keeps its mappings of the files
the pool recycles for the tasks after (`Mappings`).
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pyarrow as pa
import xxhash

from podpipe.runtime.plumbing import files


def ipc_size(table: pa.Table) -> int:
    """Bytes the IPC file of `table` will take, without writing it."""
    mock = pa.MockOutputStream()
    with pa.ipc.new_file(mock, table.schema) as writer:
        writer.write_table(table)
    size: int = mock.size()
    return size


class _HashingFile:
    """A raw file that hashes what passes through it (if `hashed`); pyarrow hands it
    its buffers.
    Small pieces (an IPC message's metadata, padding) are gathered and written with
    the next large one, so that a batch costs a few system calls, not one per piece."""

    SMALL = 64 << 10

    def __init__(self, fd: int, hashed: bool) -> None:
        self.fd, self.hash, self.closed = fd, xxhash.xxh3_64() if hashed else None, False
        self.pending = bytearray()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.hash is not None:
            self.hash.update(view)
        if len(view) < self.SMALL:
            self.pending += view
            if len(self.pending) >= self.SMALL:
                self.flush()
        else:
            self.flush()
            self._write(view)
        return len(view)

    def _write(self, view: memoryview) -> None:
        written = 0
        while written < len(view):
            written += os.write(self.fd, view[written:])

    def flush(self) -> None:
        if self.pending:
            self._write(memoryview(self.pending))
            self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.closed = True


def write_table(table: pa.Table, path: str | Path, reuse: str | Path | None = None,
                hashed: bool = True) -> tuple[int, str]:
    """Write `table` to `path` atomically; returns (bytes, xxh3 checksum, or "" unless
    `hashed`). `reuse`: a file of ours to write over instead of a new one (tmpfs pages
    already allocated are about twice as fast to write as fresh ones); it is gone
    afterwards either way."""
    with files.publishing(Path(path), over=reuse) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            raw = _HashingFile(fd, hashed)
            with pa.ipc.new_file(pa.PythonFile(raw, mode="w"), table.schema) as writer:
                writer.write_table(table)
            raw.flush()
            nbytes = os.lseek(fd, 0, os.SEEK_CUR)
            os.ftruncate(fd, nbytes)  # a longer warm file gives back what it had over
        finally:
            os.close(fd)
    return nbytes, "" if raw.hash is None else raw.hash.hexdigest()


def _mapped(path: str | Path) -> pa.Buffer:
    """The whole file as one buffer backed by a read-only mapping: nothing is copied.

    Python's mmap, not pyarrow's MemoryMappedFile: the latter advises the kernel
    to prefetch (madvise WILLNEED) every range it hands out, a cost that grows with
    the batch (1-2 ms per GiB on tmpfs). The buffer keeps the mapping alive.
    """
    with open(path, "rb") as f:
        return pa.py_buffer(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))


def checksum(path: str | Path) -> str:
    """xxh3 of a file someone else wrote (a command stage's output), over its mapping."""
    return xxhash.xxh3_64(memoryview(_mapped(path))).hexdigest()


def read_table(path: str | Path) -> pa.Table:
    """The table in an IPC file, memory-mapped: zero-copy, O(1) in the batch size."""
    return pa.ipc.open_file(pa.BufferReader(_mapped(path))).read_all()


class Mappings:
    """Read-only mappings of the files this process read, kept from task to task by
    inode. Outputs are mostly written over warm files (the pool's), so the same files
    come back as inputs: one already mapped is not faulted in and torn down again
    (page by page, a third of a stage's kernel time at 100,000-row batches). Only
    files the pool recycles are kept mapped: one deleted while nobody reads it is
    emptied first (`scratch.discard`), so a mapping kept here holds none of its
    pages. Those deleted but not emptied are not kept: inputs the node tier keeps
    too (mapped for their task only), and inputs the stage's own code holds on to
    (`forget`: unmapped when it lets go, as before)."""

    MOST = 64  # files kept mapped, the least recently read let go first

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[int, int], mmap.mmap] = OrderedDict()

    def view(self, path: str | Path, keep: bool = True) -> tuple[tuple[int, int], memoryview]:
        """The whole file at `path`, mapped (and the mapping kept, with `keep`), and
        the file's key (device, inode)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            found = os.fstat(fd)
            key = (found.st_dev, found.st_ino)
            mapping = self._kept.get(key)
            if mapping is not None and len(mapping) >= found.st_size:
                self._kept.move_to_end(key)
                return key, memoryview(mapping)[:found.st_size]
            if mapping is not None:  # the file grew: mapped again whole
                self._let_go(key)
            mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if keep:
            self._kept[key] = mapping
            while len(self._kept) > self.MOST:
                self._let_go(next(iter(self._kept)))
        return key, memoryview(mapping)[:found.st_size]

    def forget(self, key: tuple[int, int]) -> None:
        """Keep the file `key` mapped no longer (whoever uses the mapping keeps it)."""
        self._kept.pop(key, None)

    def __len__(self) -> int:
        return len(self._kept)

    def _let_go(self, key: tuple[int, int]) -> None:
        try:
            self._kept.pop(key).close()
        except BufferError:
            pass  # a table the stage's code keeps still uses it: unmapped with the last


class Watched:
    """`read_table` for a task's inputs, over the agent's `Mappings`, keeping a weak
    reference to each task's view: after the task, those still alive are *pinned* —
    held by the stage's own code (a cache of an earlier batch) — and their files
    must not be written over."""

    def __init__(self, mappings: Mappings, keep: bool = True) -> None:
        self.mappings, self.keep = mappings, keep
        self.watches: list[tuple[str, tuple[int, int], weakref.ref[Any]]] = []

    def __call__(self, path: str) -> pa.Table:
        key, view = self.mappings.view(path, self.keep)
        self.watches.append((path, key, weakref.ref(view)))
        return pa.ipc.open_file(pa.BufferReader(pa.py_buffer(view))).read_all()

    def pinned(self) -> list[str]:
        """The inputs still mapped (call once the task let go of its own references):
        their mappings are the stage's now, not kept (their files are deleted whole)."""
        pinned = []
        for path, key, watch in self.watches:
            if watch() is not None:
                pinned.append(path)
                self.mappings.forget(key)
        self.watches = []
        return pinned


def read_any_ipc(path: str | Path) -> pa.Table:
    """An IPC file or stream (what a command stage may write), memory-mapped."""
    return read_ipc_buffer(_mapped(path))


def read_ipc_buffer(buffer: pa.Buffer) -> pa.Table:
    """The table in an IPC file or stream held in `buffer` (a mapping: zero-copy)."""
    if buffer[:6].to_pybytes() == b"ARROW1":
        return pa.ipc.open_file(pa.BufferReader(buffer)).read_all()
    return pa.ipc.open_stream(pa.BufferReader(buffer)).read_all()


def to_arrow(result: Any) -> pa.Table:
    """A stage's return value as a pyarrow Table, without copying where possible."""
    if isinstance(result, pa.Table):
        return result
    if isinstance(result, pa.RecordBatch):
        return pa.Table.from_batches([result])
    module = type(result).__module__.split(".")[0]
    if module == "polars" and hasattr(result, "to_arrow"):
        return result.to_arrow()
    if module == "pandas" and hasattr(result, "columns"):
        return pa.Table.from_pandas(result, preserve_index=False)
    raise TypeError(f"returned {type(result).__name__}; expected a pyarrow Table or "
                    "RecordBatch, a polars DataFrame or a pandas DataFrame")


def schema_difference(one: pa.Schema, other: pa.Schema) -> str:
    """The first difference between two schemas, in words."""
    for a, b in zip(one, other):
        if a.name != b.name:
            return f"column {a.name!r} where the other has {b.name!r}"
        if not a.type.equals(b.type):
            return f"column {a.name!r} is {a.type} in one and {b.type} in the other"
    if len(one) != len(other):
        longer, shorter = (one, other) if len(one) > len(other) else (other, one)
        return f"column {longer.names[len(shorter)]!r} is in one only"
    return "their metadata or nullability differ"
