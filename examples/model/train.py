"""Train the example's model on the example's own data (nothing downloaded): a random
forest predicting whether a TPC-H line arrives after its committed date, from what is
known when it ships (`stages.features`). Written atomically to
data/tpch-sf{SF}/models/late.pkl; prints its accuracy on lines it was not trained on.

    python -m examples.model.train [--sf 0.1] [--rows 100000]
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from examples.model.stages import COLUMNS, features, was_late


def model_path(sf: str) -> Path:
    return Path("data") / f"tpch-sf{sf}" / "models" / "late.pkl"


def main() -> int:
    from sklearn.ensemble import RandomForestClassifier

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sf", default="0.1")
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    lines = pq.read_table(Path("data") / f"tpch-sf{args.sf}" / "lineitem", columns=COLUMNS)
    order = np.random.default_rng(7).permutation(lines.num_rows)
    train, test = lines.take(order[:args.rows]), lines.take(order[args.rows:2 * args.rows])
    model = RandomForestClassifier(n_estimators=40, max_depth=12, min_samples_leaf=20,
                                   random_state=7, n_jobs=1)
    model.fit(features(train), was_late(train).to_numpy(zero_copy_only=False))
    accuracy = model.score(features(test), was_late(test).to_numpy(zero_copy_only=False))
    path = model_path(args.sf)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".late.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB, accuracy {accuracy:.3f} on "
          f"{test.num_rows:,} lines it was not trained on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
