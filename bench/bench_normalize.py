"""Throughput of the normalisation stage (names, e-mail, phone, RNVP addresses, La Poste).

Usage: python bench/bench_normalize.py --records 1000000 [--data DIR]

Generates the four sample extracts at that size (or reuses DIR), loads them,
then times `normalize_records` alone and prints records/s and peak RSS as one
JSON line. Load time is reported apart: it is not part of the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd

from mdm_pipeline.config.loader import load_settings
from mdm_pipeline.normalize.stage import normalize_records
from mdm_pipeline.sources import load_source
from mdm_pipeline.sources.synthetic import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--data", type=Path, help="folder with generated data to reuse")
    args = parser.parse_args()
    data = args.data or Path(tempfile.mkdtemp(prefix="mdm-bench-norm-"))
    if not (data / "config.yaml").exists():
        generate(data, args.records)
    settings = load_settings(data / "config.yaml")
    t0 = time.perf_counter()
    records = pd.concat(
        [load_source(s, settings, pd.Timestamp("2026-11-22")).records for s in settings.sources],
        ignore_index=True,
    )
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = normalize_records(records, settings.normalize)
    norm_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "records": len(out),
                "load_s": round(load_s, 2),
                "normalize_s": round(norm_s, 2),
                "records_per_s": round(len(out) / norm_s),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "status": out["address_status"].value_counts().to_dict(),
            }
        )
    )


if __name__ == "__main__":
    main()
