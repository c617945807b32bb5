"""Where a rendered pod finds its data: every local path of the spec on a volume it
mounts (`--data-claim`, `--data-host-path`) at `DATA`, its working directory; the
user's code stays in the image's `WORKDIR`."""

from __future__ import annotations

import warnings

from podpipe.errors import SpecWarning, UsageError
from podpipe.model.spec import Pipeline

WORKDIR = "/app"                           # the image's WORKDIR: user code
DATA = "/data"                             # the data volume, when one is mounted


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


def check(pipeline: Pipeline, *, claim: str | None, host_path: str | None,
          replicas: int) -> None:
    """Every local path must resolve on the data volume: refused (naming them) without
    one, or outside it; sinks that several pods write on one node's disk are refused,
    and on a claim that must be ReadWriteMany, said."""
    local = local_paths(pipeline)
    named = ", ".join(f"{field} {path!r}" for field, path in local)
    if local and claim is None and host_path is None:
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
    if sinks and replicas > 1 and host_path is not None:
        raise UsageError(f"--data-host-path with --replicas {replicas}: each pod "
                         f"would write its part of sink {sinks[0]!r} on its own node's disk; "
                         "use --data-claim on a ReadWriteMany volume, or an object store")
    if sinks and replicas > 1:
        warnings.warn(SpecWarning(
            f"--data-claim {claim} with --replicas {replicas}: every "
            f"pod writes sink {sinks[0]!r} on it, so it must be ReadWriteMany (NFS, CephFS, "
            "EFS, ...); a ReadWriteOnce claim keeps pods on one node, or pending"))
