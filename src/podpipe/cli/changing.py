"""Changing or looking into a running run (or a line's running job): `swap`, `apply`,
`peek`, `shadow` and `promote` — their flags (`add`, called by `cli.arguments`) and
what each does (called by `cli`): one library function (`runtime.runs.control`)
and its result shown.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from podpipe.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console


def batch_number(text: str) -> int:
    """A batch number or a count of rows: 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return value


def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The commands' parsers, on the command line's subparsers."""
    swap = sub.add_parser(
        "swap", help="swap a stage's version in a running run (or on a standing line)",
        description="Replace STAGE's process in the running run at RUN_DIR by a new "
                    "version: it finishes its batch (--now: abandons it, to be redone), "
                    "the new version takes the later batches. The conductor, the other "
                    "stages and the data in RAM stay. A new version that fails holds the "
                    "stage (the run waits): swap back to go on. On a standing line, the "
                    "running job's from its next batch and every later job's; between "
                    "jobs, from the next job on.")
    swap.add_argument("run_dir", metavar="RUN_DIR",
                      help="a run directory, 'latest', or a line")
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

    peek = sub.add_parser(
        "peek", help="print a stage's output for a batch while the run goes",
        description="Ask the running run's conductor to lend a stage's output (the "
                    "newest batch it holds, or --batch N) and print its first rows, its "
                    "schema, or write it to a Parquet file. The file is read through an "
                    "open descriptor the conductor hands over: the run may delete it "
                    "meanwhile, never change it under the reader.")
    peek.add_argument("run_dir", metavar="RUN_DIR",
                      help="a run directory (a job's too), 'latest', or a line (its running "
                           "job)")
    peek.add_argument("stage", metavar="STAGE")
    peek.add_argument("--batch", type=batch_number, metavar="N",
                      help="which batch (default: the newest the pod holds)")
    peek.add_argument("--head", type=batch_number, default=20, metavar="ROWS",
                      help="how many rows to print (default 20)")
    shown = peek.add_mutually_exclusive_group()
    shown.add_argument("--schema", action="store_true", help="print its schema, not rows")
    shown.add_argument("--to", metavar="FILE.parquet", help="write the batch to a Parquet file")

    apply = sub.add_parser(
        "apply", help="have a running run go on with a changed spec",
        description="Compare the running pipeline with NEW_SPEC (stages and sinks, by "
                    "name): start the added ones (they get every batch; where their "
                    "inputs are gone from RAM, the batch runs again from the source), "
                    "stop the removed ones, swap the changed ones, leave the rest "
                    "running. Refuses what a running run cannot take (a changed source, "
                    "a rewired stage), saying why.")
    apply.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or 'latest'")
    apply.add_argument("new_spec", metavar="NEW_SPEC")
    apply.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")

    shadow = sub.add_parser(
        "shadow", help="run a candidate version of a stage beside it, comparing outputs",
        description="Start a candidate version of STAGE in the running run (or a line's "
                    "running job) as one more process that takes every batch the stage "
                    "makes (or every Nth), reads the same inputs from RAM and compares its "
                    "output with the live one: schema, rows, contents; where they differ, "
                    "which columns, how many rows, the largest differences, a few rows. "
                    "Its output goes nowhere; it never slows or fails the run (it runs at "
                    "a lower priority, skips batches when behind or short of RAM). "
                    "Without --run/--command: show how it compared; --stop drops it; "
                    "'podpipe promote' makes it live. On a line, the candidate runs beside "
                    "every later job too, until --stop (between jobs as well).")
    shadow.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory (a job's too), 'latest', or a line (its "
                             "running job)")
    shadow.add_argument("stage", metavar="STAGE")
    what = shadow.add_mutually_exclusive_group()
    what.add_argument("--run", metavar="MODULE:CALLABLE", help="the candidate: a Python "
                                                               "function or class")
    what.add_argument("--command", dest="new_command", metavar="COMMAND",
                      help="the candidate: an executable and its arguments, one string")
    what.add_argument("--image", metavar="IMAGE",
                      help="the candidate: an image (a pod of containers: the conductor "
                           "awaits its container; 'podpipe render ... --shadow STAGE=IMAGE' "
                           "prints the patch that adds it)")
    what.add_argument("--stop", action="store_true", help="drop the stage's candidate")
    what.add_argument("--json", action="store_true", help="show the comparison as JSON")
    what.add_argument("--watch", action="store_true",
                      help="show the comparison, updated, until the run ends")
    shadow.add_argument("--version", metavar="V",
                        help="the candidate's version name (default: a digest of its code)")
    shadow.add_argument("--every", type=batch_number, default=1, metavar="N",
                        help="offer it every Nth batch the stage makes (default 1: all)")
    shadow.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the candidate to come up (default 60)")

    promote = sub.add_parser(
        "promote", help="make a stage's candidate (podpipe shadow) its live version",
        description="Swap STAGE to its candidate from the next batch, as 'podpipe swap' "
                    "would, recording how it compared; the candidate stops.")
    promote.add_argument("run_dir", metavar="RUN_DIR",
                         help="a run directory, 'latest', or a line (its running job)")
    promote.add_argument("stage", metavar="STAGE")
    promote.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                         help="how long to wait for the in-flight batch (default 300)")


def peek(args: argparse.Namespace, console: Console) -> int:
    from podpipe.console import plural, printable, rows_table
    from podpipe.runtime.runs import control

    table, lent = control.peek(args.run_dir, args.stage, args.batch)
    where = {"ram": "pod RAM", "node": "the node tier"}.get(lent.tier, lent.tier)
    about = (f"stage {lent.stage!r}, batch {lent.batch}: {plural(table.num_rows, 'row')}, "
             f"version {lent.version or '?'}, from {where}")
    if args.to is not None:
        from pathlib import Path

        import pyarrow.parquet as pq

        from podpipe.runtime.plumbing import files

        with files.publishing(Path(args.to)) as tmp:  # whole, or not at all
            pq.write_table(table, tmp)
        console.print(f"{printable(about)} → {printable(args.to)}", highlight=False)
    elif args.schema:
        console.print(printable(about), highlight=False)
        console.print(printable(table.schema.to_string(show_schema_metadata=False)),
                      highlight=False, markup=False)
    else:
        console.print(printable(about), highlight=False)
        shown, left_out = rows_table(table, args.head, console.width)
        console.print(shown)
        if left_out:
            console.print(printable(f"({plural(len(left_out), 'more column')}: "
                                    f"{', '.join(left_out)}; --schema lists every column)"),
                          highlight=False)
    return 0


def swap(args: argparse.Namespace, console: Console) -> int:
    import shlex

    from podpipe.runtime.runs import control

    from podpipe.runtime.plumbing import protocol

    command = shlex.split(args.new_command) if args.new_command is not None else None
    overrides = control.swap_overrides(args.stage, run=args.run, command=command,
                                       image=args.image, version=args.version)
    if args.k8s:
        from podpipe.cli import kubernetes

        return kubernetes.swap_patch(args)
    for answer in control.swap(args.run_dir, args.stage, overrides, now=args.now,
                               timeout=args.timeout, recompute=args.recompute):
        said = answer.message
        if isinstance(said, protocol.Swapped) and said.pending and answer.line:
            console.print(f"{answer.run_dir}: stage {args.stage!r} is swapped from the "
                          "line's next job on", highlight=False)
        elif isinstance(said, protocol.Swapped) and said.pending:  # a pod's container
            console.print(f"{answer.run_dir}: stage {args.stage!r} takes its new version "
                          "when its container comes back with the image (update it in "
                          "place: 'podpipe swap ... --k8s' prints the patch)" +
                          ("; what the old version made is done again then"
                           if args.recompute else ""), highlight=False)
        elif isinstance(said, protocol.Swapped):
            console.print(f"{answer.run_dir}: stage {args.stage!r} now runs version "
                          f"{said.version} (pid {said.pid})", highlight=False)
        else:
            console.print(f"{answer.run_dir}: not swapped, the pod is {answer.state}",
                          highlight=False)
    return 0


def apply(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.runs import control
    from podpipe.runtime.plumbing import protocol

    for answer in control.apply(args.run_dir, args.new_spec, timeout=args.timeout):
        said = answer.message
        if not isinstance(said, protocol.Applied):
            console.print(f"{answer.run_dir}: not applied, the pod is {answer.state}",
                          highlight=False)
            continue
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", said.added), ("removed", said.removed), ("changed", said.changed),
                  ("resized", said.resized)) if names]
        console.print(f"{answer.run_dir}: " + ("; ".join(parts) or "no change") +
                      (f"; {said.redo} batches run again from the source for the added "
                       "stages" if said.redo else ""), highlight=False)
    return 0


def shadow(args: argparse.Namespace, console: Console) -> int:
    import shlex

    from podpipe.runtime.plumbing import protocol
    from podpipe.runtime.runs import control

    if args.run is None and args.new_command is None and args.image is None and not args.stop:
        return _shown(args, console)
    overrides = [] if args.stop else control.swap_overrides(
        args.stage, run=args.run, image=args.image, version=args.version,
        command=shlex.split(args.new_command) if args.new_command is not None else None)
    if args.every < 1:
        raise UsageError("--every: expected 1 or more, got 0")
    request = protocol.ShadowRequest(stage=args.stage, overrides=overrides,
                                     every=args.every, stop=args.stop)
    for answer in control.shadow(args.run_dir, request, timeout=args.timeout):
        said = answer.message
        if isinstance(said, protocol.Shadowing) and said.stopped:
            console.print(f"{answer.run_dir}: the candidate of {args.stage!r} is stopped",
                          highlight=False)
        elif isinstance(said, protocol.Shadowing) and said.pending:
            console.print(f"{answer.run_dir}: the conductor awaits the candidate's "
                          "container: add it to the pod ('podpipe render ... --shadow "
                          f"{args.stage}={args.image}' prints the patch)", highlight=False,
                          soft_wrap=True)
        elif isinstance(said, protocol.Shadowing):
            console.print(f"{answer.run_dir}: candidate version {said.version} of "
                          f"{args.stage!r} runs beside it (pid {said.pid}); see how it "
                          f"compares: podpipe shadow {args.run_dir} {args.stage}",
                          highlight=False, soft_wrap=True)
        else:
            console.print(f"{answer.run_dir}: no candidate, the pod is {answer.state}",
                          highlight=False)
    return 0


def _shown(args: argparse.Namespace, console: Console) -> int:
    """`podpipe shadow RUN STAGE`: how the stage's candidate compared (`--watch`: until
    the run ends)."""
    import time

    from rich.text import Text

    from podpipe import console as terminal
    from podpipe.runtime.rundir import status
    from podpipe.runtime.runs import following as runs, lines

    if lines.is_line(args.run_dir):
        raise UsageError("show a line's candidate by its job: podpipe shadow JOB_DIR "
                         f"{args.stage} ('podpipe status {args.run_dir}' names the running "
                         "job's directory)")
    path = runs.resolve(args.run_dir)
    current = status.read(path)
    if args.stage not in current.stages:
        raise UsageError(f"no stage {args.stage!r} in {path}; its nodes are "
                         f"{', '.join(current.stages)}")
    if current.stages[args.stage].shadow is None:
        raise UsageError(f"stage {args.stage!r} has had no candidate in {path} (start one: "
                         f"podpipe shadow {args.run_dir} {args.stage} --run MODULE:CALLABLE)")
    if args.json:
        print(json.dumps(status.plain(current)["stages"][args.stage]["shadow"], indent=2))
        return 0

    def shown() -> Text:
        stage = current.stages[args.stage]
        assert stage.shadow is not None
        return Text("\n".join(terminal.shadow_lines(args.stage, stage.shadow,
                                                     stage.batches_done)))
    if not args.watch:
        console.print(shown())
        return 0
    from rich.live import Live

    with Live(shown(), console=console, auto_refresh=False) as live:
        while current.state == "running":
            time.sleep(terminal.WATCH_SECONDS)
            current = status.read(path)
            live.update(shown(), refresh=True)
    return 0


def promote(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.plumbing import protocol
    from podpipe.runtime.runs import control

    for answer in control.promote(args.run_dir, args.stage, timeout=args.timeout):
        said = answer.message
        if isinstance(said, protocol.Swapped) and said.pending:  # a pod's container
            console.print(f"{answer.run_dir}: stage {args.stage!r} takes its candidate's "
                          "image when its container comes back with it (update it in "
                          "place: 'podpipe swap ... --image IMAGE --k8s' prints the patch)",
                          highlight=False, soft_wrap=True)
        elif isinstance(said, protocol.Swapped):
            console.print(f"{answer.run_dir}: stage {args.stage!r} now runs its candidate, "
                          f"version {said.version} (pid {said.pid})", highlight=False)
        else:
            console.print(f"{answer.run_dir}: not promoted, the pod is {answer.state}",
                          highlight=False)
    return 0
