"""The wire between a pod's processes: typed messages, length-prefixed, over Unix sockets.

Only metadata crosses it (stage, batch, paths, sizes, checksums), never data. Every
message is a record of one tagged union, encoded as JSON by msgspec and validated
as it is decoded: a peer that sends a field of the wrong type, or an unknown
message, is refused at the socket (`ProtocolError`), not deep in the conductor.
msgspec because it does exactly this (typed structs, tagged unions, validation
while decoding) in one well-kept dependency, several times faster than json plus
hand-written checks, and its structs are also the records of the journal, the
manifests and the engine (`model.output.Output`).

    agent -> conductor   Hello(node, version, pid, protocol, spec) | Broken(node, message, field)
    conductor -> agent   Task(batch, inputs, output, source?, memo?, versions?)
    agent -> conductor   Reserve(batch, nbytes)          before writing its output
    conductor -> agent   Grant(path?, tier) | Deny       Deny: drop the result
    agent -> conductor   Done(batch, output?, stats) | Failed(batch, message, input_error)
                         (stats.setup: a class set up at this task, its setupInputs come)
    conductor -> agent   Stop | Job(spec, overrides, log, keep): a standing line's next
                         job, answered by a new Hello for its spec
    auto container       Supervising(node, most), then conductor -> it: Fork(worker) |
                         Shrink(worker) (`workers: auto` in a container on Kubernetes)
    probe -> conductor   Probe, answered Ready (or Stop once the run is over); with an
                         `agent`, Ready(connected=False) until that agent is connected
    podpipe swap/apply   SwapRequest | ApplyRequest, answered Swapped | Held | Applied | Refused
    podpipe peek         PeekRequest, answered Lent with the output's open file
                         (`send_fds`: SCM_RIGHTS), or Refused
    podpipe shadow       ShadowRequest, answered Shadowing (or Refused); PromoteRequest as
                         a swap. The candidate's process (`shadow_name`) says Hello, takes
                         ShadowTask (its inputs' and the live output's files, open) and
                         answers Compared | Failed
    submit/resume/wait/stop/down -> a standing line   SubmitRequest | ResumeRequest,
                         answered Submitted (and JobOver when the job ends, if asked);
                         JobRequest answered JobOver; DownRequest answered Downed
    conductor <-> fork server   LogTo once; Spawn -> Spawned, and Exited when a child ends

Reading it, top to bottom: the framing's constants and agent names; the messages,
grouped by who speaks (agent and conductor; a shadow; the fork server; what commands
ask, in `requests`) and the `Message` union; then encoding, `send_fds`/`recv_fds` (a
message with file descriptors) and `Reader` (a stream cut into messages). The
sockets they go over: `plumbing.sockets`.

`Hello.protocol` is the version of this wire: a conductor refuses an agent of
another one (a container image of another podpipe release).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import msgspec

from podpipe.model.batch import SourceBatch
from podpipe.model.output import Output
from podpipe.runtime.plumbing.message import Tagged
from podpipe.runtime.plumbing.requests import (Applied as Applied, ApplyRequest as ApplyRequest,
                                               Downed as Downed, DownRequest as DownRequest,
                                               Held as Held, JobOver as JobOver,
                                               JobRequest as JobRequest, Lent as Lent,
                                               PeekRequest as PeekRequest,
                                               PromoteRequest as PromoteRequest,
                                               Refused as Refused,
                                               ResumeRequest as ResumeRequest,
                                               Shadowing as Shadowing,
                                               ShadowRequest as ShadowRequest,
                                               SubmitRequest as SubmitRequest,
                                               Submitted as Submitted, Swapped as Swapped,
                                               SwapRequest as SwapRequest)

PROTOCOL = 8  # 1: untyped JSON dicts (podpipe 0.1); 2: no fixed schema; 3: no sink staging
# token; 4: no standing line (Job, the spec in Hello); 5: no auto containers (Supervising,
# Fork, Shrink), no Stop.failed, no SubmitRequest.job; 6: no Stats.setup; 7: no shadows
_HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 << 20


WORKER_ENV = "PODPIPE_WORKER"  # which of its node's processes an agent is (0 if unset)
CONTAINER_ENV = "PODPIPE_CONTAINER"  # set in a node's own container (as rendered)


SHADOW = "@shadow"  # a stage's candidate's process: `prices@shadow` (`shadow_name`)


def shadow_name(node: str) -> str:
    return node + SHADOW


def shadow_of(name: str) -> str | None:
    """The stage whose candidate the process `name` is; None if it is not one."""
    return name[:-len(SHADOW)] if name.endswith(SHADOW) else None


def agent_name(node: str, worker: int) -> str:
    """The name of a node's process `worker`: `prices` (worker 0), `prices.1`, ...
    (a node's name has no dot). Its log is `<name>.log`."""
    return node if worker == 0 else f"{node}.{worker}"


def split_name(name: str) -> tuple[str, int]:
    node, _, worker = name.partition(".")
    return node, int(worker or 0)


class Closed(Exception):
    """The peer closed the connection."""


class ProtocolError(Closed):
    """The peer sent something that is not a message of this protocol."""


_Message = Tagged


# -- agent <-> conductor ------------------------------------------------------------


class Hello(_Message, tag="hello"):
    node: str
    version: str
    pid: int
    protocol: int = PROTOCOL
    worker: int = 0  # which of the node's processes (`workers`)
    spec: str = ""   # the spec it serves (on a standing line: the job's)
    setup: float = 0.0  # seconds a class stage took to set up (0: none, or kept)


class Broken(_Message, tag="broken"):
    """The agent could not start its work: the user's input (spec field, import)."""

    node: str
    message: str
    field: str | None = None
    worker: int = 0


class Task(_Message, tag="task"):
    batch: int
    inputs: list[list[str]]          # per input, its files (all batches for a reduce)
    output: str                      # where the output goes in RAM scratch
    source: SourceBatch | None = None  # for the source: which rows of which file
    memo: str | None = None          # reuse across runs: where this output is kept
    versions: dict[str, list[str]] | None = None  # for sinks: the versions behind it
    answers: str | None = None       # a call stage: the folder of answers kept
    staging: str = ""                # a sink: the run's token (`sink.Writer`)
    granted: int = 0                 # RAM granted with the task: an output no larger is
    reuse: str | None = None         # written at once (over this warm file), unasked
    checksum: bool = True            # hash the output: a copy of it is checked by that
    keep_mapped: bool = False        # keep the inputs mapped: their files are recycled
    schema: bytes | None = None      # a `schema: fixed` stage: the run's schema for it,
    schema_batch: int = -1           # (Arrow, serialized) fixed by this batch's output


class Reserve(_Message, tag="reserve"):
    batch: int
    nbytes: int


class Grant(_Message, tag="grant"):
    path: str | None = None  # elsewhere than the task's output: a spill
    tier: str = "ram"
    reuse: str | None = None  # a freed output's file to write over (its pages are warm)


class Deny(_Message, tag="deny"):
    pass


class CallStats(msgspec.Struct, forbid_unknown_fields=True):
    """What a call stage's requests did in one task."""

    requests: int = 0
    memo_hits: int = 0
    retries: int = 0
    failures: int = 0
    in_flight_max: int = 0
    latencies: list[float] = []


class Stats(msgspec.Struct, forbid_unknown_fields=True):
    rows_in: int = 0
    rows_out: int = 0
    bytes_out: int = 0
    busy: float = 0.0
    wanted: float | None = None  # of `busy`, the seconds it ran or waited for a core
    reused: int = 0
    calls: CallStats | None = None
    setup: float = 0.0  # seconds of it a class stage's setup took (its setupInputs came)


class Calling(_Message, tag="calling"):
    """A call stage's requests in flight now (sent while its task runs, 4 times a
    second at most)."""

    in_flight: int


class Done(_Message, tag="done"):
    batch: int
    output: Output | None
    stats: Stats
    pinned: list[str] = []  # inputs the stage's code still holds: not to be written over
    schema: bytes | None = None  # a `schema: fixed` stage's output schema, while the
                                 # task carried none (the run's is not fixed yet)


class Failed(_Message, tag="failed"):
    batch: int
    message: str
    input_error: bool = False
    traceback: str = ""  # the last frames of the stage's own code, for the user
    calls: CallStats | None = None  # a call stage: what its requests did before failing


class Stop(_Message, tag="stop"):
    failed: bool = False  # the run failed: the agent exits 1 (a Job's pod fails with it)


class Supervising(_Message, tag="supervising"):
    """A `workers: auto` node's container (`podpipe agent --workers auto`): it starts
    the node's workers the conductor asks for (`Fork`), up to `most`, and ends those it
    takes back (`Shrink`)."""

    node: str
    most: int


class Fork(_Message, tag="fork"):
    worker: int  # start it: its agent says hello


class Shrink(_Message, tag="shrink"):
    worker: int  # end it (told to stop, it is not started again)


class Job(_Message, tag="job"):
    """A standing line's next job: serve this spec from now on (a warm process keeps
    its imports), logging to `log`; the agent says hello again for it."""

    spec: str
    overrides: list[str]
    log: str
    run: str  # the job's run directory
    keep: bool = False  # the node's definition is the job before's: keep what is set up


class ShadowTask(_Message, tag="shadow_task"):
    """A batch for a stage's candidate (`podpipe shadow`): its inputs' files come with
    it, open (`send_fds`): `groups[i]` descriptors for input i, then the live output's
    last. `output`: where a command writes (removed once compared)."""

    batch: int
    groups: list[int]
    output: str


class Differing(msgspec.Struct, forbid_unknown_fields=True):
    """A column where the candidate's output differs from the live one's."""

    name: str
    rows: int                      # rows where it differs
    max_abs: float | None = None   # numeric: the largest |live - candidate|
    max_rel: float | None = None   # ... over the larger of the two magnitudes


class Comparison(msgspec.Struct, forbid_unknown_fields=True):
    """A candidate's output against the live one's for one batch (`data.compare`)."""

    equal: bool
    live_rows: int
    rows: int
    schema: str = ""  # how the schemas differ ("": they do not)
    rows_differing: int = 0  # rows where any common column differs (same row count)
    columns: list[Differing] = []
    examples: list[dict[str, Any]] = []  # a few differing rows: {"row": i, column:
                                         # [live, candidate], ...}

    def said(self) -> str:
        """How the candidate's output differs from the live one, in a sentence."""
        parts = [f"the schema differs ({self.schema})"] if self.schema else []
        if self.rows != self.live_rows:
            parts.append(f"{self.rows:,} rows where the live version made {self.live_rows:,}")
        if self.columns:
            parts.append(f"{self.rows_differing:,} of {self.live_rows:,} rows differ, in "
                         + ", ".join(f"{d.name} ({d.rows:,} rows"
                                     + (f", max abs {d.max_abs:.3g}" if d.max_abs is not None
                                        else "")
                                     + (f", max rel {d.max_rel:.3g}" if d.max_rel is not None
                                        else "") + ")" for d in self.columns))
        return "; ".join(parts) or "the contents differ"


class Compared(_Message, tag="compared"):
    batch: int
    comparison: Comparison
    seconds: float = 0.0  # the candidate's time on the batch


class Probe(_Message, tag="probe"):
    agent: str | None = None  # is this agent (`node`, `node.N`) connected? None: the conductor up


class Ready(_Message, tag="ready"):
    connected: bool = True


# -- conductor <-> fork server ------------------------------------------------------


class LogTo(_Message, tag="log_to"):
    path: str  # the fork server's own log, once the run directory exists


class Spawn(_Message, tag="spawn"):
    node: str
    spec: str
    overrides: list[str]
    socket: str
    env: dict[str, str]
    log: str
    cwd: str
    name: str = ""       # the agent's (`agent_name`), echoed in the answer
    early: bool = False  # needs only what every stage imports (not pandas): forked
                         # as soon as those are in, before the fork server's pandas


class Spawned(_Message, tag="spawned"):
    pid: int
    name: str = ""  # the Spawn's


class Exited(_Message, tag="exited"):
    pid: int
    code: int


Message = (Hello | Broken | Task | Reserve | Grant | Deny | Calling | Done | Failed | Stop | Job |
           Supervising | Fork | Shrink | Probe | Ready | SwapRequest | ApplyRequest | Swapped |
           Held | Applied | Refused | SubmitRequest | Submitted | ResumeRequest | JobRequest |
           JobOver | DownRequest | Downed | LogTo | Spawn | Spawned | Exited | PeekRequest |
           Lent | ShadowRequest | Shadowing | PromoteRequest | ShadowTask | Compared)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def encode(message: Message) -> bytes:
    body = _encoder.encode(message)
    return _HEADER.pack(len(body)) + body


def decode(body: bytes | bytearray | memoryview) -> Message:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"not a podpipe message: {exc}") from None


def send(sock: socket.socket, message: Message) -> None:
    sock.sendall(encode(message))


MOST_FDS = 200  # descriptors with one message (the kernel's limit: 253)


def send_fds(sock: socket.socket, message: Message, fds: list[int]) -> None:
    """`message` with open file descriptors (SCM_RIGHTS): the peer holds the files
    whatever happens to their names afterwards."""
    data = encode(message)
    sent = socket.send_fds(sock, [data], fds)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_fds(sock: socket.socket, most: int = MOST_FDS) -> tuple[Message, list[int]]:
    """A message and the descriptors sent with it, if any (`send_fds`)."""
    head, fds, _, _ = socket.recv_fds(sock, _HEADER.size, most)
    if not head:
        raise Closed("connection closed")
    head += _recv_exactly(sock, _HEADER.size - len(head))
    (size,) = _HEADER.unpack(head)
    if size > MAX_MESSAGE:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(f"message of {size} bytes is larger than {MAX_MESSAGE}")
    try:
        return decode(_recv_exactly(sock, size)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def recv(sock: socket.socket) -> Message:
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if size > MAX_MESSAGE:
        raise ProtocolError(f"message of {size} bytes is larger than {MAX_MESSAGE}")
    return decode(_recv_exactly(sock, size))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise Closed("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Reader:
    """Incremental decoder for a non-blocking socket in an event loop."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_MESSAGE:
                raise ProtocolError(f"message of {size} bytes is larger than {MAX_MESSAGE}")
            end = _HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(decode(memoryview(self._buffer)[_HEADER.size:end]))
            del self._buffer[:end]
        return messages
