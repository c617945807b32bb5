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

Everything goes through a `store.Store`, so a store that cannot be read is an
error (`StoreError`), never "no checkpoint". Uploads run in a background thread; when the store is down or slow the run goes on
from the faster tiers, the thread retries with backoff and the status says the
checkpoints are behind. The last `keep` manifests of a group are kept, and the
outputs they name; older ones are deleted.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import msgspec

from podpipe.model.graph import BATCH, SINGLE, Graph
from podpipe.model.output import Output
from podpipe.model.shards import shard_of
from podpipe.runtime.plumbing import files
from podpipe.runtime.storage import tiers
from podpipe.runtime.storage.store import Store, open_store

__all__ = ["Output", "Stored", "Store", "DurableTier", "Checkpoint", "Manifest", "checkpoints", "latest", "fetch",
           "probe", "digest", "group_name", "grouping"]

BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)
_OBJECT = re.compile(r"^outputs/[a-z0-9-]{1,63}/\d{6,}-[0-9a-f]+\.arrow$")  # in a group
SCHEMA_VERSION = 1


class Stored(msgspec.Struct, frozen=True):
    """One output in a checkpoint: the record, and its object's key in the group."""

    output: Output
    key: str


class Manifest(msgspec.Struct):
    """A major checkpoint of one group, written last (it makes the checkpoint exist)."""

    seq: int
    source_batches: int
    shards: int
    complete: bool
    finished: dict[str, list[int]]   # node -> keys done
    outputs: list[Stored]
    made_by: dict[str, dict[int, str]] = {}  # node -> key -> the stage version that made it
    created: float = 0.0
    source: str = ""  # a digest of what the run read (`source.digest`): its files, its plan
    schemaVersion: int = SCHEMA_VERSION


_manifests = msgspec.json.Decoder(Manifest)


def digest(spec_text: bytes, overrides: list[str]) -> str:
    """What identifies a pipeline's checkpoints: its spec as run, overrides included
    (but those of `checkpoints.*`: where and how often checkpoints are taken does not
    change what is computed)."""
    kept = [o for o in overrides if not o.startswith("checkpoints.")]
    return hashlib.sha256(spec_text + b"\0" + "\n".join(kept).encode()).hexdigest()[:16]


def group_name(shard: int | None) -> str:
    """The checkpoint group of a shard; None: the global part of the pipeline."""
    return "global" if shard is None else f"shard-{shard:05d}"


def grouping(graph: Graph, shards: int) -> Callable[[str, int], str]:
    """The group of an output (node, key): its shard's, or the global one."""
    def group_of(node: str, key: int) -> str:
        domain = graph.domain[node]
        if domain == BATCH:
            return group_name(shard_of(key, shards))
        return group_name(key if domain == SINGLE else None)
    return group_of


@dataclass
class Checkpoint:
    """A major checkpoint found on the store, with the store of its group."""

    manifest: Manifest
    store: Store

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def shards(self) -> int:
        return self.manifest.shards

    @property
    def source_batches(self) -> int:
        return self.manifest.source_batches

    @property
    def finished(self) -> dict[str, set[int]]:
        return {n: set(b) for n, b in self.manifest.finished.items()}

    @property
    def made_by(self) -> dict[tuple[str, int], str]:
        return {(n, k): v for n, keys in self.manifest.made_by.items() for k, v in keys.items()}


def checkpoints(url: str, name: str, spec_digest: str) -> Store:
    """The store of a pipeline's checkpoints (a spec as run) under `url`."""
    return open_store(url).child(f"{name}/{spec_digest}")


def probe(store: Store) -> None:
    """Write and delete one small object: the store is reachable and writable (with
    the credentials this process has). StoreError otherwise."""
    key = f".podpipe-probe-{uuid.uuid4().hex}"
    store.write(key, b"probe")
    store.delete(key)


def latest(store: Store, group: str) -> Checkpoint | None:
    """The newest checkpoint of one group, or None if it has none. A store that
    cannot be read raises StoreError; a manifest that cannot be parsed is skipped
    (it counts as not written)."""
    group_store = store.child(group)
    manifests = [k for k in group_store.list("") if k.startswith("manifest-")]
    for key in reversed(manifests):
        data = group_store.read(key)
        try:
            return Checkpoint(_manifests.decode(data), group_store) if data else None
        except msgspec.DecodeError:
            continue
    return None


class _Unusable(Exception):
    """A durable copy that cannot be used (missing, corrupt)."""


def fetch(checkpoint: Checkpoint, run_dir: Path,
          nodes: Iterable[str] | None = None) -> tuple[list[Output], list[str]]:
    """Download a checkpoint's outputs (of `nodes`, or all) to the node tier of
    `run_dir`; returns the copies that arrived whole (checked by checksum) and notes
    on the rest."""
    copies, notes = [], []
    wanted = None if nodes is None else set(nodes)
    for stored in checkpoint.manifest.outputs:
        out = stored.output
        if wanted is not None and out.node not in wanted:
            continue
        try:  # a manifest is input: its names must be a node's, its keys in the group
            dest = tiers.path_for(run_dir, out.node, out.key)
            if not _OBJECT.match(stored.key):
                raise ValueError(f"object {stored.key!r} is not an output's")
        except ValueError as exc:
            notes.append(f"the durable manifest names something else: {exc}; not used")
            continue
        files.private_dirs(dest.parent)
        try:
            with files.publishing(dest) as tmp:  # checked before it is trusted
                if not checkpoint.store.download(stored.key, tmp):
                    raise _Unusable("the durable copy is missing")
                if not tiers.verified(tmp, out.checksum):
                    raise _Unusable("the durable copy is corrupt (checksum); not used")
        except _Unusable as exc:
            notes.append(f"{out.node} batch {out.key}: {exc}")
            continue
        copies.append(out.on("durable", str(dest)))
    return copies, notes


Finished = dict[str, list[int]]  # node -> keys done


class _Writer:
    """Writes a pod's checkpoints to the store: uploads what is new, writes each
    group's manifest (carrying forward what an earlier pod's had), keeps the last
    `keep` of them. Called from the durable tier's thread only."""

    def __init__(self, store: Store, *, keep: int, source_batches: int, shards: int,
                 group_of: Callable[[str, int], str], source: str) -> None:
        self.store, self.keep = store, keep
        self.source_batches, self.shards, self.group_of = source_batches, shards, group_of
        self.source = source
        self.seq: dict[str, int] = {}       # group -> its last manifest's number
        self.earlier: dict[str, Checkpoint | None] = {}  # group -> its manifest before us
        self.written: dict[str, bytes] = {}  # group -> its last manifest's content
        self.uploaded: dict[tuple[str, int], str] = {}  # (node, key) -> key in the store
        self.checkpoints = 0

    @property
    def last(self) -> int | None:
        return max(self.seq.values(), default=None)

    def checkpoint(self, copies: list[Output], finished: Finished,
                    groups: dict[str, bool], made_by: dict[tuple[str, int], str]) -> None:
        outputs: dict[str, list[Stored]] = {g: [] for g in groups}
        for copy in copies:
            group = self.group_of(copy.node, copy.key)
            if group not in outputs:
                continue
            key = f"outputs/{copy.node}/{copy.key:06d}-{copy.checksum}.arrow"
            if self.uploaded.get((copy.node, copy.key)) != key:
                self.store.upload(f"{group}/{key}", Path(copy.path))
                self.uploaded[(copy.node, copy.key)] = key
            outputs[group].append(Stored(copy, key))
        for group, complete in groups.items():
            if group not in self.earlier:
                self.earlier[group] = latest(self.store, group)
            done = {n: [k for k in keys if self.group_of(n, k) == group]
                    for n, keys in finished.items()}
            versions: dict[str, dict[int, str]] = {}
            for (made, k), version in sorted(made_by.items()):
                if self.group_of(made, k) == group:
                    versions.setdefault(made, {})[k] = version
            earlier = self.earlier[group]
            if earlier is not None and earlier.manifest.source == self.source:
                # What a pod before us checkpointed stays checkpointed (the same spec,
                # so the same bytes), unless we made it again.
                ours = {(o.output.node, o.output.key) for o in outputs[group]}
                outputs[group] += [o for o in earlier.manifest.outputs
                                   if (o.output.node, o.output.key) not in ours]
                for node, keys in earlier.finished.items():
                    done[node] = sorted(set(done.get(node, [])) | keys)
                for (made, k), version in earlier.made_by.items():
                    versions.setdefault(made, {}).setdefault(k, version)
                complete = complete or earlier.complete
            manifest = Manifest(0, self.source_batches, self.shards, complete, done,
                                outputs[group],
                                {n: dict(sorted(v.items())) for n, v in sorted(versions.items())},
                                source=self.source)
            content = msgspec.json.encode(manifest)
            if self.written.get(group) == content:
                continue  # nothing new in this group
            manifest.seq = self.seq.get(group, earlier.manifest.seq if earlier else 0) + 1
            manifest.created = time.time()
            # The manifest goes last, in one PUT: a checkpoint without it does not exist.
            self.store.write(f"{group}/manifest-{manifest.seq:06d}.json",
                             msgspec.json.encode(manifest))
            self.seq[group], self.written[group] = manifest.seq, content
            self.checkpoints += 1
            self._collect(group)

    def _collect(self, group: str) -> None:
        """Keep a group's last `keep` manifests and the outputs they name."""
        keys = self.store.list(group)
        manifests = [k for k in keys if k.rsplit("/", 1)[-1].startswith("manifest-")]
        old, kept = manifests[:-self.keep], manifests[-self.keep:]
        if not old:
            return
        named = set()
        for key in kept:
            data = self.store.read(key)
            if data:
                named |= {f"{group}/{o.key}" for o in _manifests.decode(data).outputs}
        for key in old:
            self.store.delete(key)
        for key in keys:
            if key.startswith(f"{group}/outputs/") and key not in named:
                self.store.delete(key)


class DurableTier:
    """Takes major checkpoints of this pod's groups in a background thread, when due:
    the latest request replaces one not started; a failed one is tried again."""

    def __init__(self, store: Store, *, every_batches: int | None, interval: float,
                 keep: int, source_batches: int, shards: int,
                 group_of: Callable[[str, int], str], source: str = "") -> None:
        self.url = store.url
        self.writer = _Writer(store, keep=keep, source_batches=source_batches, shards=shards,
                              group_of=group_of, source=source)
        self.every_batches, self.interval = every_batches, interval
        self.taken_at_copies, self.taken_at = 0, time.monotonic()
        self.pending: tuple[list[Output], Finished, dict[str, bool],
                            dict[tuple[str, int], str]] | None = None
        self.behind = False
        self.error: str | None = None
        self.lock = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._work, name="durable-tier", daemon=True)
        self.thread.start()

    def latest(self, group: str) -> Checkpoint | None:
        return latest(self.writer.store, group)
    def due(self, copies: int) -> bool:
        """Time for a checkpoint: `every_batches` new copies, or `interval` seconds with
        at least one."""
        new = copies - self.taken_at_copies
        if new <= 0:
            return False
        if self.every_batches is not None and new >= self.every_batches:
            return True
        return time.monotonic() - self.taken_at >= self.interval

    def take(self, copies: list[Output], finished: Finished, groups: dict[str, bool],
             made_by: dict[tuple[str, int], str] | None = None) -> None:
        """Checkpoint these node-tier copies, for `groups` (name -> complete), with the
        versions that made what finished (`made_by`); a newer request replaces one not
        started."""
        with self.lock:
            self.pending = (list(copies), finished, groups, dict(made_by or {}))
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
        return {"url": self.url, "checkpoints": self.writer.checkpoints,
                "last": self.writer.last, "behind": self.behind, "error": self.error}

    def _work(self) -> None:
        attempt = 0
        while True:
            with self.lock:
                while self.pending is None and not self.closing:
                    self.lock.wait()
                if self.pending is None:
                    return
                copies, finished, groups, made_by = self.pending
            try:
                self.writer.checkpoint(copies, finished, groups, made_by)
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
