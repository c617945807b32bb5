"""The command line as a user types it: every command, its flags and their help.

Kept true to docs/cli.md and the README's CLI at a glance; `cli` dispatches what is parsed here.
"""

from __future__ import annotations

import argparse
import os

from podpipe import __version__
from podpipe.cli import changing


def _seconds(text: str) -> float:
    """A flag's seconds: a number from 0 to an hour."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 3600, got {text!r}")
    return value


def _workers(text: str) -> int | None:
    """An agent's --workers: a count, or auto (None)."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, or auto, got {text!r}")
    return int(text)


def _logging() -> argparse.ArgumentParser:
    """The log flags of the commands that run a pipeline (`runtime.plumbing.logline`)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="podpipe's lines in the run's logs at this level and above "
                            "(default info, which `logs --batch` needs; a stage's own "
                            "output is always kept)")
    flags.add_argument("-v", "--verbose", action="store_true", help="--log-level debug")
    flags.add_argument("--log-format", choices=["text", "json"],
                       help="text (default), or one JSON object a line (time, level, "
                            "message, run, stage, worker, batch) for log collectors")
    return flags


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podpipe",
        description="Run a pipeline as a pod: stage processes that hand Arrow batches to "
                    "each other through shared memory.",
        epilog="exit codes: 0 success, 1 the run failed, 2 invalid input, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"podpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    log_flags = _logging()
    run = sub.add_parser("run", help="run a pipeline to the end", parents=[log_flags],
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
    run.add_argument("-q", "--quiet", action="store_true",
                     help="no progress, no summary: one line with the outcome")
    run.add_argument("--metrics-port", metavar="[ADDR:]PORT",
                     default=os.environ.get("PODPIPE_METRICS_PORT"),
                     help="serve Prometheus metrics there while the run goes (default "
                          "$PODPIPE_METRICS_PORT; a bare PORT listens on loopback)")
    run.add_argument("--metrics-linger", type=_seconds, metavar="SECONDS",
                     default=os.environ.get("PODPIPE_METRICS_LINGER", "0"),
                     help="with --metrics-port: keep serving the final values this long "
                          "after the run ends, for a scrape to see them (default "
                          "$PODPIPE_METRICS_LINGER, else 0; 15 for a 15 s scrape)")

    resume = sub.add_parser(
        "resume", help="finish a run whose conductor died or whose pod was lost",
        parents=[log_flags],
        description="Finish the run in RUN_DIR from what survived it: outputs still in its "
                    "RAM scratch, else on the node tier (checked by checksum), else "
                    "computed again. Batches whose results were kept are not run again.")
    resume.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or 'latest'")
    resume.add_argument("--replicas", type=int, metavar="M",
                        help="a run of several replicas: resume with M of them (rescale); "
                             "shards that move resume from their durable checkpoints")
    resume.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    resume.add_argument("--accept-changed-source", action="store_true",
                        help="the source's files changed since the run started (refused "
                             "otherwise): redo the whole run from the new source")

    plan = sub.add_parser(
        "plan", help="show which pod runs which shards and how many bytes it pulls",
        description="Plan the source (file footers only; no stage runs) and show, per "
                    "replica, the shards it owns, its batches and the source bytes it "
                    "reads (compressed, of the columns the spec reads).")
    plan.add_argument("spec", metavar="SPEC")
    plan.add_argument("--replicas", type=int, default=1, metavar="N")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--json", action="store_true", help="one JSON object")
    plan.add_argument("--cpus", type=float, metavar="C",
                      help="also say how C cores would be split among the nodes (workers "
                           "each) and the throughput that predicts; needs --from")
    plan.add_argument("--from", dest="measured", metavar="RUN_DIR",
                      help="a finished run of the pipeline whose busy time per node "
                           "(per batch) the split is computed from")

    status = sub.add_parser("status", help="show a run's (or a line's) state, processes and "
                                           "progress",
                            description="Show the run in RUN_DIR (or 'latest') as its "
                                        "status file says it is now; exit 0 if it could "
                                        "be read. With --watch, keep showing it until the "
                                        "run ends, then exit as the run did (as 'wait'). "
                                        "Given a standing line (its name or directory): "
                                        "its warm processes, queue and recent jobs.")
    status.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory, 'latest', or a line")
    status.add_argument("--json", action="store_true",
                        help="one JSON object: state, scratch, processes, stages")
    status.add_argument("-w", "--watch", action="store_true",
                        help="keep showing it, updated, until the run ends; then exit as "
                             "the run did: 0, 1, 130")

    stop = sub.add_parser("stop", help="stop a running run, resumable (as Ctrl-C does)",
                          description="Stop the run in RUN_DIR (or 'latest') as Ctrl-C "
                                      "would: in-flight batches are abandoned, finished "
                                      "ones stay, and 'podpipe resume RUN_DIR' finishes "
                                      "it. Waits until it has stopped.")
    stop.add_argument("run_dir", metavar="RUN_DIR")
    stop.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                      help="how long to wait for it to stop (default 60)")

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

    logs = sub.add_parser("logs", help="print a run's logs in time order, each line "
                                       "prefixed by its process",
                          description="Print the logs of the run in RUN_DIR (or 'latest'): "
                                      "every process's merged in time order, or STAGE's "
                                      "only.")
    logs.add_argument("run_dir", metavar="RUN_DIR")
    logs.add_argument("stage", metavar="STAGE", nargs="?")
    logs.add_argument("--batch", type=int, metavar="N",
                      help="only what concerns source batch N: each stage's lines for its "
                           "task, the conductor's lines naming it")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new lines until the run ends")

    report = sub.add_parser(
        "report", help="write where a run's time went as one HTML page (or a Chrome trace)",
        description="Write the report of the run in RUN_DIR (or 'latest'), finished or "
                    "running: the graph coloured by how busy each node was, a timeline "
                    "of every task, RAM scratch over time, a table per node and the "
                    "bottleneck. One self-contained HTML file (no network), or the "
                    "timeline as a Chrome trace (opens in Perfetto).")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("-o", "--output", metavar="FILE",
                        help="where to write it (default RUN_DIR/report.html, or "
                             "RUN_DIR/trace.json)")
    report.add_argument("--format", choices=("html", "chrome-trace"), default="html")

    up = sub.add_parser(
        "up", help="start a standing line: a pod that stays up, warm, and takes jobs",
        parents=[log_flags],
        description="Start the pipeline as a standing line: every stage's processes "
                    "started once (imports done) and kept warm; then jobs ('podpipe "
                    "submit') run on it one after another, each with its own run "
                    "directory (with 'jobs: N' in the spec, up to N at once: the next "
                    "job starts on each station the one before is done with). Returns "
                    "once the line is warm (or runs it in the "
                    "terminal with --foreground; Ctrl-C ends it). The line lives in "
                    "CHECKPOINTS_NODE/lines/NAME.")
    up.add_argument("spec", metavar="SPEC", help="pipeline spec (YAML)")
    up.add_argument("--name", metavar="LINE", help="the line's name (default: the "
                    "pipeline's)")
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a spec field for the whole line (repeatable)")
    up.add_argument("--foreground", action="store_true",
                    help="run the line in this terminal until Ctrl-C or 'podpipe down'")
    up.add_argument("--metrics-port", metavar="[ADDR:]PORT",
                    help="serve Prometheus metrics there for the line's life: the running "
                         "job's series (label podpipe_job) and the line's jobs by state")
    up.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    submit = sub.add_parser(
        "submit", help="put a job on a standing line; print its id",
        description="Queue one pass of a dataset through the line LINE (a name under "
                    ".podpipe/lines, or a line's directory). A job may set its data "
                    "only: source.uri, source.columns, source.batchRows, source.format, "
                    "sinks.NAME.uri, sinks.NAME.mode, stages.NAME.env.VAR (relative "
                    "paths resolve from the line's working directory). Its run "
                    "directory works with status, logs, wait, stop, report and resume.")
    submit.add_argument("line", metavar="LINE")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="the job's data, e.g. source.uri=data/2026-12-06/*.parquet "
                             "(repeatable)")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the job to end; exit as it did: 0, 1, 130")
    submit.add_argument("--job", metavar="ID",
                        help="the job's id (its run directory's name; used once), else a "
                             "new one")
    submit.add_argument("--k8s", action="store_true",
                        help="print instead the commands that submit the job to every pod "
                             "of the line rendered with 'render --standing' as LINE (the "
                             "pipeline's name): kubectl exec POD -- podpipe submit ...")
    submit.add_argument("--replicas", type=int, default=1, metavar="N",
                        help="with --k8s: the StatefulSet's replicas (default 1)")
    submit.add_argument("--namespace", metavar="NS", help="with --k8s: the pods' namespace")

    down = sub.add_parser("down", help="end a standing line",
                          description="End the line LINE: its running job is stopped "
                                      "(resumable), queued jobs stay queued for its next "
                                      "'up', every process ends and its RAM scratch goes.")
    down.add_argument("line", metavar="LINE")
    down.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                      help="how long to wait for it to end (default 60)")

    lines = sub.add_parser("lines", help="list this user's standing lines")
    lines.add_argument("--dir", metavar="DIR", help="another lines directory "
                       "(CHECKPOINTS_NODE/lines)")
    lines.add_argument("--json", action="store_true", help="one JSON list")

    validate = sub.add_parser("validate", help="check a spec without running it, its "
                              "run: targets imported in a child process")
    validate.add_argument("spec", metavar="SPEC")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument("--no-import", action="store_true",
                          help="do not import the run: targets (fields and graph only)")
    validate.add_argument("--import-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                          help="how long importing the run: targets may take (default 60)")

    changing.add(sub)  # swap, peek, apply, shadow, promote

    verify = sub.add_parser(
        "verify", help="make a finished run's batches again and compare each stage's bytes",
        description="Make K of the finished run's source batches (spread over the "
                    "run) again from the source, stage after stage, in a throwaway process, "
                    "and compare each output's checksum with what the run made: a stage "
                    "that gives other bytes of the same batch is not deterministic (a "
                    "resume would not give what a clean run does). Reduces, call stages, "
                    "stages reading a table and sinks are not made again. Exit 1 when a "
                    "stage gave other bytes or raised.")
    verify.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or 'latest'")
    verify.add_argument("--stage", metavar="STAGE", help="report this stage only")
    verify.add_argument("--batches", type=int, default=3, metavar="K",
                        help="how many batches to make again (default 3)")
    verify.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="how long making them may take (default 600)")

    render = sub.add_parser(
        "render", help="print Kubernetes manifests that run the pipeline as a StatefulSet",
        description="Print a ConfigMap (the spec), a headless Service and a StatefulSet "
                    "whose pods run the pipeline: the conductor as a native sidecar, one "
                    "container per stage, the RAM scratch as a memory-backed emptyDir.")
    render.add_argument("spec", metavar="SPEC")
    render.add_argument("--flavor", choices=("kubernetes", "openkruise", "job"),
                        default="kubernetes",
                        help="apps/v1 StatefulSet, OpenKruise's Advanced StatefulSet "
                             "(in-place image updates), or an Indexed Job: a one-shot run "
                             "that completes (kubectl wait --for=condition=complete), or "
                             "fails without retrying a stage's failure")
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
    render.add_argument("--data-claim", metavar="CLAIM",
                        help="mount this PersistentVolumeClaim at /data, where the spec's "
                             "relative paths resolve (read-write for sinks, read-only for "
                             "the rest); a spec with local paths needs it or --data-host-path")
    render.add_argument("--data-host-path", metavar="DIR",
                        help="mount the node's DIR at /data instead of a claim")
    render.add_argument("--kube-version", default="1.34", metavar="MAJOR.MINOR",
                        help="the cluster's Kubernetes (default 1.34): from 1.34 the pod's "
                             "memory is sized at the pod level, the RAM scratch counted once")
    render.add_argument("--log-format", choices=["text", "json"],
                        help="every container's log lines: json for a cluster's collector")
    render.add_argument("--secret", metavar="NAME",
                        help="a Secret whose keys become every container's env "
                             "(object-store credentials)")
    render.add_argument("--namespace", metavar="NS")
    render.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="the conductor serves Prometheus metrics on this port of the "
                             "pod (a containerPort named 'metrics')")
    render.add_argument("--pod-monitor", action="store_true",
                        help="with --metrics-port: add a PodMonitor (Prometheus Operator) "
                             "that scrapes every pod of the pipeline")
    render.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field in every process of the pod")
    render.add_argument("--standing", action="store_true",
                        help="each pod is a standing line that takes jobs ('podpipe submit "
                             "--k8s' prints the commands) instead of running the spec once")
    patches = render.add_mutually_exclusive_group()
    patches.add_argument("--patch", metavar="STAGE=IMAGE",
                         help="print instead the JSON patch that swaps STAGE's image "
                              "(kubectl patch --type json; OpenKruise applies it in place)")
    patches.add_argument("--shadow", metavar="STAGE=IMAGE",
                         help="print instead the patch that adds a candidate of STAGE in "
                              "IMAGE to a running pod, beside the stage (kubectl patch pod "
                              "POD --subresource ephemeralcontainers; after 'podpipe "
                              "shadow RUN STAGE --image IMAGE' in the pod)")
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
    agent.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                       help="run the node's N workers in this container (its "
                            "`workers: N`), each restarted if it fails; auto: one, and more "
                            "as the conductor asks, up to the container's CPU limit")
    agent.add_argument("--restart", action="store_true",
                       help="restart a worker that dies even when it is the only one (a "
                            "Job's pod: the kubelet does not restart its containers); the "
                            "container ends with the run: 0, or 1 if it failed")

    conductor = sub.add_parser("conductor", help="(internal) the conductor of a pod on "
                                                 "Kubernetes: a native sidecar's command",
                               parents=[log_flags])
    conductor.add_argument("--spec", required=True)
    conductor.add_argument("--scratch", required=True, metavar="DIR",
                           help="the pod's memory-backed volume")
    conductor.add_argument("--run-dir", metavar="DIR",
                           help="the run directory, on the node tier (not with --standing)")
    conductor.add_argument("--standing", action="store_true",
                           help="run no job of its own: the pod is a standing line, named "
                                "as the pipeline, taking jobs from 'podpipe submit' inside "
                                "the pod until SIGTERM")
    conductor.add_argument("--layout", choices=("containers", "processes"),
                           default="containers",
                           help="containers: the kubelet starts one agent container per "
                                "stage; processes: this process starts them")
    conductor.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    conductor.add_argument("--replicas", type=int, default=1, metavar="N",
                           help="the StatefulSet's replicas; the ordinal is $POD_INDEX")
    conductor.add_argument("--metrics-port", metavar="[ADDR:]PORT",
                           help="serve Prometheus metrics there")
    conductor.add_argument("--no-hold", dest="hold", action="store_false",
                           help="exit when the run is over instead of staying up")
    conductor.add_argument("--once", action="store_true",
                           help="a Job's pod: the run is not resumed once it has failed; "
                                "the agents are told how it ended (and exit 0, or 1)")

    probe = sub.add_parser("probe", help="(internal) exit 0 if a conductor answers on SOCKET")
    probe.add_argument("socket", metavar="SOCKET")
    probe.add_argument("--agent", metavar="NAME",
                       help="and the agent NAME (a node, or node.N) is connected to it")
    return parser
