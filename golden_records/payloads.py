"""Source records' stored payloads and hashes, made by a child process while the run
matches.

A full run writes every source record's payload: its values as a JSON text, and
the hash of that text, which tells a changed record from an unchanged one. At a
million records that is gigabytes of text and 11–15 s of work, and it was done
in the store stage, in a thread beside the writes, each holding the other back
for the GIL. Yet a payload depends on the normalised record alone, never on
its matches: it can be made as soon as the records are normalised.

So a full run of at least `MIN_RECORDS` records hands the payload columns to a
child process (`payload_child`) when it starts matching. The child makes the
payloads on the machine's other core, which matching, clustering and
survivorship leave idle, chunk by chunk in the order the store writes them
(`store.WRITE_CHUNK_ROWS` records a chunk, by source and key), and writes each
chunk as one record batch of an Arrow IPC file. The store stage then reads
each chunk's batch where it would have made it.

The child makes them with `store.hash_rows`, the code the run uses itself, on
the same values: texts travel as Arrow strings, other columns pickled with their
dtypes. A child that fails, or an answer that does not fit (another order,
a chunk missing), and the store makes the payloads itself, as before: this is a
speed-up, never a different answer.

The files go to the system's temporary folder, on disk: the child's answer is a
gigabyte at a million records, which held in memory (`/dev/shm`) would count
against the run's memory without showing in any process's resident size. Read
once and deleted within seconds, most of it never leaves the page cache.
"""

from __future__ import annotations

import json
import logging
import mmap
import pickle
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from mdm_pipeline.config.schema import text_types
from mdm_pipeline.golden_records.jsonrows import as_texts
from mdm_pipeline.golden_records.snapshot_child import child_answer, stop_child
from mdm_pipeline.golden_records.store import hash_rows

log = logging.getLogger(__name__)

CHILD_MODULE = "mdm_pipeline.golden_records.payload_child"

#: The fewest records whose payloads are made by a child. The child costs a second or
#: so to start (it imports pandas); below a hundred thousand records, the payloads
#: take less than that to make here.
MIN_RECORDS = 100_000

#: The files between the two processes, in the job's folder.
TEXTS, OTHERS, ORDER, META = "texts.arrow", "others.pickle", "order.npy", "meta.json"
ANSWER = "payloads.arrow"


def write_inputs(
    folder: Path, records: pd.DataFrame, columns: list[str], order: np.ndarray, chunk_rows: int
) -> None:
    """The payload `columns` of `records` (in payload order), the order the store writes
    the records in, and the chunks' size, as the child reads them: texts as Arrow
    strings, the other columns pickled. Column by column, in the records' own order:
    neither the frame nor its columns are copied here."""
    texts: dict[str, pa.Array] = {}
    others: list[str] = []
    for name in columns:
        # Held as Arrow strings or as Python texts, a text column's payload is the
        # same (`jsonrows` quotes both alike): the child gets both kinds as Arrow's.
        values = as_texts(records[name])
        if values is None:
            others.append(name)
        else:
            texts[name] = values
    table = pa.table(texts) if texts else pa.table({})
    with pa.OSFile(str(folder / TEXTS), "wb") as sink, ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    del table, texts
    with open(folder / OTHERS, "wb") as out:
        pickle.dump(records[others].reset_index(drop=True), out, protocol=5)
    np.save(folder / ORDER, np.asarray(order, dtype=np.int64))
    meta = {"columns": list(columns), "chunk_rows": chunk_rows, "rows": len(records)}
    (folder / META).write_text(json.dumps(meta))


def read_inputs(folder: Path) -> Iterator[pd.DataFrame]:
    """What `write_inputs` wrote, a chunk at a time: the payload columns of each chunk
    of records in write order (texts as Arrow strings), indexed 0….

    The texts are mapped, and a chunk's rows are taken from anywhere in them. Each
    chunk's pages are let go once it is taken (they stay in the page cache): mapped
    pages count in the process's resident size, and the whole file's would be
    hundreds of megabytes beside the run's own at a million records."""
    meta = json.loads((folder / META).read_text())
    columns, chunk_rows = meta["columns"], meta["chunk_rows"]
    order = np.load(folder / ORDER)
    with open(folder / OTHERS, "rb") as source:
        # This run's own file, in the private folder it made for the child.
        others = pickle.load(source)
    with (
        open(folder / TEXTS, "rb") as file,
        mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped,
    ):
        texts = ipc.open_file(pa.py_buffer(mapped)).read_all()
        for start in range(0, len(order), chunk_rows):
            rows = order[start : start + chunk_rows]
            taken = texts.take(pa.array(rows))
            mapped.madvise(mmap.MADV_DONTNEED)
            part = others.take(rows)
            data: dict[str, Any] = {}
            for name in columns:
                if name in part.columns:
                    data[name] = part[name].array
                else:
                    data[name] = taken.column(name).to_pandas(types_mapper=text_types).array
            yield pd.DataFrame(data, index=pd.RangeIndex(len(rows)), copy=False)
        del texts


def make_payloads(folder: Path) -> dict[str, Any]:
    """The child's work: each chunk's hashes and payloads, in the write order, as one
    record batch of FOLDER/payloads.arrow; what to answer."""
    schema = pa.schema([("record_hash", pa.string()), ("payload", pa.string())])
    chunks = 0
    with pa.OSFile(str(folder / ANSWER), "wb") as sink, ipc.new_file(sink, schema) as writer:
        for frame in read_inputs(folder):
            digests, texts = hash_rows(frame)
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.array(digests.to_numpy(), type=pa.string()),
                        pa.array(texts.to_numpy(), type=pa.string()),
                    ],
                    schema=schema,
                )
            )
            chunks += 1
    return {"payloads": str(folder / ANSWER), "chunks": chunks}


class Chunks:
    """The child's payloads, chunk by chunk: `get(start)` is what `store.hash_rows`
    gives for the records `order[start : start + chunk_rows]`."""

    def __init__(self, path: str, order: np.ndarray, chunk_rows: int, chunks: int) -> None:
        self.order, self.chunk_rows = order, chunk_rows
        # Read batch by batch (not mapped): only the chunk being written is held.
        self._reader = ipc.open_file(pa.OSFile(path, "rb"))
        if self._reader.num_record_batches != chunks:
            raise ValueError("the child's answer does not hold every chunk")

    def get(self, start: int) -> tuple[pd.Series, pd.Series] | None:
        """(hash, payload) of the chunk starting at `start`, indexed 0…; None if the
        child's chunks are not this one's."""
        if start % self.chunk_rows:
            return None
        batch = self._reader.get_batch(start // self.chunk_rows)
        if batch.num_rows != len(self.order[start : start + self.chunk_rows]):
            return None
        return (
            pd.Series(batch.column(0).to_numpy(zero_copy_only=False), dtype=object),
            pd.Series(batch.column(1).to_numpy(zero_copy_only=False), dtype=object),
        )


class PayloadJob:
    """The payloads of `records` (their payload `columns`) made by a child process, in
    the order `order` by chunks of `chunk_rows`: started now, collected by `chunks`
    (see the module)."""

    def __init__(
        self, records: pd.DataFrame, columns: list[str], order: np.ndarray, chunk_rows: int
    ) -> None:
        self.order, self.chunk_rows = np.asarray(order, dtype=np.int64), chunk_rows
        self._process: subprocess.Popen[str] | None = None
        self.folder: str | None = None
        try:
            self.folder = tempfile.mkdtemp(prefix="mdm-payloads-")
            write_inputs(Path(self.folder), records, columns, self.order, chunk_rows)
            self._process = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, self.folder],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:  # no room for the inputs, no process to be had
            log.warning("payloads could not be made in a child process (%s)", type(exc).__name__)
            stop_child(None, self.folder)
            self.folder = None
        # A run that fails before it collects the answer still stops the child and
        # removes its files (at the latest when the interpreter exits).
        self._finalizer = weakref.finalize(self, stop_child, self._process, self.folder)

    def chunks(self) -> Chunks | None:
        """The child's payloads once it is done; None if it failed (logged): the store
        makes them itself."""
        if self._process is None:
            return None
        answer, reason = child_answer(self._process)
        if answer is not None:
            try:
                return Chunks(answer["payloads"], self.order, self.chunk_rows, answer["chunks"])
            except (ValueError, KeyError, TypeError, OSError, pa.ArrowException) as exc:
                reason = type(exc).__name__
        log.warning("payloads made in a child process failed (%s): made in this one", reason)
        return None

    def close(self) -> None:
        """Stop the child if it still runs and remove its files (idempotent)."""
        self._finalizer()
        self._process = None
