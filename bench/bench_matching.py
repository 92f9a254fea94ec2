"""Matching quality, time and memory: mdm-pipeline's engine against Splink 5 on the same data.

Usage:
    python bench/bench_matching.py --data DIR [--tool both|ours|splink]
    python bench/bench_matching.py --febrl 3|4 [--tool ...]

DIR is a folder written by `mdm generate` (config.yaml, truth.csv). FEBRL 3 and
4 come with recordlinkage (offline). Both tools get the same normalised records
(our loader and normaliser run first and are not timed) and the same fields;
each runs in a process of its own, one after the other, so that peak memory
is the tool's own. Each tool is scored at its own default threshold: ours the
shipped auto-match band, Splink its usual 0.9 — never a threshold chosen with
the truth. Prints one JSON line per tool and a Markdown table.

Splink and recordlinkage are bench-only dependencies: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import peak_rss_mib  # bench/ is on sys.path when a script runs

#: Splink's EM sample per training block, equal to our `training.max_pairs_per_block`.
EM_MAX_PAIRS = 2_000_000

FIELDS = (
    "first_name_norm",
    "last_name_norm",
    "birth_date",
    "email_norm",
    "phone_norm",
    "postcode_norm",
    "city_norm",
    "street_norm",
    "customer_ref_norm",
)


def _febrl_records(which: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """FEBRL as canonical records (one source per file) and its truth."""
    from recordlinkage.datasets import load_febrl3, load_febrl4

    from mdm_pipeline.config import schema

    if which == 3:
        frames = {"febrl3": load_febrl3()}
    else:
        a, b = load_febrl4()
        frames = {"febrl4a": a, "febrl4b": b}
    parts = []
    for source, df in frames.items():
        df = df.reset_index()
        out = pd.DataFrame(
            {c: pd.Series([None] * len(df), dtype=object) for c in schema.CANONICAL_COLUMNS}
        )
        out["source"] = source
        out["source_key"] = df["rec_id"]
        out["source_line"] = np.arange(2, len(df) + 2)
        out["record_type"] = "person"
        out["first_name"] = df["given_name"]
        out["last_name"] = df["surname"]
        out["birth_date"] = pd.to_datetime(df["date_of_birth"], format="%Y%m%d", errors="coerce")
        number = df["street_number"].fillna("")
        out["address_lines"] = (number + " " + df["address_1"].fillna("")).str.strip() + (
            "\n" + df["address_2"].fillna("")
        ).where(df["address_2"].notna(), "")
        out["postcode"] = df["postcode"]
        out["city"] = df["suburb"]
        out["country"] = "AU"
        # The social security number plays the part of a customer number shared by units.
        out["customer_ref"] = df["soc_sec_id"]
        out["trust"] = 1
        parts.append(out)
    records = pd.concat(parts, ignore_index=True)
    for col in ("consent_email", "consent_sms", "consent_post"):
        records[col] = pd.array([pd.NA] * len(records), dtype="boolean")
    # rec-123-org and rec-123-dup-0 describe the same person.
    truth = pd.DataFrame(
        {
            "source": records["source"],
            "source_key": records["source_key"],
            "entity_id": records["source_key"].str.extract(r"^(rec-\d+)")[0],
        }
    )
    return records, truth


def prepare(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Normalise the records once and save them for both tools."""
    from mdm_pipeline.config.settings import NormalizeSettings
    from mdm_pipeline.normalize.stage import normalize_records
    from mdm_pipeline.pipeline.run import Pipeline

    if args.febrl:
        records, truth = _febrl_records(args.febrl)
        records = normalize_records(records, NormalizeSettings(default_country="AU"))
        label = f"FEBRL{args.febrl}"
    else:
        records = Pipeline.from_config(args.data / "config.yaml").normalised_records()
        truth = pd.read_csv(args.data / "truth.csv", dtype=str)
        label = f"generated {len(records):,}"
    records = records.reset_index(drop=True)
    entity = records[["source", "source_key"]].merge(truth, how="left")["entity_id"]
    records["__entity"] = entity.fillna("__own_" + pd.Series(np.arange(len(records))).astype(str))
    records.to_pickle(work / "records.pkl")
    return {"dataset": label, "records": len(records)}


def run_ours(work: Path) -> dict[str, object]:
    from mdm_pipeline.config.settings import MatchingSettings
    from mdm_pipeline.matching.clustering import guarded_clusters
    from mdm_pipeline.matching.engine import AUTO, match, train
    from mdm_pipeline.matching.keys import prepare

    records = pd.read_pickle(work / "records.pkl")
    settings = MatchingSettings()
    t0 = time.perf_counter()
    records = prepare(records)
    model = train(records, settings)
    result = match(records, settings, model)
    auto = result.pairs[result.pairs["band"] == AUTO]
    labels, _ = guarded_clusters(len(records), auto, settings.clustering)
    seconds = time.perf_counter() - t0
    return {"labels": labels.tolist(), "seconds": seconds, "pairs": len(result.pairs)}


def run_splink(work: Path) -> dict[str, object]:
    import splink.comparison_library as cl
    from splink import Linker, SettingsCreator, block_on
    from splink.backends.duckdb import DuckDBAPI

    records = pd.read_pickle(work / "records.pkl")
    frame = pd.DataFrame({"unique_id": np.arange(len(records))})
    for col in FIELDS:
        values = records[col]
        if col == "birth_date":
            values = pd.to_datetime(values).dt.strftime("%Y-%m-%d")
        frame[col.removesuffix("_norm")] = values.astype(object).where(values.notna(), None)
    frame["first_initial"] = frame["first_name"].str[:1]
    has_ref = frame["customer_ref"].notna().any()
    t0 = time.perf_counter()
    db_api = DuckDBAPI()
    comparisons = [
        cl.NameComparison("first_name"),
        cl.NameComparison("last_name"),
        cl.DateOfBirthComparison("birth_date", input_is_string=True),
        cl.EmailComparison("email"),
        cl.ExactMatch("phone"),
        cl.ExactMatch("postcode").configure(term_frequency_adjustments=True),
        cl.ExactMatch("city"),
        cl.LevenshteinAtThresholds("street", [2]),
    ]
    # The same blocking rules as our shipped defaults, but for the phonetic keys
    # (exact names here) and the block size cap, which Splink does not have.
    rules = [
        block_on("email"),
        block_on("phone"),
        block_on("birth_date", "last_name"),
        block_on("birth_date", "first_name"),
        block_on("postcode", "last_name", "first_name"),
        block_on("birth_date", "postcode"),
        block_on("street", "postcode", "first_initial"),
    ]
    if has_ref:
        comparisons.append(cl.LevenshteinAtThresholds("customer_ref", [1]))
        rules.insert(0, block_on("customer_ref"))
    settings = SettingsCreator(
        link_type="dedupe_only",
        comparisons=comparisons,
        blocking_rules_to_generate_predictions=rules,
    )
    linker = Linker(db_api.register(frame), settings)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("first_name", "last_name", "birth_date"), block_on("email")], recall=0.7
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=1)
    # EM samples at most as many pairs per training block as ours does: unsampled, the
    # first + last name block holds 214M pairs at 1M records and exhausts 24 GiB.
    for block in (block_on("first_name", "last_name"), block_on("birth_date")):
        linker.training.estimate_parameters_using_expectation_maximisation(
            block, max_pairs=EM_MAX_PAIRS
        )
    predictions = linker.inference.predict(threshold_match_probability=0.9)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
        predictions, threshold_match_probability=0.9
    ).as_pandas_dataframe()
    seconds = time.perf_counter() - t0
    labels = clusters.set_index("unique_id")["cluster_id"].reindex(frame["unique_id"])
    codes, _ = pd.factorize(labels)
    return {"labels": codes.tolist(), "seconds": seconds, "pairs": None}


def score(work: Path, labels: list[int]) -> dict[str, float]:
    from mdm_pipeline.matching.evaluation import bcubed, pair_scores

    truth = pd.read_pickle(work / "records.pkl")["__entity"]
    pred = pd.Series(labels)
    pairs = pair_scores(pred, truth)
    b3 = bcubed(pred, truth)
    sizes = pred.value_counts()
    return {
        "precision": round(pairs.precision, 4),
        "recall": round(pairs.recall, 4),
        "f1": round(pairs.f1, 4),
        "bcubed_f1": round(b3.f1, 4),
        "largest_cluster": int(sizes.max()),
        "largest_true_cluster": int(truth.value_counts().max()),
    }


def child(tool: str, work: Path) -> None:
    """One tool in this process: run, score, print one JSON line."""
    out = run_ours(work) if tool == "ours" else run_splink(work)
    figures = score(work, out.pop("labels"))
    peak = peak_rss_mib()
    print(json.dumps({"tool": tool, **out, **figures, "peak_rss_mib": round(peak)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder written by `mdm generate`")
    src.add_argument("--febrl", type=int, choices=(3, 4))
    parser.add_argument("--tool", choices=("both", "ours", "splink"), default="both")
    parser.add_argument("--child", choices=("ours", "splink"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work)
        return
    # The prepared records (600 MB at 1M) are removed at the end: left in /tmp, they
    # sit in the page cache and slow the next benchmark run down (docs/benchmarks.md).
    work = Path(tempfile.mkdtemp(prefix="mdm-bench-match-"))
    try:
        info = prepare(args, work)
        tools = ("ours", "splink") if args.tool == "both" else (args.tool,)
        rows = []
        for tool in tools:
            cmd = [sys.executable, __file__, "--child", tool, "--work", str(work)]
            cmd += ["--febrl", str(args.febrl)] if args.febrl else ["--data", str(args.data)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{tool} failed")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps({**info, **row}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{info['dataset']} — {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} cores\n"
    )
    print(
        "| tool | precision | recall | F1 | B-cubed F1 | largest cluster (true) | time | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tool']} | {r['precision']} | {r['recall']} | {r['f1']} | {r['bcubed_f1']} | "
            f"{r['largest_cluster']} ({r['largest_true_cluster']}) | {r['seconds']:.1f} s | "
            f"{r['peak_rss_mib']:,} MiB |"
        )


if __name__ == "__main__":
    main()
