"""A pipeline as data: the frozen records a parsed spec becomes (`model.spec` parses).

Every layer above the model sees these types only, never YAML or dicts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

SOURCE = "source"
# A node's name becomes a process name, a directory in scratch and on the node tier
# and, on Kubernetes, a container name: so it must be a DNS-1123 label.
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DEFAULT_RETRIES = 3  # restarts of a stage process that dies, before the run fails


@dataclass(frozen=True)
class Resources:
    """What one stage process needs besides the RAM scratch (Kubernetes requests)."""

    cpu: str | None = None       # a Kubernetes CPU quantity: "2", "0.5", "500m"
    memory: int | None = None    # bytes of the process's own memory
    gpu: int | None = None       # whole GPUs each worker has to itself (nvidia.com/gpu)


@dataclass(frozen=True)
class Source:
    uri: str
    format: str
    batch_rows: int
    columns: tuple[str, ...] | None = None
    workers: int | None = None    # processes loading batches; None: auto


@dataclass(frozen=True)
class Policy:
    """How a stage's failures and outputs are judged."""

    retries: int = DEFAULT_RETRIES  # deaths of its processes retried before the run fails
    timeout: float | None = None  # seconds a batch may take; over it, the process dies
    schema: str = "fixed"         # "any": its output schema may change between batches


@dataclass(frozen=True)
class Command:
    """A `command:` stage's executable: started per batch, or once per worker and
    served its batches on stdin (`serve`)."""

    argv: tuple[str, ...]
    serve: bool = False


@dataclass(frozen=True)
class Call:
    """A call stage's service: each batch is POSTed in slices, every answer kept."""

    url: str                       # $(ENV) expanded by the stage's process
    format: str = "arrow"          # arrow: Arrow IPC streams; json: arrays of row objects
    rows_per_request: int = 1000
    concurrency: int = 8           # requests in flight, over all the stage's workers
    rate_limit: float | None = None  # requests per second, at most
    timeout: float = 10.0          # seconds per request
    retries: int = 5               # on connection errors, timeouts, 429 and 5xx
    headers: dict[str, str] = field(default_factory=dict)
    memo_key: tuple[str, ...] = ()  # headers that tell requests apart (with the body)
    echo: tuple[str, ...] = ()     # request columns each answer carries back, checked
    memo: bool = True              # keep every answer; never send a request twice


@dataclass(frozen=True)
class Table:
    """A side input: loaded into the pod's RAM once, read whole by every task of the
    stages that list it among their inputs."""

    name: str
    uri: str
    format: str
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    run: str | None = None
    command: Command | None = None
    call: Call | None = None
    reduce: str | None = None    # a reduce's scope: "shard" (each shard's batches) | "global"
    version: str | None = None
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    policy: Policy = Policy()
    workers: int | None = None    # processes taking its batches; None: auto (1 for a reduce)
    params: dict[str, Any] = field(default_factory=dict)  # a Python stage's keyword arguments
    setup_inputs: tuple[str, ...] = ()  # tables handed to a class's setup (the last inputs)


@dataclass(frozen=True)
class Sink:
    name: str
    input: str
    uri: str
    mode: str = "error"  # error: refuse stale part files; overwrite: replace at success
    workers: int | None = None


@dataclass(frozen=True)
class Checkpoints:
    """Where run directories go, the durable tier and how often it is written."""

    node: str = ".podpipe"
    durable: str | None = None
    every_batches: int | None = None
    interval: float = 30.0
    keep: int = 3
    reuse: bool = False  # keep every stage output on the durable tier, by what made it
    required: bool = False  # a run whose last checkpoint failed fails


CONTAINER_CPUS = 2.0  # a `workers: auto` container's cores on Kubernetes, unless `cpus`


@dataclass(frozen=True)
class Pipeline:
    name: str
    source: Source
    stages: tuple[Stage, ...]
    sinks: tuple[Sink, ...]
    memory: int
    checkpoints: Checkpoints
    shards: int = 1
    cpus: float | None = None  # what `workers: auto` may use; None: what this process may
    gpus: int | None = None    # the pod's GPUs; None: those visible to it
    determinism: str = "warn"  # a batch made again with other bytes: warn, fail or off
    tables: tuple[Table, ...] = ()
    jobs: int = 1  # a standing line's jobs at once (a run is one)
    file: str = "spec"
    document: Any = field(default=None, repr=False, compare=False)  # as parsed, overridden

    @property
    def container_cpus(self) -> float:
        """What a `workers: auto` node's container may grow to on Kubernetes (its CPU
        limit, as rendered), and what auto shares among them there: `cpus`, else
        CONTAINER_CPUS (the conductor cannot see the node's cores from its container)."""
        return self.cpus or CONTAINER_CPUS

    def workers(self, node: str) -> int | None:
        """`node`'s fixed number of workers, None for auto (a reduce, a table: 1)."""
        if node == SOURCE:
            return self.source.workers
        if any(t.name == node for t in self.tables):
            return 1
        for target in self.sinks:
            if target.name == node:
                return target.workers
        stage = self.stage(node)
        if stage.call is not None:  # two by default, each half the concurrency: the
            return stage.workers or min(2, stage.call.concurrency)  # end of one batch's
                                                                    # requests overlaps
                                                                    # the next batch's
        return 1 if stage.reduce else stage.workers

    def gpu_slots(self, devices: Sequence[str]) -> dict[str, list[tuple[str, ...]]]:
        """Each GPU stage's device sets, one per worker that gets devices (a worker
        beyond them gets none): `resources.gpu` devices each, none shared. Stages
        with a fixed `workers` take theirs first, in spec order; `auto` ones share
        the rest evenly (at least one set each while any is left)."""
        free = list(devices)
        slots: dict[str, list[tuple[str, ...]]] = {}
        wanting = [s for s in self.stages if s.resources.gpu]
        auto = [s for s in wanting if s.workers is None and not s.reduce]
        fixed = [s for s in wanting if s not in auto]
        for index, stage in enumerate(fixed + auto):
            per = stage.resources.gpu or 1
            if stage in fixed:
                count = min(1 if stage.reduce else stage.workers or 1, len(free) // per)
            else:  # what is left, split among the auto stages still to come
                share = len(free) // (len(wanting) - index)
                count = max(min(1, len(free) // per), share // per)
            slots[stage.name] = [tuple(free[i * per:(i + 1) * per]) for i in range(count)]
            free = free[count * per:]
        return slots

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def table(self, name: str) -> Table:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)
