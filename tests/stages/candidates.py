"""Stages for the shadow tests (`podpipe shadow`): a live stage the test holds back in
two halves, and candidates that match it, differ from it, raise, hang or die."""

from __future__ import annotations

import os
import signal
import time

import pyarrow as pa
import pyarrow.compute as pc


def _wait_for(variable: str) -> None:
    while not os.path.exists(os.environ[variable]):
        time.sleep(0.02)


def double_in_halves(t: pa.Table) -> pa.Table:
    """x doubled, once the file named by GATE exists; batches from x = 5000 on wait for
    GATE2 too: the test knows when the first half is through (whatever the machine)."""
    _wait_for("GATE")
    if pc.min(t["x"]).as_py() >= 5000:
        _wait_for("GATE2")
    return double(t)


def double(t: pa.Table) -> pa.Table:
    """The live stage's candidate that matches it."""
    return pa.table({"x": pc.multiply(t["x"], 2)})


def double_off(t: pa.Table) -> pa.Table:
    """x doubled, but one more where x ends in 07: ten rows a batch of 1,000 differ."""
    doubled = pc.multiply(t["x"], 2)
    off = pc.equal(pc.remainder(t["x"], 100), 7)
    return pa.table({"x": pc.if_else(off, pc.add(doubled, 1), doubled)})


def raises(t: pa.Table) -> pa.Table:
    raise ValueError("this candidate is broken on purpose")


def hangs(t: pa.Table) -> pa.Table:
    time.sleep(3600)
    return t


def dies(t: pa.Table) -> pa.Table:
    os.kill(os.getpid(), signal.SIGKILL)
    return t


def double_slowly(t: pa.Table) -> pa.Table:
    """x doubled, once the file named by GATE exists, 0.6 s a batch: a run of ten
    batches lasts past a candidate's timeout of 3 s on its first."""
    _wait_for("GATE")
    time.sleep(0.6)
    return double(t)


_calls = 0


def q1_prices_held_twice(t: pa.Table) -> pa.Table:
    """TPC-H Q1's prices stage that does four batches, then waits in its fifth for the
    file named by PRICES_GATE and from its seventh for PRICES_GATE2 too (a pod's test:
    its sixth is handed out, and made, after the gate opens)."""
    from examples.tpch.stages import prices

    global _calls
    _calls += 1
    for gate in ("PRICES_GATE",) * (_calls >= 5) + ("PRICES_GATE2",) * (_calls >= 7):
        while not os.path.exists(os.environ[gate]):
            time.sleep(0.02)
    return prices(t)
