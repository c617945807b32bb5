"""Kubernetes' commands: `render` (the manifests), `conductor` (what a rendered pod's
conductor container runs) and the JSON patch of `swap --k8s`. Each calls one library
function (`podpipe.render`, `runtime.runs.pod`, `runtime.runs.upkeep`) and shows its
result."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from podpipe.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console


def render(args: argparse.Namespace, console: Console) -> int:
    """`podpipe render`: the manifests (or `--patch`'s JSON patch), to stdout or `-o`."""
    from pathlib import Path

    from podpipe import render as rendering
    from podpipe.runtime.runs import pod

    pipeline = pod.validate(args.spec, args.set)
    options = rendering.Options(
        flavor=args.flavor, replicas=args.replicas, layout=args.layout,
        image=args.image or rendering.Options.image, secret=args.secret,
        volumes=rendering.Volumes(storage_class=args.storage_class, node_size=args.node_size,
                                  host_path=args.host_path, data_claim=args.data_claim,
                                  data_host_path=args.data_host_path),
        namespace=args.namespace, overrides=tuple(args.set), metrics_port=args.metrics_port,
        pod_monitor=args.pod_monitor, log_format=args.log_format,
        kube_version=args.kube_version, standing=args.standing)
    manifests = rendering.render(pipeline, Path(args.spec).read_text(), options)
    if args.patch:
        stage, sep, image = args.patch.partition("=")
        if not sep or not stage or not image:
            raise UsageError(f"--patch {args.patch!r}: expected STAGE=IMAGE")
        text = json.dumps(rendering.image_patch(manifests, stage, image)) + "\n"
    elif args.shadow:
        stage, sep, image = args.shadow.partition("=")
        if not sep or not stage or not image:
            raise UsageError(f"--shadow {args.shadow!r}: expected STAGE=IMAGE")
        text = json.dumps(rendering.shadow_patch(manifests, stage, image)) + "\n"
    else:
        text = rendering.dump(manifests)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    from podpipe.runtime.plumbing import files

    out = Path(args.output)
    try:
        files.publish(out, text)
    except OSError as exc:
        raise UsageError(f"-o {out}: {exc.strerror}") from None
    return 0


def conductor(args: argparse.Namespace, console: Console) -> int:
    """`podpipe conductor`: a pod's conductor, a one-shot run's or a standing line's."""
    from podpipe.runtime.runs import pod, upkeep

    if args.standing:  # a standing line: no run of its own, jobs until SIGTERM
        return upkeep.stand(args.spec, args.set, scratch=args.scratch,
                            replicas=args.replicas, hold=args.hold,
                            launch=args.layout == "processes", metrics=args.metrics_port)
    if args.run_dir is None:
        raise UsageError("podpipe conductor: --run-dir DIR, or --standing")
    return pod.serve(args.spec, overrides=args.set, scratch=args.scratch,
                     run_dir=args.run_dir, layout=args.layout, hold=args.hold,
                     replicas=args.replicas, metrics=args.metrics_port,
                     once=args.once)


def swap_patch(args: argparse.Namespace) -> int:
    """`podpipe swap … --image IMAGE --k8s`: the JSON patch that swaps the image."""
    from podpipe import render as rendering
    from podpipe.runtime.rundir import layout as rundir
    from podpipe.runtime.runs import following as runs, pod

    if args.image is None:
        raise UsageError("--k8s: a swap on Kubernetes is an image change; give --image")
    run_dir = runs.resolve(args.run_dir)
    recorded = rundir.read(run_dir)
    if not (run_dir / "spec.yaml").is_file():
        raise UsageError(f"{run_dir}: not a podpipe run directory (no spec.yaml)")
    pipeline = pod.validate(str(run_dir / "spec.yaml"), recorded.overrides)
    sys.stdout.write(json.dumps(rendering.stage_patch(pipeline, args.stage, args.image)) + "\n")
    return 0
