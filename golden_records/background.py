"""Reads of the store done by a child process while the run goes on with other work.

An incremental night reads large things from the store that it knows how to
ask for well before it needs them:

- the snapshot the last run left (every record's matching fields, about a
  hundred megabytes of compressed Parquet at a million records), needed once
  tonight's extracts are loaded (`SnapshotRead`); its base, the same from
  night to night, is kept decoded beside the store
  (`snapshot_child.base_cache`) by the run that writes it;
- the stored records, with their payloads and golden records, of the golden
  records that tonight's changed and deleted records belong to: most of the
  records whose golden record the night chooses again (nine in ten at 1M
  records), needed once matching and clustering are done (`ScopeRead`);
- the stored match evidence of the records matched again or deleted, compared
  with tonight's, needed when the night writes (`EvidenceRead`);
- what the return files need of the stored records of tonight's rows (their
  golden IDs and the return fields of their payloads: a full extract's every
  record, read while the run loads the extracts; a delta extract's rows by
  key, with the members of their golden records), for the files written
  while the store is (`ReturnsRead`).

In one process each read would hold the GIL for much of its work beside the
work it could overlap (a thread was tried for the snapshot: each slowed the
other down, docs/benchmarks.md). So, for a SQLite store, each runs in a child
process on the machine's other core and hands its tables over as files in
memory (`/dev/shm` where the system has it): Arrow IPC files, which this
process maps without copying, or, for frames of Python objects, pickles
(`answer_frame`). A child process rather than a fork of this one, which by then
holds an open database connection, Arrow's threads and a gigabyte of memory:
each child is either a program of its own (``python -m``), or, when the night
hands one over, forked from the night's zygote, a process made at the night's
start with every module a child needs already imported (`zygote`). The store
does not change in between: the run holds the store's run lock, and collects
every answer before it writes anything (a child reading the store would
otherwise hold up the transaction's commit).

The scope's and the evidence's children are started ahead of their inputs (the
scope's once the snapshot is in, the evidence's once the delta is known): as
programs, each imports pandas and SQLAlchemy (most of a second of CPU) while
the run finds the delta, normalises and matches; forked, each is ready at once.
Then each waits, holding nothing of the store, until its inputs are handed
over (`_Child.go`).

A PostgreSQL store, a store in memory, a small store (`BACKGROUND_MIN_BYTES`),
or a child that fails for any reason: the read is done in this process, as
before. A background read is a speed-up, never a different answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
from sqlalchemy.engine import Connection, Engine

from mdm_pipeline.config.schema import SOURCE, SOURCE_KEY, record_keys
from mdm_pipeline.golden_records import store
from mdm_pipeline.golden_records.snapshot_child import (
    ChildProcess,
    child_answer,
    stop_child,
    write_table,
)
from mdm_pipeline.golden_records.zygote import Zygote

log = logging.getLogger(__name__)

#: Where a child writes its tables: memory-backed where the system has it, so that
#: neither process waits on a disk for data that lives a few seconds.
SHARED_MEMORY = Path("/dev/shm")
#: The children's modules, each run with `python -m`.
CHILD_MODULE = "mdm_pipeline.golden_records.snapshot_child"
STORE_CHILD_MODULE = "mdm_pipeline.golden_records.store_child"
KEYS = [SOURCE, SOURCE_KEY]
#: The last argument of a child started ahead of its inputs, and the first word of the
#: lines that hand them over on its standard input, which name them (`_Child.go`).
DEFERRED = "--deferred"
GO = "go"


def go_line(names: list[str]) -> str:
    """The line that tells a deferred child these inputs are in its folder."""
    return " ".join([GO, *names]) + "\n"


def given_inputs(line: str) -> list[str]:
    """The inputs a line from `go_line` names; an error for any other line (the end
    of the input: the run stopped before it handed them over)."""
    words = line.split()
    if not words or words[0] != GO:
        raise EOFError("no inputs")
    return words[1:]


#: The smallest store file read in the background. A child costs about a second of
#: start-up (the scope's child imports pandas and SQLAlchemy), which the work it
#: overlaps hides on a store of a hundred thousand records and more, not on a small
#: one, where the reads themselves take a few milliseconds.
BACKGROUND_MIN_BYTES = 256 * 2**20


def shared_folder(prefix: str) -> str:
    """A new private folder for a child's files, in memory (`SHARED_MEMORY`) where the
    system has it and this process may write there, else in the temporary folder."""
    if SHARED_MEMORY.is_dir():
        try:
            return tempfile.mkdtemp(prefix=prefix, dir=SHARED_MEMORY)
        except OSError:  # /dev/shm there but not writable here
            pass
    return tempfile.mkdtemp(prefix=prefix)


def background_file(engine: Engine) -> str | None:
    """The file of a SQLite store large enough to be read in the background, else None."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    if not path.is_file() or path.stat().st_size < BACKGROUND_MIN_BYTES:
        return None
    return database


def start_zygote(engine: Engine) -> Zygote | None:
    """The process a night forks its readers of `engine` from (`zygote`), started now;
    None where no reader would be a child (see the module) or it cannot be had."""
    return Zygote.start() if background_file(engine) is not None else None


def answer_frame(path: Path | str) -> pd.DataFrame:
    """A frame a child handed back (`store_child.read`): a pickle, its own private
    file, or an Arrow IPC file."""
    if Path(path).suffix == ".pickle":
        # Written by this run's child, in the private folder this run made for it.
        with open(path, "rb") as source:
            frame = pickle.load(source)
        if not isinstance(frame, pd.DataFrame):
            raise TypeError("a child's answer is not a frame")
        return frame
    return map_table(path).to_pandas()


def map_table(path: Path | str) -> pa.Table:
    """An Arrow IPC file's table, its buffers mapped rather than read: the file can go
    at once, its pages stay until the table is let go."""
    return ipc.open_file(pa.memory_map(str(path))).read_all()


def _table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


class _Child:
    """A child process `python -m MODULE [ARGS] STORE_FILE FOLDER` answering one JSON line on
    its standard output (see `snapshot_child`): started at once, waited for by
    `answer`, stopped and its folder removed by `close` (or when this object goes).

    Without `inputs` the child is started ahead of them (`deferred`): it imports its
    modules (pandas and SQLAlchemy, most of a second of CPU) while the run works,
    then waits, without touching the store, until `go` hands it its inputs; its
    answer then comes that much sooner after them.

    Given a `zygote`, the child is forked from it (no imports at all), the same
    program started otherwise, or if the zygote cannot fork it."""

    def __init__(
        self,
        engine: Engine,
        module: str,
        inputs: dict[str, pa.Table] | None,
        *args: str,
        zygote: Zygote | None = None,
    ) -> None:
        self.engine = engine
        self._zygote = zygote
        self._process: ChildProcess | None = None
        self.folder: str | None = None
        store_file = background_file(engine)
        if store_file is not None:
            self._start(store_file, module, inputs, args)
        # A run that fails before it collects the answer still stops the child and
        # removes its files (at the latest when the interpreter exits).
        self._finalizer = weakref.finalize(self, stop_child, self._process, self.folder)

    def _start(
        self,
        store_file: str,
        module: str,
        inputs: dict[str, pa.Table] | None,
        args: tuple[str, ...],
    ) -> None:
        try:
            self.folder = shared_folder("mdm-background-")
            self._write_inputs(inputs or {})
            argv = [*args, store_file, self.folder, *([DEFERRED] if inputs is None else [])]
            forked = None
            if self._zygote is not None:
                forked = self._zygote.spawn(module, argv, stdin=inputs is None)
            self._process = forked or subprocess.Popen(
                [sys.executable, "-m", module, *argv],
                stdin=subprocess.DEVNULL if inputs is not None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:  # no room for the inputs, no process to be had
            log.warning(
                "a read of the store could not start in a child process (%s): done in this one",
                exc.__class__.__name__,
            )
            stop_child(None, self.folder)
            self.folder = None

    def _write_inputs(self, inputs: dict[str, pa.Table]) -> None:
        assert self.folder is not None
        for name, table in inputs.items():
            write_table(table, str(Path(self.folder) / f"{name}.arrow"))

    def go(
        self, inputs: dict[str, pa.Table], last: bool = True, placed: Collection[str] = ()
    ) -> None:
        """Hand a deferred child inputs: it goes on with its work from now on, until it
        needs inputs not yet given (`last` False: more will come). `placed` names
        inputs already in its folder (moved there as NAME.arrow). A child that
        cannot take them (no room for the files, a child already gone) is stopped:
        `answer` then gives None, and the read is done in this process."""
        process = self._process
        if process is None or process.stdin is None:
            return
        try:
            self._write_inputs(inputs)
            process.stdin.write(go_line([*inputs, *placed]))
            process.stdin.flush()
            if not last:
                return
            process.stdin.close()
        except OSError as exc:
            log.warning(
                "a read of the store in a child process got no inputs (%s)", type(exc).__name__
            )
            process.kill()
            with contextlib.suppress(OSError):
                process.stdin.close()
        # Closed: `communicate` (the answer) must not write to it again.
        process.stdin = None

    @property
    def started(self) -> bool:
        return self._process is not None

    def answer(self) -> dict[str, Any] | None:
        """The child's answer; None if there is no child or it failed (logged)."""
        if self._process is None:
            return None
        answer, reason = child_answer(self._process)
        if answer is not None:
            return answer
        log.warning("a read of the store in a child process failed (%s): done in this one", reason)
        return None

    def stop(self) -> None:
        """Stop the child if it still runs, its answer left to whoever waits for it."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def close(self) -> None:
        """Stop the child if it still runs and remove its files (idempotent)."""
        self._finalizer()
        self._process = None
        self.folder = None


#: For a stage's own child started the same way (`pipeline.exports.NightReturns`).
Child = _Child


class SnapshotRead:
    """`store.read_snapshot`, started now and collected by `result` (see the module)."""

    def __init__(self, engine: Engine, zygote: Zygote | None = None) -> None:
        self._child = _Child(engine, CHILD_MODULE, {}, zygote=zygote)

    def result(
        self, convert: dict[str, list[str]] | None = None
    ) -> tuple[str, dict[str, pd.DataFrame], dict[str, Any]] | None:
        """What `store.read_snapshot(engine, convert)` would answer."""
        engine = self._child.engine
        try:
            answer = self._child.answer()
            if answer is None:
                return store.read_snapshot(engine, convert)
            last = store.snapshot_run(engine, [tuple(p) for p in answer["parts"]])
            if last is None:
                return None
            try:
                tables = {name: map_table(path) for name, path in answer["files"].items()}
            except (OSError, pa.ArrowInvalid) as exc:  # the base's cache gone meanwhile
                log.warning("the snapshot's files could not be read (%s)", type(exc).__name__)
                return store.read_snapshot(engine, convert)
            return store.snapshot_frames(last, tables, convert)
        finally:
            self.close()

    def close(self) -> None:
        self._child.close()


class ScopeRead:
    """`store.read_cluster_scope` of some records, started now; `result` completes it
    into `store.read_scope` of the records a night needs (see the module)."""

    def __init__(
        self, engine: Engine, keys: pd.DataFrame | None = None, zygote: Zygote | None = None
    ) -> None:
        """Started with the `keys` of tonight's changed and deleted records, or without
        them, ahead of them (`start`); forked from `zygote` if given."""
        inputs = None if keys is None else self._inputs(keys)
        self._child = _Child(engine, STORE_CHILD_MODULE, inputs, "scope", zygote=zygote)
        self._frames: ThreadPoolExecutor | None = None
        self._ready: Future[tuple[pd.DataFrame, pd.DataFrame, pd.Index] | None] | None = None
        if inputs is not None:
            self._collect()

    @staticmethod
    def _inputs(keys: pd.DataFrame) -> dict[str, pa.Table]:
        return {"keys": _table(keys[KEYS].astype(str))}

    def start(self, keys: pd.DataFrame) -> None:
        """The keys of a read started without them: the child reads from now on."""
        self._child.go(self._inputs(keys))
        self._collect()

    def _collect(self) -> None:
        """Its answer, once there, made into frames by a thread of this process.

        The child answers while the run still matches or clusters, and the run
        waited for nothing but this conversion when it asked for the scope: the
        frames taken back (once from Arrow, now unpickled) and the hash table of
        the records' keys, 0.25-0.5 s at 1M records. Done as soon as the child
        answers, it takes the time the run's own thread spends in numpy,
        rapidfuzz and scipy without the GIL."""
        if self._child.started and self._frames is None:
            self._frames = ThreadPoolExecutor(1, thread_name_prefix="mdm-scope")
            self._ready = self._frames.submit(self._take)
            self._frames.shutdown(wait=False)

    def _take(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.Index] | None:
        answer = self._child.answer()
        if answer is None:
            return None
        records = answer_frame(answer["records"])
        golden = answer_frame(answer["golden"])
        index = record_keys(records)
        index.is_unique  # noqa: B018  (builds the lookup's hash table here)
        return records, golden, index

    @property
    def started(self) -> bool:
        return self._child.started

    def result(self, conn: Connection, keys: pd.DataFrame) -> store.Scope:
        """`store.read_scope(conn, keys)`: what the child read of these records, and the
        rest read here (through `conn`, inside the run's transaction)."""
        try:
            self._collect()
            taken = self._ready.result() if self._ready is not None else None
            if taken is None:
                return store.read_scope(conn, keys)
            records, golden, index = taken
        finally:
            self.close()
        wanted = keys[KEYS].astype(str)
        found = index.get_indexer(record_keys(wanted))
        early = store.Scope(records.take(found[found >= 0]).reset_index(drop=True), golden)
        rest = wanted[found < 0]
        return store.merge_scopes([early, store.read_scope(conn, rest)])

    def close(self) -> None:
        """Stop the child and the thread that waits for its answer (idempotent)."""
        ready, self._ready = self._ready, None
        if ready is not None and not ready.done():
            self._child.stop()
            with contextlib.suppress(Exception):  # what it failed on is of no use now
                ready.result()
        self._child.close()


@dataclass
class Returns:
    """What the store holds for the return files (`store.read_returns`): `held` (an
    Arrow table, mapped from `file` when a child read it) and `members`."""

    held: pa.Table
    members: pd.DataFrame
    #: The file `held` is mapped from, if any: a child that writes the files is handed
    #: it as it is (`_Child.go`'s `placed`), its table never copied by this process.
    file: Path | None = None


class ReturnsRead:
    """`store.read_returns`, started at the night's start and collected by `result`
    (see the module): what the store holds of the rows of tonight's extracts, for
    the business units' return files, read while the run loads and normalises.

    The extracts that are not deltas are read whole as soon as the child is
    forked, while the run loads them: a full extract's rows are all returned, and
    at a million records their payloads take the child 8-9 s to read and parse
    (under a second from the held parts the night before left, when it left
    them: `store.read_held`).
    A delta extract's rows are read by key once the delta is known (`start`),
    with the members of their golden records (its other records). A row whose
    record changes tonight is read too and not used: the night has it itself."""

    def __init__(
        self,
        engine: Engine,
        fields: pa.Schema,
        whole: Collection[str],
        member_sources: Collection[str],
        zygote: Zygote | None = None,
    ) -> None:
        self._fields = fields
        self._whole = sorted(whole)
        self._member_sources = sorted(member_sources)
        self._keys: pd.DataFrame | None = None
        self._child = _Child(engine, STORE_CHILD_MODULE, None, "returns", zygote=zygote)
        self._child.go(
            {"fields": fields.empty_table(), "whole": pa.table({SOURCE: self._whole})}, last=False
        )

    def start(self, keys: pd.DataFrame) -> None:
        """The (source, source_key) of tonight's rows whose records did not change: the
        delta extracts' are read from now on (the others' are read whole)."""
        self._keys = keys[KEYS].astype(str).reset_index(drop=True)
        self._keys = self._keys[~self._keys[SOURCE].isin(self._whole)]
        members = self._keys[SOURCE].isin(self._member_sources)
        self._child.go({"keys": _table(self._keys.assign(members=members))})

    def result(self, conn: Connection, keep: str | None = None) -> Returns:
        """What `store.read_returns` answers, its held table's file moved into folder
        `keep` if given (a child's, which reads it next; see `Returns.file`).
        Collected before the run writes anything: the child's read must not hold the
        store while the run's transaction needs it whole (and what it read is the
        state the night started from)."""
        if self._keys is None:
            self.close()
            raise RuntimeError("the return files' read needs tonight's keys first")
        try:
            answer = self._child.answer()
            if answer is None:
                held, members = store.read_returns(
                    conn, self._fields, self._keys, self._whole, self._member_sources
                )
                return Returns(held, members)
            path = Path(answer["held"])
            if keep is not None:
                moved = Path(keep) / path.name
                try:
                    os.replace(path, moved)
                    path = moved
                except OSError:  # another file system: the table is handed over as a copy
                    keep = None
            members = answer_frame(answer["members"])
            return Returns(map_table(path), members, path if keep is not None else None)
        finally:
            self.close()

    def close(self) -> None:
        self._child.close()


class EvidenceRead:
    """`store.evidence_changes`, started now and collected by `result` (see the module):
    the stored pairs of the records matched again or deleted tonight, read while
    the run matches them, and compared with tonight's evidence while the run
    clusters and chooses golden records."""

    def __init__(
        self,
        engine: Engine,
        touched: pd.DataFrame | None = None,
        evidence: pd.DataFrame | None = None,
        zygote: Zygote | None = None,
    ) -> None:
        """Started with the records matched again or deleted (`touched`) and tonight's
        `evidence`, or without them, ahead of them (`start`, then `compare`); forked
        from `zygote` if given."""
        self._touched: pd.DataFrame | None = None
        self._evidence: pd.DataFrame | None = None
        inputs = None
        if touched is not None and evidence is not None:
            inputs = {**self._touched_input(touched), **self._evidence_input(evidence)}
        self._child = _Child(engine, STORE_CHILD_MODULE, inputs, "evidence", zygote=zygote)

    def _touched_input(self, touched: pd.DataFrame) -> dict[str, pa.Table]:
        self._touched = touched[KEYS].astype(str)
        return {"touched": _table(self._touched)}

    def _evidence_input(self, evidence: pd.DataFrame) -> dict[str, pa.Table]:
        self._evidence = evidence
        return {"evidence": _table(evidence)}

    def start(self, touched: pd.DataFrame) -> None:
        """The records of a read started without them: the child reads their stored
        pairs from now on, then waits for tonight's evidence (`compare`).

        They are known once the night knows the blocks it matches again, before
        the match: the read (0.6 s at 1M records) is over by the match's end
        instead of starting there."""
        self._child.go(self._touched_input(touched), last=False)

    def compare(self, evidence: pd.DataFrame) -> None:
        """Tonight's evidence, once matched: the child compares it from now on."""
        self._child.go(self._evidence_input(evidence))

    def result(self, conn: Connection) -> store.EvidenceChanges:
        """What `store.evidence_changes(conn, touched, evidence)` answers. Collected
        before the run writes anything: the child's read must not hold the store
        while the run's transaction needs it whole."""
        if self._touched is None or self._evidence is None:
            raise ValueError("the evidence's records and tonight's evidence are both needed")
        try:
            answer = self._child.answer()
            if answer is None:
                return store.evidence_changes(conn, self._touched, self._evidence)
            return store.EvidenceChanges(
                *(answer_frame(answer[name]) for name in ("gone", "fresh", "changed"))
            )
        finally:
            self.close()

    def close(self) -> None:
        self._child.close()
