"""The bundled TPC-H Q1 pipeline run from Python: podpipe's API in one page.

    python -m examples.api.q1 [LINEITEM_GLOB]

Runs the pipeline of examples/tpch/q1.yaml (with another source, if given), prints
each stage's figures and the answer, then shows what a failing stage raises.
"""

from __future__ import annotations

import sys

import podpipe

SPEC = "examples/tpch/q1.yaml"


def main(lineitem: str = "data/tpch-sf0.01/lineitem/*.parquet") -> None:
    pipeline = podpipe.validate(SPEC, overrides=[f"source.uri={lineitem}"])
    print(f"{pipeline.name}: {[s.name for s in pipeline.stages]}")

    run = podpipe.run(pipeline)  # the spec as validated, overrides included
    print(run)
    for name, figures in run.stages.items():
        print(f"  {name:<8} {figures.batches_done}/{figures.batches_total} batches, "
              f"{figures.rows_out:,} rows out, busy {figures.busy_seconds:.2f} s")
    answer = run.to_arrow("sink-0").sort_by([("l_returnflag", "ascending"),
                                             ("l_linestatus", "ascending")])
    print(answer.select(["l_returnflag", "l_linestatus", "count_order"]).to_pylist())

    # A spec may also be a dict: here Q1 with a stage that fails on its first batch.
    broken = dict(pipeline.document)
    broken["spec"] = {**broken["spec"], "sinks": [{"input": "total", "uri": "out/broken/"}],
                      "stages": [{**s, "run": "examples.api.broken:prices"}
                                 if s["name"] == "prices" else s
                                 for s in broken["spec"]["stages"]]}
    try:
        podpipe.run(broken)
    except podpipe.RunError as error:
        print(f"failed: stage {error.stage!r}, batch {error.batch}")
        print(error.traceback)
    print(podpipe.status("latest").state)


if __name__ == "__main__":
    main(*sys.argv[1:])
