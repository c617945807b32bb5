"""`podpipe peek`: a stage's output lent to a reader while the run goes.

The conductor never reads batch data: it opens the output's file and passes the
open descriptor over the reader's connection (`protocol.send_fds`), and pins the
output so that the engine, once every stage has read it, deletes its name rather
than recycle its pages for a later output (`Ledger.delete`). The reader maps the
descriptor: what it reads stays the batch it asked for whatever the run does next,
and the pages go when it lets go of them — the lease ends by itself, with the
reader. Only what the pod still holds can be lent (in RAM, or on the node tier)."""

from __future__ import annotations

import os
from typing import Callable

from podpipe.engine.ledger import Ledger
from podpipe.runtime.conductor.agents import Agents, Conn
from podpipe.runtime.plumbing import protocol


def lend(agents: Agents, conn: Conn, ledger: Ledger, request: protocol.PeekRequest,
         made_by: Callable[[str, int], str | None]) -> None:
    """Answer `request`: the output, lent (`Lent` and its file, with the version that
    made it, `made_by`), or why not."""
    node = request.stage
    if node not in ledger.graph.inputs:
        agents.answer(conn, protocol.Refused(f"no stage {node!r} in this run (its nodes: "
                                             f"{', '.join(ledger.graph.order)})"))
        return
    held = sorted(k for n, k in ledger.outputs if n == node)
    key = (held[-1] if held else None) if request.batch is None else request.batch
    if key is None or (node, key) not in ledger.outputs:
        agents.answer(conn, protocol.Refused(
            f"{node!r}: batch {key if key is not None else '(newest)'} is not held now "
            f"(held: {_ranges(held) or 'none'}); an output goes once every stage that "
            "reads it has"))
        return
    output = ledger.outputs[(node, key)]
    try:
        fd = os.open(output.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        agents.answer(conn, protocol.Refused(f"{node!r} batch {key}: {exc.strerror}"))
        return
    try:
        ledger.pinned.add((node, key))  # deleted, never recycled, while it may be mapped
        protocol.send_fds(conn.sock, protocol.Lent(stage=node, batch=key, rows=output.rows,
                                                   tier=output.tier,
                                                   version=made_by(node, key)),
                          [fd])
    except OSError:
        pass  # the reader went away
    finally:
        os.close(fd)


def _ranges(keys: list[int]) -> str:
    """`0-3, 7`: the batches held, as runs."""
    runs: list[list[int]] = []
    for k in keys:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
