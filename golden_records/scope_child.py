"""The process `background.ScopeRead` starts: the stored records of some golden records.

Run as ``python -m mdm_pipeline.golden_records.scope_child STORE_FILE FOLDER``,
with FOLDER/keys.arrow holding (source, source_key) of tonight's changed and
deleted records. It opens the SQLite store read-only, reads
`store.read_cluster_scope` of those keys (every record of their golden
records, payloads included, and the golden records), writes
FOLDER/records.arrow and FOLDER/golden.arrow and prints one JSON line naming
them. On failure it prints the error's class alone (never a value from the
store) and exits with 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import sqlalchemy as sa

from mdm_pipeline.golden_records import background, store
from mdm_pipeline.golden_records.connection import _tune_sqlite
from mdm_pipeline.golden_records.snapshot_child import serve


def read(store_file: str, folder: str) -> dict[str, Any]:
    """Read the scope of FOLDER/keys.arrow into FOLDER; what to print."""
    out = Path(folder)
    keys = background.map_table(out / "keys.arrow").to_pandas()
    # Read-only: this process never writes, whatever its code comes to do.
    engine = sa.create_engine(f"sqlite:///file:{quote(store_file)}?mode=ro&uri=true")
    sa.event.listen(engine, "connect", _tune_sqlite)
    try:
        with engine.connect() as conn:
            scope = store.read_cluster_scope(conn, keys)
    finally:
        engine.dispose()
    answer = {}
    for name, frame in (("records", scope.records), ("golden", scope.golden)):
        path = out / f"{name}.arrow"
        background.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
        answer[name] = str(path)
    return answer


if __name__ == "__main__":
    sys.exit(serve(read, sys.argv[1:]))
