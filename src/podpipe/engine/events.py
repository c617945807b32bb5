"""What the engine is told (events), what it answers (actions), and the record of
its progress that views read (`Progress`).

The conductor turns what happens in a pod into events and carries out the actions;
each action carries everything needed to carry it out, so the conductor never
looks inside the engine to decide anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from podpipe.errors import InputError, PodpipeError
from podpipe.model.graph import Graph
from podpipe.model.output import Output
from podpipe.model.pipeline import SOURCE

Key = tuple[str, int]  # (node, key): a source batch, a shard, or 0 (global)

# ------------------------------------------------------------------- events


@dataclass(frozen=True)
class AgentReady:
    """A process of the node (its `worker`) connected and said hello."""

    node: str
    worker: int = 0


@dataclass(frozen=True)
class SpaceRequested:
    node: str
    batch: int
    nbytes: int
    worker: int = 0


@dataclass(frozen=True)
class TaskDone:
    node: str
    batch: int
    output: Output | None  # None for sinks
    worker: int = 0
    pinned: tuple[str, ...] = ()  # inputs the stage's code still maps: never overwritten
    busy: float = 0.0  # seconds the task took (not counting a wait for RAM)
    wanted: float | None = None  # of them, seconds it ran or waited for a core


@dataclass(frozen=True)
class TaskFailed:
    node: str
    batch: int
    message: str
    input_error: bool = False  # the data, not the code, is at fault
    traceback: str = ""        # the last frames of the stage's code
    worker: int = 0


SETUP_FAILED = 3  # an agent's exit code: its stage's setup (a class's __init__) raised


@dataclass(frozen=True)
class AgentExited:
    """The node's process exited (`returncode`), or its container disconnected (None)."""

    node: str
    returncode: int | None
    worker: int = 0
    at: float = 0.0  # when (monotonic seconds): deaths close together are one incident

    @property
    def how(self) -> str:
        """How it went, in words."""
        if self.returncode is None:
            return "its container disconnected"
        if self.returncode == SETUP_FAILED:
            return "its setup raised (its log shows where)"
        return f"its process exited (code {self.returncode})"


@dataclass(frozen=True)
class TaskTimedOut:
    """`node` has had `batch` for longer than its `timeout` (`seconds`)."""

    node: str
    batch: int
    seconds: float
    worker: int = 0
    at: float = 0.0  # when (monotonic seconds)


@dataclass(frozen=True)
class AgentBroken:
    """The node's process could not even start its work (the spec, an import)."""

    node: str
    message: str       # what went wrong, for a held stage's status
    error: InputError  # what fails the run, for a stage not swapped
    worker: int = 0


@dataclass(frozen=True)
class Imported:
    """Another pod's output for a shard this pod does not own, which a global reduce
    here reads (handed over through the durable tier)."""

    node: str
    shard: int
    output: Output


@dataclass(frozen=True)
class SwapRequested:
    """A new version of the stage is coming: it gets no new task, and is replaced as
    soon as it is between batches (at once with `now`: its batch is done again).
    With `recompute`, what the old versions made is done again too."""

    node: str
    now: bool = False
    recompute: bool = False


@dataclass(frozen=True)
class VersionChanged:
    """A container came back with another version of `node` (an image updated in
    place, on Kubernetes): it is swapped in — a version that fails is held, and one
    that comes back again (swapped back) takes the stage up again. With `recompute`,
    what the old versions made is done again too."""

    node: str
    recompute: bool = False


@dataclass(frozen=True)
class Recompute:
    """The batches `node` has done were made by a version now replaced: do them again
    (from the source, the one tier that holds every batch's inputs), and everything
    downstream of them, so the outputs are as if the new version had run from the
    start."""

    node: str


@dataclass(frozen=True)
class Reshaped:
    """The pipeline changed while it runs (`podpipe apply`): `graph` is the new one,
    `retries` the restarts its nodes may have. Nodes gone are stopped and dropped
    with their outputs; nodes added run every key of theirs, their inputs made again
    from the source where they are gone; kept nodes whose `workers` differ get them."""

    graph: Graph
    retries: dict[str, int]
    workers: dict[str, int | None] = field(default_factory=dict)  # every node's, from the spec
    node: str = SOURCE  # (every event names a node; this one is about the whole line)


@dataclass(frozen=True)
class Tick:
    """Four times a second, for `workers: auto`: the cores each node's processes
    wanted since the last tick — ran, or were ready to run and waited for a core
    (a process busy all along: 1.0)."""

    cpu: dict[str, float]
    node: str = SOURCE


@dataclass(frozen=True)
class Shared:
    """On a line with `jobs: N`: the bytes of the line's budget the older jobs leave
    this one (what they hold and may still make)."""

    limit: int


@dataclass(frozen=True)
class HandedOver:
    """On a line with `jobs: N`: the processes of `nodes`, which this job has no more
    tasks for (`Ledger.spent`), serve the next job from now on."""

    nodes: frozenset[str]


@dataclass(frozen=True)
class TookOver:
    """On a line with `jobs: N`: the older job handed over `node`'s processes (these
    worker numbers); they say hello for this job next."""

    node: str
    workers: tuple[int, ...]


Event = (AgentReady | SpaceRequested | TaskDone | TaskFailed | AgentExited | TaskTimedOut |
         AgentBroken | Imported | SwapRequested | VersionChanged | Recompute | Reshaped | Tick
         | Shared | HandedOver | TookOver)

# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Dispatch:
    node: str
    batch: int
    inputs: tuple[tuple[Output, ...], ...]  # per input in spec order; all batches for a reduce
    worker: int = 0
    reserved: int = 0  # RAM granted with the task: an output no larger needs no request
    reuse: int | None = None  # a pooled file to write it over (`grants.with_task`)
    kept: bool = False  # its output goes to the node tier (a resume needs it)
    reads_kept: bool = False  # an input does (deleted under mappings: not worth keeping)


@dataclass(frozen=True)
class Grant:
    node: str
    worker: int = 0
    reuse: int | None = None  # a pooled file to write the output over (warm pages)


@dataclass(frozen=True)
class Deny:
    """Refuse a waiting request for RAM: the agent drops its result, the batch is redone."""

    node: str
    worker: int = 0


@dataclass(frozen=True)
class Delete:
    """Delete an output's file. `held`: someone may still map it (a stage's own cache,
    a node-tier copy being made, a reader of what runs once that a recompute undid),
    so its pages stay theirs until they let go; otherwise the file is emptied first
    and its pages go back at once, whoever kept a mapping of it."""

    path: str
    held: bool = False


@dataclass(frozen=True)
class Recycle:
    """An output no one reads any more: keep its file as `pooled` (its pages stay
    in RAM, counted in the budget) for a later output to be written over."""

    path: str
    pooled: int


@dataclass(frozen=True)
class Unpool:
    """Free the pooled file `pooled` (the budget needs its room, or the run ends)."""

    pooled: int


@dataclass(frozen=True)
class Spill:
    """Let `node` write its waiting output for `batch` to the node tier instead of RAM."""

    node: str
    batch: int
    worker: int = 0


@dataclass(frozen=True)
class Keep:
    """A resume would need this output (a reduce reads it, or it runs once): keep a copy
    on the node tier (one that is there already, spilled, is only recorded)."""

    output: Output


@dataclass(frozen=True)
class Restart:
    """Start `node`'s process again after `delay` seconds (its `attempt`-th restart)."""

    node: str
    attempt: int
    delay: float
    worker: int = 0


@dataclass(frozen=True)
class Kill:
    """End `node`'s process now (a task over its timeout); what follows says whether
    it is started again."""

    node: str
    worker: int = 0


@dataclass(frozen=True)
class Replace:
    """A swap happens now: stop `node`'s process (`kill`: it is mid-batch, its result is
    never used) and start the new version's. Each worker of the stage is replaced
    on its own, as it comes between batches."""

    node: str
    kill: bool
    worker: int = 0


@dataclass(frozen=True)
class Stop:
    """`node` left the pipeline (an apply): stop its processes for good."""

    node: str
    kill: bool


@dataclass(frozen=True)
class Hold:
    """A swapped-in version failed: stop its processes (every worker's); the stage
    waits for another swap."""

    node: str
    message: str


@dataclass(frozen=True)
class Forget:
    """What `node` made for `key` no longer stands (a recompute): drop its records."""

    node: str
    key: int


@dataclass(frozen=True)
class Finished:
    pass


@dataclass(frozen=True)
class Failed:
    error: PodpipeError


@dataclass(frozen=True)
class AddWorker:
    """`workers: auto` gives `node` another process, `worker`."""

    node: str
    worker: int


@dataclass(frozen=True)
class RemoveWorker:
    """`workers: auto` takes `node`'s idle process `worker` back (another node needs
    the core): stop it for good."""

    node: str
    worker: int


Action = (Dispatch | Grant | Deny | Delete | Recycle | Unpool | Spill | Keep | Restart | Kill |
          Replace | Stop | Hold | Forget | Finished | Failed | AddWorker | RemoveWorker)


# -- what views read (`Ledger.progress`) ---------------------------------------------


@dataclass(frozen=True)
class NodeProgress:
    done: int
    total: int
    restarts: int
    workers: int
    workers_max: int
    queued: int
    in_flight: int
    held: str | None
    tier: str | None  # a table, once loaded: where it is


@dataclass(frozen=True)
class Progress:
    """What the run looks like now, for views: made by `Ledger.progress`."""

    scratch: int        # bytes of RAM scratch in use
    peak: int           # the most in use so far
    recent_peak: int    # the most in use since the previous record
    budget: int
    spills: int
    on_line: int        # source batches on the line
    nodes: dict[str, NodeProgress]
    shards_here: list[int]
    waiting_for: list[int]

    @property
    def queued(self) -> dict[str, int]:
        return {n: p.queued for n, p in self.nodes.items()}

    @property
    def workers(self) -> dict[str, int]:
        return {n: p.workers for n, p in self.nodes.items()}
