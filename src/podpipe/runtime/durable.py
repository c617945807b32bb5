"""The durable tier: major checkpoints on an object store (fsspec: file://, s3://, ...).

A major checkpoint is the node-tier copies the run has made so far, uploaded, plus a
manifest written last: which outputs (node, batch, key, bytes, rows, checksum),
which batches each node had finished, how many source batches the plan had. It
counts only once its manifest exists, so a checkpoint cut short by a crash is never
seen. Layout under `checkpoints.durable`:

    <pipeline>/<spec digest>/outputs/<node>/<batch>-<checksum>.arrow
    <pipeline>/<spec digest>/manifest-<seq>.json

Uploads run in a background thread; when the store is down or slow the run goes on
from the faster tiers, the thread retries with backoff and the status says the
checkpoints are behind. The last `keep` manifests are kept, and the outputs they
name; older ones are deleted.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podpipe.runtime.journal import Copy

BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)


def digest(spec_text: bytes, overrides: list[str]) -> str:
    """What identifies a pipeline's checkpoints: its spec as run, overrides included."""
    return hashlib.sha256(spec_text + b"\0" + "\n".join(overrides).encode()).hexdigest()[:16]


def _store(url: str, name: str, spec_digest: str):
    import fsspec  # here, not at import: spawned stage processes never need it

    fs, root = fsspec.core.url_to_fs(f"{url.rstrip('/')}/{name}/{spec_digest}")
    return fs, root.rstrip("/")


@dataclass
class Checkpoint:
    """A major checkpoint found on the store."""

    seq: int
    source_batches: int
    finished: dict[str, set[int]]
    outputs: list[dict[str, Any]]
    fs: Any = field(repr=False)
    root: str = ""


def latest(url: str, name: str, spec_digest: str) -> Checkpoint | None:
    """The newest complete checkpoint of this pipeline, or None (none, or unreadable)."""
    try:
        fs, root = _store(url, name, spec_digest)
        manifests = sorted(p for p in fs.ls(root, detail=False)
                           if p.rsplit("/", 1)[-1].startswith("manifest-"))
        if not manifests:
            return None
        manifest = json.loads(fs.cat_file(manifests[-1]))
    except (OSError, ValueError):
        return None
    return Checkpoint(manifest["seq"], manifest["source_batches"],
                      {n: set(b) for n, b in manifest["finished"].items()},
                      manifest["outputs"], fs, root)


def fetch(checkpoint: Checkpoint, run_dir: Path, verified) -> tuple[list[Copy], list[str]]:
    """Download a checkpoint's outputs to the node tier of `run_dir`; returns the copies
    that arrived whole (checked with `verified(path, checksum)`) and notes on the rest."""
    from podpipe.runtime.tiers import path_for

    copies, notes = [], []
    for out in checkpoint.outputs:
        dest = path_for(run_dir, out["node"], out["batch"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.durable.tmp")
        try:
            checkpoint.fs.get_file(f"{checkpoint.root}/{out['key']}", str(tmp))
        except OSError as exc:
            notes.append(f"{out['node']} batch {out['batch']}: cannot fetch the durable "
                         f"copy: {exc}")
            tmp.unlink(missing_ok=True)
            continue
        if not verified(tmp, out["checksum"]):
            notes.append(f"{out['node']} batch {out['batch']}: the durable copy is corrupt "
                         "(checksum); not used")
            tmp.unlink()
            continue
        tmp.rename(dest)
        copies.append(Copy(out["node"], out["batch"], "durable", str(dest), out["nbytes"],
                           out["rows"], out["checksum"]))
    return copies, notes


class DurableTier:
    """Takes major checkpoints in a background thread."""

    def __init__(self, url: str, name: str, spec_digest: str, *, every_batches: int | None,
                 interval: float, keep: int, source_batches: int) -> None:
        self.url, self.keep, self.source_batches = url, keep, source_batches
        self.every_batches, self.interval = every_batches, interval
        self.fs, self.root = _store(url, name, spec_digest)
        found = latest(url, name, spec_digest)
        self.seq = found.seq if found else 0
        self.uploaded: dict[tuple[str, int], str] = {}  # (node, batch) -> key in the store
        self.folders: set[str] = set()
        self.taken_at_copies, self.taken_at = 0, time.monotonic()
        self.pending: tuple[list[Copy], dict[str, list[int]]] | None = None
        self.checkpoints, self.behind = 0, False
        self.error: str | None = None
        self.lock = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._work, name="durable-tier", daemon=True)
        self.thread.start()

    def due(self, copies: int) -> bool:
        """Time for a checkpoint: `every_batches` new copies, or `interval` seconds with
        at least one."""
        new = copies - self.taken_at_copies
        if new <= 0:
            return False
        if self.every_batches is not None and new >= self.every_batches:
            return True
        return time.monotonic() - self.taken_at >= self.interval

    def take(self, copies: list[Copy], finished: dict[str, list[int]]) -> None:
        """Checkpoint these node-tier copies; a newer request replaces one not started."""
        with self.lock:
            self.pending = (list(copies), finished)
            self.behind = True
            self.taken_at_copies, self.taken_at = len(copies), time.monotonic()
            self.lock.notify()

    def close(self, wait: float) -> None:
        """Stop, after finishing the checkpoint in hand for at most `wait` seconds."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join(wait)

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "checkpoints": self.checkpoints, "last": self.seq or None,
                "behind": self.behind, "error": self.error}

    def _work(self) -> None:
        attempt = 0
        while True:
            with self.lock:
                while self.pending is None and not self.closing:
                    self.lock.wait()
                if self.pending is None:
                    return
                copies, finished = self.pending
            try:
                self._checkpoint(copies, finished)
            except Exception as exc:  # noqa: BLE001 - any store failure: retry later
                self.error = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    if self.closing:
                        return
                    self.lock.wait(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                attempt += 1
                continue
            attempt = 0
            with self.lock:
                if self.pending is not None and self.pending[0] is copies:
                    self.pending = None
                    self.behind = False
                self.error = None
                if self.closing and self.pending is None:
                    return

    def _checkpoint(self, copies: list[Copy], finished: dict[str, list[int]]) -> None:
        outputs = []
        for copy in copies:
            key = f"outputs/{copy.node}/{copy.batch:06d}-{copy.checksum}.arrow"
            if self.uploaded.get((copy.node, copy.batch)) != key:
                if copy.node not in self.folders:  # a directory store needs them
                    self.fs.makedirs(f"{self.root}/outputs/{copy.node}", exist_ok=True)
                    self.folders.add(copy.node)
                self.fs.put_file(copy.path, f"{self.root}/{key}")
                self.uploaded[(copy.node, copy.batch)] = key
            outputs.append({"node": copy.node, "batch": copy.batch, "key": key,
                            "nbytes": copy.nbytes, "rows": copy.rows,
                            "checksum": copy.checksum})
        seq = self.seq + 1
        manifest = {"seq": seq, "source_batches": self.source_batches, "finished": finished,
                    "outputs": outputs, "created": time.time()}
        # The manifest goes last, in one PUT: a checkpoint without it does not exist.
        self.fs.pipe_file(f"{self.root}/manifest-{seq:06d}.json",
                          json.dumps(manifest).encode())
        self.seq = seq
        self.checkpoints += 1
        self._collect()

    def _collect(self) -> None:
        """Keep the last `keep` manifests and the outputs they name."""
        manifests = sorted(p for p in self.fs.ls(self.root, detail=False)
                           if p.rsplit("/", 1)[-1].startswith("manifest-"))
        old, kept = manifests[:-self.keep], manifests[-self.keep:]
        if not old:
            return
        named = {f"{self.root}/{o['key']}" for m in kept
                 for o in json.loads(self.fs.cat_file(m))["outputs"]}
        for path in old:
            self.fs.rm_file(path)
        for path in self.fs.find(f"{self.root}/outputs"):
            if path not in named:
                self.fs.rm_file(path)
