"""What `podpipe apply` may change: model.change.diff."""

from __future__ import annotations

import pytest
import yaml

from podpipe.errors import UsageError
from podpipe.model import change
from podpipe.model import spec as specs

BASE = [{"name": "a", "run": "m:f", "inputs": ["source"]},
        {"name": "b", "run": "m:g", "inputs": ["a"]}]


def _p(stages, sinks=None, **spec_fields):
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
           "spec": {"source": {"uri": "x.parquet"}, "stages": stages,
                    "sinks": sinks or [{"input": "b", "uri": "out/"}], **spec_fields}}
    return specs.parse(yaml.safe_dump(doc))


def test_added_removed_and_changed_nodes_are_told_apart():
    old = _p(BASE + [{"name": "c", "run": "m:h", "inputs": ["a"]}],
             [{"input": "b", "uri": "out/"}, {"name": "c-out", "input": "c", "uri": "c/"}])
    new = _p([BASE[0], {**BASE[1], "run": "m:g2"}, {"name": "d", "run": "m:h", "inputs": ["a"]}],
             [{"input": "b", "uri": "out/"}, {"name": "d-out", "input": "d", "uri": "d/"}])
    assert change.diff(old, new) == change.Change(added=("d", "d-out"),
                                                  removed=("c", "c-out"), changed=("b",))
    assert change.diff(old, old).empty


def test_a_sink_with_a_new_uri_is_changed():
    new = _p(BASE, [{"input": "b", "uri": "elsewhere/"}])
    assert change.diff(_p(BASE), new).changed == ("sink-0",)


@pytest.mark.parametrize("new, message", [
    (_p(BASE, shards=2), "spec.shards changed"),
    (_p([BASE[0], {**BASE[1], "inputs": ["source"]}],
        [{"input": "b", "uri": "out/"}, {"name": "x", "input": "a", "uri": "x/"}]),
     "'b': its inputs changed"),
    (_p([BASE[0], {**BASE[1], "reduce": True}]), "'b': it changed from batch to single"),
])
def test_what_a_running_run_cannot_take_is_refused_saying_why(new, message):
    with pytest.raises(UsageError, match=message):
        change.diff(_p(BASE), new)


def test_a_table_may_be_added_but_not_changed_under_a_running_run():
    def pipeline(b_inputs: list[str], tables: list[dict], more: list[dict] = ()):
        sinks = [{"input": "b", "uri": "out/"}] + [
            {"name": f"{m['name']}-out", "input": m["name"], "uri": f"{m['name']}/"}
            for m in more]
        return specs.parse(yaml.safe_dump({
            "apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
            "spec": {"source": {"uri": "x.parquet"}, "tables": tables,
                     "stages": [{"name": "a", "run": "m:f", "inputs": ["source"]},
                                {"name": "b", "run": "m:f", "inputs": b_inputs}, *more],
                     "sinks": sinks}}))

    before = pipeline(["a"], [])
    dim = {"name": "dim", "uri": "dim.parquet"}
    reader = {"name": "c", "run": "m:f", "inputs": ["a", "dim"]}
    with pytest.raises(UsageError, match="inputs changed"):  # b may not be rewired...
        change.diff(before, pipeline(["a", "dim"], [dim]))
    grown = pipeline(["a"], [dim], [reader])
    added = change.diff(before, grown)  # ...but a new stage may read a new table
    assert set(added.added) == {"dim", "c", "c-out"} and not added.changed
    with pytest.raises(UsageError, match="table 'dim' changed"):
        change.diff(grown, pipeline(["a"], [{**dim, "uri": "other.parquet"}], [reader]))


def test_a_changed_worker_count_is_a_resize_not_a_change():
    def pipeline(workers):
        return specs.parse(yaml.safe_dump({
            "apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
            "spec": {"source": {"uri": "x.parquet"},
                     "stages": [{"name": "a", "run": "m:f", "inputs": ["source"],
                                 "workers": workers}],
                     "sinks": [{"input": "a", "uri": "out/"}]}}))

    diff = change.diff(pipeline(1), pipeline(3))
    assert diff.resized == ("a",) and not diff.changed and not diff.empty
    assert change.diff(pipeline("auto"), pipeline("auto")).empty
