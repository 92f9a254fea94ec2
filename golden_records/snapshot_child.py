"""The process `background` starts: a SQLite store's snapshot, decoded to files.

Run as ``python -m mdm_pipeline.golden_records.snapshot_child STORE_FILE FOLDER``.
It imports neither pandas nor SQLAlchemy (it starts in a fifth of a second),
reads the rows of `mdm_snapshot` (the table `schema.snapshot`) read-only,
decodes each part's Parquet and writes it to FOLDER as an Arrow IPC file, then
prints one JSON line: the (name, run) of every row, and the file of every
part. Whether those rows are the last run's snapshot is for the caller to
decide (`store.snapshot_run`). On failure it prints the error's class alone
(never a value from the store) and exits with 1.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable
from typing import IO, Any, Protocol

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

#: The cyclic collector's thresholds in the run's processes, its children included
#: (Python's default: 700, 10, 10). A run or a child holds millions of container
#: objects (rows of a bulk write or of a read, frames, events): at the default
#: thresholds every 700 allocations trigger a collection and every hundredth one
#: scans them all again (1.8 s of a 5% incremental run at 1M records in the run's
#: process, 0.4 s with these; 0.17 s and 0.08 s of the 2.2-2.7 s a night's scope
#: takes in its child, docs/benchmarks.md).
#: The garbage is mostly frames and rows that reference counting frees; what
#: cycles there are wait at most a hundred thousand allocations.
BATCH_GC_THRESHOLDS = (100_000, 50, 100)

#: As `connection._tune_sqlite` maps the store: most of the snapshot's pages are read
#: from the map rather than copied by a read call each.
_MMAP_BYTES = 2147418112


def write_table(table: pa.Table, path: str) -> None:
    """`table` as an Arrow IPC file (what a child hands over)."""
    with pa.OSFile(path, "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read(store_file: str, folder: str) -> dict[str, Any]:
    """Decode the snapshot's parts into `folder`; what to print."""
    uri = "file:" + store_file.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}")
        rows = conn.execute(
            "SELECT name, run_id, data FROM mdm_snapshot ORDER BY name, part"
        ).fetchall()
    finally:
        conn.close()
    files = {}
    for i, name in enumerate(dict.fromkeys(n for n, _, _ in rows)):
        data = b"".join(d for n, _, d in rows if n == name)
        table = pq.read_table(pa.BufferReader(data))
        del data
        path = os.path.join(folder, f"{i}.arrow")
        write_table(table, path)
        files[name] = path
    return {"parts": [[name, run] for name, run, _ in rows], "files": files}


class ChildProcess(Protocol):
    """What the parents use of a child: a `subprocess.Popen` (text mode), or a child
    forked from a zygote (`zygote.ForkedChild`)."""

    pid: int
    returncode: int | None
    stdin: IO[str] | None
    stdout: IO[str] | None

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def communicate(self) -> tuple[str, str]: ...


def stop_child(child: ChildProcess | None, folder: str | None) -> None:
    """Stop a child process if it still runs, and remove its folder (for the parents
    of this module's kind of child: a finalizer's work, so it must never raise)."""
    if child is not None and child.returncode is None:
        child.kill()
        child.communicate()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def child_answer(child: ChildProcess) -> tuple[dict[str, Any] | None, str]:
    """What a child that `serve`s answered; else None, and why: the last line of its
    standard error (the error's class), or that it printed no JSON object.

    The answer is taken as soon as its line comes, not when the child has ended: a
    child prints it last, its files closed, and only then lets go of what it read
    (a night's scope and evidence children took 0.3-0.6 s more to end, which the
    run waited for). A child that prints no JSON object has failed: it has ended,
    or is waited for, before its error is read."""
    line = child.stdout.readline() if child.stdout is not None else ""
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        return answer, ""
    _, err = child.communicate()
    if child.returncode != 0:
        return None, (err.strip().splitlines() or ["no message"])[-1]
    return None, "an answer that is not JSON"


def serve(work: Callable[..., dict[str, Any]], argv: list[str]) -> int:
    """Do a child's work on its command-line arguments (`argv`, here STORE_FILE and
    FOLDER) and answer the parent: one JSON line on the standard output, or the
    error's class alone on the standard error (a message could quote stored data)
    and exit status 1.

    A child is a batch process like the run that starts it: it collects cyclic
    garbage as rarely (`BATCH_GC_THRESHOLDS`)."""
    gc.set_threshold(*BATCH_GC_THRESHOLDS)
    try:
        answer = work(*argv)
    except Exception as exc:
        sys.stderr.write(exc.__class__.__name__ + "\n")
        return 1
    # The answer to the parent process (a protocol, not a message to a person), sent
    # at once: the parent goes on as soon as it has it (`child_answer`).
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve(read, sys.argv[1:]))
