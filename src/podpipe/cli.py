"""The `podpipe` command. Each subcommand parses its arguments and calls one function.

Exit codes (errors.py): 0 success, 1 the run failed, 2 invalid input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

import os

from podpipe import __version__
from podpipe.errors import PodpipeError, StageError, UsageError, exit_code



def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podpipe",
        description="Run a pipeline as a pod: stage processes that hand Arrow batches to "
                    "each other through shared memory.",
        epilog="exit codes: 0 success, 1 the run failed, 2 invalid input, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"podpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a pipeline to the end",
                         description="Run a pipeline spec to the end in a pod on this machine.")
    run.add_argument("spec", metavar="SPEC", help="pipeline spec (YAML)")
    run.add_argument("--run-dir", metavar="DIR",
                     help="run directory (default: CHECKPOINTS_NODE/runs/RUN_ID)")
    run.add_argument("--replicas", type=int, default=1, metavar="N",
                     help="replicas of the pod; replica I owns the shards S with "
                          "S %% N == I. Without an ordinal, all N start on this machine")
    run.add_argument("--pod-index", type=int, metavar="I",
                     help="run only replica I (default: $POD_INDEX, else the suffix of a "
                          "StatefulSet hostname NAME-I)")
    run.add_argument("--memory", metavar="SIZE", help="RAM scratch budget, e.g. 2GiB "
                     "(overrides spec.memory)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec field, e.g. source.batchRows=100000 or "
                          "stages.filter.run=mod:fn (repeatable)")
    run.add_argument("--fresh", action="store_true",
                     help="ignore the durable tier's checkpoints of this spec; start over")
    run.add_argument("--quiet", action="store_true",
                     help="no progress, no summary: one line with the outcome")

    resume = sub.add_parser(
        "resume", help="finish a run whose conductor died or whose pod was lost",
        description="Finish the run in RUN_DIR from what survived it: outputs still in its "
                    "RAM scratch, else on the node tier (checked by checksum), else "
                    "computed again. Batches whose results were kept are not run again.")
    resume.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or 'latest'")
    resume.add_argument("--replicas", type=int, metavar="M",
                        help="a run of several replicas: resume with M of them (rescale); "
                             "shards that move resume from their durable checkpoints")
    resume.add_argument("--quiet", action="store_true", help="no progress, no summary")

    plan = sub.add_parser(
        "plan", help="show which pod runs which shards and how many bytes it pulls",
        description="Plan the source (file footers only; no stage runs) and show, per "
                    "replica, the shards it owns, its batches and the source bytes it "
                    "reads (compressed, of the columns the spec reads).")
    plan.add_argument("spec", metavar="SPEC")
    plan.add_argument("--replicas", type=int, default=1, metavar="N")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--json", action="store_true", help="one JSON object")

    status = sub.add_parser("status", help="show a run's state, processes and progress")
    status.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or 'latest'")
    status.add_argument("--json", action="store_true",
                        help="one JSON object: state, scratch, processes, stages")

    wait = sub.add_parser("wait", help="wait for a run to end; exit with its exit code",
                          description="Block until the run in RUN_DIR (or 'latest') ends, "
                                      "then exit as it did: 0 succeeded, 1 failed, 130 "
                                      "interrupted; 124 if --timeout passed first.")
    wait.add_argument("run_dir", metavar="RUN_DIR")
    wait.add_argument("--timeout", type=float, metavar="SECONDS")

    runs = sub.add_parser("runs", help="list the runs in .podpipe/runs, newest first")
    runs.add_argument("--dir", metavar="DIR", help="another runs directory "
                      "(CHECKPOINTS_NODE/runs)")
    runs.add_argument("--json", action="store_true", help="one JSON list")

    logs = sub.add_parser("logs", help="print a run's logs, each line prefixed by its "
                                       "process",
                          description="Print the logs of the run in RUN_DIR (or 'latest'), "
                                      "every process's, or STAGE's only.")
    logs.add_argument("run_dir", metavar="RUN_DIR")
    logs.add_argument("stage", metavar="STAGE", nargs="?")

    validate = sub.add_parser("validate", help="check a spec without running it")
    validate.add_argument("spec", metavar="SPEC")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    swap = sub.add_parser(
        "swap", help="swap a stage's version in a running run",
        description="Replace STAGE's process in the running run at RUN_DIR by a new "
                    "version: it finishes its batch (--now: abandons it, to be redone), "
                    "the new version takes the later batches. The conductor, the other "
                    "stages and the data in RAM stay. A new version that fails holds the "
                    "stage (the run waits): swap back to go on.")
    swap.add_argument("run_dir", metavar="RUN_DIR")
    swap.add_argument("stage", metavar="STAGE")
    what = swap.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", metavar="MODULE:FUNCTION", help="a Python callable")
    what.add_argument("--command", dest="new_command", metavar="COMMAND",
                      help="an executable and its arguments, one string (split as a shell "
                           "would)")
    what.add_argument("--image", metavar="IMAGE", help="the stage's container image")
    swap.add_argument("--version", metavar="V",
                      help="the new version's name (default: a digest of what defines it)")
    swap.add_argument("--now", action="store_true",
                      help="do not wait for the in-flight batch: abandon it, to be redone")
    swap.add_argument("--recompute", action="store_true",
                      help="also redo the batches the old version did, and everything "
                           "downstream of them, from the source: the outputs end as if the "
                           "new version had run from the start")
    swap.add_argument("--k8s", action="store_true",
                      help="print the JSON patch that swaps the image on Kubernetes "
                           "(kubectl patch --type json; OpenKruise applies it in place); "
                           "needs --image")
    swap.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                      help="how long to wait for the in-flight batch (default 300)")

    apply = sub.add_parser(
        "apply", help="have a running run go on with a changed spec",
        description="Compare the running pipeline with NEW_SPEC (stages and sinks, by "
                    "name): start the added ones (they get every batch; where their "
                    "inputs are gone from RAM, the batch runs again from the source), "
                    "stop the removed ones, swap the changed ones, leave the rest "
                    "running. Refuses what a running run cannot take (a changed source, "
                    "a rewired stage), saying why.")
    apply.add_argument("run_dir", metavar="RUN_DIR")
    apply.add_argument("new_spec", metavar="NEW_SPEC")
    apply.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")

    render = sub.add_parser(
        "render", help="print Kubernetes manifests that run the pipeline as a StatefulSet",
        description="Print a ConfigMap (the spec), a headless Service and a StatefulSet "
                    "whose pods run the pipeline: the conductor as a native sidecar, one "
                    "container per stage, the RAM scratch as a memory-backed emptyDir.")
    render.add_argument("spec", metavar="SPEC")
    render.add_argument("--flavor", choices=("kubernetes", "openkruise"), default="kubernetes",
                        help="apps/v1 StatefulSet, or OpenKruise's Advanced StatefulSet "
                             "(in-place image updates)")
    render.add_argument("--replicas", type=int, default=1, metavar="N")
    render.add_argument("--image", metavar="IMAGE",
                        help="image of the conductor and of every stage without an image: "
                             f"field (default podpipe:{__version__})")
    render.add_argument("--layout", choices=("containers", "processes"), default="containers",
                        help="containers: one per stage (default); processes: one container "
                             "whose conductor starts the stages as processes")
    render.add_argument("--storage-class", metavar="NAME",
                        help="storage class of each pod's node-tier volume")
    render.add_argument("--node-size", default="20Gi", metavar="SIZE",
                        help="size of each pod's node-tier volume (default 20Gi)")
    render.add_argument("--host-path", metavar="DIR",
                        help="put the node tier on the host at DIR instead of a volume claim")
    render.add_argument("--secret", metavar="NAME",
                        help="a Secret whose keys become every container's env "
                             "(object-store credentials)")
    render.add_argument("--namespace", metavar="NS")
    render.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field in every process of the pod")
    render.add_argument("--patch", metavar="STAGE=IMAGE",
                        help="print instead the JSON patch that swaps STAGE's image "
                             "(kubectl patch --type json; OpenKruise applies it in place)")
    render.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")

    agent = sub.add_parser("agent", help="(internal) serve one stage of a pod: a container's "
                                         "command on Kubernetes")
    agent.add_argument("--stage", "--node", dest="node", required=True, metavar="NAME",
                       help="the stage, 'source' or a sink name")
    agent.add_argument("--spec", required=True)
    agent.add_argument("--socket", required=True, help="the conductor's Unix socket")
    agent.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    agent.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="wait this long for the conductor's socket to come up")
    agent.add_argument("--hold", action="store_true",
                       help="once the run is over, stay up until SIGTERM")

    conductor = sub.add_parser("conductor", help="(internal) the conductor of a pod on "
                                                 "Kubernetes: a native sidecar's command")
    conductor.add_argument("--spec", required=True)
    conductor.add_argument("--scratch", required=True, metavar="DIR",
                           help="the pod's memory-backed volume")
    conductor.add_argument("--run-dir", required=True, metavar="DIR",
                           help="the run directory, on the node tier")
    conductor.add_argument("--layout", choices=("containers", "processes"),
                           default="containers",
                           help="containers: the kubelet starts one agent container per "
                                "stage; processes: this process starts them")
    conductor.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    conductor.add_argument("--replicas", type=int, default=1, metavar="N",
                           help="the StatefulSet's replicas; the ordinal is $POD_INDEX")
    conductor.add_argument("--no-hold", dest="hold", action="store_false",
                           help="exit when the run is over instead of staying up")

    probe = sub.add_parser("probe", help="(internal) exit 0 if a conductor answers on SOCKET")
    probe.add_argument("socket", metavar="SOCKET")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "agent":  # a stage process: keep its start light, no rich
        from podpipe.runtime import agent

        return agent.serve(args.spec, args.set, args.node, args.socket, hold=args.hold,
                           wait=args.wait)
    if args.command == "probe":
        from podpipe.runtime import protocol

        return 0 if protocol.probe(args.socket) else 1
    from rich.console import Console

    console, errors = Console(), Console(stderr=True)
    try:
        return _COMMANDS[args.command](args, console)
    except PodpipeError as exc:
        errors.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True,
                     soft_wrap=True)
        if isinstance(exc, StageError) and exc.traceback:  # where in the user's code
            errors.print("the stage's code, last frames:\n" + exc.traceback, markup=False,
                         highlight=False, soft_wrap=True)
        return exit_code(exc)
    except KeyboardInterrupt:
        errors.print("interrupted")
        return exit_code(KeyboardInterrupt())


def entry() -> None:
    """The console script: exit without tearing the interpreter down once output is
    flushed (pyarrow's teardown costs a fifth of a second and does nothing useful)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args: argparse.Namespace, console) -> int:
    from podpipe.runtime import pod

    return _with_progress(console, args.quiet, lambda observer: pod.run(
        args.spec, overrides=args.set, run_dir=args.run_dir, replicas=args.replicas,
        pod_index=args.pod_index, memory=args.memory, fresh=args.fresh, observer=observer))


def _resume(args: argparse.Namespace, console) -> int:
    from podpipe.runtime import pod, replicas, runs

    args.run_dir = str(runs.resolve(args.run_dir))
    if replicas.is_replicas(args.run_dir):
        return _with_progress(console, args.quiet, lambda observer: replicas.resume(
            args.run_dir, replicas=args.replicas, observer=observer))
    if args.replicas is not None:
        raise UsageError(f"--replicas: {args.run_dir} is the run of one pod; start the "
                         "pipeline again with 'podpipe run SPEC --replicas M' (with "
                         "spec.checkpoints.durable set, its shards resume from there)")
    return _with_progress(console, args.quiet,
                          lambda observer: pod.resume(args.run_dir, observer=observer))


def _plan(args: argparse.Namespace, console) -> int:
    from podpipe import report
    from podpipe.runtime import pod

    planned = pod.plan(args.spec, overrides=args.set, replicas=args.replicas)
    if args.json:
        print(json.dumps(planned, indent=2))
    else:
        console.print(report.plan_table(planned))
    return 0


def _with_progress(console, quiet: bool, start) -> int:
    from podpipe import report

    if quiet:
        final = start(None)
        console.print(f"{final['pipeline']}: {final['state']} in "
                      f"{final['elapsed_seconds']:.1f} s; run directory {final['run_dir']}",
                      highlight=False)
        return 0
    with report.LiveProgress(console) as live:
        try:
            final = start(live)
        except PodpipeError:
            live.progress.stop()
            raise
    for note in final.get("restore_notes", []):
        console.print(f"[yellow]restored:[/] {note}", highlight=False)
    console.print(report.summary(final))
    warning = report.durable_warning(final)
    if warning:
        console.print(f"[yellow]durable:[/] {warning}", highlight=False)
    console.print(f"run directory: {final['run_dir']}")
    return 0


def _status(args: argparse.Namespace, console) -> int:
    from podpipe import report
    from podpipe.runtime import runs, status

    current = status.read(runs.resolve(args.run_dir))
    if args.json:
        print(json.dumps(current, indent=2))
    else:
        console.print(report.status_table(current))
    return 0


def _validate(args: argparse.Namespace, console) -> int:
    from podpipe.runtime import pod

    pipeline = pod.validate(args.spec, args.set)
    console.print(f"{args.spec}: valid pipeline {pipeline.name!r} with "
                  f"{len(pipeline.stages)} stages and {len(pipeline.sinks)} sinks",
                  highlight=False)
    return 0


def _render(args: argparse.Namespace, console) -> int:
    from pathlib import Path

    from podpipe import render
    from podpipe.runtime import pod

    pipeline = pod.validate(args.spec, args.set)
    options = render.Options(
        flavor=args.flavor, replicas=args.replicas, layout=args.layout,
        image=args.image or render.Options.image, storage_class=args.storage_class,
        node_size=args.node_size, host_path=args.host_path, secret=args.secret,
        namespace=args.namespace, overrides=tuple(args.set))
    manifests = render.render(pipeline, Path(args.spec).read_text(), options)
    if args.patch:
        stage, sep, image = args.patch.partition("=")
        if not sep or not stage or not image:
            raise UsageError(f"--patch {args.patch!r}: expected STAGE=IMAGE")
        text = json.dumps(render.image_patch(manifests, stage, image)) + "\n"
    else:
        text = render.dump(manifests)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    from podpipe.runtime import files

    out = Path(args.output)
    try:
        files.publish(out, text)
    except OSError as exc:
        raise UsageError(f"-o {out}: {exc.strerror}") from None
    return 0


def _conductor(args: argparse.Namespace, console) -> int:
    from podpipe.runtime import pod

    return pod.serve(args.spec, overrides=args.set, scratch=args.scratch,
                     run_dir=args.run_dir, layout=args.layout, hold=args.hold,
                     replicas=args.replicas)


def _swap(args: argparse.Namespace, console) -> int:
    import shlex

    from podpipe.runtime import control, protocol

    command = shlex.split(args.new_command) if args.new_command is not None else None
    overrides = control.swap_overrides(args.stage, run=args.run, command=command,
                                       image=args.image, version=args.version)
    if args.k8s:
        return _swap_patch(args)
    for answer in control.swap(args.run_dir, args.stage, overrides, now=args.now,
                               timeout=args.timeout, recompute=args.recompute):
        said = answer.message
        if isinstance(said, protocol.Swapped):
            console.print(f"{answer.run_dir}: stage {args.stage!r} now runs version "
                          f"{said.version} (pid {said.pid})", highlight=False)
        else:
            console.print(f"{answer.run_dir}: not swapped, the pod is {answer.state}",
                          highlight=False)
    return 0


def _apply(args: argparse.Namespace, console) -> int:
    from podpipe.runtime import control, protocol

    for answer in control.apply(args.run_dir, args.new_spec, timeout=args.timeout):
        said = answer.message
        if not isinstance(said, protocol.Applied):
            console.print(f"{answer.run_dir}: not applied, the pod is {answer.state}",
                          highlight=False)
            continue
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", said.added), ("removed", said.removed), ("changed", said.changed))
                 if names]
        console.print(f"{answer.run_dir}: " + ("; ".join(parts) or "no change") +
                      (f"; {said.redo} batches run again from the source for the added "
                       "stages" if said.redo else ""), highlight=False)
    return 0


def _swap_patch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from podpipe import render
    from podpipe.runtime import pod, rundir

    if args.image is None:
        raise UsageError("--k8s: a swap on Kubernetes is an image change; give --image")
    run_dir = Path(args.run_dir)
    recorded = rundir.read(run_dir)
    try:
        spec_text = (run_dir / "spec.yaml").read_text()
    except OSError as exc:
        raise UsageError(f"{run_dir}: not a podpipe run directory ({exc})") from None
    pipeline = pod.validate(str(run_dir / "spec.yaml"), recorded.overrides)
    manifests = render.render(pipeline, spec_text, render.Options())
    sys.stdout.write(json.dumps(render.image_patch(manifests, args.stage, args.image)) + "\n")
    return 0


def _wait(args: argparse.Namespace, console) -> int:
    from podpipe.runtime import runs

    code, final = runs.wait(args.run_dir, args.timeout)
    console.print(f"{final['run_dir']}: {final['state']}" +
                  (f": {final['error']}" if final.get("error") else ""), highlight=False)
    return code


def _runs(args: argparse.Namespace, console) -> int:
    from podpipe import report
    from podpipe.runtime import runs

    found = runs.listing(args.dir)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        console.print(report.runs_table(found, args.dir or str(runs.DEFAULT_RUNS)))
    return 0


def _logs(args: argparse.Namespace, console) -> int:
    from podpipe.runtime import runs

    for line in runs.logs(args.run_dir, args.stage):
        sys.stdout.write(line + "\n")
    return 0


_COMMANDS = {"run": _run, "status": _status, "validate": _validate, "conductor": _conductor,
             "render": _render, "resume": _resume, "plan": _plan, "swap": _swap,
             "apply": _apply, "wait": _wait, "runs": _runs, "logs": _logs}

if __name__ == "__main__":
    entry()
