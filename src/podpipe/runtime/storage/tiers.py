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

from podpipe.model.output import Output
from podpipe.model.pipeline import NAME
from podpipe.runtime.plumbing import files

CHUNK = 4 << 20
DIR = "node"


def path_for(run_dir: Path, node: str, batch: int) -> Path:
    """Where the node tier keeps `node`'s output for `batch`. ValueError for a name
    that is not a node's (it comes from a manifest or a journal: input too), so that
    no path built here leaves the run directory."""
    if not NAME.match(node) or batch < 0:
        raise ValueError(f"{node!r} batch {batch} names no output of a pipeline")
    return run_dir / DIR / node / f"{batch:06d}.arrow"


class NodeTier:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        # (a descriptor of the output, its copy to be), None to stop
        self.queue: queue.SimpleQueue[tuple[int, Output] | None] = queue.SimpleQueue()
        self.made: queue.SimpleQueue[Output] = queue.SimpleQueue()  # copies done, to journal
        self.errors: list[str] = []
        self.abandon = False  # copies still queued are dropped, not made
        self.thread = threading.Thread(target=self._work, name="node-tier", daemon=True)
        self.thread.start()

    def submit(self, output: Output, dest: str) -> None:
        """Copy `output` to `dest` on the node tier; its file is opened now, so that it
        being deleted from RAM scratch right after cannot race the copy."""
        try:
            fd = os.open(output.path, os.O_RDONLY)
        except OSError:
            return  # already gone: nothing to keep
        self.queue.put((fd, output.on("node", dest)))

    def finished(self) -> list[Output]:
        """The copies made since the last call."""
        made = []
        while not self.made.empty():
            made.append(self.made.get())
        return made

    def close(self, *, abandon: bool = False) -> None:
        """Finish the copies already handed over, then stop; with `abandon` (nothing
        will resume from them: the run succeeded), only the one being made."""
        if abandon:
            self.abandon = True
        self.queue.put(None)
        self.thread.join()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            fd, copy = item
            if self.abandon:
                os.close(fd)
                continue
            try:
                if _copy(fd, Path(copy.path)) == copy.checksum:
                    self.made.put(copy)
                else:
                    Path(copy.path).unlink(missing_ok=True)
                    self.errors.append(f"{copy.node} batch {copy.key}: checksum differs "
                                       "while copying; not kept")
            except OSError as exc:
                self.errors.append(f"{copy.node} batch {copy.key}: cannot copy to the "
                                   f"node tier: {exc.strerror or exc}")
            finally:
                os.close(fd)


def _copy(fd: int, dest: Path) -> str:
    """Copy an open file to `dest` atomically and durably; returns its xxh3."""
    files.private_dirs(dest.parent)
    digest = xxhash.xxh3_64()
    with files.publishing(dest, durable=True) as tmp, open(tmp, "wb") as out:
        offset = 0
        while chunk := os.pread(fd, CHUNK, offset):
            digest.update(chunk)
            out.write(chunk)
            offset += len(chunk)
    return digest.hexdigest()


def verified(path: str | Path, checksum: str) -> bool:
    """Is the file at `path` there, whole, with this checksum?"""
    from podpipe.runtime.data import arrowfile

    try:
        return arrowfile.checksum(path) == checksum
    except (OSError, ValueError):
        return False
