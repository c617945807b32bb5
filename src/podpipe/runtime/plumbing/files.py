"""Publishing a file: the one way podpipe makes a file appear.

A file is written under a temporary name in its own directory (so the rename stays
on one filesystem), fsynced where durability matters, then renamed over its final
name: a reader sees the old file or the new one, never half of one. Never rewrite
a file in place. The temporary file is created exclusively, mode 0600, without
following links: what a run writes is its user's alone.
"""

from __future__ import annotations

import os
import pwd
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def temporary_name(name: str) -> str:
    """The temporary name a file `name` is written under: hidden, unique to this
    process (on an object store too, where the same scheme is used)."""
    return f".{name}.{os.getpid()}.tmp"


def temporary_of(name: str) -> tuple[str, int] | None:
    """The file a temporary `name` is written for, and the pid of the process writing
    it (`temporary_name` read backwards); None if `name` is no temporary name."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    final, _, pid = name[1:-len(".tmp")].rpartition(".")
    return (final, int(pid)) if final and pid.isdigit() else None


def temporary(path: Path) -> Path:
    return path.with_name(temporary_name(path.name))


@contextmanager
def publishing(path: Path, *, durable: bool = False,
               over: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes `path` (fsynced first,
    and its directory after, with `durable`); on failure it is removed. `over`: a
    file of ours to write over, moved to the temporary name (an empty one is made
    if it is gone); it is gone afterwards either way."""
    tmp = temporary(path)
    try:
        if over is not None:
            os.replace(over, tmp)
    except FileNotFoundError:
        over = None  # gone: written anew
    if over is None:
        _create_private(tmp)
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


def _create_private(tmp: Path) -> None:
    """Create the temporary file exclusively, readable by this user only, never
    through a link someone planted under its name (a stale one of ours goes)."""
    os.close(_create(tmp, 0o600))


def _create(tmp: Path, mode: int) -> int:
    """A descriptor writing the new file `tmp`, created exclusively, never through a
    link (one planted under its name is removed, not followed)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(tmp, flags, mode)
    except FileExistsError:
        tmp.unlink()
        return os.open(tmp, flags, mode)


@contextmanager
def writing(path: Path, *, mode: int = 0o600) -> Iterator[BinaryIO]:
    """A file to write `path` through: a temporary file created exclusively, without
    following links (`mode`, less the umask), renamed over `path` once written; on
    failure it is removed. (`publishing` yields a path, for writers that open it
    themselves; where others may write in the folder, this is the one to use.)"""
    tmp = temporary(path)
    fd = _create(tmp, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def private_dirs(path: Path) -> None:
    """`path` and any missing parents, each mode 0700 (`mkdir -p -m 0700`)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile


def append_private(path: Path) -> int:
    """A file descriptor appending to `path` (a log), created 0600, never through a link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)


class NotOurs(Exception):
    """A path podpipe would read back or act on is another user's, or others may
    write to it: it is not trusted."""


def _who(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_ours(path: Path) -> None:
    """Refuse (`NotOurs`) `path` unless this user owns it, and it (a link: its target
    too) is not writable by group or others: what another user arranged must not
    steer this user's run."""
    me = os.geteuid()
    for st in (os.lstat(path), os.stat(path)):
        if st.st_uid != me:
            raise NotOurs(f"{path} is owned by {_who(st.st_uid)}, not by you "
                          f"({_who(me)}): podpipe does not act on another user's runs")
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
            raise NotOurs(f"{path} is writable by others (mode {stat.filemode(st.st_mode)}): "
                          "podpipe does not trust what others may have changed")


def read_ours(path: Path, limit: int = 1 << 26) -> bytes:
    """The bytes of `path`, a file of this user's that others cannot write (`NotOurs`
    otherwise), opened without following a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotOurs(f"{path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            check_ours(path)  # (says why)
        return f.read(limit)
