"""Shard assignment and pod ordinals (model.shards), and specs that declare them."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from podpipe.errors import SpecError
from podpipe.model import shards
from podpipe.model import spec as specs


@given(sizes=st.lists(st.integers(0, 10**12), max_size=300), shard_count=st.integers(1, 64),
       replicas=st.integers(1, 40))
def test_the_pods_cover_every_batch_exactly_once(sizes, shard_count, replicas):
    seen: list[int] = []
    for index in range(replicas):
        for shard in shards.owned(shard_count, replicas, index):
            seen += list(shards.batches(shard, len(sizes), shard_count))
    assert sorted(seen) == list(range(len(sizes)))
    plan = shards.plan(sizes, shard_count, replicas)
    assert sum(p.batches for p in plan) == len(sizes)
    assert sum(p.bytes for p in plan) == sum(sizes)
    assert sorted(s for p in plan for s in p.shards) == list(range(shard_count))
    n = len(sizes)  # round robin: a shard has n // shards batches, or one more
    for p in plan:
        assert len(p.shards) * (n // shard_count) <= p.batches <= \
            len(p.shards) * -(-n // shard_count)


def test_the_same_batch_lands_in_the_same_shard_whatever_the_replicas():
    for replicas in (1, 2, 3, 7):
        owner = {s: i for i in range(replicas) for s in shards.owned(8, replicas, i)}
        assert all(owner[shards.shard_of(b, 8)] == shards.shard_of(b, 8) % replicas
                   for b in range(40))


@pytest.mark.parametrize("explicit, env, host, expected", [
    (2, {"POD_INDEX": "5"}, "q1-7", 2),
    (None, {"POD_INDEX": "5"}, "q1-7", 5),
    (None, {}, "q1-7", 7),
    (None, {}, "q1-x", None),
    (None, {}, "laptop-3", None),   # not this StatefulSet's name: not an ordinal
    (None, {}, "q1", None),
])
def test_the_ordinal_comes_from_the_flag_the_environment_or_the_statefulset_hostname(
        explicit, env, host, expected):
    assert shards.ordinal(explicit, env, host, "q1") == expected


def test_a_pod_index_that_is_not_a_number_is_refused():
    with pytest.raises(ValueError, match="POD_INDEX='a'"):
        shards.ordinal(None, {"POD_INDEX": "a"}, "h", "q1")


def _spec(stages, shards_=4):
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
           "spec": {"source": {"uri": "x.parquet"}, "shards": shards_, "stages": stages,
                    "sinks": [{"input": stages[-1]["name"], "uri": "out/"}]}}
    return yaml.safe_dump(doc)


def test_a_global_reduce_over_shard_reduces_is_accepted():
    pipeline = specs.parse(_spec([
        {"name": "a", "run": "m:f", "inputs": ["source"]},
        {"name": "r", "run": "m:f", "reduce": True, "inputs": ["a"]},
        {"name": "g", "run": "m:f", "reduce": True, "scope": "global", "inputs": ["r"]},
    ]))
    assert pipeline.shards == 4 and pipeline.stage("g").reduce == "global"


@pytest.mark.parametrize("stages, field, message", [
    ([{"name": "a", "run": "m:f", "inputs": ["source"]},
      {"name": "g", "run": "m:f", "reduce": True, "scope": "global", "inputs": ["a"]}],
     "spec.stages[1].inputs", "reduce each shard first"),
    ([{"name": "a", "run": "m:f", "inputs": ["source"], "scope": "global"}],
     "spec.stages[0].scope", "is for a reduce stage"),
    ([{"name": "a", "run": "m:f", "inputs": ["source"], "reduce": True, "scope": "pod"}],
     "spec.stages[0].scope", "expected one of ['shard', 'global']"),
    ([{"name": "a", "run": "m:f", "inputs": ["source"]},
      {"name": "r", "run": "m:f", "reduce": True, "inputs": ["a"]},
      {"name": "g", "run": "m:f", "reduce": True, "scope": "global", "inputs": ["r"]},
      {"name": "r2", "run": "m:f", "reduce": True, "inputs": ["g"]}],
     "spec.stages[3].inputs", "make it 'scope: global'"),
])
def test_misplaced_scopes_are_refused_naming_the_field(stages, field, message):
    with pytest.raises(SpecError) as caught:
        specs.parse(_spec(stages))
    assert caught.value.field == field and message in str(caught.value)


def test_zero_shards_are_refused():
    with pytest.raises(SpecError, match="spec.shards"):
        specs.parse(_spec([{"name": "a", "run": "m:f", "inputs": ["source"]}], shards_=0))
