"""Latency of the auditors' questions on a large store.

Usage:
    python bench/bench_queries.py --store sqlite:////path/mdm.sqlite [--n 20] [--config FILE]
        [--pad-to N]

--pad-to N first copies golden records (with their versions, source records and
cross-references, under new IDs and keys) until the store holds N golden
records: the questions are index lookups, and this is how a store of a million
golden records is had without a nightly run on two million extract rows. It
writes into the store: give it a copy.

Times `golden show`, `golden history`, `golden as-of` and `why` (the functions the
CLI calls) on N golden records picked at random among those with two or more
members, and, with --config, the whole `mdm golden show` process once (Python
start-up and imports included). Prints one JSON line per question.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from datetime import datetime

import sqlalchemy as sa

from mdm_pipeline.golden_records import audit, store
from mdm_pipeline.golden_records.refs import RecordRef


def pad(engine: sa.Engine, target: int) -> None:
    """Copies of stored golden records under new IDs until `target` are stored."""
    round_no = 0
    while True:
        with engine.begin() as conn:
            have = conn.execute(sa.text("select count(*) from mdm_golden_records")).scalar()
            missing = target - have
            if missing <= 0:
                return
            round_no += 1
            tag = f"Z{round_no}"
            conn.execute(
                sa.text(
                    "create temp table pick as select golden_id from mdm_golden_records "
                    "where golden_id not like '%Z%' limit :n"
                ),
                {"n": missing},
            )
            for table, cols in (
                ("mdm_golden_records", "golden_id"),
                ("mdm_golden_history", "golden_id"),
            ):
                names = [r[1] for r in conn.execute(sa.text(f"pragma table_info({table})")).all()]
                select = ", ".join(f"{c} || '{tag}'" if c == cols else c for c in names)
                conn.execute(
                    sa.text(
                        f"insert into {table} ({', '.join(names)}) select {select} from {table} "
                        "where golden_id in (select golden_id from pick)"
                    )
                )
            for table in ("mdm_source_records", "mdm_xref"):
                names = [r[1] for r in conn.execute(sa.text(f"pragma table_info({table})")).all()]
                select = ", ".join(
                    f"{c} || '{tag}'" if c in ("golden_id", "source_key") else c for c in names
                )
                conn.execute(
                    sa.text(
                        f"insert into {table} ({', '.join(names)}) select {select} from {table} "
                        "where golden_id in (select golden_id from pick)"
                    )
                )
            conn.execute(sa.text("drop table pick"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--config")
    parser.add_argument("--pad-to", type=int)
    args = parser.parse_args()
    engine = store.connect(args.store)
    if args.pad_to:
        pad(engine, args.pad_to)
    with engine.connect() as conn:
        total = conn.execute(sa.text("select count(*) from mdm_golden_records")).scalar()
        picked = (
            conn.execute(
                sa.text(
                    "select golden_id from mdm_golden_records where members > 1 "
                    "and status = 'active' order by random() limit :n"
                ),
                {"n": args.n},
            )
            .scalars()
            .all()
        )
        pairs = []
        for gid in picked:
            rows = conn.execute(
                sa.text(
                    "select source, source_key from mdm_source_records where golden_id = :g limit 2"
                ),
                {"g": gid},
            ).all()
            pairs.append((RecordRef(*rows[0]), RecordRef(*rows[1])))
    questions = {
        "golden show": lambda i: audit.golden_show(engine, picked[i]),
        "golden history": lambda i: audit.golden_history(engine, picked[i]),
        "golden as-of": lambda i: audit.golden_as_of(engine, picked[i], datetime.now()),
        "why": lambda i: audit.why(engine, *pairs[i]),
    }
    print(json.dumps({"golden_records": total, "asked": len(picked)}))
    for name, ask in questions.items():
        times = []
        for i in range(len(picked)):
            t0 = time.perf_counter()
            ask(i)
            times.append(time.perf_counter() - t0)
        print(
            json.dumps(
                {
                    "question": name,
                    "median_ms": round(statistics.median(times) * 1000, 1),
                    "max_ms": round(max(times) * 1000, 1),
                }
            )
        )
    engine.dispose()
    if args.config:
        # The whole command, as a steward types it: start-up and imports included.
        mdm = shutil.which("mdm") or "mdm"
        for command, rest in (
            (["golden", "show"], [picked[0]]),
            (["golden", "history"], [picked[0]]),
            (["why"], [str(pairs[0][0]), str(pairs[0][1])]),
        ):
            name = "mdm " + " ".join(command)
            t0 = time.perf_counter()
            done = subprocess.run(
                [mdm, *command, "--config", args.config, *rest, "--json"],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "MDM_STORE_URL": args.store},
            )
            wall = time.perf_counter() - t0
            json.loads(done.stdout)  # it answered
            print(json.dumps({"question": f"{name} (whole process)", "wall_s": round(wall, 2)}))


if __name__ == "__main__":
    main()
