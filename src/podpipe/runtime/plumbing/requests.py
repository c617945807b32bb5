"""What commands ask of a running run or a standing line, and its answers: the
messages of `podpipe swap`, `apply`, `peek`, `shadow` and `promote` to a conductor,
and of `submit`, `resume`, `wait`, `stop` and `down` to a line. Part of the wire's
one union (`protocol.Message`); the agents' own messages are in `protocol`."""

from __future__ import annotations

from podpipe.runtime.plumbing.message import Tagged


# -- podpipe swap / apply / peek / shadow / promote <-> a conductor --------------------


class SwapRequest(Tagged, tag="swap"):
    stage: str
    overrides: list[str]
    now: bool = False
    recompute: bool = False


class ApplyRequest(Tagged, tag="apply"):
    spec: str   # the new spec's text
    path: str   # the user's file, to name in messages
    run: str = ""  # the run it is for (a line's job: its id), if named


class Swapped(Tagged, tag="swapped"):
    stage: str
    version: str
    pid: int
    pending: bool = False  # a standing line between jobs: from its next job on


class Held(Tagged, tag="held"):
    stage: str
    message: str


class Applied(Tagged, tag="applied"):
    added: list[str]
    removed: list[str]
    changed: list[str]
    redo: int  # source batches that run down the line again
    resized: list[str] = []  # nodes whose workers changed


class Refused(Tagged, tag="refused"):
    message: str


class PeekRequest(Tagged, tag="peek"):
    """`podpipe peek`: lend me a stage's output (`batch`, else its newest held)."""
    stage: str
    batch: int | None = None
    run: str = ""  # the run it is for (a line's job: its id), if named


class Lent(Tagged, tag="lent"):
    """The output lent: its file comes with this message, open (`send_fd`)."""
    stage: str
    batch: int
    rows: int
    tier: str
    version: str | None = None


class ShadowRequest(Tagged, tag="shadow"):
    """`podpipe shadow`: run a candidate of `stage` (its `overrides`) beside it on
    every `every`th batch it takes; with `stop`, drop the stage's candidate."""
    stage: str
    overrides: list[str] = []
    every: int = 1
    stop: bool = False


class Shadowing(Tagged, tag="shadowing"):
    """The candidate is up (`version`, its process `pid`); with `stopped`, gone; with
    `pending`, awaited (a pod of containers: its container is added to the pod)."""
    stage: str
    version: str = ""
    pid: int = 0
    stopped: bool = False
    pending: bool = False


class PromoteRequest(Tagged, tag="promote"):
    """`podpipe promote`: the stage's candidate goes live from the next batch (a swap:
    answered `Swapped`, `Held` or `Refused`)."""
    stage: str


# -- podpipe submit / down / status <-> a standing line -------------------------------


class SubmitRequest(Tagged, tag="submit"):
    overrides: list[str]  # the job's --set, after the line's (paths: from the line's cwd)
    wait: bool = False    # answer again (`JobOver`) once the job is over
    job: str | None = None  # its id (the same on every pod of a rendered line), else new


class Submitted(Tagged, tag="submitted"):
    job: str      # its id
    run_dir: str  # its run directory
    ahead: int    # jobs before it in the queue (the running one counted)


class ResumeRequest(Tagged, tag="resume"):
    """Put a failed or stopped job of the line back on it (answered `Submitted`)."""

    run_dir: str
    wait: bool = False    # answer again (`JobOver`) once the job is over


class JobRequest(Tagged, tag="job_request"):
    """Answer `JobOver` once the job at `run_dir` is over; with `stop`, stop it first."""

    run_dir: str
    stop: bool = False


class JobOver(Tagged, tag="job_over"):
    job: str
    run_dir: str
    state: str  # succeeded, failed, interrupted
    error: str | None = None


class DownRequest(Tagged, tag="down"):
    pass


class Downed(Tagged, tag="downed"):
    dropped: list[str]  # the queued jobs that did not run (resumable)
    stopped: list[str]  # the running job, stopped (resumable)
