"""Several pods' statuses as one: a function per field, never a blind sum."""

from __future__ import annotations

import msgspec
import pytest

from podpipe.runtime.rundir import status


def _stage(**fields) -> status.StageStatus:
    base = {"kind": "call", "batches_done": 3, "batches_total": 5, "rows_in": 300,
            "rows_out": 300, "busy_seconds": 1.5, "bytes_written": 1000, "bytes_read": 900,
            "restarts": 1, "restored": {"node": 2}, "recomputed": 0, "reused": 0}
    return msgspec.convert({**base, **fields}, status.StageStatus)


def _calls(**fields) -> status.CallStatus:
    return status.CallStatus(**{"requests": 10, "memo_hits": 1, "retries": 2, "failures": 0,
                                "in_flight": 3, "in_flight_max": 4, **fields})


def test_counts_add_up_and_maxima_are_the_larger_pods():
    one = _stage(workers=2, workers_max=3, versions={"v1": 3}, restored={"node": 2},
                 calls=_calls(latency_p50=0.1, latency_p99=0.4))
    two = _stage(workers=1, workers_max=2, versions={"v1": 1, "v2": 2},
                 restored={"ram": 1}, calls=_calls(requests=5, in_flight_max=9,
                                                   latency_p50=0.2, latency_p99=0.3))
    merged = status.add_stage(status.add_stage(None, one), two)
    assert (merged.batches_done, merged.batches_total, merged.rows_in) == (6, 10, 600)
    assert merged.busy_seconds == pytest.approx(3.0) and merged.restarts == 2
    assert merged.workers == 3 and merged.workers_max == 3  # now: all; most: one pod's
    assert merged.versions == {"v1": 4, "v2": 2} and merged.restored == {"node": 2, "ram": 1}
    calls = merged.calls
    assert calls is not None
    assert (calls.requests, calls.retries, calls.in_flight) == (15, 4, 6)
    assert calls.in_flight_max == 9  # in one process, at once: never a sum
    assert (calls.latency_p50, calls.latency_p99) == (0.2, 0.4)  # the larger, not 0.3/0.7


def test_a_pod_without_latencies_yet_beside_one_with_them():
    """A pod whose `latency_p50` is still None beside one with a float raised
    TypeError in the controller's loop."""
    waiting = _stage(calls=_calls(latency_p50=None, latency_p99=None))
    answered = _stage(calls=_calls(latency_p50=0.05, latency_p99=0.2))
    for first, second in ((waiting, answered), (answered, waiting)):
        merged = status.add_stage(first, second).calls
        assert merged is not None
        assert (merged.latency_p50, merged.latency_p99) == (0.05, 0.2)
    none = status.add_stage(_stage(calls=None), _stage(calls=None))
    assert none.calls is None
    assert status.add_stage(_stage(calls=None), answered).calls == answered.calls


def test_every_field_of_a_stage_and_of_its_calls_has_a_way_to_merge():
    assert set(status._STAGE) == set(status.StageStatus.__struct_fields__)
    assert set(status._CALLS) == set(status.CallStatus.__struct_fields__)
