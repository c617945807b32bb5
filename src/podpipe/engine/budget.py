"""The RAM budget, and the line of batches it paces.

An agent asks for the exact bytes of its output before writing it and waits for a
grant, so scratch never exceeds the budget (`take`, `give`, `fits`). Bytes are
counted in whole pages, as tmpfs holds them: a run of many small outputs would
otherwise overrun the budget by up to a page a file. New source
batches are admitted only while the batches already on the line, at the largest
footprint seen so far, still fit (`has_room`: backpressure). When that estimate
proves too low (later batches are larger) and the line stops for lack of RAM, the
newest batch on the line is given up (`victim`, `give_up`) and run again from the
source later; the footprint is raised so that the line holds no more batches than
it did. What still cannot move spills to the node tier (the state machine decides
which output).
"""

from __future__ import annotations

import mmap
from collections import deque

from podpipe.engine.events import Action, Unpool

POOL_FILES = 16  # warm files kept at most
PAGE = mmap.PAGESIZE  # what a file takes of tmpfs, at the least
EXPECT = 4  # a node's next output is expected to be no larger than its last EXPECT
WARM_USE = 2  # a warm file is written over by an output of at least 1/WARM_USE of it


def pages(nbytes: int) -> int:
    """`nbytes` rounded up to whole pages: what a file of that size takes of tmpfs."""
    return -(-nbytes // PAGE) * PAGE


class Budget:
    def __init__(self, limit: int, per_batch_nodes: int) -> None:
        self.limit = limit       # what this run may use (a line's job: what is left it)
        self.whole = limit       # the RAM budget
        self.per_batch_nodes = per_batch_nodes  # tasks a batch has on the line
        self.usage = 0           # bytes in scratch plus bytes granted
        self.peak = 0
        self.recent = 0          # the most since `since_last` was last asked
        self.spills = 0          # outputs written to the node tier for lack of RAM
        self.on_line: dict[int, int] = {}   # batch -> tasks left on the line
        self.produced: dict[int, int] = {}  # batch -> bytes made so far
        self.footprint: int | None = None   # most bytes one batch made over the whole line
        # Files of outputs no one reads any more, kept to be written over (their pages
        # are warm): id -> bytes, oldest first. Counted in `usage`, given up first.
        self.pool: dict[int, int] = {}
        self.pooled = 0  # ids handed out
        self.last: dict[str, deque[int]] = {}  # node -> its last outputs' bytes

    # -- bytes ------------------------------------------------------------------

    def since_last(self) -> int:
        """The most RAM in use since the previous call (a timeline's sample: its highest
        is the run's peak); starts the next window at the use now."""
        most, self.recent = self.recent, self.usage
        return most

    def spilled(self) -> None:
        """An output went to the node tier for lack of RAM."""
        self.spills += 1

    def regraphed(self, per_batch_nodes: int) -> None:
        self.per_batch_nodes = per_batch_nodes

    def take(self, nbytes: int) -> None:
        self.usage += pages(nbytes)
        self.peak = max(self.peak, self.usage)
        self.recent = max(self.recent, self.usage)

    def give(self, nbytes: int) -> None:
        self.usage -= pages(nbytes)

    def share(self, limit: int) -> None:
        """On a line with `jobs: N`: what the older jobs leave of the line's budget."""
        self.limit = limit

    def claim(self) -> int:
        """What this job holds and may still make (each batch on the line up to the
        footprint): what a younger job on the same line may not take."""
        footprint = self.footprint or 0
        return self.usage + sum(max(0, footprint - self.produced.get(b, 0))
                                for b in self.on_line)

    def fits(self, nbytes: int) -> bool:
        return self.usage + pages(nbytes) <= self.limit

    # -- the line ---------------------------------------------------------------

    def enter(self, batch: int, tasks: int | None = None) -> None:
        """`batch` comes onto the line with `tasks` tasks (default: every per-batch node)."""
        self.on_line[batch] = self.per_batch_nodes if tasks is None else tasks
        self.produced[batch] = 0

    def one_more(self, batch: int) -> None:
        """A node added to the line (an apply) owes `batch` a task too."""
        if batch in self.on_line:
            self.on_line[batch] += 1
        else:
            self.enter(batch, 1)

    def made(self, node: str, batch: int, nbytes: int) -> None:
        self.produced[batch] = self.produced.get(batch, 0) + nbytes
        self.last.setdefault(node, deque(maxlen=EXPECT)).append(nbytes)

    def expect(self, node: str) -> int | None:
        """The bytes `node`'s next output is expected to take: the most of its last
        few; None before its first."""
        seen = self.last.get(node)
        return max(seen) if seen else None

    def one_less(self, batch: int) -> bool:
        """One task fewer left for `batch`; True when that was its last (off the line)."""
        self.on_line[batch] -= 1
        if self.on_line[batch]:
            return False
        del self.on_line[batch]
        self.footprint = max(self.footprint or 0, self.produced.pop(batch, 0))
        return True

    def has_room(self, first_sizes: list[int], reserve: int = 0) -> bool:
        """Can one more batch come onto the line, leaving `reserve` bytes free?
        `first_sizes`: the source outputs of the batches on it, for a first guess of
        the footprint before one is known."""
        if not self.on_line:
            return True
        footprint = self.footprint
        if footprint is None:
            if not first_sizes:
                return False
            # A guess too low only costs time: a jammed line gives up its newest batch.
            footprint = max(first_sizes) * self.per_batch_nodes
        coming = sum(max(0, footprint - self.produced.get(b, 0)) for b in self.on_line)
        free = self.usage - sum(self.pool.values())  # the pool gives way to any batch
        return free + coming + footprint + reserve <= self.limit

    # -- the pool of warm files ---------------------------------------------------

    def recycle(self, nbytes: int) -> int | None:
        """Keep a freed output's `nbytes` as a pooled file; its id, or None if the pool
        is full (then the file is deleted and its bytes given back)."""
        if len(self.pool) >= POOL_FILES:
            self.give(nbytes)
            return None
        self.pooled += 1
        self.pool[self.pooled] = pages(nbytes)
        return self.pooled

    def reuse(self, want: int) -> int | None:
        """The pooled file to write an output of `want` bytes over: the smallest that
        holds it, else the largest (its pages are all reused); None if the pool is
        empty, or if the output would use less than 1/`WARM_USE` of the file: the
        pages beyond it would be freed, and a larger output later would have to
        fault fresh ones in (Q1's partial sums, a few hundred bytes a batch, took a
        10 MB file each time). Taken from the pool: its bytes now count toward the
        output's."""
        if not self.pool:
            return None
        holding = [(n, i) for i, n in self.pool.items() if n >= want]
        size, chosen = min(holding) if holding else max((n, i) for i, n in self.pool.items())
        return chosen if want * WARM_USE >= size else None

    def grant(self, want: int) -> tuple[tuple[int | None, int] | None, list[Action]]:
        """Room for an output of `want` bytes, over a warm file if there is one (its
        bytes are counted already; a larger one is truncated only once the output is
        written, so the reservation is the larger of the two), pooled files given up
        if that makes it fit: (the warm file or None, bytes reserved), or None if it
        does not fit; and the pooled files given up (`Unpool`)."""
        want = pages(want)
        reuse = self.reuse(want)
        warm = self.pool[reuse] if reuse is not None else 0
        need = max(0, want - warm)
        given_up = self.trim(need, reuse)
        if not self.fits(need):
            return None, given_up
        if reuse is not None:
            del self.pool[reuse]
        self.take(need)
        return (reuse, max(want, warm)), given_up

    def trim(self, need: int, keep: int | None) -> list[Action]:
        """Give up pooled files (oldest first, not `keep`) until `need` more bytes fit."""
        given_up: list[Action] = []
        for pooled in [i for i in self.pool if i != keep]:
            if self.fits(need):
                break
            self.give(self.pool.pop(pooled))
            given_up.append(Unpool(pooled))
        return given_up

    def drain(self) -> list[Action]:
        """The run is over: every pooled file goes."""
        for pooled in self.pool:
            self.give(self.pool[pooled])
        drained: list[Action] = [Unpool(pooled) for pooled in self.pool]
        self.pool.clear()
        return drained

    def victim(self, waiting: list[int], running: set[int]) -> int | None:
        """The batch to give up so that an older one waiting for RAM can move: the
        newest on the line, newer than every waiting one, none of whose tasks is
        computing. None if there is no such batch."""
        if not waiting:
            return None
        for batch in sorted(self.on_line, reverse=True):
            if batch <= min(waiting):
                return None
            if batch not in running:
                return batch
        return None

    def give_up(self, batch: int) -> None:
        """`batch` leaves the line, to be loaded again later."""
        del self.on_line[batch]
        self.produced.pop(batch, None)
        # The footprint was under-estimated: the line holds no more batches than now.
        self.footprint = max(self.footprint or 0, self.limit // (len(self.on_line) + 1))
