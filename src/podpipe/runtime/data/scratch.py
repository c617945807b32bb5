"""The pod's RAM scratch: one private directory on a tmpfs per run, shared by its processes.

Layout: `owner.json` (who owns it: pid, start time, run id), `conductor.sock`,
`data/<node>/<batch>.arrow`. The directory is made exclusively with a random,
fixed-length name and mode 0700 (`tempfile.mkdtemp`), so nobody else can read its
data or reach its socket, and the socket's path stays short whatever the
pipeline's name. A finished or failed run removes its scratch; a crashed one is
swept by the next run of the same user once its owner process is gone (pid and
start time checked, so a reused pid does not keep garbage alive). Only directories
provably podpipe's and the user's own are swept: a real directory (not a link)
under the scratch root, owned by this user, with an owner file naming a dead
process.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podpipe.errors import UsageError
from podpipe.runtime.plumbing import files

PREFIX = "podpipe-"
OWNER = "owner.json"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes, the last a NUL


class UnsafeScratch(Exception):
    """A scratch directory this run cannot trust (someone else's, a link, too open)."""


def default_root() -> Path:
    """`PODPIPE_SCRATCH_ROOT`, else /dev/shm; UsageError for an empty or relative one,
    or one that is no directory."""
    value = os.environ.get("PODPIPE_SCRATCH_ROOT")
    if value is None:
        return Path("/dev/shm")
    if not value or not os.path.isabs(value) or not os.path.isdir(value):
        raise UsageError(f"PODPIPE_SCRATCH_ROOT={value!r}: expected an absolute path to a "
                         "directory on a tmpfs (unset it for /dev/shm)")
    return Path(value)


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]


def alive(pid: int, start: str | None) -> bool:
    now = process_start(pid)
    return now is not None and (start is None or now == start)


def private_dir(path: Path) -> bool:
    """Is `path` a real directory (not a link) of this user's that only they can use?"""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & 0o077)


def _owner(path: Path) -> dict[str, Any]:
    """The owner file of a scratch, read without following a link."""
    fd = os.open(path / OWNER, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        owner = json.loads(f.read(4096))
    if not isinstance(owner, dict):
        raise ValueError("not an owner record")
    return owner


JOBS = "jobs"  # a standing line's: each job's folder


@dataclass(frozen=True)
class Scratch:
    path: Path
    volume: bool = False  # the directory is a mounted volume: empty it, keep it
    home: Path | None = None  # a line's job's: the line's scratch (its socket)

    @classmethod
    def create(cls, run_id: str, root: Path | None = None) -> "Scratch":
        root = root or default_root()
        path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))  # 0700, exclusive
        if len(str(path / "conductor.sock")) > SOCKET_PATH_MAX:
            shutil.rmtree(path)
            raise UsageError(f"scratch root {root}: its path is too long for a Unix socket "
                             f"({SOCKET_PATH_MAX} bytes at most); choose a shorter "
                             "PODPIPE_SCRATCH_ROOT")
        return cls(path)._claim(run_id)

    @classmethod
    def at(cls, path: Path) -> "Scratch":
        """The scratch of a pod on Kubernetes: the whole memory-backed volume at `path`.

        What a previous conductor container of this pod left there is removed first:
        the volume outlives container restarts.
        """
        path.mkdir(parents=True, exist_ok=True)
        scratch = cls(path, volume=True)
        scratch.remove()
        try:
            path.chmod(0o700)  # the pod's containers run as one user
        except OSError:
            pass  # a volume we do not own: its mount decides
        return scratch._claim(None)

    @classmethod
    def adopt(cls, path: Path, run_id: str | None, volume: bool = False) -> "Scratch":
        """The scratch of a run whose conductor died, taken over with what it holds.
        UnsafeScratch if it is not provably this user's own scratch of that run."""
        if not volume:
            if not private_dir(path):
                raise UnsafeScratch(f"{path} is not a private directory of this user's")
            try:
                owner = _owner(path)
            except (OSError, ValueError) as exc:
                raise UnsafeScratch(f"{path}: no readable owner record ({exc})") from None
            if owner.get("run_id") != run_id:
                raise UnsafeScratch(f"{path} belongs to run {owner.get('run_id')!r}, "
                                    f"not {run_id!r}")
        return cls(path, volume)._claim(run_id)

    def _claim(self, run_id: str | None) -> "Scratch":
        path = self.path
        (path / "data").mkdir(mode=0o700, exist_ok=True)
        (path / "pool").mkdir(mode=0o700, exist_ok=True)
        owner = {"pid": os.getpid(), "start": process_start(os.getpid()), "run_id": run_id}
        files.publish(path / OWNER, json.dumps(owner))
        return self

    @property
    def socket(self) -> Path:
        return (self.home or self.path) / "conductor.sock"

    def output_dir(self, node: str) -> Path:
        return self.path / "data" / node

    def make_output_dir(self, node: str) -> None:
        self.output_dir(node).mkdir(mode=0o700, exist_ok=True)

    def output_path(self, node: str, batch: int) -> Path:
        return self.output_dir(node) / f"{batch:06d}.arrow"

    def pool_path(self, pooled: int) -> Path:
        """Where a freed output's file waits to be written over (warm pages)."""
        return self.path / "pool" / f"{pooled:08d}.arrow"

    def usage(self) -> int:
        """Bytes of files under the scratch directory, as the filesystem counts them;
        each file once, by inode (one moved between folders while this walks them —
        an output to the pool of warm files and back — is still one file)."""
        blocks: dict[int, int] = {}
        for folder, _, names in os.walk(self.path):
            for name in names:
                try:
                    found = os.stat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                blocks[found.st_ino] = found.st_blocks * 512
        return sum(blocks.values())

    def child(self, job: str) -> "Scratch":
        """A standing line's job's own outputs and pool, in a new folder of the line's
        (`jobs/JOB.XXXX/`: a job resumed on the line never writes where a file of its
        earlier start may still be read)."""
        (self.path / JOBS).mkdir(mode=0o700, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{job}.", dir=self.path / JOBS))  # 0700
        return Scratch(path, home=self.path)._claim(job)

    def sweep_jobs(self, running: set[Path], keep: set[str]) -> None:
        """What the line's jobs over left in RAM goes, but the files to `keep` (tables
        kept for the next job, or read by a running one); the running jobs' folders
        stay."""
        if not (self.path / JOBS).is_dir():
            return
        for folder in (self.path / JOBS).iterdir():
            if folder in running or folder.is_symlink():
                continue
            kept = [Path(p) for p in keep if Path(p).is_relative_to(folder)]
            if not kept:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            for found in list(folder.rglob("*")):
                if found.is_file() and found not in kept and found.name != OWNER:
                    found.unlink(missing_ok=True)

    def remove(self) -> None:
        if not self.volume:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def discard(path: str | Path) -> None:
    """Delete a scratch file nobody reads any more, emptying it first: agents keep
    mappings of what they read (`arrowfile.Mappings`), and a mapping would keep a
    deleted file's pages in RAM, outside the budget, until its agent let go of it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError:  # not a file of ours to empty (a link, say): deleted, not followed
        Path(path).unlink(missing_ok=True)
        return
    try:
        os.unlink(path)
        os.ftruncate(fd, 0)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def sweep(root: Path | None = None, keep: Path | None = None) -> list[Path]:
    """Remove this user's scratch directories under `root` whose owner process is
    gone, but `keep`; returns them. What cannot be proven podpipe's and this user's
    own (no owner record, a link, another owner, open modes) is left alone."""
    root = root or default_root()
    removed: list[Path] = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(PREFIX)]
    except OSError:
        return removed
    for path in candidates:
        if path == keep or not private_dir(path):
            continue
        try:
            owner = _owner(path)
            if alive(int(owner["pid"]), owner.get("start")):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not provably a podpipe scratch (or being created right now)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
