"""End-to-end timing of `mdm run` on generated data.

Usage: python bench/bench_pipeline.py --records 100000 [--records 1000000] [--keep DIR]

For each size: generate the four extracts with the seeded generator, run the
whole pipeline into a fresh SQLite store, and print wall time per stage, peak
RSS and pair quality against the generator's truth as one JSON line. Each
size runs in a child process so that peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(records: int, workdir: Path) -> dict:
    import pandas as pd
    import sqlalchemy as sa

    from mdm_pipeline.matching.evaluation import pair_scores
    from mdm_pipeline.pipeline.run import Pipeline
    from mdm_pipeline.sources.synthetic import generate

    t0 = time.perf_counter()
    generate(workdir, records)
    gen_s = time.perf_counter() - t0
    pipeline = Pipeline.from_config(workdir / "config.yaml")
    t0 = time.perf_counter()
    summary = pipeline.run()
    wall = time.perf_counter() - t0
    engine = sa.create_engine(f"sqlite:///{workdir / 'mdm.sqlite'}")
    xref = pd.read_sql("select source, source_key, golden_id from mdm_source_records", engine)
    truth = pd.read_csv(workdir / "truth.csv", dtype=str)
    both = xref.merge(truth, on=["source", "source_key"])
    scores = pair_scores(both["golden_id"], both["entity_id"])
    return {
        "records": records,
        "generate_s": round(gen_s, 2),
        "run_wall_s": round(wall, 2),
        "stages_s": summary.seconds,
        "peak_rss_mib": summary.peak_rss_mib,
        "candidate_pairs": summary.candidate_pairs,
        "clusters": summary.clusters,
        "precision": round(scores.precision, 4),
        "recall": round(scores.recall, 4),
        "f1": round(scores.f1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, action="append", required=True)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=Path, help="keep generated data under this folder")
    args = parser.parse_args()
    if args.child:
        workdir = args.keep or Path(tempfile.mkdtemp(prefix="mdm-bench-"))
        print(json.dumps(_one(args.records[0], workdir)))
        return
    print(
        json.dumps(
            {
                "machine": platform.machine(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )
    for n in args.records:
        cmd = [sys.executable, __file__, "--child", "--records", str(n)]
        if args.keep:
            cmd += ["--keep", str(args.keep / str(n))]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
