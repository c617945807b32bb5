"""A serving command stage in Python (`serve: true`, protocol 1), as docs/spec.md shows
it: one task per line on stdin, x doubled, an Arrow IPC file written, one answer per
line on stdout. With EXIT_BATCH set, it exits (code 5) when that batch comes."""

import json
import os
import sys

import pyarrow as pa
import pyarrow.compute as pc

for line in sys.stdin:
    task = json.loads(line)
    if str(task["batch"]) == os.environ.get("EXIT_BATCH"):
        sys.exit(5)
    table = pa.ipc.open_file(task["inputs"][0]).read_all()
    table = table.set_column(0, "x", pc.multiply(table["x"], 2))
    with pa.OSFile(task["output"], "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    print("a line for the log")  # not an answer: it goes to the stage's log
    print(json.dumps({"batch": task["batch"]}), flush=True)
