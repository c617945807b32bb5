"""TPC-H data and answers from DuckDB's generator (extension loaded from its package).

    python -m examples.tpch.data generate --sf 0.1   # -> data/tpch-sf0.1/{lineitem,orders,customer}/
    python -m examples.tpch.data check out/tpch-q1 --sf 0.1 [--query 12]
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import shutil
import sys
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ANSWER_SCALES = (0.01, 0.1, 1.0)
TABLES = ("lineitem", "orders", "customer")  # what the bundled queries read
ORDER_BY = {"lineitem": "l_orderkey, l_linenumber", "orders": "o_orderkey",
            "customer": "c_custkey"}


def connect():
    import duckdb
    import duckdb_extension_tpch

    pattern = os.path.join(os.path.dirname(duckdb_extension_tpch.__file__), "extensions",
                           f"v{duckdb.__version__}", "tpch.duckdb_extension")
    found = glob.glob(pattern)
    if not found:
        raise SystemExit(f"no TPC-H extension for DuckDB {duckdb.__version__} at {pattern}; "
                         "install duckdb-extension-tpch of the same version")
    con = duckdb.connect()
    con.execute(f"LOAD '{found[0]}'")
    return con


def default_dir(sf: float) -> Path:
    return Path("data") / f"tpch-sf{sf:g}" / "lineitem"


def generate(sf: float, out: Path, rows_per_group: int = 100_000) -> Path:
    """Write lineitem at scale factor `sf` as Parquet files under `out`, and orders and
    customer beside it (`out/../orders`, ...), each atomically and only if missing.
    Returns `out`."""
    folders = {name: out if name == "lineitem" else out.parent / name for name in TABLES}
    missing = [name for name, folder in folders.items() if not folder.exists()]
    if not missing:
        return out
    con = connect()
    con.execute(f"CALL dbgen(sf={sf})")
    for name in missing:
        folder = folders[name]
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        con.execute(f"COPY (SELECT * FROM {name} ORDER BY {ORDER_BY[name]}) TO "
                    f"'{tmp}' (FORMAT parquet, ROW_GROUP_SIZE {rows_per_group}, "
                    f"FILE_SIZE_BYTES '64MB')")
        tmp.rename(folder)
    return out


def official(sf: float, query: int = 1) -> list[dict]:
    """The official answer rows of TPC-H query `query` at `sf` (one of ANSWER_SCALES)."""
    if not any(math.isclose(sf, s) for s in ANSWER_SCALES):
        raise SystemExit(f"no official answer at scale factor {sf}; use one of {ANSWER_SCALES}")
    text = connect().execute("SELECT answer FROM tpch_answers() WHERE query_nr = ? AND "
                             "scale_factor = ?", [query, sf]).fetchone()[0]
    header, *lines = text.strip().splitlines()
    return [dict(zip(header.split("|"), line.split("|"))) for line in lines]


def compare(result: pa.Table, sf: float, query: int = 1) -> list[str]:
    """Differences between a result of query `query` and the official answer (empty
    when equal): money to the last digit, averages to 1e-9."""
    expected = official(sf, query)
    got = result.to_pylist()
    if len(got) != len(expected):
        return [f"{len(got)} rows, expected {len(expected)}"]
    problems = []
    for i, (row, want) in enumerate(zip(got, expected)):
        for column in want:
            if column not in row:
                problems.append(f"no column {column!r}")
                continue
            value, target = row[column], want[column]
            if column.startswith("avg"):
                ok = math.isclose(float(value), float(target), rel_tol=1e-9)
            elif isinstance(value, Decimal):
                ok = value == Decimal(target)
            else:
                ok = str(value) == target
            if not ok:
                problems.append(f"row {i} {column}: {value} != {target}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.tpch.data")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write lineitem as Parquet")
    gen.add_argument("--sf", type=float, default=0.1)
    gen.add_argument("--out", type=Path)
    check = sub.add_parser("check", help="compare a result with the official answer")
    check.add_argument("result", type=Path, help="the sink directory of the run")
    check.add_argument("--sf", type=float, default=0.1)
    check.add_argument("--query", type=int, default=1, choices=(1, 3, 12))
    args = parser.parse_args(argv)
    if args.command == "generate":
        out = generate(args.sf, args.out or default_dir(args.sf))
        print(f"{', '.join(TABLES)} at SF {args.sf:g}: {out.parent}")
        return 0
    result = pq.read_table(args.result)
    problems = compare(result, args.sf, args.query)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"Q{args.query} result " + ("matches" if not problems else "DIFFERS from")
          + f" the official TPC-H answer at SF {args.sf:g}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
