"""Writing golden records and their cross-references to the central store, SQLite and PostgreSQL.

Usage:
    python bench/bench_store.py --data DIR [--url URL ...]

DIR is a folder written by `mdm generate` (its truth file gives the clusters,
so the figure is the store's alone: no matching). Steps, each timed apart:

1. night 1: survivorship, then `write_run` of every record and golden record
   into an empty store, in one transaction;
2. night 2 on the same input: nothing may be written (the change detection);
3. night 3 with 5% of the records changed (a new postcode): new versions,
   history rows and cross-reference changes for those only.

Prints one JSON line per store and a Markdown table. PostgreSQL is CI's
server by default (postgresql+psycopg://postgres@127.0.0.1:5432/test), in a
scratch schema dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa
from common import peak_rss_mib  # bench/ is on sys.path when a script runs

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def night(
    engine: sa.Engine,
    run_id: str,
    at: datetime,
    records: pd.DataFrame,
    cluster: pd.Series,
    payload: list[str],
) -> tuple[dict[str, float], object]:
    from mdm_pipeline.golden_records import store
    from mdm_pipeline.golden_records.survivorship import survive

    t0 = time.perf_counter()
    golden, lineage = survive(records, cluster)
    t1 = time.perf_counter()
    empty = pd.DataFrame(
        {c: [] for c in ("source", "location", "line", "source_key", "reason", "raw")}
    )
    with store.transaction(engine) as conn:
        store.start_run(conn, run_id, "bench", at)
        result, _ = store.write_run(
            conn,
            run_id,
            at,
            records,
            payload,
            cluster,
            golden,
            lineage,
            empty,
            sorted(records["source"].unique()),
        )
    t2 = time.perf_counter()
    return {"survive_s": round(t1 - t0, 1), "write_s": round(t2 - t1, 1)}, result


def main() -> None:
    from mdm_pipeline.golden_records import store
    from mdm_pipeline.normalize.stage import NORMALISED_COLUMNS
    from mdm_pipeline.pipeline.run import Pipeline

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--url", action="append", help="store URL(s); default SQLite and PG")
    args = parser.parse_args()
    records = Pipeline.from_config(args.data / "config.yaml").normalised_records()
    truth = pd.read_csv(args.data / "truth.csv", dtype=str)
    entity = records[["source", "source_key"]].merge(truth, how="left")["entity_id"]
    own = pd.Series("own" + records.index.astype(str), index=records.index)
    cluster = pd.Series(pd.factorize(entity.fillna(own))[0])
    payload = [c for c in NORMALISED_COLUMNS if c in records]
    rng = np.random.default_rng(1)
    changed = records.copy()
    pick = rng.choice(len(records), len(records) // 20, replace=False)
    changed.loc[pick, "postcode_norm"] = (
        "99" + changed.loc[pick, "postcode_norm"].fillna("000").str[2:]
    )

    urls = args.url or []
    scratch = None
    if not urls:
        path = Path(f"/tmp/mdm-bench-store-{uuid.uuid4().hex[:6]}.sqlite")
        scratch = f"mdm_bench_{uuid.uuid4().hex[:8]}"
        urls = [f"sqlite:///{path}", f"{PG}?options=-csearch_path%3D{scratch}"]
        admin = sa.create_engine(PG)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{scratch}"'))
    rows = []
    try:
        for url in urls:
            engine = store.connect(url)
            kind = engine.dialect.name
            n1, _r1 = night(engine, "R1", datetime(2026, 11, 1, 2), records, cluster, payload)
            n2, r2 = night(engine, "R2", datetime(2026, 11, 2, 2), records, cluster, payload)
            n3, r3 = night(engine, "R3", datetime(2026, 11, 3, 2), changed, cluster, payload)
            engine.dispose()
            row = {
                "store": kind,
                "records": len(records),
                "golden": int(cluster.nunique()),
                "night1_write_s": n1["write_s"],
                "survive_s": n1["survive_s"],
                "rerun_write_s": n2["write_s"],
                "rerun_records_written": r2.records_written,
                "delta5_write_s": n3["write_s"],
                "delta5_records_written": r3.records_written,
                "delta5_golden_updated": r3.golden_updated,
                "peak_rss_mib": round(peak_rss_mib()),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if scratch:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{scratch}" CASCADE'))
    print(
        "\n| store | records | golden | survive | write night 1 | rerun (writes) "
        "| 5% changed (records, golden written) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['store']} | {r['records']:,} | {r['golden']:,} | {r['survive_s']} s | "
            f"{r['night1_write_s']} s | {r['rerun_write_s']} s ({r['rerun_records_written']}) | "
            f"{r['delta5_write_s']} s ({r['delta5_records_written']:,}, "
            f"{r['delta5_golden_updated']:,}) |"
        )


if __name__ == "__main__":
    main()
