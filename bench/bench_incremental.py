"""A full nightly run, then a 5% delta processed incrementally, on the same store.

Usage:
    python bench/bench_incremental.py --data DIR [--share 0.05] [--repeat N]

DIR is a folder written by `mdm generate` (it is copied, not modified). Steps:

1. `mdm run` on the full extracts into a fresh SQLite store (timed per stage);
2. for each CSV source, a delta file with `--share` of its rows: half with a
   new e-mail (or phone), a tenth deleted, a tenth new records (copies of
   existing customers under new keys), the rest with a new postcode; the
   config is switched to these delta files (`delta.operation_column: OP`);
3. `mdm run --incremental` on them (timed per stage), `--repeat` times, each on
   a copy of the store as the full run left it.

Prints one JSON line per run and the ratio of the median incremental wall time
to the full run's (single runs on a shared 2-core machine vary by a fifth).
Each run is in a child process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from common import changes, peak_rss_mib  # bench/ is on sys.path when a script runs

from mdm_pipeline.pipeline.allocator import BLAS_THREADS_VARIABLE


def child(config: Path, incremental: bool) -> None:
    from mdm_pipeline.pipeline.allocator import keep_freed_memory
    from mdm_pipeline.pipeline.run import Pipeline

    keep_freed_memory()  # as `mdm run` does
    t0 = time.perf_counter()
    summary = Pipeline.from_config(config).run(incremental=incremental)
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "mode": summary.mode,
                "wall_s": round(wall, 1),
                "stages_s": summary.seconds,
                **changes(summary),
                # The run resets the kernel's high-water mark at each stage.
                "peak_rss_mib": round(max(summary.peak_rss_mib, peak_rss_mib())),
                "stage_peak_rss_mib": summary.peak_rss_by_stage,
            }
        )
    )


def _column(spec: dict, field: str) -> str | None:
    value = spec["mapping"].get(field)
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("column"), str):
        return value["column"]
    return None


def make_deltas(folder: Path, share: float, seed: int = 1) -> int:
    """Write a delta file per CSV source and point the config at them; returns rows."""
    config_path = folder / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    rng = np.random.default_rng(seed)
    total = 0
    for spec in config["sources"]:
        if spec["format"] != "csv":
            continue
        path = folder / spec["path"]
        encoding, sep = spec.get("encoding", "utf-8"), spec.get("delimiter", ",")
        frame = pd.read_csv(
            path,
            sep=sep,
            dtype=str,
            encoding=encoding,
            keep_default_na=False,
            on_bad_lines="skip",
            engine="python" if len(sep) > 1 else "c",
        )
        key = _column(spec, "source_key")
        contact = _column(spec, "email") or _column(spec, "phone")
        postcode = _column(spec, "postcode")
        pick = frame.iloc[rng.choice(len(frame), int(len(frame) * share), replace=False)].copy()
        n = len(pick)
        op = np.array(["U"] * n, dtype=object)
        op[: n // 10] = "D"
        new = slice(n // 10, n // 5)
        pick.iloc[new, pick.columns.get_loc(key)] = pick.iloc[new][key] + "N"
        mail = slice(n // 5, n // 5 + n // 2)
        if contact:
            pick.iloc[mail, pick.columns.get_loc(contact)] = [
                f"nouveau{i}@exemple.fr" for i in range(len(pick.iloc[mail]))
            ]
        if postcode:
            rest = slice(n // 5 + n // 2, n)
            pick.iloc[rest, pick.columns.get_loc(postcode)] = "13001"
        pick["OP"] = op
        delta = path.with_name(path.stem + "_delta" + path.suffix)
        pick.to_csv(delta, sep=sep, index=False, encoding=encoding)
        spec["path"] = delta.name
        spec["delta"] = {"operation_column": "OP"}
        total += n
    config_path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=1, help="incremental runs (median)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    parser.add_argument("--child", choices=("full", "incremental"), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.config, args.child == "incremental")
        return
    work = Path(tempfile.mkdtemp(prefix="mdm-bench-inc-")) / "data"
    shutil.copytree(args.data, work, ignore=shutil.ignore_patterns("*.sqlite", "out"))
    if args.keep:
        print(json.dumps({"work": str(work)}), flush=True)
    rows = []

    def run(mode: str) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--data",
            str(args.data),
            "--child",
            mode,
            "--config",
            str(work / "config.yaml"),
        ]
        # The child's environment as `mdm run` makes its own (`no_blas_threads`): this
        # script imports numpy before `child` could ask.
        env = {**os.environ, BLAS_THREADS_VARIABLE: os.environ.get(BLAS_THREADS_VARIABLE, "1")}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{mode} run failed")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        return row

    try:
        full = run("full")
        print(json.dumps({"delta_rows": make_deltas(work, args.share)}), flush=True)
        stored = work / "mdm.sqlite"
        kept = work.parent / "after_full.sqlite"
        if args.repeat > 1:
            shutil.copy(stored, kept)
        for i in range(args.repeat):
            if i:
                shutil.copy(kept, stored)
            # The copies are the benchmark's own doing: their gigabytes of dirty pages
            # are flushed before the run, not by its commit (an fsync of the store's
            # file writes every dirty page of it, 4 GB a copy), as no real night
            # inherits them.
            os.sync()
            rows.append(run("incremental"))
    finally:
        # Eight gigabytes at 1M records (the extracts, the store and its copy): left
        # behind, a few runs fill the page cache, and the next runs pay for the memory
        # the kernel must then reclaim.
        if not args.keep:
            shutil.rmtree(work.parent, ignore_errors=True)
    walls = sorted(r["wall_s"] for r in rows)
    median = walls[len(walls) // 2]
    print(
        json.dumps(
            {
                "incremental_wall_s": walls,
                "incremental_over_full": round(median / full["wall_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
