"""The durable tier: major checkpoints on an object store (fsspec: file://, s3://, ...).

Checkpoints are kept per *group*: each shard (`shard-00003`) and the global part of
the pipeline (`global`), so that progress is tracked per shard whichever pod made
it, and a shard that moves to another pod when the replicas change resumes from
its own checkpoints. A major checkpoint of a group is its node-tier copies,
uploaded, plus a manifest written last: which outputs (node, key, bytes, rows,
checksum), which keys each node had finished, how many source batches and shards
the plan had, and whether the group is `complete`. It counts only once its
manifest exists, so a checkpoint cut short by a crash is never seen. The pod that
runs a global reduce reads the other shards' outputs from their complete
manifests. Layout under `checkpoints.durable`:

    <pipeline>/<spec digest>/<group>/outputs/<node>/<key>-<checksum>.arrow
    <pipeline>/<spec digest>/<group>/manifest-<seq>.json

Uploads run in a background thread; when the store is down or slow the run goes on
from the faster tiers, the thread retries with backoff and the status says the
checkpoints are behind. The last `keep` manifests of a group are kept, and the
outputs they name; older ones are deleted.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from podpipe.runtime.journal import Copy

BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)


def digest(spec_text: bytes, overrides: list[str]) -> str:
    """What identifies a pipeline's checkpoints: its spec as run, overrides included
    (but those of `checkpoints.*`: where and how often checkpoints are taken does not
    change what is computed)."""
    kept = [o for o in overrides if not o.startswith("checkpoints.")]
    return hashlib.sha256(spec_text + b"\0" + "\n".join(kept).encode()).hexdigest()[:16]


def group_name(shard: int | None) -> str:
    """The checkpoint group of a shard; None: the global part of the pipeline."""
    return "global" if shard is None else f"shard-{shard:05d}"


def _store(url: str, name: str, spec_digest: str):
    import fsspec  # here, not at import: spawned stage processes never need it

    fs, root = fsspec.core.url_to_fs(f"{url.rstrip('/')}/{name}/{spec_digest}")
    return fs, root.rstrip("/")


def grouping(graph, shards: int) -> Callable[[str, int], str]:
    """The group of an output (node, key): its shard's, or the global one."""
    from podpipe.model.graph import BATCH, SINGLE
    from podpipe.model.shards import shard_of

    def group_of(node: str, key: int) -> str:
        domain = graph.domain[node]
        if domain == BATCH:
            return group_name(shard_of(key, shards))
        return group_name(key if domain == SINGLE else None)
    return group_of


@dataclass
class Checkpoint:
    """A major checkpoint found on the store."""

    seq: int
    source_batches: int
    shards: int
    complete: bool
    finished: dict[str, set[int]]
    outputs: list[dict[str, Any]]
    fs: Any = field(repr=False)
    root: str = ""


def latest(url: str, name: str, spec_digest: str, group: str) -> Checkpoint | None:
    """The newest checkpoint of one group of this pipeline, or None (none, or
    unreadable)."""
    try:
        fs, root = _store(url, name, spec_digest)
        root = f"{root}/{group}"
        if not fs.exists(root):
            return None
        manifests = sorted(p for p in fs.ls(root, detail=False)
                           if p.rsplit("/", 1)[-1].startswith("manifest-"))
        if not manifests:
            return None
        manifest = json.loads(fs.cat_file(manifests[-1]))
    except (OSError, ValueError):
        return None
    return Checkpoint(manifest["seq"], manifest["source_batches"], manifest["shards"],
                      manifest["complete"],
                      {n: set(b) for n, b in manifest["finished"].items()},
                      manifest["outputs"], fs, root)


def fetch(checkpoint: Checkpoint, run_dir: Path, verified,
          nodes: Iterable[str] | None = None) -> tuple[list[Copy], list[str]]:
    """Download a checkpoint's outputs (of `nodes`, or all) to the node tier of
    `run_dir`; returns the copies that arrived whole (checked with
    `verified(path, checksum)`) and notes on the rest."""
    from podpipe.runtime.tiers import path_for

    copies, notes = [], []
    wanted = None if nodes is None else set(nodes)
    for out in checkpoint.outputs:
        if wanted is not None and out["node"] not in wanted:
            continue
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


Finished = dict[str, list[int]]  # node -> keys done


class DurableTier:
    """Takes major checkpoints of this pod's groups in a background thread."""

    def __init__(self, url: str, name: str, spec_digest: str, *, every_batches: int | None,
                 interval: float, keep: int, source_batches: int, shards: int,
                 group_of: Callable[[str, int], str]) -> None:
        self.url, self.keep, self.source_batches = url, keep, source_batches
        self.shards, self.group_of = shards, group_of
        self.name, self.spec_digest = name, spec_digest
        self.every_batches, self.interval = every_batches, interval
        self.fs, self.root = _store(url, name, spec_digest)
        self.seq: dict[str, int] = {}       # group -> its last manifest's number
        self.earlier: dict[str, Checkpoint | None] = {}  # group -> its manifest before us
        self.written: dict[str, str] = {}   # group -> its last manifest's content
        self.uploaded: dict[tuple[str, int], str] = {}  # (node, key) -> key in the store
        self.folders: set[str] = set()
        self.taken_at_copies, self.taken_at = 0, time.monotonic()
        self.pending: tuple[list[Copy], Finished, dict[str, bool]] | None = None
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

    def take(self, copies: list[Copy], finished: Finished, groups: dict[str, bool]) -> None:
        """Checkpoint these node-tier copies, for `groups` (name -> complete); a newer
        request replaces one not started."""
        with self.lock:
            self.pending = (list(copies), finished, groups)
            self.behind = True
            self.taken_at_copies, self.taken_at = len(copies), time.monotonic()
            self.lock.notify()

    def close(self, wait: float) -> bool:
        """Stop, after finishing the checkpoint in hand for at most `wait` seconds;
        returns whether every checkpoint asked for was taken."""
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join(wait)
        with self.lock:
            return self.pending is None

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "checkpoints": self.checkpoints,
                "last": max(self.seq.values(), default=None),
                "behind": self.behind, "error": self.error}

    def _work(self) -> None:
        attempt = 0
        while True:
            with self.lock:
                while self.pending is None and not self.closing:
                    self.lock.wait()
                if self.pending is None:
                    return
                copies, finished, groups = self.pending
            try:
                self._checkpoint(copies, finished, groups)
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

    def _checkpoint(self, copies: list[Copy], finished: Finished,
                    groups: dict[str, bool]) -> None:
        outputs: dict[str, list[dict[str, Any]]] = {g: [] for g in groups}
        for copy in copies:
            group = self.group_of(copy.node, copy.batch)
            if group not in outputs:
                continue
            key = f"outputs/{copy.node}/{copy.batch:06d}-{copy.checksum}.arrow"
            if self.uploaded.get((copy.node, copy.batch)) != key:
                folder = f"{self.root}/{group}/outputs/{copy.node}"
                if folder not in self.folders:  # a directory store needs them
                    self.fs.makedirs(folder, exist_ok=True)
                    self.folders.add(folder)
                self.fs.put_file(copy.path, f"{self.root}/{group}/{key}")
                self.uploaded[(copy.node, copy.batch)] = key
            outputs[group].append({"node": copy.node, "batch": copy.batch, "key": key,
                                   "nbytes": copy.nbytes, "rows": copy.rows,
                                   "checksum": copy.checksum})
        for group, complete in groups.items():
            if group not in self.earlier:
                self.earlier[group] = latest(self.url, self.name, self.spec_digest, group)
            done = {n: [k for k in keys if self.group_of(n, k) == group]
                    for n, keys in finished.items()}
            earlier = self.earlier[group]
            if earlier is not None:
                # What a pod before us checkpointed stays checkpointed (the same spec,
                # so the same bytes), unless we made it again.
                ours = {(o["node"], o["batch"]) for o in outputs[group]}
                outputs[group] += [o for o in earlier.outputs
                                   if (o["node"], o["batch"]) not in ours]
                for node, keys in earlier.finished.items():
                    done[node] = sorted(set(done.get(node, [])) | keys)
                complete = complete or earlier.complete
            content = json.dumps({"source_batches": self.source_batches,
                                  "shards": self.shards, "complete": complete,
                                  "finished": done, "outputs": outputs[group]})
            if self.written.get(group) == content:
                continue  # nothing new in this group
            seq = self.seq.get(group, earlier.seq if earlier else 0) + 1
            manifest = {"seq": seq, **json.loads(content), "created": time.time()}
            # The manifest goes last, in one PUT: a checkpoint without it does not exist.
            self.fs.makedirs(f"{self.root}/{group}", exist_ok=True)
            self.fs.pipe_file(f"{self.root}/{group}/manifest-{seq:06d}.json",
                              json.dumps(manifest).encode())
            self.seq[group], self.written[group] = seq, content
            self.checkpoints += 1
            self._collect(f"{self.root}/{group}")

    def _collect(self, root: str) -> None:
        """Keep a group's last `keep` manifests and the outputs they name."""
        manifests = sorted(p for p in self.fs.ls(root, detail=False)
                           if p.rsplit("/", 1)[-1].startswith("manifest-"))
        old, kept = manifests[:-self.keep], manifests[-self.keep:]
        if not old:
            return
        named = {f"{root}/{o['key']}" for m in kept
                 for o in json.loads(self.fs.cat_file(m))["outputs"]}
        for path in old:
            self.fs.rm_file(path)
        for path in self.fs.find(f"{root}/outputs"):
            if path not in named:
                self.fs.rm_file(path)
