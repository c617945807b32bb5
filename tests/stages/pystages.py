"""Stage functions the integration tests run in real stage processes."""

from __future__ import annotations

import os
import random
import signal
import time

import pyarrow as pa
import pyarrow.compute as pc


def double(t: pa.Table) -> pa.Table:
    return t.set_column(t.schema.get_field_index("x"), "x", pc.multiply(t["x"], 2))


def plus_one(t: pa.Table) -> pa.Table:
    return t.set_column(t.schema.get_field_index("x"), "x", pc.add(t["x"], 1))


def combine(doubled: pa.Table, plus: pa.Table) -> pa.Table:
    """Fan-in: positional inputs, in the order the spec lists them."""
    return pa.table({"x": doubled["x"], "y": plus["x"],
                     "sum": pc.add(doubled["x"], plus["x"])})


def as_polars(t: pa.Table):
    import polars as pl

    return pl.from_arrow(t).with_columns((pl.col("x") * 3).alias("x"))


def as_pandas(t: pa.Table):
    df = t.to_pandas(types_mapper=pd_arrow_dtype)
    df["x"] = df["x"] - 1
    return df


def pd_arrow_dtype(arrow_type):
    import pandas as pd

    return pd.ArrowDtype(arrow_type)


def chunk_report(t: pa.Table) -> pa.Table:
    """A reduce: one row per input chunk (batch), to prove it sees chunks, not a copy."""
    return pa.table({"chunk": list(range(t["x"].num_chunks)),
                     "rows": [len(c) for c in t["x"].chunks],
                     "sum": [pc.sum(c).as_py() for c in t["x"].chunks]})


def sum_all(t: pa.Table) -> pa.Table:
    return pa.table({"rows": [t.num_rows], "sum": [pc.sum(t["x"]).as_py()]})


def fail_on_third(t: pa.Table) -> pa.Table:
    if pc.any(pc.equal(t["x"], int(os.environ.get("BOOM_AT", "2500")))).as_py():
        raise ValueError("boom on purpose")
    return t


def fail_while_marked(t: pa.Table) -> pa.Table:
    """Fails the batch holding x == 2500 while the file FAIL_MARKER exists."""
    if os.path.exists(os.environ["FAIL_MARKER"]) and pc.any(pc.equal(t["x"], 2500)).as_py():
        raise ValueError("x is 2500 and the marker is there")
    return t


def spin(t: pa.Table) -> pa.Table:
    """Busy for SLOW_SECONDS of CPU (not asleep: its cores show)."""
    end = time.process_time() + float(os.environ.get("SLOW_SECONDS", "0.3"))
    while time.process_time() < end:
        pass
    return t


def slow(t: pa.Table) -> pa.Table:
    time.sleep(float(os.environ.get("SLOW_SECONDS", "0.3")))
    return t


def widen(t: pa.Table) -> pa.Table:
    """An output several times the input: pressure on the RAM budget."""
    pad = pa.array([b"p" * 200] * t.num_rows, pa.binary())
    return t.append_column("pad", pad)


def widen_later(t: pa.Table) -> pa.Table:
    """Outputs that grow tenfold partway through (once the first column reaches
    $GROW_AT): the footprint learned early is wrong."""
    big = pc.greater_equal(t.column(0), int(os.environ.get("GROW_AT", "20000")))
    size = 400 if pc.any(big).as_py() else 40
    return t.append_column("pad", pa.array([b"p" * size] * t.num_rows, pa.binary()))


_calls = 0


def die_on_call(t: pa.Table) -> pa.Table:
    """Kills its own process on call number $DIE_ON_CALL, as an OOM kill would."""
    global _calls
    _calls += 1
    if _calls == int(os.environ.get("DIE_ON_CALL", "1")):
        os.kill(os.getpid(), signal.SIGKILL)
    return t


def _die_once() -> None:
    """The first process to reach call number $DIE_ON_CALL kills itself, as an OOM
    kill would (once per run: it leaves the file $DIE_MARKER behind)."""
    global _calls
    _calls += 1
    marker = os.environ["DIE_MARKER"]
    if _calls != int(os.environ.get("DIE_ON_CALL", "1")):
        return
    try:  # made at once or not at all: two workers at that call, only one dies
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def q1_prices_v2(t: pa.Table) -> pa.Table:
    """TPC-H Q1's prices stage as a second version: the same answer."""
    from examples.tpch.stages import prices

    return prices(t)


def q1_prices_held_at_five(t: pa.Table) -> pa.Table:
    """TPC-H Q1's prices stage that does four batches, then waits in its fifth for the
    file named by PRICES_GATE: the stage cannot finish before the test says."""
    from examples.tpch.stages import prices

    global _calls
    _calls += 1
    while _calls >= 5 and not os.path.exists(os.environ["PRICES_GATE"]):
        time.sleep(0.02)
    return prices(t)


def q1_prices_spinning(t: pa.Table) -> pa.Table:
    """TPC-H Q1's prices stage, busy on a core for SLOW_SECONDS more a batch (the
    line's bottleneck, CPU bound)."""
    from examples.tpch.stages import prices

    return prices(spin(t))


def q1_prices_broken(t: pa.Table) -> pa.Table:
    """TPC-H Q1's prices stage with a bug: every batch fails."""
    raise ValueError("a bug in prices")


def q1_prices_dying_once(t: pa.Table) -> pa.Table:
    """TPC-H Q1's prices stage, dying once (`_die_once`)."""
    from examples.tpch.stages import prices

    _die_once()
    return prices(t)


def sum_all_sums(t: pa.Table) -> pa.Table:
    """A global reduce over `sum_all`'s outputs, one row per shard."""
    return pa.table({"rows": [pc.sum(t["rows"]).as_py()], "sum": [pc.sum(t["sum"]).as_py()],
                     "shards": [t.num_rows]})


def _tag(t: pa.Table, version: str) -> pa.Table:
    return t.append_column("version", pa.array([version] * t.num_rows, pa.string()))


def tag_v1(t: pa.Table) -> pa.Table:
    """A stage that marks its output with its version (swap tests)."""
    return _tag(t, "v1")


def tag_v2(t: pa.Table) -> pa.Table:
    return _tag(t, "v2")


def tag_broken(t: pa.Table) -> pa.Table:
    raise RuntimeError("version 3 is broken on purpose")


def count_versions(t: pa.Table) -> pa.Table:
    """A reduce over `tag_*` outputs: rows per version."""
    counts = t.group_by("version", use_threads=False).aggregate([("x", "count")])
    return counts.sort_by("version")


def q1_total_gated(t: pa.Table) -> pa.Table:
    """TPC-H Q1's reduce, once the file named by GATE exists: a run with it cannot
    finish before the test opens the gate (whatever the machine's speed)."""
    from examples.tpch import stages

    gate = os.environ["GATE"]
    while not os.path.exists(gate):
        time.sleep(0.02)
    return stages.total(t)


def hang_on_batch_one(t: pa.Table) -> pa.Table:
    """Hangs (far beyond any test's timeout) on the batch holding x == 1000."""
    if pc.any(pc.equal(t["x"], 1000)).as_py():
        time.sleep(3600)
    return t


def hang_once(t: pa.Table) -> pa.Table:
    """Hangs on its first call in the run (a marker file says it did), then works."""
    marker = os.environ["HANG_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(3600)
    return t


def drift(t: pa.Table) -> pa.Table:
    """Its output gains a column from the batch holding x == 1000 on."""
    if pc.min(t["x"]).as_py() >= 1000:
        return t.append_column("extra", pc.cast(t["x"], pa.float64()))
    return t


def chatty(t: pa.Table) -> pa.Table:
    """Prints what it sees: a stage's own output, for the logs."""
    print(f"chatty sees x from {pc.min(t['x']).as_py()}")
    return t


def tag_v1_gated(t: pa.Table) -> pa.Table:
    """`tag_v1` once the file named by GATE exists: no batch is done before the test
    says so (whatever the machine's speed)."""
    while not os.path.exists(os.environ["GATE"]):
        time.sleep(0.02)
    return _tag(t, "v1")


_SEEN: list[pa.Table] = []


def keeps_inputs(t: pa.Table) -> pa.Table:
    """Keeps every input it was given (a cache, as stage code may have) and checks
    that the earlier ones still hold what they held: zero-copy inputs must not
    change under a stage that keeps them."""
    for earlier in _SEEN:
        first = earlier["x"][0].as_py()
        if earlier["x"].to_pylist() != list(range(first, first + earlier.num_rows)):
            raise AssertionError(f"a kept input from x={first} changed under the stage")
    _SEEN.append(t)
    return t


def q12_join_dying_once(lines: pa.Table, orders: pa.Table) -> pa.Table:
    """TPC-H Q12's join, dying once (`_die_once`)."""
    from examples.tpch.joins import with_priority

    _die_once()
    return with_priority(lines, orders)


def _gated(function, t: pa.Table) -> pa.Table:
    gate = os.environ["GATE"]
    while not os.path.exists(gate):
        time.sleep(0.02)
    return function(t)


def q12_total_gated(t: pa.Table) -> pa.Table:
    """TPC-H Q12's reduce, once the file named by GATE exists."""
    from examples.tpch.joins import q12_total

    return _gated(q12_total, t)


def q3_top_gated(t: pa.Table) -> pa.Table:
    """TPC-H Q3's reduce, once the file named by GATE exists."""
    from examples.tpch.joins import q3_top

    return _gated(q3_top, t)


def with_label(t: pa.Table, codes: pa.Table) -> pa.Table:
    """Each row with the label of x % 10, from the table `codes` (k, label)."""
    keyed = t.append_column("k", pc.remainder(t["x"], 10))
    return codes.join(keyed, "k", join_type="inner", use_threads=False).select(
        ["x", "label"]).sort_by("x")


_TAGGED = [0]


def tag_v1_then_gated(t: pa.Table) -> pa.Table:
    """`tag_v1` for its first three batches, then once the file named by GATE exists:
    the run cannot end before the test has acted on it."""
    _TAGGED[0] += 1
    while _TAGGED[0] > 3 and not os.path.exists(os.environ["GATE"]):
        time.sleep(0.02)
    return _tag(t, "v1")


def mapped_deleted(t: pa.Table) -> pa.Table:
    """The input, with what this process maps of scratch files deleted since: how many
    such mappings (`deleted_maps`), and the KiB of pages they still hold in RAM
    (`deleted_kib`, from /proc/self/smaps)."""
    root = os.environ.get("PODPIPE_SCRATCH_ROOT", "/dev/shm")
    maps = kib = 0
    deleted = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) > 1 and len(fields[1]) == 4:  # a mapping
                deleted = line.rstrip().endswith("(deleted)") and f" {root}/" in line
                maps += deleted
            elif deleted and fields[0] == "Rss:":
                kib += int(fields[1])
    return t.append_column("deleted_maps", pa.array([maps] * t.num_rows, pa.int64())) \
        .append_column("deleted_kib", pa.array([kib] * t.num_rows, pa.int64()))


def mapped_deleted_gated(t: pa.Table) -> pa.Table:
    """`mapped_deleted` once the file named by GATE exists."""
    return _gated(mapped_deleted, t)


def fail_with_markup(t: pa.Table) -> pa.Table:
    """Fails with what a terminal or rich would act on: markup, colours, a link."""
    raise ValueError("bad [/x] [link=http://evil.example]here[/link] "
                     "\x1b[31mred\x1b[0m \x1b]8;;http://evil.example\x07link\x1b]8;;\x07")


def double_gated(t: pa.Table) -> pa.Table:
    """`double`, once the file named by GATE exists."""
    return _gated(double, t)


def floats_after_dying(t: pa.Table) -> pa.Table:
    """x as it is until the batch holding $DIE_AT, where its process dies once; from
    that batch on x comes back as float64: a restarted process's first output has
    another schema than the run's."""
    at = int(os.environ["DIE_AT"])
    if pc.any(pc.greater_equal(t["x"], at)).as_py():
        marker = os.environ["DIE_MARKER"]
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.kill(os.getpid(), signal.SIGKILL)
        except FileExistsError:
            pass
        return pa.table({"x": pc.cast(t["x"], pa.float64())})
    return t


def spawns_a_sleeper_gated(t: pa.Table) -> pa.Table:
    """Starts a child of its own once (`sleep 300`, in its process group; its pid in
    $CHILD_PID), then `double` once the file named by GATE exists."""
    import subprocess

    marker = os.environ["CHILD_PID"]
    if not os.path.exists(marker):
        child = subprocess.Popen(["sleep", "300"])
        with open(marker + ".tmp", "w") as f:
            f.write(str(child.pid))
        os.replace(marker + ".tmp", marker)
    return _gated(double, t)


def double_then_gated(t: pa.Table) -> pa.Table:
    """`double` for x below 5000, then once the file named by GATE exists: half the
    run's batches are done before the test has acted."""
    if pc.min(t["x"]).as_py() >= 5000:
        _gated(lambda table: table, t)
    return double(t)


class Scaled:
    """A class stage: set up once per process (leaving SETUP_DIR/setup-<pid>), x times
    `factor` per batch (its param), closed on a clean end (SETUP_DIR/closed-<pid>)."""

    def __init__(self, factor: int = 2) -> None:
        self.factor = factor
        self.folder = os.environ["SETUP_DIR"]
        open(os.path.join(self.folder, f"setup-{os.getpid()}"), "x").close()

    def __call__(self, t: pa.Table) -> pa.Table:
        return t.set_column(0, "x", pc.multiply(t["x"], self.factor))

    def close(self) -> None:
        open(os.path.join(self.folder, f"closed-{os.getpid()}"), "x").close()


class ScaledDyingOnce(Scaled):
    """`Scaled`, its process dying once (`_die_once`)."""

    def __call__(self, t: pa.Table) -> pa.Table:
        _die_once()
        return super().__call__(t)


class NoModel:
    """A class stage whose setup fails, as one whose model file is missing would."""

    def __init__(self) -> None:
        raise FileNotFoundError("no model file at models/scorer.bin")

    def __call__(self, t: pa.Table) -> pa.Table:
        return t


def offset(t: pa.Table, by: int = 0) -> pa.Table:
    """x plus `by` (a function stage's param)."""
    return t.set_column(0, "x", pc.add(t["x"], by))


class ScaledPlusOne(Scaled):
    """`Scaled`'s next version: x times `factor`, plus one."""

    def __call__(self, t: pa.Table) -> pa.Table:
        scaled = super().__call__(t)
        return scaled.set_column(0, "x", pc.add(scaled["x"], 1))


class SeesDevices:
    """Records, once per worker, the GPUs its process was given (SETUP_DIR/devices-<worker>
    holds CUDA_VISIBLE_DEVICES, or '-' when unset); waits 0.05 s a batch, as a stage
    waiting on its device would (so that `auto` wants more of it)."""

    def __init__(self) -> None:
        worker = os.environ.get("PODPIPE_WORKER", "0")
        with open(os.path.join(os.environ["SETUP_DIR"], f"devices-{worker}"), "x") as f:
            f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "-"))

    def __call__(self, t: pa.Table) -> pa.Table:
        time.sleep(0.05)
        return t


class Labelled:
    """A class stage handed a table at its setup (`setupInputs: [codes]`): it builds
    its index of `codes` (k -> label) once per worker (SETUP_DIR/index-<pid>: a line
    per setup, the rows it indexed), then labels each row of a batch by x % `modulo`."""

    def __init__(self, codes: pa.Table, modulo: int = 10) -> None:
        self.labels = dict(zip(codes["k"].to_pylist(), codes["label"].to_pylist()))
        self.modulo = modulo
        with open(os.path.join(os.environ["SETUP_DIR"], f"index-{os.getpid()}"), "a") as f:
            f.write(f"{codes.num_rows}\n")

    def __call__(self, t: pa.Table) -> pa.Table:
        keys = pc.remainder(t["x"], self.modulo).to_pylist()
        return t.append_column("label", pa.array([self.labels[k] for k in keys]))


def noisy(t: pa.Table) -> pa.Table:
    """Not deterministic: a column of random numbers, other bytes each time it runs."""
    return t.append_column("noise", pa.array([random.random() for _ in range(t.num_rows)]))


def fail_once_written(t: pa.Table) -> pa.Table:
    """`fail_on_third`, its failing batch raising only once a file matching the glob
    WRITTEN exists (what a test wants done before the run fails: a sink's part)."""
    import glob

    if pc.any(pc.equal(t["x"], int(os.environ.get("BOOM_AT", "2500")))).as_py():
        while not glob.glob(os.environ["WRITTEN"]):
            time.sleep(0.02)
        raise ValueError("boom on purpose")
    return t


def double_gated_failing(t: pa.Table) -> pa.Table:
    """`double`, once the file named by GATE exists; then the batch holding x == 2500
    fails if the file FAIL_MARKER exists."""
    return _gated(lambda batch: double(fail_while_marked(batch)), t)


def with_label_gated(t: pa.Table, codes: pa.Table) -> pa.Table:
    """`with_label`, once the file named by GATE exists."""
    return _gated(lambda batch: with_label(batch, codes), t)
