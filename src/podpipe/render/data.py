"""Where a rendered pod finds its data: every local path of the spec on a volume it
mounts (`--data-claim`, `--data-host-path`) at `DATA`, its working directory; the
user's code stays in the image's `WORKDIR`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from podpipe.errors import SpecWarning, UsageError
from podpipe.model.sizes import parse_size
from podpipe.model.spec import Pipeline

WORKDIR = "/app"                           # the image's WORKDIR: user code
DATA = "/data"                             # the data volume, when one is mounted


@dataclass(frozen=True)
class Volumes:
    """Where a pod keeps its node tier and finds its data (`podpipe render` flags)."""

    storage_class: str | None = None    # the node tier's PVCs; None: the default
    node_size: str = "20Gi"             # each pod's node-tier volume
    host_path: str | None = None        # the node tier on the host instead of a PVC
    data_claim: str | None = None       # the data volume: a PVC of this name,
    data_host_path: str | None = None   # or a directory of the node

    @property
    def data(self) -> bool:
        return self.data_claim is not None or self.data_host_path is not None

    def check(self) -> None:
        try:
            parse_size(self.node_size)
        except ValueError as exc:
            raise UsageError(f"--node-size: {exc}") from None
        for flag, path in (("--host-path", self.host_path),
                           ("--data-host-path", self.data_host_path)):
            if path is not None and not path.startswith("/"):
                raise UsageError(f"{flag} {path!r}: expected an absolute path")
        if self.data_claim is not None and self.data_host_path is not None:
            raise UsageError("--data-claim and --data-host-path: choose one data volume")


def local_paths(pipeline: Pipeline) -> list[tuple[str, str]]:
    """(field, path) of every path of the spec on a local filesystem: what a pod reads
    or writes through its own mounts, not an object store's."""
    found = [("spec.source.uri", pipeline.source.uri)]
    found += [(f"spec.tables[{i}].uri", t.uri) for i, t in enumerate(pipeline.tables)]
    found += [(f"spec.sinks[{i}].uri", s.uri) for i, s in enumerate(pipeline.sinks)]
    if pipeline.checkpoints.durable:
        found.append(("spec.checkpoints.durable", pipeline.checkpoints.durable))
    return [(field, uri.removeprefix("file://")) for field, uri in found
            if "://" not in uri or uri.startswith("file://")]


def check(pipeline: Pipeline, volumes: Volumes, replicas: int) -> None:
    """Every local path must resolve on the data volume: refused (naming them) without
    one, or outside it; sinks that several pods write on one node's disk are refused,
    and on a claim that must be ReadWriteMany, said."""
    local = local_paths(pipeline)
    named = ", ".join(f"{field} {path!r}" for field, path in local)
    if local and not volumes.data:
        raise UsageError(f"{named}: a pod would not find {'it' if len(local) == 1 else 'them'}"
                         f" (relative paths resolve under {WORKDIR}, the image's read-only "
                         f"root). Mount a volume for the data with --data-claim CLAIM or "
                         f"--data-host-path DIR (relative paths then resolve under {DATA}), "
                         "or use object-store URLs")
    outside = [(f, p) for f, p in local if p.startswith("/") and p != DATA
               and not p.startswith(DATA + "/")]
    if outside:
        raise UsageError(", ".join(f"{f} {p!r}" for f, p in outside) + f": not on the data "
                         f"volume mounted at {DATA}; make {'it' if len(outside) == 1 else 'them'}"
                         " relative (or under /data), or an object-store URL")
    sinks = [p for f, p in local if f.startswith("spec.sinks")]
    if sinks and replicas > 1 and volumes.data_host_path is not None:
        raise UsageError(f"--data-host-path with --replicas {replicas}: each pod "
                         f"would write its part of sink {sinks[0]!r} on its own node's disk; "
                         "use --data-claim on a ReadWriteMany volume, or an object store")
    if sinks and replicas > 1:
        warnings.warn(SpecWarning(
            f"--data-claim {volumes.data_claim} with --replicas {replicas}: every "
            f"pod writes sink {sinks[0]!r} on it, so it must be ReadWriteMany (NFS, CephFS, "
            "EFS, ...); a ReadWriteOnce claim keeps pods on one node, or pending"))
