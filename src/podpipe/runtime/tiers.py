"""The node tier: copies of batch outputs on the node's disk, made off the critical path.

The conductor hands an output over as soon as it is done (`NodeTier.submit` opens
the file at once, so the engine deleting it from RAM scratch cannot race the copy);
a background thread copies it to `RUN_DIR/node/<node>/<batch>.arrow` under a
temporary name, hashing while it copies, fsyncs, renames, and only then reports
the copy (`finished`), for the conductor to record in the journal — its only writer. A copy whose hash differs from the output's checksum is
thrown away. A copy that fails (the disk is full) is a cache miss, not a failure:
it is reported, and the run goes on.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import xxhash

from podpipe.runtime.journal import Copy

CHUNK = 4 << 20
DIR = "node"


def path_for(run_dir: Path, node: str, batch: int) -> Path:
    return run_dir / DIR / node / f"{batch:06d}.arrow"


class NodeTier:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.made: queue.SimpleQueue = queue.SimpleQueue()  # copies done, to journal
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._work, name="node-tier", daemon=True)
        self.thread.start()

    def submit(self, node: str, batch: int, path: str, nbytes: int, rows: int,
               checksum: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # already gone: nothing to keep
        self.queue.put((fd, Copy(node, batch, "node", str(path_for(self.run_dir, node, batch)),
                                 nbytes, rows, checksum)))

    def finished(self) -> list[Copy]:
        """The copies made since the last call."""
        made = []
        while not self.made.empty():
            made.append(self.made.get())
        return made

    def close(self) -> None:
        """Finish the copies already handed over, then stop."""
        self.queue.put(None)
        self.thread.join()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            fd, copy = item
            try:
                if _copy(fd, Path(copy.path)) == copy.checksum:
                    self.made.put(copy)
                else:
                    Path(copy.path).unlink(missing_ok=True)
                    self.errors.append(f"{copy.node} batch {copy.batch}: checksum differs "
                                       "while copying; not kept")
            except OSError as exc:
                self.errors.append(f"{copy.node} batch {copy.batch}: cannot copy to the "
                                   f"node tier: {exc.strerror or exc}")
            finally:
                os.close(fd)


def _copy(fd: int, dest: Path) -> str:
    """Copy an open file to `dest` atomically and durably; returns its xxh3."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    digest = xxhash.xxh3_64()
    try:
        with open(tmp, "wb") as out:
            offset = 0
            while chunk := os.pread(fd, CHUNK, offset):
                digest.update(chunk)
                out.write(chunk)
                offset += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return digest.hexdigest()


def verified(path: str | Path, checksum: str) -> bool:
    """Is the file at `path` there, whole, with this checksum?"""
    from podpipe.runtime import arrowfile

    try:
        return arrowfile.checksum(path) == checksum
    except (OSError, ValueError):
        return False
