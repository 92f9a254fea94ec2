"""End-to-end timing of `mdm run` on generated data, next to Splink on the same records.

Usage:
    python bench/bench_pipeline.py --records 100000 [--records 1000000] [--keep DIR] [--splink]
                                   [--rerun] [--night SHARE] [--full-night] [--repeat N]

For each size: generate the four extracts with the seeded generator (in a
process of its own, before the run's, as a night's extracts come), run the
whole pipeline (load, normalise, match, cluster, survive, store, export) into
a fresh SQLite store, and print wall time per stage, peak RSS and pair quality
against the generator's truth as one JSON line. With --splink, Splink 5 then
runs on the same records (`bench_matching.py --tool splink`: our normalised
records, its usual settings and the same blocking rules; training +
prediction + clustering timed). Each run is a child process so that its peak
RSS is its own. With --rerun, a second run on the same records follows, into
the store the first one wrote: a night on which nothing changed, the steady
state of a nightly full run (it reads and compares the whole store, and writes
nothing but its run log). With --night, an incremental night follows on a copy
of that store (`mdm run --incremental`): a delta file of SHARE of each CSV
extract's rows, made as `bench_incremental.py` makes it (new e-mails, new
postcodes, deletions, new keys), run twice from the same stored state. The
first creates the store's rollback journal, which SQLite keeps from then on
(`journal_mode = PERSIST`); the second reuses it, as every later night of a
nightly incremental job does: its figure is the steady state. With
--full-night, incremental nights on a copy of the first run's store and
its extracts as they were, all full: the nights of an installation that
receives no delta files, its every row returned to its unit. The first
reads the stored rows it returns from their payloads and leaves them for the
next (the held parts); the next, run N times from the store the first left,
reads them there: its median is the steady state. Then each
run's wall time over Splink's in this same benchmark run, and the ratio of
each stage's time between consecutive sizes, beside the ratio of candidate
pairs: no stage should grow faster.

With --repeat N, the steady night and Splink each run N times, one after
the other in turn (the night each time from the same stored state), and
the middle run of each (the median, N odd) is the one compared: on a shared
two-core machine the same run's time has been seen to vary by a third from
one minute to the next, for either tool.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import TreePeak, changes, peak_rss_mib  # bench/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent


#: The generator, run by `_one` in a child process (folder and record count as arguments).
GENERATE = (
    "import sys; from pathlib import Path; "
    "from mdm_pipeline.sources.synthetic import generate; "
    "generate(Path(sys.argv[1]), int(sys.argv[2]))"
)


def _one(records: int, workdir: Path, kind: str, again: bool = False) -> dict:
    from mdm_pipeline.pipeline.allocator import keep_freed_memory, no_blas_threads

    no_blas_threads()  # as `mdm run` does, before numpy is imported
    import pandas as pd
    import sqlalchemy as sa

    from mdm_pipeline.matching.evaluation import pair_scores
    from mdm_pipeline.pipeline.run import Pipeline

    keep_freed_memory()  # as `mdm run` does

    t0 = time.perf_counter()
    if not (workdir / "config.yaml").exists():
        # In a process of its own, so that the run's starts as `mdm run`'s does: the
        # generator's freed memory, which this process keeps (`keep_freed_memory`),
        # held 600 MB more through the first run's load, beside the loading child
        # (tree peak 4,215-4,230 MiB against 3,753 MiB, docs/benchmarks.md).
        subprocess.run([sys.executable, "-c", GENERATE, str(workdir), str(records)], check=True)
    gen_s = time.perf_counter() - t0
    pipeline = Pipeline.from_config(workdir / "config.yaml")
    if kind == "spark":
        from mdm_pipeline.config.settings import SparkSettings

        spark = SparkSettings(master="local[2]", driver_memory="4g")
        pipeline.settings = pipeline.settings.model_copy(update={"engine": "spark", "spark": spark})
    if not again:
        # A fresh store each time: the run writes every golden record.
        (workdir / "mdm.sqlite").unlink(missing_ok=True)
    t0 = time.perf_counter()
    with TreePeak() as tree:
        summary = pipeline.run()
    wall = time.perf_counter() - t0
    # Before the scoring below reads the store back: the run's own peak, and with
    # Spark's JVM and Python workers (processes of their own).
    # The run resets the kernel's high-water mark at each stage: its summary holds
    # the largest of them.
    peak = round(max(summary.peak_rss_mib, peak_rss_mib()))
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
        "engine": kind,
        "peak_rss_mib": peak,
        "stage_peak_rss_mib": summary.peak_rss_by_stage,
        "peak_rss_tree_mib": round(tree.peak_mib),
        "candidate_pairs": summary.candidate_pairs,
        "clusters": summary.clusters,
        "golden_created": summary.golden_created,
        "golden_updated": summary.golden_updated,
        "precision": round(scores.precision, 4),
        "recall": round(scores.recall, 4),
        "f1": round(scores.f1, 4),
    }


def _night(workdir: Path) -> dict:
    """An incremental run on `workdir` (a copy of a stored first run, its config
    pointed at delta files): wall time, stages, peaks and what it changed."""
    from mdm_pipeline.pipeline.allocator import keep_freed_memory, no_blas_threads

    no_blas_threads()  # as `mdm run` does, before numpy is imported
    from mdm_pipeline.golden_records.zygote import Zygote
    from mdm_pipeline.pipeline.run import Pipeline

    keep_freed_memory()  # as `mdm run` does
    pipeline = Pipeline.from_config(workdir / "config.yaml")
    t0 = time.perf_counter()
    zygote = Zygote.start()  # as `mdm run` does, before any thread (the peak's sampler)
    try:
        with TreePeak() as tree:
            summary = pipeline.run(incremental=True, zygote=zygote)
    finally:
        if zygote is not None:
            zygote.close()
    wall = time.perf_counter() - t0
    return {
        "run_wall_s": round(wall, 2),
        "stages_s": summary.seconds,
        "peak_rss_mib": round(max(summary.peak_rss_mib, peak_rss_mib())),
        "peak_rss_tree_mib": round(tree.peak_mib),
        **changes(summary),
    }


#: The runs compared with Splink, when the benchmark made them.
RUNS = ("ours", "rerun", "first_night", "night", "first_full_night", "full_night")
#: The store as the night found it, kept beside the night's copy to run it again.
BEFORE_NIGHT = "before-night.sqlite"


def _night_copy(workdir: Path, share: float) -> Path:
    """A copy of `workdir` with its store, switched to delta extracts of `share`, and a
    second copy of the store (`BEFORE_NIGHT`)."""
    from bench_incremental import make_deltas  # bench/ is on sys.path

    night = workdir.with_name(workdir.name + "-night")
    shutil.rmtree(night, ignore_errors=True)
    shutil.copytree(workdir, night, ignore=shutil.ignore_patterns("out", "truth.csv"))
    shutil.copy(night / "mdm.sqlite", night / BEFORE_NIGHT)
    make_deltas(night, share)
    # The copies' dirty pages are the benchmark's doing, flushed before the run, not
    # by its commit (as bench_incremental.py does).
    os.sync()
    return night


def _full_night_copy(workdir: Path) -> Path:
    """A copy of `workdir` with its store, its extracts unchanged and all full."""
    night = workdir.with_name(workdir.name + "-full-night")
    shutil.rmtree(night, ignore_errors=True)
    shutil.copytree(workdir, night, ignore=shutil.ignore_patterns("out", "truth.csv"))
    os.sync()
    return night


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, action="append", required=True)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--again", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--rerun", action="store_true", help="run again on the same records and store"
    )
    parser.add_argument(
        "--night",
        type=float,
        metavar="SHARE",
        help="then an incremental night on a delta of SHARE of each CSV extract",
    )
    parser.add_argument(
        "--full-night",
        action="store_true",
        help="then incremental nights on the same full extracts (nothing changed)",
    )
    parser.add_argument("--night-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=Path, help="keep generated data under this folder")
    parser.add_argument("--splink", action="store_true", help="run Splink 5 on the same records")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run the steady night and Splink N times each and compare their medians",
    )
    parser.add_argument(
        "--engine",
        choices=("local", "spark", "both"),
        default="local",
        help="our engine(s): spark runs in local mode on this machine",
    )
    args = parser.parse_args()
    if args.night_child:
        print(json.dumps(_night(args.keep)))
        return
    if args.child:
        workdir = args.keep or Path(tempfile.mkdtemp(prefix="mdm-bench-"))
        print(json.dumps(_one(args.records[0], workdir, args.engine, args.again)))
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
    rows: list[dict] = []
    for n in args.records:
        workdir = args.keep / str(n) if args.keep else Path(tempfile.mkdtemp(prefix="mdm-bench-"))
        row: dict = {}
        for engine in ("local", "spark") if args.engine == "both" else (args.engine,):
            cmd = [sys.executable, __file__, "--child", "--records", str(n)]
            cmd += ["--keep", str(workdir), "--engine", engine]
            ours = json.loads(_last_line(cmd))
            print(json.dumps({"tool": f"mdm-pipeline ({engine})", **ours}), flush=True)
            row.setdefault("records", ours["records"])
            row.setdefault("ours", ours)
            row[engine] = ours
            if args.rerun:
                again = json.loads(_last_line([*cmd, "--again"]))
                print(json.dumps({"tool": f"mdm-pipeline ({engine}), rerun", **again}), flush=True)
                row.setdefault("rerun", again)
        splink_cmd = [sys.executable, str(HERE / "bench_matching.py"), "--data", str(workdir)]
        splink_cmd += ["--tool", "splink"]
        steady: list[dict] = []
        splinks: list[dict] = []

        if args.night:
            # Each steady night beside a Splink run: a drift of the machine's speed
            # weighs on both sides alike.
            beside = functools.partial(_run_splink, splink_cmd, splinks) if args.splink else None
            night = _night_copy(workdir, args.night)
            row["first_night"], steady = _nights(
                n, night, "incremental night", args.repeat, from_first=False, beside=beside
            )
            row["night"] = _median(steady, "run_wall_s")
        if args.full_night:
            night = _full_night_copy(workdir)
            label = "incremental night on full extracts"
            row["first_full_night"], full = _nights(n, night, label, args.repeat, from_first=True)
            row["full_night"] = _median(full, "run_wall_s")
        if args.splink:
            while len(splinks) < args.repeat:
                _run_splink(splink_cmd, splinks)
            splink = row["splink"] = _median(splinks, "seconds")
            over = {
                f"{run}_over_splink": round(row[run]["run_wall_s"] / splink["seconds"], 2)
                for run in RUNS
                if run in row
            }
            if args.repeat > 1:
                over["medians_of"] = args.repeat
                over["night_runs_s"] = [r["run_wall_s"] for r in steady]
                over["splink_runs_s"] = [round(r["seconds"], 2) for r in splinks]
            print(json.dumps({"records": row["records"], **over}), flush=True)
        rows.append(row)
    for small, large in itertools.pairwise(rows):
        a, b = small["ours"], large["ours"]
        ratios = {k: round(b["stages_s"][k] / a["stages_s"][k], 1) for k in a["stages_s"]}
        print(
            json.dumps(
                {
                    "from": a["records"],
                    "to": b["records"],
                    "records_ratio": round(b["records"] / a["records"], 1),
                    "pairs_ratio": round(b["candidate_pairs"] / a["candidate_pairs"], 1),
                    "stage_ratios": ratios,
                    "wall_ratio": round(b["run_wall_s"] / a["run_wall_s"], 1),
                }
            )
        )


def _nights(
    n: int,
    night: Path,
    label: str,
    repeat: int,
    from_first: bool,
    beside: Callable[[], None] | None = None,
) -> tuple[dict, list[dict]]:
    """A first incremental night in folder `night` (a copy made for it, removed after),
    then `repeat` more, each from the same stored state: the store kept beside it
    (`BEFORE_NIGHT`), or with `from_first` the store the first night left (what it
    leaves for the next one, the held parts, is then part of the steady state).
    `beside` runs after each of the next nights. Each night is printed as it ends."""
    cmd = [sys.executable, __file__, "--night-child", "--records", str(n), "--keep", str(night)]
    stored, kept = night / "mdm.sqlite", night / BEFORE_NIGHT
    try:
        first = json.loads(_last_line(cmd))
        print(json.dumps({"tool": f"mdm-pipeline, {label} (first)", **first}), flush=True)
        if from_first:
            shutil.copy(stored, kept)
        steady = []
        for _ in range(repeat):
            # The same stored state again; the journal the first left stays.
            shutil.copy(kept, stored)
            os.sync()
            steady.append(json.loads(_last_line(cmd)))
            print(json.dumps({"tool": f"mdm-pipeline, {label} (next)", **steady[-1]}), flush=True)
            if beside is not None:
                beside()
        return first, steady
    finally:
        # Gigabytes (the store's copies and its journal), not kept.
        shutil.rmtree(night, ignore_errors=True)


def _run_splink(cmd: list[str], runs: list[dict]) -> None:
    """One Splink run (`bench_matching.py`), printed and added to `runs`."""
    runs.append(json.loads(_last_line(cmd)))
    print(json.dumps(runs[-1]), flush=True)


def _median(runs: list[dict], key: str) -> dict:
    """The middle run by `key` (of an even number, the later of the two middle ones)."""
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def _last_line(cmd: list[str]) -> str:
    """Run a child benchmark and return its last JSON line (its summary)."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{"))


if __name__ == "__main__":
    main()
