"""The pod's RAM scratch: one directory on a tmpfs per run, shared by every process.

Layout: `owner.json` (who owns it), `conductor.sock`, `data/<node>/<batch>.arrow`.
A finished or failed run removes its scratch; a crashed one is swept by the next
run on this machine once its owner process is gone (pid and start time checked,
so a reused pid does not keep garbage alive).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from podpipe.runtime import files

PREFIX = "podpipe-"


def default_root() -> Path:
    return Path(os.environ.get("PODPIPE_SCRATCH_ROOT", "/dev/shm"))


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def alive(pid: int, start: str | None) -> bool:
    now = process_start(pid)
    return now is not None and (start is None or now == start)


@dataclass(frozen=True)
class Scratch:
    path: Path
    volume: bool = False  # the directory is a mounted volume: empty it, keep it

    @classmethod
    def create(cls, run_id: str, root: Path | None = None) -> "Scratch":
        root = root or default_root()
        path = root / f"{PREFIX}{run_id}"
        path.mkdir(parents=True)
        return cls(path)._claim()

    @classmethod
    def at(cls, path: Path) -> "Scratch":
        """The scratch of a pod on Kubernetes: the whole memory-backed volume at `path`.

        What a previous conductor container of this pod left there is removed first:
        the volume outlives container restarts.
        """
        path.mkdir(parents=True, exist_ok=True)
        scratch = cls(path, volume=True)
        scratch.remove()
        return scratch._claim()

    @classmethod
    def adopt(cls, path: Path, volume: bool = False) -> "Scratch":
        """The scratch of a run whose conductor died, taken over with what it holds."""
        return cls(path, volume)._claim()

    def _claim(self) -> "Scratch":
        path = self.path
        (path / "data").mkdir(exist_ok=True)
        owner = {"pid": os.getpid(), "start": process_start(os.getpid())}
        files.publish(path / "owner.json", json.dumps(owner))
        return self

    @property
    def socket(self) -> Path:
        return self.path / "conductor.sock"

    def output_dir(self, node: str) -> Path:
        return self.path / "data" / node

    def output_path(self, node: str, batch: int) -> Path:
        return self.output_dir(node) / f"{batch:06d}.arrow"

    def usage(self) -> int:
        """Bytes of files under the scratch directory, as the filesystem counts them."""
        total = 0
        for folder, _, files in os.walk(self.path):
            for name in files:
                try:
                    total += os.stat(os.path.join(folder, name)).st_blocks * 512
                except FileNotFoundError:
                    pass
        return total

    def remove(self) -> None:
        if not self.volume:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def sweep(root: Path | None = None, keep: Path | None = None) -> list[Path]:
    """Remove scratch directories whose owner process is gone, but `keep`; returns them."""
    root = root or default_root()
    removed: list[Path] = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        if path == keep:
            continue
        try:
            owner = json.loads((path / "owner.json").read_text())
            if alive(int(owner["pid"]), owner.get("start")):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            # No readable owner: a run that crashed while creating it, unless it is
            # being created right now; give a fresh directory a minute.
            try:
                if time.time() - path.stat().st_mtime < 60:
                    continue
            except OSError:
                continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
