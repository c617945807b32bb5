"""The standing line's commands: `up`, `submit`, `down`, `lines`, and `status LINE`.

Each calls one library function (`runtime.runs.line` is the line's own process,
`runtime.runs.lines` the requests sent to it) and shows its result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from podpipe.errors import RunError, UsageError

if TYPE_CHECKING:
    from rich.console import Console



def up(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.runs import line, lines, pod, upkeep

    pipeline = pod.validate(args.spec, args.set)  # a bad spec: exit 2 before anything
    path = lines.place(pipeline, args.name)
    name = path.name
    if args.metrics_port:
        from podpipe.runtime.conductor.metrics import address

        address(args.metrics_port)  # a clear error before anything starts
    start = line.Start(path, args.spec, args.set, name, args.metrics_port)
    if args.foreground:
        def show() -> None:
            console.print(f"line {name} is up: {path}; submit with 'podpipe submit "
                          f"{path} --set source.uri=...'; Ctrl-C ends it",
                          highlight=False, soft_wrap=True)
        return upkeep.supervise(start, upkeep.Ready(args.ready_fd, show))
    upkeep.detach(start)
    console.print(f"line {name} is up: {path}\nsubmit a job: podpipe submit {path} "
                  f"--set source.uri=...\nend it:       podpipe down {path}",
                  highlight=False, soft_wrap=True)
    return 0


def submit(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.runs import lines

    if args.job is not None:
        lines.check_job_id(args.job)
    if args.k8s:
        return _submit_k8s(args)
    return _follow(lines.submit(args.line, args.set, wait=args.wait, job=args.job), console)


def _submit_k8s(args: argparse.Namespace) -> int:
    """`submit --k8s`: print the commands that submit one job to every pod."""
    import shlex

    from podpipe import render
    from podpipe.model.pipeline import NAME
    from podpipe.runtime.runs import lines

    if not NAME.match(args.line):
        raise UsageError(f"--k8s: LINE {args.line!r} is the rendered pipeline's name (its "
                         "StatefulSet's), a DNS label")
    lines.job_overrides(args.set)
    job = args.job or lines.job_id(args.line)
    for argv in render.submit_commands(args.line, args.replicas, job, args.set,
                                       namespace=args.namespace, wait=args.wait):
        print(shlex.join(argv))
    return 0


def resume(run_dir: str, line: str, console: Console) -> int:
    """`podpipe resume JOB` while the job's line is up: back on the line, waited for."""
    from podpipe.runtime.runs import lines

    return _follow(lines.submit(line, [], wait=True, resume=Path(run_dir)), console)


def _follow(answers: Iterator[Any], console: Console) -> int:
    """Show a job's `Submitted` and, if waited for, its end; exit as it did."""
    from podpipe.runtime.plumbing import protocol
    from podpipe.runtime.runs import following

    for answer in answers:
        if isinstance(answer, protocol.Submitted):
            ahead = f" ({answer.ahead} ahead of it)" if answer.ahead else ""
            console.print(f"{answer.job}{ahead}\nrun directory: {answer.run_dir}",
                          highlight=False, soft_wrap=True)
            sys.stdout.flush()
        elif isinstance(answer, protocol.JobOver):
            if answer.state == "failed":
                raise RunError(f"job {answer.job} failed: {answer.error}")
            console.print(f"{answer.job}: {answer.state}" +
                          (f": {answer.error}" if answer.error else ""), highlight=False,
                          soft_wrap=True)
            return following.EXIT_CODES.get(answer.state, 1)
    return 0


def down(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.plumbing import protocol
    from podpipe.runtime.runs import lines

    record = lines.read(lines.home(args.line))
    answer = lines.ask(args.line, protocol.DownRequest())
    assert isinstance(answer, protocol.Downed)
    if not lines.gone(record, args.timeout):
        raise RunError(f"line {record.name}: still up after {args.timeout:g} s "
                       f"(pid {record.pid})")
    said = [f"line {record.name} is down"]
    if answer.stopped:
        said.append(f"stopped job {answer.stopped[0]} (resumable: 'podpipe resume "
                    "RUN_DIR')")
    if answer.dropped:
        said.append(f"{len(answer.dropped)} queued job(s) did not run; they stay queued "
                    "for the line's next 'up'")
    console.print("; ".join(said), highlight=False, soft_wrap=True)
    return 0


def listed(args: argparse.Namespace, console: Console) -> int:
    from podpipe import console as terminal
    from podpipe.runtime.runs import lines

    found = lines.listing(args.dir)
    if args.json:
        import msgspec

        print(json.dumps([{"dir": str(p), **msgspec.to_builtins(r)} for p, r in found],
                         indent=2))
    else:
        console.print(terminal.lines_table(found, args.dir or str(lines.lines_dir())))
    return 0


def status(args: argparse.Namespace, console: Console) -> int:
    from podpipe import console as terminal
    from podpipe.runtime.runs import lines

    path = lines.home(args.run_dir)

    def now() -> lines.LineRecord:
        record = lines.read(path)
        if not record.up:
            record.state = "starting" if lines.coming_up(record) else "down"
        return record
    record = now()
    if args.json:
        import msgspec

        print(json.dumps({"dir": str(path), **msgspec.to_builtins(record)}, indent=2))
    elif args.watch:  # until the line is down (or Ctrl-C)
        import time

        from rich.live import Live

        with Live(terminal.line_table(record, str(path)), console=console,
                  auto_refresh=False) as live:
            while record.state != "down":
                time.sleep(terminal.WATCH_SECONDS)
                record = now()
                live.update(terminal.line_table(record, str(path)), refresh=True)
    else:
        console.print(terminal.line_table(record, str(path)))
    return 0
