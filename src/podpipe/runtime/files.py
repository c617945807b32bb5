"""Publishing a file: the one way podpipe makes a file appear.

A file is written under a temporary name in its own directory (so the rename stays
on one filesystem), fsynced where durability matters, then renamed over its final
name: a reader sees the old file or the new one, never half of one. Never rewrite
a file in place.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temporary_name(name: str) -> str:
    """The temporary name a file `name` is written under: hidden, unique to this
    process (on an object store too, where the same scheme is used)."""
    return f".{name}.{os.getpid()}.tmp"


def temporary(path: Path) -> Path:
    return path.with_name(temporary_name(path.name))


@contextmanager
def publishing(path: Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `path` (fsynced first,
    and its directory after, with `durable`); on failure it is removed."""
    tmp = temporary(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        sync_dir(path.parent)


def publish(path: Path, data: bytes | str, *, durable: bool = False) -> None:
    """Write `data` as the file `path`, all at once."""
    with publishing(path, durable=durable) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)


def sync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
