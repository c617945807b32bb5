"""The `podpipe` command: each command calls one library function and shows its result.

What may be typed (commands, flags, their help) is `cli.arguments`. Exit codes
(errors.py): 0 success, 1 the run failed, 2 invalid input, 130 interrupted.

Reading this module, top to bottom: `main` (a pod's own commands, `agent` and
`probe`, first and without rich; then every other command through `_COMMANDS`,
its errors shown one way); then one function per command, in the order of the
table at the end: running (`_run`, `_resume`, `_plan`, with `_with_progress`),
reading a run (`_status`, `_stop`, `_wait`, `_runs`, `_logs`, `_report`),
`_validate`. Changing or looking into a running run (`swap`, `apply`, `peek`,
`shadow`, `promote`) is `cli.changing`; a standing line's commands are
`cli.standing`; Kubernetes' (`render`, `conductor`, a swap's patch) `cli.kubernetes`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import TYPE_CHECKING, Callable

from podpipe.cli import changing, kubernetes, standing
from podpipe.cli.arguments import parser
from podpipe.errors import PodpipeError, StageError, UsageError, exit_code

if TYPE_CHECKING:  # imported where used: `podpipe run` forks its fork server first thing
    from rich.console import Console

    from podpipe.runtime.rundir.status import Status



def main(argv: list[str] | None = None) -> int:
    # numpy's OpenBLAS keeps its idle threads spinning for about 0.1 s of CPU after
    # it loads, in every process that imports numpy (pyarrow and pandas do): on a pod
    # of few cores that is taken from the run's start (Q1 at 5,000-row batches: 7%
    # slower). They sleep when idle instead; a setting of the user's wins.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    args = parser().parse_args(argv)
    _log_settings(args)
    if args.command == "agent":  # a stage process: keep its start light, no rich
        from podpipe.runtime.plumbing import protocol
        from podpipe.runtime.stage import agent

        if protocol.shadow_of(args.node):  # a stage's candidate (`podpipe shadow`)
            from podpipe.runtime.stage import shadow

            return shadow.serve(args.spec, args.set, args.node, args.socket, wait=args.wait)

        def serve() -> int:
            return agent.serve(args.spec, args.set, args.node, args.socket, hold=args.hold,
                               wait=args.wait)
        if args.workers == 1 and not args.restart:
            return serve()
        from podpipe.runtime.stage import container

        if args.workers is None:  # auto: one, and what the conductor asks for
            return container.supervise(1, serve, container.Auto.of(
                args.spec, args.set, args.node, args.socket, args.wait))
        return container.supervise(args.workers, serve)
    if args.command == "probe":
        from podpipe.runtime.plumbing import sockets

        return 0 if sockets.probe(args.socket, agent=args.agent) else 1
    args.server = None
    if args.command == "run":  # its fork server imports pyarrow while the spec is read
        from podpipe.runtime.runs.launcher import warm

        args.server = warm()
    from rich.console import Console
    from rich.text import Text

    from podpipe.console import printable

    # Markup off: what a message says (a path, a stage's error) is shown as text.
    console, errors = Console(markup=False), Console(stderr=True, markup=False)

    def warn(message: Warning | str, *_: object, **__: object) -> None:
        errors.print(Text.assemble(("warning:", "yellow"), " ", printable(str(message))),
                     highlight=False, soft_wrap=True)
    warnings.showwarning = warn
    try:
        return _COMMANDS[args.command](args, console)
    except BrokenPipeError:  # `podpipe plan --json | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PodpipeError as exc:
        errors.print(Text.assemble(("error:", "bold red"), " ", printable(str(exc))),
                     highlight=False, soft_wrap=True)
        if isinstance(exc, StageError) and exc.traceback:  # where in the user's code
            errors.print("the stage's code, last frames:\n" + printable(exc.traceback),
                         highlight=False, soft_wrap=True)
        return exit_code(exc)
    except KeyboardInterrupt:
        errors.print("interrupted")
        return exit_code(KeyboardInterrupt())
    finally:
        if args.server is not None:  # unless the run took it
            args.server.close()


def entry() -> None:
    """The console script: exit without tearing the interpreter down once output is
    flushed (pyarrow's teardown costs a fifth of a second and does nothing useful)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.runs import pod

    return _with_progress(console, args.quiet, lambda observer: pod.run(
        args.spec, overrides=args.set, run_dir=args.run_dir, replicas=args.replicas,
        pod_index=args.pod_index, memory=args.memory, fresh=args.fresh, observer=observer,
        metrics=args.metrics_port, metrics_linger=args.metrics_linger, server=args.server))


def _log_settings(args: argparse.Namespace) -> None:
    """The log flags, for this process and every process of the run (inherited)."""
    from podpipe.runtime.plumbing import logline

    level = getattr(args, "log_level", None) or (
        "debug" if getattr(args, "verbose", False) else None)
    if level:
        os.environ[logline.LEVEL_ENV] = level
    if getattr(args, "log_format", None):
        os.environ[logline.FORMAT_ENV] = args.log_format


def _resume(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from podpipe.runtime.runs import lines, pod, replicas, following as runs

    args.run_dir = str(runs.resolve(args.run_dir))
    line = lines.job_line(Path(args.run_dir))
    if line is not None and lines.serving(line):  # a line's job: back on its line
        return standing.resume(args.run_dir, line, console)
    if replicas.is_replicas(args.run_dir):
        return _with_progress(console, args.quiet, lambda observer: replicas.resume(
            args.run_dir, replicas=args.replicas, observer=observer,
            accept_changed_source=args.accept_changed_source))
    if args.replicas is not None:
        raise UsageError(f"--replicas: {args.run_dir} is the run of one pod; start the "
                         "pipeline again with 'podpipe run SPEC --replicas M' (with "
                         "spec.checkpoints.durable set, its shards resume from there)")
    return _with_progress(console, args.quiet, lambda observer: pod.resume(
        args.run_dir, observer=observer, accept_changed_source=args.accept_changed_source))


def _plan(args: argparse.Namespace, console: Console) -> int:
    from podpipe import console as terminal
    from podpipe.runtime.runs import planning

    if args.cpus is not None and args.measured is None:
        raise UsageError("--cpus: needs --from RUN_DIR, a finished run whose busy time per "
                         "node the split is computed from")
    planned = planning.plan(args.spec, overrides=args.set, replicas=args.replicas)
    if args.cpus is not None:
        planned["cores"] = planning.cores(args.spec, args.cpus, args.measured, overrides=args.set)
    if args.json:
        print(json.dumps(planned, indent=2))
        return 0
    console.print(terminal.plan_table(planned))
    if "cores" in planned:
        console.print(terminal.cores_table(planned["cores"]))
    return 0


def _with_progress(console: Console, quiet: bool,
                   start: Callable[[Callable[[Status], None] | None], Status]) -> int:
    from rich.text import Text

    from podpipe import console as terminal
    from podpipe.console import printable

    if quiet:
        final = start(None)
        console.print(f"{final.pipeline}: {final.state} in "
                      f"{final.elapsed_seconds:.1f} s; run directory {final.run_dir}",
                      highlight=False, soft_wrap=True)
        return 0
    with terminal.LiveProgress(console) as live:
        try:
            final = start(live)
        except PodpipeError:
            live.stop()
            raise
    resumed = terminal.resumed(final)
    if resumed:
        console.print(Text.assemble(("resumed:", "yellow"), " ", printable(resumed)),
                      highlight=False, soft_wrap=True)
    console.print(terminal.summary(final))
    for line in terminal.calls(final):
        console.print(f"calls: {line}", highlight=False)
    for name, out in final.sinks.items():
        console.print(f"{name}: wrote {terminal.plural(out.files, 'file')}, "
                      f"{terminal.plural(out.rows, 'row')} → {out.uri}", highlight=False)
    warning = terminal.durable_warning(final)
    if warning:
        console.print(Text.assemble(("durable:", "yellow"), " ", printable(warning)),
                      highlight=False)
    for line in terminal.nondeterministic(final):
        console.print(Text.assemble(("warning:", "yellow"), " ", printable(line)),
                      highlight=False)
    console.print(f"run directory: {final.run_dir}")
    return 0


def _status(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.runs import lines

    if lines.is_line(args.run_dir):
        return standing.status(args, console)
    from podpipe import console as terminal
    from podpipe.runtime.runs import following as runs
    from podpipe.runtime.rundir import status

    path = runs.resolve(args.run_dir)
    current = status.read(path)
    if args.json:
        print(json.dumps(status.plain(current), indent=2))
    elif args.watch:
        import time

        from rich.live import Live

        with Live(terminal.status_table(current), console=console, auto_refresh=False) as live:
            while current.state == "running":
                time.sleep(terminal.WATCH_SECONDS)
                current = status.read(path)
                live.update(terminal.status_table(current), refresh=True)
        return runs.EXIT_CODES.get(current.state, 1)  # as `wait`: the run has ended
    else:
        console.print(terminal.status_table(current))
    return 0


def _stop(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.runs import following as runs

    code, final = runs.stop(args.run_dir, args.timeout)
    if code == runs.TIMED_OUT:
        console.print(f"{final.run_dir}: asked to stop; still running after "
                      f"{args.timeout:g} s", highlight=False)
        return code
    console.print(f"{final.run_dir}: {final.state}; finish it with 'podpipe resume "
                  f"{final.run_dir}'" if final.state == "interrupted" else
                  f"{final.run_dir}: {final.state}", highlight=False, soft_wrap=True)
    return 0


def _validate(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.runs import pod

    pipeline = pod.validate(args.spec, args.set,
                            import_seconds=None if args.no_import else args.import_timeout)
    from podpipe.console import plural

    console.print(f"{args.spec}: valid pipeline {pipeline.name!r} with "
                  f"{plural(len(pipeline.stages), 'stage')} and "
                  f"{plural(len(pipeline.sinks), 'sink')}", highlight=False, soft_wrap=True)
    return 0


def _verify(args: argparse.Namespace, console: Console) -> int:
    from podpipe.console import plural
    from podpipe.runtime.runs import verify

    verdicts = verify.verify(args.run_dir, stage=args.stage, batches=args.batches,
                             timeout=args.timeout)
    differed = False
    for stage in dict.fromkeys(v.stage for v in verdicts):
        mine = [v for v in verdicts if v.stage == stage]
        same, other = [v for v in mine if v.same], [v for v in mine if v.same is False]
        skipped = [v for v in mine if v.same is None]
        differed |= bool(other)
        said = [f"other bytes on {plural(len(other), 'batch')} (" + "; ".join(
            f"{v.batch}: {v.why}" for v in other) + ")"] if other else []
        said += [f"the same bytes on {plural(len(same), 'batch')}"] if same else []
        said += [f"{len(skipped)} not compared ("
                 + "; ".join(sorted({v.why for v in skipped})) + ")"] if skipped else []
        console.print(f"stage {stage!r}: {', '.join(said)}", highlight=False, soft_wrap=True)
    return 1 if differed else 0


def _wait(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.runs import following as runs

    code, final = runs.wait(args.run_dir, args.timeout)
    console.print(f"{final.run_dir}: {final.state}" +
                  (f": {final.error}" if final.error else ""), highlight=False)
    return code


def _runs(args: argparse.Namespace, console: Console) -> int:
    from podpipe import console as terminal
    from podpipe.runtime.runs import following as runs

    found = runs.listing(args.dir)
    if args.json:
        import msgspec

        print(json.dumps(msgspec.to_builtins(found), indent=2))
    else:
        console.print(terminal.runs_table(found, args.dir or str(runs.DEFAULT_RUNS)))
    return 0


def _logs(args: argparse.Namespace, console: Console) -> int:
    from podpipe.runtime.runs import following as runs

    from podpipe.console import printable

    shown = printable if sys.stdout.isatty() else str  # (the log files keep the bytes)
    for line in runs.logs(args.run_dir, args.stage, batch=args.batch, follow=args.follow):
        sys.stdout.write(shown(line) + "\n")
        if args.follow:
            sys.stdout.flush()
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from podpipe import report, trace
    from podpipe.runtime.plumbing import files
    from podpipe.runtime.runs import following as runs

    run_dir = runs.resolve(args.run_dir)
    if args.format == "html":
        text = report.page(run_dir)
    else:
        text = json.dumps(trace.chrome_trace(run_dir)) + "\n"
    out = Path(args.output) if args.output else \
        run_dir / ("report.html" if args.format == "html" else "trace.json")
    try:
        files.publish(out, text)
    except OSError as exc:
        raise UsageError(f"-o {out}: {exc.strerror}") from None
    console.print(f"wrote {out}", highlight=False, soft_wrap=True)
    return 0


_COMMANDS = {"run": _run, "status": _status, "validate": _validate,
             "conductor": kubernetes.conductor, "render": kubernetes.render, "resume": _resume,
             "plan": _plan, "swap": changing.swap, "apply": changing.apply, "peek": changing.peek,
             "shadow": changing.shadow, "promote": changing.promote, "verify": _verify,
             "wait": _wait,
             "stop": _stop, "report": _report, "runs": _runs, "logs": _logs,
             "up": standing.up, "submit": standing.submit, "down": standing.down,
             "lines": standing.listed}
