"""The process `background` starts: a SQLite store's snapshot, decoded to files.

Run as ``python -m mdm_pipeline.golden_records.snapshot_child STORE_FILE FOLDER``.
It imports neither pandas nor SQLAlchemy (it starts in a fifth of a second),
reads the rows of `mdm_snapshot` (the table `schema.snapshot`) read-only,
decodes each part's Parquet and writes it to FOLDER as an Arrow IPC file, then
prints one JSON line: the (name, run) of every row, and the file of every
part. Whether those rows are the last run's snapshot is for the caller to
decide (`store.snapshot_run`). On failure it prints the error's class alone
(never a value from the store) and exits with 1.

The snapshot's base (the part "records", every record's row as a full run or a
compaction wrote it) stays the same from night to night while the nights only
rewrite their small parts. Decoded, it is kept beside the store in an Arrow IPC
file named after the store and the base (`base_cache`), and the next nights
hand that file over instead of decoding the base again: at 1M records, 100 MB
of Parquet that took a second of a core to decode into 350 MB of fresh memory,
and a night's first seconds waited for it (docs/benchmarks.md). The file is a
copy of what the store holds, found by the base's run and sizes: a base written
again (a full run, a compaction) has another name, and the file of the old one
is removed when the new one's is written. The run that writes a base writes its
file too, from the table it serialised (`store.write_snapshot`), so that the
first night after it decodes nothing either; a night that finds no file (the
store was too small for background reads then, or the file was deleted)
decodes the base and writes it. Deleting the file costs one decode.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
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


#: Linux's `sync_file_range` flag that starts writing dirty pages without waiting.
_SYNC_FILE_RANGE_WRITE = 2


def sync_range() -> Callable[[int], object] | None:
    """`sync_file_range(fd, 0, 0, WRITE)` of the C library, or None where there is
    none (not Linux): a file's dirty pages handed to the disk now, without waiting."""
    if sys.platform != "linux":
        return None
    import ctypes

    call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if call is None:
        return None
    zero = ctypes.c_int64(0)
    return lambda fd: call(fd, zero, zero, _SYNC_FILE_RANGE_WRITE)


def write_table(table: pa.Table, path: str) -> None:
    """`table` as an Arrow IPC file (what a child hands over)."""
    with pa.OSFile(path, "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


#: The snapshot's part that `base_cache` keeps decoded.
BASE = "records"
#: `schema.HELD_PREFIX` (this module imports no SQLAlchemy; a test checks they agree).
HELD_PREFIX = "held."
#: Between the store's file name and the base's key in its cache's name.
BASE_CACHE_INFIX = "-snapshot-"


def base_cache(store_file: str, base: list[tuple[int, str, int]]) -> str:
    """The file beside `store_file` that holds its snapshot's base decoded, named after
    the base's rows (part, run that wrote it, bytes): runs are never the same, and a
    base is written once, by its run."""
    key = hashlib.sha1(json.dumps(base).encode(), usedforsecurity=False).hexdigest()[:16]
    return f"{store_file}{BASE_CACHE_INFIX}{key}.arrow"


def _readable(path: str) -> bool:
    """Whether an Arrow IPC file is there and whole (its footer read): a file written
    where this one writes is renamed into place once complete."""
    try:
        with pa.memory_map(path) as source:
            ipc.open_file(source)
    except (OSError, pa.ArrowInvalid):
        return False
    return True


def keep_decoded_base(table: pa.Table, cache: str) -> bool:
    """Write the decoded base to `cache` (complete, then renamed into place) and remove
    the files of the store's earlier bases; False if it cannot be written there."""
    stem = cache[: cache.rindex(BASE_CACHE_INFIX) + len(BASE_CACHE_INFIX)]
    partial = f"{cache}.{os.getpid()}.partial"
    try:
        write_table(table, partial)
        # Its pages go to the disk from now on, while the night loads its extracts: left
        # to the kernel, they were written during the night's commit, which waited for
        # them (a first night's store stage 7 s -> 13 s at 1M records).
        flush = sync_range()
        if flush is not None:
            fd = os.open(partial, os.O_RDONLY)
            try:
                flush(fd)
            finally:
                os.close(fd)
        os.replace(partial, cache)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(partial)
        return False
    # Earlier bases' files, and what a night stopped while it wrote one left.
    folder, prefix = os.path.split(stem)
    for name in os.listdir(folder or "."):
        old = os.path.join(folder, name)
        if name.startswith(prefix) and name.endswith((".arrow", ".partial")) and old != cache:
            with contextlib.suppress(OSError):
                os.remove(old)
    return True


def read(store_file: str, folder: str) -> dict[str, Any]:
    """Decode the snapshot's parts into `folder` (the base into its cache beside the
    store, unless that is there already); what to print."""
    uri = "file:" + store_file.replace("?", "%3f").replace("#", "%23") + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        conn.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}")
        conn.execute("BEGIN")  # the list and the parts read are one state of the store
        # Not the parts held for the return files (`HELD_PREFIX`): not the snapshot.
        listed = conn.execute(
            "SELECT name, part, run_id, length(data) FROM mdm_snapshot "
            "WHERE substr(name, 1, ?) != ? ORDER BY name, part",
            (len(HELD_PREFIX), HELD_PREFIX),
        ).fetchall()
        base = [(part, run, size) for name, part, run, size in listed if name == BASE]
        cache = base_cache(store_file, base) if base else None
        cached = cache is not None and _readable(cache)
        rows = conn.execute(
            "SELECT name, run_id, data FROM mdm_snapshot WHERE name != ? "
            "AND substr(name, 1, ?) != ? ORDER BY name, part",
            (BASE if cached else "", len(HELD_PREFIX), HELD_PREFIX),
        ).fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    files = {BASE: cache} if cached and cache is not None else {}
    for i, name in enumerate(dict.fromkeys(n for n, _, _ in rows)):
        data = b"".join(d for n, _, d in rows if n == name)
        table = pq.read_table(pa.BufferReader(data))
        del data
        if name == BASE and cache is not None and keep_decoded_base(table, cache):
            files[name] = cache
            continue
        path = os.path.join(folder, f"{i}.arrow")
        write_table(table, path)
        files[name] = path
    return {"parts": [[name, run] for name, _, run, _ in listed], "files": files}


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
