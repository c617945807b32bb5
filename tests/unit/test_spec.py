"""A spec is strict: every mistake is named by file, field and line, never ignored."""

from __future__ import annotations

import pytest
import yaml

from podpipe.errors import SpecError, SpecWarning
from podpipe.model import spec as specs
from podpipe.model.graph import Graph

GOOD = """\
apiVersion: podpipe.dev/v1alpha1
kind: Pipeline
metadata: {name: q1}
spec:
  source: {uri: "data/*.parquet", batchRows: 1000}
  stages:
    - {name: filter, run: "m.stages:f", inputs: [source]}
    - {name: total, run: "m.stages:t", reduce: true, inputs: [filter]}
  sinks:
    - {input: total, uri: out/}
  memory: 2GiB
  checkpoints: {node: .podpipe, durable: "file://.durable", everyBatches: 4}
"""


def test_a_valid_spec_parses_into_typed_fields():
    pipeline = specs.parse(GOOD, file="q1.yaml")
    assert pipeline.name == "q1"
    assert pipeline.memory == 2 * 2**30
    assert pipeline.source.batch_rows == 1000 and pipeline.source.format == "parquet"
    assert [s.name for s in pipeline.stages] == ["filter", "total"]
    assert pipeline.stage("total").reduce == "shard"  # a reduce, over each shard
    assert pipeline.sinks[0].name == "sink-0"
    assert pipeline.checkpoints.every_batches == 4


def _edit(path: str, value) -> str:
    doc = yaml.safe_load(GOOD)
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is _DELETE:
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return yaml.safe_dump(doc, sort_keys=False)


_DELETE = object()

BAD = [
    ("unknown-field", _edit("spec.stages.0.inptus", ["source"]),
     "spec.stages[0].inptus", "unknown field 'inptus'"),
    ("unknown-top-field", _edit("spec.memroy", "1GiB"), "spec.memroy", "unknown field"),
    ("unknown-input", _edit("spec.stages.1.inputs", ["filtr"]), "spec.stages[1].inputs[0]",
     "unknown input 'filtr'"),
    ("cycle", _edit("spec.stages.0.inputs", ["total"]), "spec.stages[0].inputs",
     "cycle: filter -> total -> filter"),
    ("duplicate-name", _edit("spec.stages.1.name", "filter"), "spec.stages[1].name",
     "duplicate stage name 'filter'"),
    ("unsafe-name", _edit("spec.stages.0.name", "../x"), "spec.stages[0].name",
     "invalid name '../x'"),
    ("underscore-name", _edit("spec.stages.0.name", "my_filter"), "spec.stages[0].name",
     "a container's (a DNS label)"),
    ("no-jobs", _edit("spec.jobs", 0), "spec.jobs", "integer >= 1"),
    ("too-many-jobs", _edit("spec.jobs", 17), "spec.jobs", "at most 16"),
    ("underscore-name-hint", _edit("spec.stages.0.name", "my_filter"), "spec.stages[0].name",
     "e.g. 'my-filter'"),
    ("k8s-milli-size", _edit("spec.memory", "512m"), "spec.memory", "write 512Mi"),
    ("fraction-of-a-byte", _edit("spec.memory", "0.5"), "spec.memory", "0.5Gi"),
    ("bad-sink-mode", _edit("spec.sinks.0.mode", "append"), "spec.sinks[0].mode",
     "['error', 'overwrite']"),
    ("workers-on-a-reduce", _edit("spec.stages.1.workers", 2), "spec.stages[1].workers",
     "a reduce runs as one worker"),
    ("zero-workers", _edit("spec.stages.0.workers", 0), "spec.stages[0].workers",
     "expected 'auto' or a whole number of worker processes from 1"),
    ("negative-workers", _edit("spec.stages.0.workers", -2), "spec.stages[0].workers",
     "from 1 to 256"),
    ("fractional-workers", _edit("spec.stages.0.workers", 1.5), "spec.stages[0].workers",
     "got 1.5"),
    ("source-workers", _edit("spec.source.workers", "many"), "spec.source.workers",
     "'auto'"),
    ("sink-workers", _edit("spec.sinks.0.workers", 0), "spec.sinks[0].workers", "'auto'"),
    ("cpus", _edit("spec.cpus", 0), "spec.cpus", "above 0"),
    ("reserved-name", _edit("spec.stages.0.name", "source"), "spec.stages[0].name", "reserved"),
    ("bad-size", _edit("spec.memory", "lots"), "spec.memory", "expected a size"),
    ("zero-size", _edit("spec.memory", 0), "spec.memory", "positive"),
    ("run-not-callable", _edit("spec.stages.0.run", "m.stages.f"), "spec.stages[0].run",
     "module.path:function"),
    ("both-run-and-command", _edit("spec.stages.0.command", ["./x"]), "spec.stages[0]",
     "got run and command"),
    ("neither-run-nor-command", _edit("spec.stages.0.run", _DELETE), "spec.stages[0]",
     "got neither"),
    ("wrong-api-version", _edit("apiVersion", "v1"), "apiVersion", "podpipe.dev/v1alpha1"),
    ("wrong-kind", _edit("kind", "Pod"), "kind", "'Pipeline'"),
    ("no-stages", _edit("spec.stages", []), "spec.stages", "non-empty list"),
    ("batch-rows-not-int", _edit("spec.source.batchRows", "many"), "spec.source.batchRows",
     "integer >= 1"),
    ("unknown-format", _edit("spec.source.format", "xlsx"), "spec.source.format",
     "parquet"),
    ("dangling-stage", _edit("spec.sinks.0.input", "filter"), "spec.stages[1].name",
     "read by no stage and no sink"),
    ("unknown-sink-input", _edit("spec.sinks.0.input", "nope"), "spec.sinks[0].input",
     "unknown input 'nope'"),
    ("unknown-checkpoint-field", _edit("spec.checkpoints.every", 3),
     "spec.checkpoints.every", "unknown field"),
    ("missing-metadata-name", _edit("metadata.name", _DELETE), "metadata",
     "missing required field 'name'"),
]


@pytest.mark.parametrize("text,field,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_spec_names_file_field_and_expectation(text, field, message):
    with pytest.raises(SpecError) as caught:
        specs.parse(text, file="q1.yaml")
    assert caught.value.field == field
    assert message in str(caught.value)
    assert str(caught.value).startswith("q1.yaml")


def test_an_error_points_at_the_line_of_the_field():
    text = GOOD.replace("inputs: [filter]", "inputs: [filtr]")
    with pytest.raises(SpecError) as caught:
        specs.parse(text, file="q1.yaml")
    assert caught.value.line == 8
    assert str(caught.value).startswith("q1.yaml:8: spec.stages[1].inputs[0]")


def test_mixing_per_batch_and_reduced_inputs_is_refused():
    text = GOOD.replace("- {input: total, uri: out/}",
                        "- {input: both, uri: out/}").replace(
        "  sinks:", "    - {name: both, run: 'm:f', inputs: [filter, total]}\n  sinks:")
    with pytest.raises(SpecError, match="mixes per-batch and reduced inputs"):
        specs.parse(text, file="q1.yaml")


@pytest.mark.parametrize("raw,message", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"\x00\x01\x02PK", "binary file"),
    (b"\xff\xfe\xfa", "not UTF-8"),
    (b"spec: [unclosed\n", "invalid YAML"),
    (b"- just\n- a list\n", "expected a mapping"),
], ids=["empty", "blank", "binary", "not-utf8", "yaml-syntax", "not-a-mapping"])
def test_unreadable_files_are_input_errors(raw, message):
    with pytest.raises(SpecError, match=message):
        specs.parse(raw, file="x.yaml")


def test_a_yaml_syntax_error_carries_its_line():
    with pytest.raises(SpecError) as caught:
        specs.parse(GOOD + "  extra: [unclosed\n", file="q1.yaml")
    assert caught.value.line is not None and caught.value.line >= 13


@pytest.mark.parametrize("override,check", [
    ("source.batchRows=42", lambda p: p.source.batch_rows == 42),
    ("memory=3GiB", lambda p: p.memory == 3 * 2**30),
    ("stages.filter.run=other:g", lambda p: p.stage("filter").run == "other:g"),
    ("spec.sinks.0.uri=elsewhere/", lambda p: p.sinks[0].uri == "elsewhere/"),
    ("shards=4", lambda p: p.shards == 4),
    ("jobs=2", lambda p: p.jobs == 2),
], ids=["int", "size", "stage-by-name", "list-index", "new-field", "jobs"])
def test_set_overrides_a_field_before_validation(override, check):
    assert check(specs.parse(GOOD, overrides=[override]))


def test_set_creates_missing_parent_mappings():
    text = GOOD.replace("  checkpoints: {node: .podpipe, durable: \"file://.durable\", "
                        "everyBatches: 4}\n", "")
    assert specs.parse(text).checkpoints.durable is None
    pipeline = specs.parse(text, overrides=["checkpoints.durable=file:///tmp/d"])
    assert pipeline.checkpoints.durable == "file:///tmp/d"


@pytest.mark.parametrize("override,message", [
    ("nonsense", "expected KEY=VALUE"),
    ("stages.nope.run=m:f", "no field 'spec.stages.nope'"),
    ("source.batchRows=zero", "integer >= 1"),
], ids=["no-equals", "unknown-item", "invalid-value"])
def test_a_bad_override_is_an_input_error(override, message):
    with pytest.raises(SpecError, match=message):
        specs.parse(GOOD, overrides=[override])


@pytest.mark.parametrize("checkpoints, message", [
    ({"reuse": True}, "needs spec.checkpoints.durable"),
    ({"durable": "file:///tmp/s", "reuse": "yes"}, "expected true or false"),
])
def test_reuse_across_runs_needs_a_durable_tier_and_a_boolean(checkpoints, message):
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
           "spec": {"source": {"uri": "x.parquet"},
                    "stages": [{"name": "a", "run": "m:f", "inputs": ["source"]}],
                    "sinks": [{"input": "a", "uri": "out/"}], "checkpoints": checkpoints}}
    with pytest.raises(SpecError) as caught:
        specs.parse(yaml.safe_dump(doc))
    assert caught.value.field == "spec.checkpoints.reuse" and message in str(caught.value)


TABLES = """\
apiVersion: podpipe.dev/v1alpha1
kind: Pipeline
metadata: {name: q12}
spec:
  source: {uri: "lineitem/*.parquet"}
  tables:
    - {name: orders, uri: orders/, columns: [o_orderkey, o_orderpriority]}
  stages:
    - {name: late, run: "m:late", inputs: [source]}
    - {name: join, run: "m:join", inputs: [late, orders]}
    - {name: count, run: "m:count", reduce: true, inputs: [join]}
  sinks:
    - {input: count, uri: out/}
"""


def test_a_table_is_a_node_every_task_of_its_readers_reads_whole():
    pipeline = specs.parse(TABLES)
    assert pipeline.table("orders").columns == ("o_orderkey", "o_orderpriority")
    assert pipeline.table("orders").format == "parquet"
    graph = Graph.of(pipeline)
    assert graph.domain["orders"] == "table" and graph.domain["join"] == "batch"
    assert graph.stages == ("late", "join", "count") and graph.tables == {"orders"}
    assert graph.reduce_inputs() == ["join"]  # the reduce reads batches, not the table


@pytest.mark.parametrize("edit,field,message", [
    (("spec.tables.0.name", "join"), "spec.stages[1].name", "names a table already"),
    (("spec.tables.0.name", "source"), "spec.tables[0].name", "reserved"),
    (("spec.stages.1.inputs", ["late", "order"]), "spec.stages[1].inputs[1]",
     "unknown input 'order'"),
    (("spec.stages.1.inputs", ["orders"]), "spec.stages[1].inputs", "reads only tables"),
    (("spec.sinks.0.input", "orders"), "spec.sinks[0].input", "a table is an input of stages"),
    (("spec.stages.1.inputs", ["late"]), "spec.tables[0].name", "read by no stage"),
    (("spec.tables.0.format", "xlsx"), "spec.tables[0].format", "expected one of"),
    (("spec.tables.0.columns", []), "spec.tables[0].columns", "non-empty list"),
    (("spec.sinks.0.uri", "orders/out/"), "spec.sinks[0].uri", "inside table 'orders'"),
])
def test_a_bad_table_is_refused_naming_it(edit, field, message):
    doc = yaml.safe_load(TABLES)
    node = doc
    parts = edit[0].split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[parts[-1]] = edit[1]
    with pytest.raises(SpecError) as caught:
        specs.parse(yaml.safe_dump(doc), file="q12.yaml")
    assert caught.value.field == field and message in str(caught.value), str(caught.value)
    assert caught.value.exit_code == 2


def test_the_old_api_version_is_read_with_a_warning_naming_the_new_one():
    old = GOOD.replace("podpipe.dev/v1alpha1", "podpipe/v1alpha1")
    with pytest.warns(SpecWarning, match="apiVersion 'podpipe/v1alpha1' is now "
                                         "'podpipe.dev/v1alpha1'"):
        pipeline = specs.parse(old, file="p.yaml")
    assert pipeline.name == "q1"


def test_a_spec_given_as_a_dict_names_the_key_path_not_a_line_of_text_it_never_saw():
    import podpipe

    doc = yaml.safe_load(GOOD)
    doc["spec"]["stages"][1]["run"] = "no-colon"
    with pytest.raises(SpecError) as raised:
        podpipe.validate(doc)
    message = str(raised.value)
    assert message.startswith("the spec dict: spec.stages[1].run: "), message
    assert "<dict>" not in message and raised.value.line is None


def test_the_package_says_it_is_typed():
    from importlib.resources import files

    assert files("podpipe").joinpath("py.typed").is_file()


def _gpu_pipeline(gpus: dict, *stages: tuple[str, int, object]):
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "g"},
           "spec": {"source": {"uri": "x.parquet"}, **gpus,
                    "sinks": [{"input": name, "uri": f"o/{name}/"} for name, _, _ in stages],
                    "stages": [{"name": name, "run": "m:f", "inputs": ["source"],
                                "resources": {"gpu": gpu}, "workers": workers}
                               for name, gpu, workers in stages]}}
    return specs.parse(yaml.safe_dump(doc))


def test_gpu_slots_give_each_worker_its_own_devices_fixed_stages_first():
    pipeline = _gpu_pipeline({"gpus": 4}, ("a", 1, "auto"), ("b", 2, 1))
    assert pipeline.gpus == 4 and pipeline.stage("b").resources.gpu == 2
    slots = pipeline.gpu_slots(["0", "1", "2", "3"])
    assert slots == {"b": [("0", "1")], "a": [("2",), ("3",)]}
    short = _gpu_pipeline({}, ("a", 1, 4)).gpu_slots(["5", "7"])
    assert short == {"a": [("5",), ("7",)]}  # workers 2 and 3: none
    shared = _gpu_pipeline({}, ("a", 1, "auto"), ("c", 1, "auto")).gpu_slots("0123")
    assert shared == {"a": [("0",), ("1",)], "c": [("2",), ("3",)]}
    assert _gpu_pipeline({}, ("a", 2, "auto")).gpu_slots([]) == {"a": []}


@pytest.mark.parametrize("field,value,message", [
    ("gpus", -1, "spec.gpus"), ("gpus", "two", "spec.gpus")])
def test_bad_gpu_counts_are_refused_naming_the_field(field, value, message):
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        _gpu_pipeline({field: value}, ("a", 1, 1))
    with pytest.raises(SpecError, match=r"spec\.stages\[0\]\.resources\.gpu"):
        _gpu_pipeline({}, ("a", 0, 1))


def test_setup_inputs_are_tables_that_come_last_among_a_stages_inputs():
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "s"},
           "spec": {"source": {"uri": "x.parquet"},
                    "tables": [{"name": "codes", "uri": "codes.parquet"}],
                    "stages": [{"name": "a", "run": "m:C", "inputs": ["source"],
                                "setupInputs": ["codes"]}],
                    "sinks": [{"input": "a", "uri": "o/"}]}}
    stage = specs.parse(yaml.safe_dump(doc)).stage("a")
    assert stage.inputs == ("source", "codes") and stage.setup_inputs == ("codes",)
    for bad in (["source"], ["nope"]):
        doc["spec"]["stages"][0]["setupInputs"] = bad
        with pytest.raises(SpecError, match=r"spec\.stages\[0\]\.setupInputs"):
            specs.parse(yaml.safe_dump(doc))
    doc["spec"]["stages"][0].update(setupInputs=["codes"], inputs=["source", "codes"])
    with pytest.raises(SpecError, match="not listed in its inputs"):
        specs.parse(yaml.safe_dump(doc))


def test_a_worker_takes_its_devices_from_the_pod_or_in_its_own_container_from_its_own(
        monkeypatch):
    from podpipe.runtime.stage import agent

    pipeline = _gpu_pipeline({}, ("a", 1, 2), ("b", 1, 1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    monkeypatch.setenv("PODPIPE_WORKER", "1")
    monkeypatch.delenv("PODPIPE_CONTAINER", raising=False)
    assert agent._devices(pipeline, "a") == {"CUDA_VISIBLE_DEVICES": "5"}  # the pod's 3
    assert agent._devices(pipeline, "b") == {"CUDA_VISIBLE_DEVICES": ""}  # b has worker 0
    monkeypatch.setenv("PODPIPE_WORKER", "0")
    assert agent._devices(pipeline, "b") == {"CUDA_VISIBLE_DEVICES": "6"}
    monkeypatch.setenv("PODPIPE_CONTAINER", "1")  # b's container: the plugin gave it 3,5,6
    assert agent._devices(pipeline, "b") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert agent._devices(_gpu_pipeline({}, ("a", 1, 1)), "source") == \
        {"CUDA_VISIBLE_DEVICES": ""}
