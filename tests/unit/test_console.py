"""What a person reads: the summary at 80 columns, the live rates, plurals."""

from __future__ import annotations

import io
import re

import msgspec
from rich.console import Console

from podpipe import console as console
from podpipe.runtime.rundir.status import Status


def _typed(status: dict) -> Status:
    """The record the views are given, from a status written as plain data."""
    return msgspec.convert({"run_id": "r", "error": None, "run_dir": "/r", "scratch": None,
                            "started": 0.0, "ended": None, "source_batches": 10,
                            "spilled_outputs": 0, "shards": 1, "processes": [],
                            "restore_notes": [], **status}, Status)


def _node(kind, rows_in=0, rows_out=0, written=0, read=0, done=10):
    return {"kind": kind, "batches_done": done, "batches_total": 10, "rows_in": rows_in,
            "rows_out": rows_out, "busy_seconds": 12.3456, "bytes_written": written,
            "bytes_read": read, "restarts": 0, "restored": {}, "recomputed": 0,
            "reused": 0, "version": None, "versions": {}, "held": None}


def _status(done: int = 10) -> dict:
    def node(kind, rows_in, rows_out, written, read):
        return _node(kind, rows_in, rows_out, written, read, done)
    return {"pipeline": "tpch-q1", "state": "succeeded", "elapsed_seconds": 12.5,
            "peak_scratch_bytes": 900 * 2**20, "budget_bytes": 2**30,
            "scratch_bytes": 10 * 2**20,
            "stages": {"source": node("source", 0, 59_986_052, 1023 * 2**20, 0),
                       "filter-the-shipdates": node("stage", 59_986_052, 59_142_609,
                                                    1000 * 2**20, 1023 * 2**20),
                       "total": node("reduce", 40, 4, 2300, 2100),
                       "sink-0": node("sink", 4, 4, 0, 2300)}}


def test_the_summary_fits_80_columns_without_wrapping_a_cell():
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(console.summary(_typed(_status())))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    for name, rows, size in (("source", "59.99M", "1.0Gi"),
                             ("filter-the-ship…", "59.14M", "1.0Gi"),
                             ("total", "4", "2.2Ki"), ("sink-0", "4", "2.2Ki")):
        row = next(line for line in lines if line.startswith(name))
        assert rows in row and size in row and "…" not in row[16:], row  # nothing cut
    assert len(lines) == 8  # title, header, rule, 4 nodes, caption: nothing wrapped


def test_short_units():
    assert [console.short_count(n) for n in (999_999, 1_000_000, 6_001_215_000)] == [
        "999,999", "1.00M", "6.00G"]
    assert [console.short_size(n) for n in (999, 1000, 2300, 900 * 2**20, 2**30)] == [
        "999B", "1.0Ki", "2.2Ki", "900Mi", "1.0Gi"]


def test_a_finished_stages_rate_stays_what_it_was_when_it_finished():
    now = [0.0]
    live = console.LiveProgress(Console(file=io.StringIO()), clock=lambda: now[0])
    status = _typed(_status(done=5))
    now[0] = 10.0
    live(status)
    status = _typed(_status(done=10))
    now[0] = 20.0
    live(status)  # finished now: 59,986,052 rows in 20 s
    now[0] = 100.0
    live(status)
    rates = {t.fields["name"]: t.fields["rate"] for t in live.progress.tasks}
    live.stop()
    assert rates["source"] == f"{59_986_052 / 20:,.0f} rows/s"


def test_nothing_is_drawn_before_the_first_status():
    out = io.StringIO()
    with console.LiveProgress(Console(file=out, force_terminal=True, width=80)):
        pass
    assert out.getvalue() == ""


def test_plurals():
    assert [console.plural(n, w) for n, w in ((1, "sink"), (2, "sink"), (1, "batch"),
                                            (3, "batch"), (1000, "row"))] == [
        "1 sink", "2 sinks", "1 batch", "3 batches", "1,000 rows"]


def test_the_live_view_names_the_node_the_line_waits_on():
    status = _status(done=5)
    for node, queued, in_flight, workers in (("filter-the-shipdates", 6, 2, 2),
                                             ("source", 1, 1, 1), ("total", 9, 0, 1)):
        status["stages"][node].update(queued=queued, in_flight=in_flight, workers=workers)
    assert console.holding_back(_typed(status)) == ("filter-the-shipdates", 6)  # total is idle
    out = io.StringIO()
    live = console.LiveProgress(Console(file=out, width=100, force_terminal=False))
    live(_typed(status))
    live.stop()
    assert "waiting on" in out.getvalue() and "6 queued" in out.getvalue()


def test_status_says_what_the_line_waits_on_and_each_processs_worker():
    status = {**_status(done=5), "state": "running", "run_id": "r", "scratch": "/s",
              "processes": [{"role": "stage", "stage": "source", "pod": "p", "pid": 7,
                             "worker": 1, "alive": True}]}
    status["stages"]["source"].update(queued=3, in_flight=1, workers=1)
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(console.status_table(_typed(status)))
    assert "waiting on: source (3 queued)" in out.getvalue()
    assert re.search(r"^ *stage +source +1 +p +7 +yes *$", out.getvalue(), re.M), out.getvalue()
    assert "running for" in out.getvalue()  # a live run: not "running in"


def test_a_call_stage_gets_a_line_of_its_requests():
    status = {**_status(), "stages": {
        "source": _node("source"),
        "geocode-addresses": {**_node("call"), "calls": {
            "requests": 12_345, "memo_hits": 1_200, "retries": 1, "failures": 0,
            "in_flight": 0, "in_flight_max": 16, "latency_p50": 0.1034,
            "latency_p99": 0.2511}}}}
    [line] = console.calls(_typed(status))
    assert line == ("geocode-addresses: 12,345 requests sent, 1,200 kept answers used, "
                    "1 retry, p50 103 ms, p99 251 ms")
    assert console.plural(2, "retry") == "2 retries"


def test_peeked_rows_show_the_columns_that_fit_whole_and_name_the_others():
    import pyarrow as pa
    from rich.console import Console

    from podpipe.console import rows_table

    table = pa.table({f"column_{i}": [f"value {i} " * 5, "x"] for i in range(10)})
    shown, left_out = rows_table(table, 5, 80)
    console = Console(width=80, record=True)
    console.print(shown)
    lines = console.export_text().splitlines()
    assert left_out and left_out[-1] == "column_9" and "column_0" not in left_out
    assert len([line for line in lines if line.strip()]) == 4  # header, rule, 2 rows
    assert all(len(line) <= 80 for line in lines)
