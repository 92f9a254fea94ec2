"""Reading the store's snapshot in a second process while this one loads the extracts.

An incremental night starts by reading two things that do not depend on each
other: tonight's extracts, and the snapshot the last run left in the store
(every record's matching fields, about a hundred megabytes of compressed
Parquet at a million records). Both hold the GIL for much of their work in one
process (a thread was tried: each slowed the other down, docs/benchmarks.md),
so for a SQLite store the snapshot's fetch and decompression run in a child
process (`snapshot_child`, started without pandas) on the machine's other
core. The child hands the decoded tables over as Arrow IPC files in memory
(`/dev/shm` where the system has it), which this process maps without copying;
only the conversion to Python objects, which must happen here, is left to do.
A child process rather than a fork: this one holds an open database connection
and may hold Arrow's threads, neither of which is safe to fork.

A PostgreSQL store, a store in memory, or a child that fails for any reason:
the snapshot is read here as before. The background read is a speed-up, never
a different answer.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
from sqlalchemy.engine import Engine

from mdm_pipeline.golden_records import store

log = logging.getLogger(__name__)

#: Where the child writes the decoded tables: memory-backed where the system has it,
#: so that neither process waits on a disk for data that lives a few seconds.
SHARED_MEMORY = Path("/dev/shm")
#: The child's module, run with `python -m`.
CHILD_MODULE = "mdm_pipeline.golden_records.snapshot_child"


def _store_file(engine: Engine) -> str | None:
    """The file of a SQLite store, None for any other store."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database if Path(database).is_file() else None


class SnapshotRead:
    """A snapshot read started now and collected by `result` (see the module)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._child: subprocess.Popen[str] | None = None
        self._folder: str | None = None
        store_file = _store_file(engine)
        if store_file is None:
            return
        shared = SHARED_MEMORY if SHARED_MEMORY.is_dir() else None
        try:
            self._folder = tempfile.mkdtemp(prefix="mdm-snapshot-", dir=shared)
        except OSError:  # /dev/shm there but not writable here
            self._folder = tempfile.mkdtemp(prefix="mdm-snapshot-")
        self._child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                CHILD_MODULE,
                store_file,
                self._folder,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(
        self, convert: dict[str, list[str]] | None = None
    ) -> tuple[str, dict[str, pd.DataFrame], dict[str, Any]] | None:
        """What `store.read_snapshot(engine, convert)` would answer."""
        child, self._child = self._child, None
        if child is None:
            return store.read_snapshot(self._engine, convert)
        try:
            out, err = child.communicate()
            if child.returncode != 0:
                log.warning(
                    "snapshot read in a child process failed (%s): read in this one",
                    (err.strip().splitlines() or ["no message"])[-1],
                )
                return store.read_snapshot(self._engine, convert)
            answer = json.loads(out)
            last = store.snapshot_run(self._engine, [tuple(p) for p in answer["parts"]])
            if last is None:
                return None
            # Mapped, not copied: the files go at once (in `close`); their pages stay
            # until the tables that use them are let go.
            tables = {
                name: ipc.open_file(pa.memory_map(path)).read_all()
                for name, path in answer["files"].items()
            }
            return store.snapshot_frames(last, tables, convert)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child if it still runs and remove its files (idempotent)."""
        if self._child is not None:
            self._child.kill()
            self._child.communicate()
            self._child = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
