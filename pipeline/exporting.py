"""A full run's return files, written by a child process while the store is written.

The return files (each business unit's extract back, row for row, with what
the run made of each row) need every record's golden ID, and nothing else the
store stage makes. At a million records they took 3.5-4.5 s of a run on one
core, after the store stage, while the store stage itself leaves the other core
idle much of its time (its writes are this process's, one statement at a time).

So a full run of at least `MIN_RECORDS` records hands each source's extract
rows and return columns to a child (`export_child`) before it starts the store
stage, and lets go of the extract rows it held for them. The store stage tells
the child the golden IDs as soon as it has assigned them (`golden_ids`); the
child writes the files into the run's staging folder while the store is
written, at a lower priority, and the export stage collects them (`files`).
As before, they replace the previous files only once the run has committed.

A child that fails, or cannot start, and this process writes the files from
the same inputs, with the same code: a speed-up, never a different file.

The same pieces also make what the next incremental night reads back of the
full extracts' records for its own return files (`HeldPart`), which a night
otherwise parses out of every stored payload.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mdm_pipeline.config import schema
from mdm_pipeline.config.settings import ParquetSource, Source
from mdm_pipeline.golden_records.schema import HELD_SOURCES, RETURNS_KEYS
from mdm_pipeline.golden_records.snapshot_child import child_answer, stop_child
from mdm_pipeline.sources.writers import (
    CSV_CHUNK_ROWS,
    rendered_row_by_row,
    write_back_pieces,
)

log = logging.getLogger(__name__)

CHILD_MODULE = "mdm_pipeline.pipeline.export_child"

#: The fewest records whose return files a child writes: below, the files take less
#: time to write than the child to start.
MIN_RECORDS = 100_000

#: Columns added to each business unit's return file.
RETURN_COLUMNS = {
    "golden_id": "mdm_golden_id",
    **{f"rnvp_line{i}": f"mdm_rnvp_line{i}" for i in range(1, 7)},
    "street_norm": "mdm_street",
    "postcode_norm": "mdm_postcode",
    "city_norm": "mdm_city",
    "address_status": "mdm_address_status",
    "address_codes": "mdm_address_codes",
    "email_norm": "mdm_email",
    "email_valid": "mdm_email_valid",
    "phone_norm": "mdm_phone",
    "phone_valid": "mdm_phone_valid",
    "npai_flag": "mdm_npai",
    "npai_date": "mdm_npai_date",
    "npai_reason": "mdm_npai_reason",
}


def return_columns(records: pd.DataFrame, duplicates: np.ndarray | None = None) -> pd.DataFrame:
    """What a business unit gets back beside each of its rows (`records`: its records
    with their golden ID): cleaned values and flags, and its own duplicates, i.e. its
    other records in the same golden record, by key, so that it can merge them
    (`duplicates`, if already found among more records than these: `bu_duplicates`)."""
    added = records.reindex(columns=list(RETURN_COLUMNS)).rename(columns=RETURN_COLUMNS)
    added["mdm_bu_duplicates"] = (
        bu_duplicates(
            records["source_key"].astype(str).to_numpy(dtype=object),
            records["golden_id"].to_numpy(),
        )
        if duplicates is None
        else duplicates
    )
    return added.reset_index(drop=True)


def bu_duplicates(keys: np.ndarray, golden_ids: np.ndarray) -> np.ndarray:
    """Per record, the keys of the other records in its golden record, in key order and
    joined by spaces ("" for none or no golden ID).

    Golden records are small (a few records each): every record's others are
    enumerated as positions in one sorted array and joined in Arrow, with no
    Python call per record (a group-by joining texts took six seconds of a full
    run's export at a million records)."""
    out = np.full(len(keys), "", dtype=object)
    gid_codes, _ = pd.factorize(golden_ids)
    key_ranks, uniques = pd.factorize(keys, sort=True)
    # Records grouped by golden record, each group in key order.
    order = np.lexsort((key_ranks, gid_codes))
    order = order[gid_codes[order] >= 0]
    group = gid_codes[order]
    if not len(group):
        return out
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[starts, len(group)])
    member_start = np.repeat(starts, sizes)
    member_size = np.repeat(sizes, sizes)
    # Each member against every member of its group, itself (and its own key) left out.
    member = np.repeat(np.arange(len(group)), member_size)
    within = np.arange(len(member)) - np.repeat(np.cumsum(member_size) - member_size, member_size)
    other = member_start[member] + within
    rank = key_ranks[order]
    keep = rank[other] != rank[member]
    member, other = member[keep], other[keep]
    counts = np.bincount(member, minlength=len(group))
    offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
    texts = pa.array(np.asarray(uniques, dtype=object), type=pa.string()).take(
        pa.array(rank[other])
    )
    joined = pc.binary_join(pa.ListArray.from_arrays(offsets, texts), " ")
    out[order] = joined.to_numpy(zero_copy_only=False)
    return out


#: What a business unit's return file needs from each stored payload.
_PAYLOAD_FIELDS = [c for c in RETURN_COLUMNS if c != "golden_id"]
#: Flags among them; the others are texts.
_FLAGS = ("email_valid", "phone_valid", "npai_flag")
#: Those fields as `store.read_returns` parses them out of the payloads.
RETURN_FIELDS = pa.schema(
    [pa.field(c, pa.bool_() if c in _FLAGS else pa.string()) for c in _PAYLOAD_FIELDS]
)


#: Return columns that are texts, booleans that may be unknown, and the NPAI flag: the
#: types a run's own records give them, so that a file written from the store is the
#: file the run writes (a Parquet file's schema included).
_TEXT_FIELDS = [c for c in _PAYLOAD_FIELDS if c not in _FLAGS]
_UNKNOWN_BOOLEANS = ["email_valid", "phone_valid"]
_TEXT_KEPT_AS_OBJECTS = ["npai_date", "npai_reason"]  # as `with_flags` leaves them


def typed_returns(values: pd.DataFrame) -> pd.DataFrame:
    """The return fields of `values` (missing ones empty) in the types a run gives them."""
    out = values.reindex(columns=_PAYLOAD_FIELDS)
    text = schema.text_dtype()
    for c in _TEXT_FIELDS:
        if c in _TEXT_KEPT_AS_OBJECTS:
            out[c] = out[c].astype(object).where(out[c].notna(), np.nan)
        else:
            out[c] = out[c].astype(text)
    for c in _UNKNOWN_BOOLEANS:
        out[c] = out[c].astype("boolean")
    out["npai_flag"] = out["npai_flag"].astype("boolean").fillna(False).astype(bool)
    return out


def as_held(records: pd.DataFrame) -> pa.Table:
    """Records a run stores (source_key, golden_id and return fields in the run's
    types) as `store.read_returns` gives them back from their payloads."""
    values = typed_returns(records.reset_index(drop=True))
    columns = [
        pa.array(records[c].astype(str).to_numpy(dtype=object), type=pa.string())
        for c in ("source_key", "golden_id")
    ]
    for field in RETURN_FIELDS:
        column = values[field.name]
        if field.name in _TEXT_KEPT_AS_OBJECTS:  # texts or missing (`with_flags`)
            column = column.astype(schema.text_dtype())
        columns.append(pa.array(column, type=field.type, from_pandas=True))
    return pa.Table.from_arrays(columns, names=["source_key", "golden_id", *RETURN_FIELDS.names])


#: How a held part is written: no dictionaries or statistics, which its readers do
#: not use. 962k records' part: 1.0-1.5 s of CPU to write against 1.5-1.9 s, 52.7 MB
#: against 57.7 MB, and read back in 0.7-1.2 s against 1.4-2.1 s (session 40).
HELD_PARQUET: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": False,
    "write_statistics": False,
}


def held_sources(specs: Iterable[Source]) -> list[str]:
    """The sources a held part holds every record of, sorted: those sent as full
    extracts (a delta extract's unchanged records are read by key instead)."""
    return sorted(spec.name for spec in specs if spec.delta is None)


def held_table(sources: pa.Array, records: pd.DataFrame) -> pa.Table:
    """Rows of a held part (`store.write_held`): `as_held(records)`, each record's
    source (`sources`) first."""
    return as_held(records).add_column(0, RETURNS_KEYS[0], sources)


def held_schema(sources: list[str]) -> pa.Schema:
    """A held part's schema; its metadata names the sources it holds every record of
    (`store.read_held` reads no other)."""
    keys = [pa.field(c, pa.string()) for c in RETURNS_KEYS]
    return pa.schema([*keys, *RETURN_FIELDS], metadata={HELD_SOURCES: json.dumps(sorted(sources))})


class HeldPart:
    """What the next incremental night reads back of a full run's full extracts, made
    as the run's return files are: the return fields of each of their records, as
    the run stored them in its payload, with its golden ID (`store.write_held`).

    Without it, the first night on full extracts after a full run read a million
    payloads back for its return files (a gigabyte of JSON parsed) while later
    nights read what the night before had held: 25.6 s against 17.3-23.7 s at 1M
    records (docs/benchmarks.md, session 40). Written a piece at a time, as the
    files are: the export's child holds one piece, never a source."""

    def __init__(self, sink: str | Path | io.BytesIO, sources: list[str]) -> None:
        #: The sources whose records it holds (`add`), every one of them.
        self.sources = frozenset(sources)
        self._writer = pq.ParquetWriter(sink, held_schema(sources), **HELD_PARQUET)

    def add(self, source: str, records: pd.DataFrame) -> None:
        """`records` of `source` (source_key, golden_id and the return fields), if it is
        one of the part's `sources`: a delta extract's records are not held."""
        if source not in self.sources:
            return
        names = pa.array(np.full(len(records), source, dtype=object), type=pa.string())
        self._writer.write_table(held_table(names, records))

    def close(self) -> None:
        self._writer.close()


#: The golden IDs' file in the job's folder (for each source's, see `write_inputs`).
GOLDEN_IDS = "golden_ids.pickle"
#: The sources sent as full extracts, whose held part the job makes (JSON), in its folder.
HELD_SOURCES_FILE = "held_sources.json"
#: The held part (`HeldPart`) in the job's folder, once written whole.
HELD_FILE = "held.parquet"
#: What this process writes on the child's standard input once the golden IDs are there.
GO = "go\n"


#: Rows of a piece of a source whose columns all render row by row
#: (`writers.rendered_row_by_row`): the child's memory is a piece's.
PIECE_ROWS = 25_000


def piece_rows(spec: Source, raw: pd.DataFrame, part: pd.DataFrame) -> int:
    """How many rows of a source the child takes at a time: a Parquet file is written
    whole; a CSV file by pieces that give the whole file's text, `PIECE_ROWS` when
    every column renders row by row, else the writer's own chunks."""
    if isinstance(spec, ParquetSource):
        return max(len(part), 1)
    empty = np.array([], dtype=object)
    added = return_columns(part.iloc[:0].assign(golden_id=empty), empty)
    if rendered_row_by_row([*raw.dtypes, *added.dtypes]):
        return PIECE_ROWS
    return CSV_CHUNK_ROWS


def write_inputs(
    folder: Path,
    specs: list[Source],
    raws: list[pd.DataFrame],
    parts: Iterable[pd.DataFrame],
) -> None:
    """Each source's inputs, in files the child reads one at a time: its spec and its
    records' keys (`<i>.pickle`), then its extract rows and return columns by
    pieces (`<i>.<k>.pickle`, `piece_rows`). The child holds one piece at a time,
    and the store stage is the run's peak: a whole source held beside it was
    0.5-0.8 GB at a million records."""
    for i, (spec, raw, part) in enumerate(zip(specs, raws, parts, strict=True)):
        keys = pa.array(part["source_key"].astype(str).to_numpy(dtype=object), type=pa.string())
        size = piece_rows(spec, raw, part)
        starts = range(0, len(part), size) if len(part) else range(1)
        with open(folder / f"{i}.pickle", "wb") as out:
            pickle.dump((spec, keys, len(starts)), out, protocol=5)
        for k, start in enumerate(starts):
            piece = (raw.iloc[start : start + size], part.iloc[start : start + size])
            with open(folder / f"{i}.{k}.pickle", "wb") as out:
                pickle.dump(piece, out, protocol=5)


def write_golden_ids(folder: Path, golden_ids: np.ndarray) -> None:
    """The records' golden IDs, as Arrow strings: a million Python texts would be
    50 MB of the child's memory, each source's taken as texts when it is written."""
    with open(folder / GOLDEN_IDS, "wb") as out:
        pickle.dump(pa.array(golden_ids, type=pa.string(), from_pandas=True), out, protocol=5)


def _load(path: Path) -> Any:
    # This run's own files, in the private folder it made for the job.
    with open(path, "rb") as source:
        return pickle.load(source)


def _pieces(
    folder: Path,
    source: int,
    pieces: int,
    golden_ids: pa.Array,
    duplicates: pa.Array,
    held: tuple[HeldPart, str] | None = None,
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Source `source`'s (extract rows, added columns), a piece at a time, each piece's
    records added to `held` (the part, the source's name) on the way. The golden
    IDs and duplicates stay Arrow strings but for the piece's own: as Python texts,
    a source's were a hundred megabytes of the child's memory."""
    at = 0
    for k in range(pieces):
        raw, part = _load(folder / f"{source}.{k}.pickle")
        ids, others = (
            a.slice(at, len(part)).to_numpy(zero_copy_only=False) for a in (golden_ids, duplicates)
        )
        at += len(part)
        part = part.assign(golden_id=ids)
        if held is not None:
            held[0].add(held[1], part)
        yield raw, return_columns(part, others)


def _job_held_sources(folder: Path) -> list[str] | None:
    """The sources the job's held part is to hold (`HELD_SOURCES_FILE`), None if it
    makes none."""
    path = folder / HELD_SOURCES_FILE
    return json.loads(path.read_text()) if path.exists() else None


def export_from(folder: Path, out_dir: Path, sources: int) -> list[Path]:
    """The return files of the job in `folder`, written into `out_dir`, and its held
    part (`HELD_FILE`) if it makes one (what the child does, and what this process
    does if the child fails)."""
    golden_ids = _load(folder / GOLDEN_IDS)
    whole = _job_held_sources(folder)
    # Written under another name, and named `HELD_FILE` once whole.
    partial = folder / f"{HELD_FILE}.part"
    held = HeldPart(partial, whole) if whole is not None else None
    paths, offset = [], 0
    for i in range(sources):
        spec, keys, pieces = _load(folder / f"{i}.pickle")
        ids = golden_ids.slice(offset, len(keys))
        if len(ids) != len(keys):
            raise ValueError("the golden IDs are not the records'")
        offset += len(keys)
        # A record's others in its golden record are found among the whole source's.
        duplicates = pa.array(
            bu_duplicates(keys.to_numpy(zero_copy_only=False), ids.to_numpy(zero_copy_only=False)),
            type=pa.string(),
        )
        del keys
        mine = (held, spec.name) if held is not None else None
        paths.append(
            write_back_pieces(spec, _pieces(folder, i, pieces, ids, duplicates, mine), out_dir)
        )
    if offset != len(golden_ids):
        raise ValueError("the golden IDs are not the records'")
    if held is not None:
        held.close()
        os.replace(partial, folder / HELD_FILE)
    return paths


class ExportJob:
    """The return files of a run's sources written by a child process (see the module):
    started now, told the golden IDs by `golden_ids`, collected by `files`.

    `parts[i]` holds source i's records with the columns `return_columns` reads (all
    but the golden ID), in the order of `raws[i]`'s rows; the golden IDs are those
    of every source's records, in the sources' order. With `held`, the job also
    makes the next night's held part of the sources sent as full extracts
    (`HeldPart`), collected with the files (`held_part`)."""

    def __init__(
        self,
        specs: list[Source],
        raws: list[pd.DataFrame],
        parts: Iterable[pd.DataFrame],
        out_dir: Path,
        held: bool = False,
    ) -> None:
        self.sources, self.out_dir = len(specs), out_dir
        self.folder = Path(tempfile.mkdtemp(prefix="mdm-export-"))
        self._process: subprocess.Popen[str] | None = None
        #: The held part (Parquet), once the files are collected (`files`), if made.
        self.held_part: bytes | None = None
        whole = held_sources(specs)
        # The inputs are written whatever happens next: this process writes the files
        # from them if the child cannot.
        try:
            write_inputs(self.folder, specs, raws, parts)
            if held and whole:
                (self.folder / HELD_SOURCES_FILE).write_text(json.dumps(whole))
        except BaseException:
            stop_child(None, str(self.folder))
            raise
        try:
            arguments = [str(self.folder), str(out_dir), str(self.sources)]
            self._process = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, *arguments],
                # Arrow's buffers from the C library's heap, which gives them back when
                # freed: its own pool keeps them (60 MB more at the child's peak).
                env={**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            log.warning("return files could not be written by a child (%s)", type(exc).__name__)
        self._told = False
        # A run that fails before it collects the files still stops the child and
        # removes the inputs (at the latest when the interpreter exits).
        self._finalizer = weakref.finalize(self, stop_child, self._process, str(self.folder))

    def golden_ids(self, golden_ids: pd.Series) -> None:
        """The records' golden IDs, in the sources' order: the child starts writing."""
        write_golden_ids(self.folder, golden_ids.to_numpy(dtype=object))
        self._told = True
        if self._process is not None and self._process.stdin is not None:
            try:  # `files` closes the pipe, as it collects the answer
                self._process.stdin.write(GO)
                self._process.stdin.flush()
            except OSError:  # the child is gone: `files` writes them here
                pass

    def files(self) -> list[Path]:
        """The return files, once written (by the child, else here), and the held part
        (`held_part`)."""
        if not self._told:
            raise RuntimeError("the return files need the golden IDs first")
        paths = self._childs_files()
        if paths is None:
            paths = export_from(self.folder, self.out_dir, self.sources)
        if _job_held_sources(self.folder) is not None:
            try:
                self.held_part = (self.folder / HELD_FILE).read_bytes()
            except OSError:
                # The next night reads the stored payloads instead: slower, the same.
                log.warning("the held part made with the return files is missing")
        return paths

    def _childs_files(self) -> list[Path] | None:
        """The child's files, from its answer; None if this process is to write them."""
        if self._process is None:
            return None
        answer, reason = child_answer(self._process)
        if answer is not None:
            try:
                paths = [Path(p) for p in answer["paths"]]
                if len(paths) == self.sources and all(p.is_file() for p in paths):
                    return paths
                reason = "not every file written"
            except (KeyError, TypeError) as exc:
                reason = type(exc).__name__
        log.warning("return files written by a child failed (%s): written here", reason)
        return None

    def close(self) -> None:
        """Stop the child if it still runs and remove the inputs (idempotent)."""
        self._finalizer()
        self._process = None
