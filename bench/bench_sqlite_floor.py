"""How fast SQLite alone can write what a first night leaves in the store.

Usage:
    python bench/bench_sqlite_floor.py --store FILE [--splink-s SECONDS]

FILE is a SQLite store a first `mdm run` wrote (for instance at 1M records,
`bench_pipeline.py --keep`). Every table's rows are read from it into memory
first (not timed), then written into a new file with the same schema by the
standard library's `sqlite3` alone, timed: one transaction, each table's
rows in its primary key's order, as many rows per INSERT statement as the
store writes (their values flattened before the clock starts), the secondary
indexes built after the rows, the store's own settings (page size, cache,
rollback journal), then the commit and its fsync.

Why: the issue asks for a whole first night in at most half of Splink's time
on the same records. This is the part of that night no pipeline code can take
away on the default store: the rows and indexes it must hold, written by
SQLite with no Python work per record beyond handing the driver a tuple. The
figure bounds the store stage from below; the comparison with Splink's time
says how much of the target it leaves for loading, normalising, matching and
survivorship.

Prints one JSON line per table and a summary line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path


def _tables(source: sqlite3.Connection) -> list[tuple[str, str, list[str]]]:
    """(name, CREATE TABLE, CREATE INDEX statements) of each table with rows."""
    found = []
    for name, sql in source.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ):
        indexes = [
            row[0]
            for row in source.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                "AND sql IS NOT NULL",
                (name,),
            )
        ]
        found.append((name, sql, indexes))
    return found


def _key_order(source: sqlite3.Connection, table: str) -> str:
    """ORDER BY the table's primary key (its rows' order in a first night's insert)."""
    key = sorted(
        (row[5], row[1])
        for row in source.execute(f'PRAGMA table_info("{table}")')
        if row[5]  # pk position, 0 when not in the key
    )
    return ", ".join(f'"{name}"' for _, name in key) or "rowid"


def _statements(table: str, rows: list[tuple], limit: int) -> list[tuple[str, list[tuple]]]:
    """(INSERT statement, its values) covering `rows`: as many rows per statement as
    the store puts in one (`ROWS_PER_STATEMENT`, within the driver's limit on bound
    values), then the rest one at a time."""
    from mdm_pipeline.golden_records.store import ROWS_PER_STATEMENT

    width = len(rows[0])
    per = max(1, min(ROWS_PER_STATEMENT, limit // width))
    one = "(" + ", ".join("?" * width) + ")"
    whole = len(rows) // per * per
    flat = [tuple(itertools.chain.from_iterable(rows[i : i + per])) for i in range(0, whole, per)]
    return [
        (f'INSERT INTO "{table}" VALUES {", ".join([one] * per)}', flat),
        (f'INSERT INTO "{table}" VALUES {one}', rows[whole:]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--splink-s", type=float, help="Splink's time in the same benchmark run")
    args = parser.parse_args()

    from mdm_pipeline.golden_records.connection import SQLITE_CACHE_KIB

    source = sqlite3.connect(args.store)
    tables = _tables(source)
    rows = {
        name: source.execute(
            f'SELECT * FROM "{name}" ORDER BY {_key_order(source, name)}'
        ).fetchall()
        for name, _, _ in tables
    }
    page_size = source.execute("PRAGMA page_size").fetchone()[0]
    source.close()

    folder = Path(tempfile.mkdtemp(prefix="mdm-bench-floor-", dir=args.store.parent))
    target_path = folder / "floor.sqlite"
    target = sqlite3.connect(target_path, isolation_level=None)
    target.execute(f"PRAGMA page_size = {page_size}")
    target.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    target.execute("PRAGMA journal_mode = PERSIST")
    for _, create, _ in tables:
        target.execute(create)
    limit = target.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    statements = {name: _statements(name, got, limit) for name, got in rows.items() if got}
    os.sync()  # the schema's pages and the rows read above are not the write's to flush
    total = 0.0
    try:
        t_all = time.perf_counter()
        target.execute("BEGIN")
        for name, _, indexes in tables:
            if not rows[name]:
                continue
            t0 = time.perf_counter()
            for statement, values in statements[name]:
                target.executemany(statement, values)
            inserted = time.perf_counter() - t0
            t0 = time.perf_counter()
            for create in indexes:
                target.execute(create)
            indexed = time.perf_counter() - t0
            print(
                json.dumps(
                    {
                        "table": name,
                        "rows": len(rows[name]),
                        "insert_s": round(inserted, 2),
                        "indexes_s": round(indexed, 2),
                    }
                ),
                flush=True,
            )
        t0 = time.perf_counter()
        target.execute("COMMIT")
        commit = time.perf_counter() - t0
        total = time.perf_counter() - t_all
        size = target_path.stat().st_size
    finally:
        target.close()
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    summary = {
        "store": str(args.store),
        "bytes": size,
        "commit_s": round(commit, 2),
        "total_s": round(total, 2),
    }
    if args.splink_s:
        summary["total_over_splink"] = round(total / args.splink_s, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
