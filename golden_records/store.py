"""The central store: SQLAlchemy 2 Core tables and the nightly write.

One run writes in one transaction, so a failure leaves the store as it was.
Writes are set-based: the new state is compared with the stored one in
pandas and only rows that changed are written, so a rerun on the same input
changes nothing but the run log. Golden IDs are opaque, kept from one night to
the next (a cluster keeps the ID of the stored golden record it shares the most
source records with) and never reused.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mdm_pipeline.config.errors import StoreLockedError
from mdm_pipeline.config.schema import (
    contiguous,
    distinct,
    joined_keys,
    text_dtype,
    text_types,
)
from mdm_pipeline.golden_records.connection import (  # noqa: F401  (part of the store's API)
    MIGRATIONS,
    _alembic_config,
    connect,
    schema_revision,
    upgrade,
)
from mdm_pipeline.golden_records.jsonrows import json_rows, read_fields
from mdm_pipeline.golden_records.schema import (  # noqa: F401  (the store's tables)
    HELD_PREFIX,
    HELD_SOURCES,
    MATCH_COLUMNS,
    RETURNS_KEYS,
    events,
    golden_history,
    golden_records,
    golden_versions,
    lock,
    match_evidence,
    metadata,
    models,
    npai,
    quarantine,
    record_history,
    runs,
    snapshot,
    source_records,
    xref,
)
from mdm_pipeline.golden_records.snapshot_child import BASE as SNAPSHOT_BASE
from mdm_pipeline.golden_records.snapshot_child import base_cache, keep_decoded_base, sync_range

if TYPE_CHECKING:  # the child's module imports this one
    from mdm_pipeline.golden_records.payloads import Chunks, PayloadJob

log = logging.getLogger(__name__)

EVIDENCE_KEYS = ("left_source", "left_key", "right_source", "right_key")

#: One kind of rows `_overlapped` writes: (its parts, prepare a part, write what was prepared).
_Phase = tuple[Iterable[Any], Callable[[Any], Any], Callable[[Any], None]]


#: Rows serialised at a time by `hash_rows`: the JSON text of a million payloads is
#: gigabytes (four bytes a character once an accent is in it); by chunks it is not.
HASH_CHUNK_ROWS = 50_000


def hash_rows(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """A stable hash per row of JSON-able values, to find what changed, and the JSON.

    Each row's text is the JSON object pandas writes for it (`jsonrows`), its null
    members left out (`sparse`: a missing field costs the store nothing), so that
    stored hashes stay valid; its hash is BLAKE2b of its UTF-8 bytes, read in
    place from the Arrow array. Done by chunks of rows, so that only one chunk's
    text is held twice at a time.
    """
    digests: list[str] = []
    lines: list[np.ndarray] = []
    for start in range(0, len(frame), HASH_CHUNK_ROWS):
        rows = json_rows(frame.iloc[start : start + HASH_CHUNK_ROWS], sparse=True)
        offsets = np.frombuffer(rows.buffers()[1], dtype=np.int32)[
            rows.offset : rows.offset + len(rows) + 1
        ].tolist()
        data = memoryview(rows.buffers()[2])
        digests.extend(
            hashlib.blake2b(data[a:b], digest_size=16).hexdigest()
            for a, b in itertools.pairwise(offsets)
        )
        lines.append(rows.to_numpy(zero_copy_only=False))
    text = np.concatenate(lines) if lines else np.array([], dtype=object)
    return pd.Series(digests, index=frame.index, dtype=object), pd.Series(
        text, index=frame.index, dtype=object
    )


def _json_rows(frame: pd.DataFrame) -> list[str]:
    """One JSON object per row, as pandas writes it: what `jsonrows` must write, kept
    for the tests that compare both."""
    text = frame.to_json(orient="records", lines=True, date_format="iso", force_ascii=False)
    # "\n" only: JSON escapes it inside strings, not U+2028 and the like.
    return text.rstrip("\n").split("\n") if len(frame) else []


def sort_order(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Row positions that sort `frame` by `columns`, ascending and stable.

    Computed in Arrow: pandas sorts text columns by factorising each one first,
    several times slower on the hundred thousand keys of a night's write (and a
    million in a full run). Both order texts by code point, as SQLite's BINARY
    collation does; a column Arrow cannot type falls back to pandas.
    """
    try:
        table = pa.table({c: pa.array(frame[c], from_pandas=True) for c in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return (
            frame[columns]
            .reset_index(drop=True)
            .sort_values(columns, kind="stable")
            .index.to_numpy()
        )
    order = pc.sort_indices(table, sort_keys=[(c, "ascending") for c in columns])
    return order.to_numpy()


def hex_digests(values: np.ndarray) -> np.ndarray:
    """64-bit hashes as 16 hex digits each (object array), in one pass over the bytes."""
    raw = binascii.hexlify(np.ascontiguousarray(values, dtype=">u8").tobytes())
    return np.frombuffer(raw, dtype="S16").astype("U16").astype(object)


#: Random bits of a golden ID, after its 44 bits of time.
_GID_RANDOM_BITS = 36


def new_golden_ids(n: int) -> np.ndarray:
    """`n` new opaque golden IDs: "G", the time in milliseconds (11 hex digits), then 36
    random bits (9 hex digits); distinct from each other and from every earlier run's.

    Nothing in them comes from the data. The time comes first, as in UUIDv7, so that
    a night's new golden records sit together in every index keyed by golden ID
    rather than on thousands of scattered pages: a 5% delta at 1M records (10k
    golden records created) changed 86 pages of the golden records' key instead of
    3.9k, and 5.7k of the cross-reference's golden ID index instead of 12.3k
    (docs/benchmarks.md). Runs are one at a time (the run lock) and each takes
    longer than a millisecond, so a run's prefix is its own; within a run, random
    tails that collide are drawn again.
    """
    prefix = f"G{time.time_ns() // 1_000_000:011X}"
    tails = np.empty(0, dtype=np.uint64)
    while len(tails) < n:
        drawn = np.frombuffer(os.urandom(8 * (n - len(tails))), dtype=np.uint64)
        tails = distinct(np.r_[tails, drawn >> np.uint64(64 - _GID_RANDOM_BITS)])
    # In random order (`distinct` sorted them), 9 upper-case hex digits each.
    tails = tails[np.random.default_rng().permutation(len(tails))]
    digits = np.frombuffer(binascii.hexlify(tails.astype(">u8").tobytes()).upper(), dtype="S1")
    hexed = np.ascontiguousarray(digits.reshape(-1, 16)[:, 16 - 9 :]).view("S9").ravel()
    return np.char.add(prefix, hexed.astype("U9")).astype(object)


def new_golden_id() -> str:
    """One new golden ID (`new_golden_ids`)."""
    return str(new_golden_ids(1)[0])


@dataclass(frozen=True)
class Assignment:
    """Golden IDs of this run's clusters, and what became of the stored ones."""

    gid_of_cluster: pd.Series  # cluster label -> golden ID
    retired: pd.DataFrame  # golden_id, survivor_id (None when all its records are gone)


def assign_golden_ids(
    clusters: pd.DataFrame, previous: pd.DataFrame, created: pd.Series | None = None
) -> Assignment:
    """A golden ID per cluster, kept from the previous night where possible.

    `clusters` has (source, source_key, cluster); `previous` has (source,
    source_key, golden_id); `created` gives each stored ID's creating run (run
    IDs sort by time). A stored ID follows the larger part of its records (a
    split keeps it for the larger part); a cluster offered several IDs keeps
    the oldest (a merge keeps the older ID), and the others are retired into
    it. Clusters offered none get a new ID; an ID is never reused. Ties go to
    the smaller cluster label, then the smaller ID, so that the result does not
    depend on row order.
    """
    shared = (
        clusters.merge(previous, on=["source", "source_key"], how="inner")
        if len(previous)
        else None
    )
    return _assign(clusters["cluster"], shared, created)


def _assign(
    cluster: pd.Series, shared: pd.DataFrame | None, created: pd.Series | None
) -> Assignment:
    """`assign_golden_ids` once each stored record is paired with its cluster: `shared`
    has (golden_id, cluster) of the records the store holds (None if it holds none)."""
    labels = np.sort(cluster.unique())
    assigned: dict[int, str] = {}
    retired = pd.DataFrame({"golden_id": [], "survivor_id": []}, dtype=object)
    if shared is not None and len(shared):
        # On integer codes (stored IDs numbered in their text order): sorting pairs of
        # texts and counts, a rerun at a million records took 2 s here.
        # Arrow texts stay Arrow texts: a million stored IDs as Python strings are 70 MB.
        gid_code, gid_texts = pd.factorize(shared["golden_id"], sort=True)
        gid_text = np.asarray(gid_texts, dtype=object)
        member_of = shared["cluster"].to_numpy(dtype=np.int64)
        low = int(member_of.min())
        width = int(member_of.max()) - low + 1
        pair, n = np.unique(  # noqa: TID251 (return_counts: it sorts)
            gid_code * width + (member_of - low), return_counts=True
        )
        pair_gid, pair_cluster = pair // width, pair % width + low
        # Each stored ID goes to the cluster holding most of its records (then the
        # smaller cluster).
        order = np.lexsort((pair_cluster, -n, pair_gid))
        home = order[np.r_[True, pair_gid[order][1:] != pair_gid[order][:-1]]]
        home_gid, home_cluster, home_n = pair_gid[home], pair_cluster[home], n[home]
        age = (created if created is not None else pd.Series(dtype=object)).reindex(
            gid_text[home_gid]
        )
        age_code = pd.factorize(age.fillna("").to_numpy(dtype=object), sort=True)[0]
        # Each cluster keeps the oldest of the IDs that chose it (then the one holding
        # more of its records, then the smaller ID).
        order = np.lexsort((home_gid, -home_n, age_code, home_cluster))
        chosen = order[np.r_[True, home_cluster[order][1:] != home_cluster[order][:-1]]]
        assigned = dict(
            zip(home_cluster[chosen].tolist(), gid_text[home_gid[chosen]].tolist(), strict=True)
        )
        away = np.ones(len(home), dtype=bool)
        away[chosen] = False
        retired = pd.DataFrame(
            {
                "golden_id": gid_text[home_gid[away]],
                "survivor_id": [assigned[c] for c in home_cluster[away].tolist()],
            }
        )
    gids = pd.Series(labels, index=labels).map(assigned).astype(object)
    fresh = gids.isna().to_numpy()
    gids[fresh] = new_golden_ids(int(fresh.sum()))
    return Assignment(gids, retired)


def _grouped(frame: pd.DataFrame, by: list[str], value: str) -> dict:
    """Sorted `value`s per group of `by` (a tuple key for several columns), from one
    sort and one split: no Python call per group, which thousands of events would cost."""
    order = sort_order(frame, [*by, value])
    keys = frame[by].to_numpy()[order]
    values = frame[value].to_numpy()[order]
    if not len(keys):
        return {}
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)])
    names = [k[0] if len(by) == 1 else tuple(k) for k in keys[starts].tolist()]
    # Slices of one list: numpy's split makes an array per group, tens of thousands.
    listed, bounds = values.tolist(), [*starts.tolist(), len(values)]
    return {name: listed[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}


def change_events(
    before: pd.DataFrame, after: pd.DataFrame
) -> list[tuple[str, str, dict[str, dict[str, list[str]]]]]:
    """Merges and splits between two cross-references (source, source_key, golden_id).

    A merge: one golden record of `after` gathers records of several of
    `before`. A split: the records of one golden record of `before` (those still
    delivered) are spread over several of `after`. Returns (kind, golden ID,
    {"before": {id: members}, "after": {id: members}}) per event, members as
    "source:key"; the golden ID is the survivor of a merge, the split one.
    """
    return _events(before.merge(after, on=["source", "source_key"], suffixes=("_old", "_new")))


def _events(both: pd.DataFrame) -> list[tuple[str, str, dict[str, dict[str, list[str]]]]]:
    """`change_events` once each record is paired with itself: `both` has source,
    source_key, golden_id_old and golden_id_new of the records in both."""
    if not len(both):
        return []
    # Only the golden IDs in an event are looked at: on most nights, none or few. An
    # old ID is in one when it or one of its new IDs is in more than one (old, new) pair.
    links = both[["golden_id_old", "golden_id_new"]].drop_duplicates()
    spread_or_gathered = links["golden_id_old"].duplicated(keep=False) | links[
        "golden_id_new"
    ].duplicated(keep=False)
    olds = links.loc[spread_or_gathered, "golden_id_old"].unique()
    involved = both["golden_id_old"].isin(olds)
    if not involved.any():
        return []
    both = both[involved]
    both = both.assign(member=both["source"] + ":" + both["source_key"].astype(str))
    # Member lists per golden ID and per (old, new) pair, built once: an event then
    # only looks them up (a night can hold thousands of events).
    by_old = _grouped(both, ["golden_id_old"], "member")
    by_new = _grouped(both, ["golden_id_new"], "member")
    by_pair = _grouped(both, ["golden_id_old", "golden_id_new"], "member")
    pairs = both[["golden_id_old", "golden_id_new"]].drop_duplicates()
    news_of_old = {
        k: set(v) for k, v in _grouped(pairs, ["golden_id_old"], "golden_id_new").items()
    }
    olds_of_new = {
        k: set(v) for k, v in _grouped(pairs, ["golden_id_new"], "golden_id_old").items()
    }

    def spread(olds: set[str]) -> dict[str, list[str]]:
        """Where the records of these old golden records went."""
        out: dict[str, list[str]] = {}
        for old in olds:
            for new in news_of_old[old]:
                out.setdefault(new, []).extend(by_pair[(old, new)])
        return {g: sorted(m) for g, m in out.items()}

    events: list[tuple[str, str, dict[str, dict[str, list[str]]]]] = []
    for gid in sorted(g for g, olds in olds_of_new.items() if len(olds) > 1):
        olds = olds_of_new[gid]
        after_map = spread(olds)
        after_map[gid] = by_new[gid]
        events.append(("merge", gid, {"before": {o: by_old[o] for o in olds}, "after": after_map}))
    for gid in sorted(g for g, news in news_of_old.items() if len(news) > 1):
        events.append(("split", gid, {"before": {gid: by_old[gid]}, "after": spread({gid})}))
    return events


@dataclass
class WriteResult:
    """What one run changed in the store."""

    golden_created: int = 0
    golden_updated: int = 0
    golden_unchanged: int = 0
    golden_retired: int = 0
    records_written: int = 0
    records_removed: int = 0
    quarantine_rows: int = 0
    merges: int = 0
    splits: int = 0


#: Column types whose values the drivers return as SQLAlchemy would (text, numbers), or
#: as text or datetime objects that pandas converts a column at a time (DateTime).
_PLAIN_TYPES = (sa.String, sa.Integer, sa.Float, sa.DateTime, sa.LargeBinary)


def _read(conn: Connection, query: sa.Select) -> pd.DataFrame:
    """The rows of `query` as a frame.

    A query without bound parameters over plain columns goes to the driver as its
    SQL text: SQLAlchemy's result processing would parse each SQLite datetime
    with a regular expression and build a row object per row (a third of reading
    a night's 95k stored records back); DateTime columns are converted here, a
    column at a time, to the same datetime64 values.
    """
    sql = _driver_sql(conn, query)
    if sql is None:
        result = conn.execute(query)
        return pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    return _frame(conn.exec_driver_sql(sql).fetchall(), query)


def _driver_sql(conn: Connection, query: sa.Select) -> str | None:
    """`query`'s SQL text for the driver, when it has no bound parameters and only
    plain columns (whose values the driver returns as `_frame` reads them)."""
    compiled = query.compile(dialect=conn.dialect)
    if compiled.params or not all(isinstance(c.type, _PLAIN_TYPES) for c in query.selected_columns):
        return None
    return str(compiled)


def _frame(rows: list, query: sa.Select) -> pd.DataFrame:
    """The driver's rows of `query` as a frame, DateTime columns parsed a column at a time."""
    columns = list(query.selected_columns)
    frame = pd.DataFrame(rows, columns=[c.key for c in columns])
    for c in columns:
        if isinstance(c.type, sa.DateTime) and len(frame):
            frame[c.key] = pd.to_datetime(frame[c.key], format="ISO8601")
    return frame


def _keys_in(conn: Connection, table: sa.Table, keys: pd.DataFrame) -> sa.ColumnElement[bool]:
    """`table`'s rows whose key columns are among `keys` (a temporary table joined by the
    database through its index: one statement, not one per key)."""
    cols = list(keys.columns)
    tmp = _temp_keys(conn, table, keys)
    if len(cols) == 1:
        return table.c[cols[0]].in_(sa.select(tmp.c[cols[0]]))
    return sa.tuple_(*[table.c[c] for c in cols]).in_(sa.select(*[tmp.c[c] for c in cols]))


def _delete_keys(conn: Connection, table: sa.Table, keys: pd.DataFrame) -> None:
    if len(keys):
        conn.execute(table.delete().where(_keys_in(conn, table, keys)))


def _close_open(
    conn: Connection, table: sa.Table, keys: pd.DataFrame, at: datetime, run_id: str
) -> None:
    """End the open (valid_to IS NULL) history rows of these keys at `at`."""
    if len(keys):
        conn.execute(
            table.update()
            .where(table.c.valid_to.is_(None), _keys_in(conn, table, keys))
            .values(valid_to=at, closed_run=run_id)
        )


def _replace(
    conn: Connection,
    table: sa.Table,
    frame: pd.DataFrame,
    stored: pd.DataFrame,
    same: tuple[str, np.ndarray] | None = None,
) -> None:
    """`frame`'s rows in place of the stored ones with the same primary key (`stored`:
    the keys among them the store holds).

    On SQLite an upsert rewrites each row where it lies, with only the indexes of
    the columns it sets touched; a delete then an insert would take each row out
    of every index and put it back. PostgreSQL's COPY cannot upsert, and its
    delete and COPY are the faster pair there.

    `same` (column, mask): the rows of `frame` whose stored value of that column
    is already theirs. On SQLite they are upserted without setting it: an indexed
    column in an upsert's SET has its index entry taken out and put back even
    when the value is the one stored (a night's 41k changed source records, most
    still in their golden record: 0.88 s with the golden ID set, 0.52 s without).
    """
    if same is not None and conn.dialect.name == "sqlite":
        column, mask = same
        for _ in _inserting(conn, table, frame[mask], upsert=True, kept=(column,)):
            pass
        frame = frame[~mask]
    for _ in _replacing(conn, table, frame, stored):
        pass


def _replacing(
    conn: Connection,
    table: sa.Table,
    frame: pd.DataFrame,
    stored: pd.DataFrame,
    slice_rows: int = 0,
) -> Iterator[None]:
    """`_replace`, a step at a time (see `_inserting`)."""
    if conn.dialect.name == "sqlite":
        yield from _inserting(conn, table, frame, upsert=True, slice_rows=slice_rows)
        return
    _delete_keys(conn, table, stored)
    yield
    yield from _inserting(conn, table, frame, slice_rows=slice_rows)


def _insert(conn: Connection, table: sa.Table, frame: pd.DataFrame, upsert: bool = False) -> None:
    """Bulk insert: rows go to the driver as tuples, past SQLAlchemy's per-row processing.

    On PostgreSQL they are streamed with COPY. On SQLite, datetimes are written
    as text in the format SQLAlchemy itself uses, so that the ORM-free reads and
    the Core reads of the same column agree; `upsert` (SQLite only) overwrites
    a row whose primary key is stored.
    """
    for _ in _inserting(conn, table, frame, upsert):
        pass


def _inserting(
    conn: Connection,
    table: sa.Table,
    frame: pd.DataFrame,
    upsert: bool = False,
    slice_rows: int = 0,
    kept: tuple[str, ...] = (),
) -> Iterator[None]:
    """`_insert`, yielding after each slice of `slice_rows` rows (`INSERT_SLICE_ROWS`
    if 0): a caller can run it a step at a time, between other work on the same
    connection (`_overlapped`'s `idle`). The secondary indexes of an empty table
    are built once, after its last slice, however the steps are spread. An upsert
    leaves the `kept` columns of a stored row as they are (see `_replace`)."""
    if not len(frame):
        return
    slice_rows = slice_rows or INSERT_SLICE_ROWS
    cols = [c.name for c in table.columns if c.name in frame.columns]
    # In key order, each insert lands next to the previous one in the table's B-tree:
    # pages are read and written once, not once per row spread over gigabytes.
    key = [c.name for c in table.primary_key.columns if c.name in cols]
    order = None
    if key and len(frame) > 1:
        # Only the key columns are sorted; each column is then taken in that order.
        order = sort_order(frame, key)
    if order is None:
        order = np.arange(len(frame))
    sqlite = conn.dialect.name == "sqlite"
    with _indexes_built_after(conn, [table], len(frame)):
        # By slices of rows: a row is a tuple of Python objects, and a million of
        # them (with their texts taken out of Arrow arrays) are gigabytes.
        for start in range(0, len(order), slice_rows):
            taken = order[start : start + slice_rows]
            # Column by column into one block of rows, missing values (NaN, NaT, pd.NA)
            # to None: a frame-wide `where` and `itertuples` cost seconds on a million
            # rows. The block is new: the caller's frame is never written to.
            rows = np.empty((len(taken), len(cols)), dtype=object)
            for j, c in enumerate(cols):
                if sqlite and isinstance(table.c[c].type, sa.DateTime):
                    rows[:, j] = _datetime_texts(frame[c].iloc[taken])
                else:
                    rows[:, j] = frame[c].iloc[taken].to_numpy(dtype=object)
                missing = pd.isna(rows[:, j])
                if missing.any():
                    rows[missing, j] = None
            _insert_rows(conn, table, cols, key, rows, upsert, kept)
            yield


#: Rows `_insert` hands the driver at a time.
INSERT_SLICE_ROWS = 100_000


#: Rows from which an insert into an empty table builds its secondary indexes after the
#: rows are in, rather than row by row.
BULK_INDEX_ROWS = 50_000


@contextmanager
def _indexes_built_after(conn: Connection, tables: list[sa.Table], rows: int) -> Iterator[None]:
    """Around a large insert into empty tables (a first run's), the tables' secondary
    indexes are dropped, then built again from the rows: one sort instead of a
    random B-tree insert per row (a million source records' golden IDs: 12.2 s of
    inserts with the index, 6.0 s without it and 1.9 s to build it). In the write's
    transaction: a failed run leaves the indexes as they were. Any other insert
    keeps them; inserts into a table already in such a block leave it to the block."""
    held: set[str] = conn.info.setdefault("mdm_bulk_tables", set())
    empty = (
        [
            t
            for t in tables
            if t.name not in held
            and t.indexes
            and conn.execute(sa.select(1).select_from(t).limit(1)).first() is None
        ]
        if rows >= BULK_INDEX_ROWS
        else []
    )
    for table in empty:
        for index in table.indexes:
            index.drop(conn)
        held.add(table.name)
    try:
        yield
    finally:
        for table in empty:
            held.discard(table.name)
    for table in empty:
        for index in table.indexes:
            index.create(conn)


def _insert_rows(
    conn: Connection,
    table: sa.Table,
    cols: list[str],
    key: list[str],
    rows: np.ndarray,
    upsert: bool,
    kept: tuple[str, ...] = (),
) -> None:
    """Rows (a block of Python objects, a row of `cols`' values each) to the driver:
    COPY on PostgreSQL, one `executemany` elsewhere (an upsert on `key` where
    asked, setting every column but the key's and the `kept` ones). A
    statement's values are a row of the block reshaped: taken in one pass, where
    tuples per row, then flattened and cut again, took three."""
    names = ", ".join(f'"{c}"' for c in cols)
    if conn.dialect.name == "postgresql":
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(tuple(row))
        return
    marks = "(" + ", ".join("?" if conn.dialect.paramstyle == "qmark" else "%s" for _ in cols) + ")"
    conflict = ""
    if upsert:
        updated = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c not in (*key, *kept))
        target = ", ".join(f'"{k}"' for k in key)
        conflict = f" ON CONFLICT ({target}) DO UPDATE SET {updated}"
    per = _rows_per_statement(conn, len(cols))
    whole = len(rows) // per * per if per > 1 else 0
    if whole:
        # Rows in order, so a key twice in one statement ends as it would one by one.
        conn.exec_driver_sql(
            f'INSERT INTO "{table.name}" ({names}) VALUES {", ".join([marks] * per)}{conflict}',
            list(map(tuple, rows[:whole].reshape(-1, per * len(cols)))),
        )
    if whole < len(rows):
        conn.exec_driver_sql(
            f'INSERT INTO "{table.name}" ({names}) VALUES {marks}{conflict}',
            list(map(tuple, rows[whole:])),
        )


#: Rows one SQLite INSERT takes at most (`_rows_per_statement`).
ROWS_PER_STATEMENT = 100


def _rows_per_statement(conn: Connection, columns: int) -> int:
    """How many rows one INSERT of `columns` values each takes on SQLite.

    Python's driver binds a row's values holding the GIL and lets it go around
    each step of the statement, then waits to get it back, up to the
    interpreter's switch interval, while another thread runs Python: beside the
    thread that prepares the next chunk (building and hashing JSON texts), a
    million source records took 25 s to insert one row per statement, 15 s a
    hundred rows per statement, and 6 s alone (docs/benchmarks.md, session 19).
    A thousand rows per statement suffer less beside a thread running Python (a
    night's 41k changed source records: 1.3 s against 3.3 s, 0.95 s alone either
    way) but made a first run's store stage slower (12.2 s -> 12.9 s at 300k
    records, three runs each, session 26): the run's own threads mostly let the
    GIL go. Within the build's limit on bound values (999 before SQLite 3.32)."""
    limit = 999
    driver = conn.connection.dbapi_connection
    getlimit = getattr(driver, "getlimit", None)
    if getlimit is not None:
        import sqlite3

        limit = getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return max(1, min(ROWS_PER_STATEMENT, limit // max(columns, 1)))


def _datetime_texts(column: pd.Series) -> np.ndarray:
    """Datetimes as SQLAlchemy writes them to SQLite (None where missing), each distinct
    value formatted once: a column holds few (a run's time, payload dates), and
    `strftime` over a million rows is a Python call per row (8 s of a full run).
    A column already of datetimes is taken as it is: `to_datetime` would look at
    hundreds of its values one by one to decide on a cache it does not need (1.4 s
    of a first night's store stage at 1M records)."""
    dates = column if pd.api.types.is_datetime64_any_dtype(column) else pd.to_datetime(column)
    codes, uniques = pd.factorize(dates)
    texts = pd.DatetimeIndex(uniques).strftime("%Y-%m-%d %H:%M:%S.%f").to_numpy(dtype=object)
    return np.append(texts, None)[np.where(codes < 0, len(texts), codes)]


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction for the whole write: all of it lands, or none of it.

    On SQLite it is begun at once: Python's driver otherwise begins it only at
    the first INSERT, UPDATE or DELETE, and what runs before (the reads the write
    is decided on, and DDL such as a bulk insert's index rebuild) would run, and
    a DDL statement be committed, outside it."""
    with engine.begin() as conn, _writeback(engine):
        if conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
            conn.exec_driver_sql("BEGIN")
        yield conn


#: How often the files of a SQLite store are asked to start writing their dirty pages.
WRITEBACK_SECONDS = 0.25


@contextmanager
def _writeback(engine: Engine) -> Iterator[None]:
    """While a SQLite store's transaction runs, its file's and its journal's dirty pages
    are handed to the disk as they accumulate, as PostgreSQL's `backend_flush_after`
    does, instead of all at the commit's fsync: a night changes a gigabyte of pages
    and journals their originals, which the disk then writes while the run computes
    (commit 2.2-2.8 s -> 1.4-2.2 s at 1M records, docs/benchmarks.md). Only starts
    writes the kernel could start at any time: SQLite's own fsyncs still order the
    journal before the pages it protects."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    flush = sync_range() if path and path != ":memory:" else None
    if flush is None or path is None:
        yield
        return
    stop = threading.Event()

    def run() -> None:
        fds: dict[str, int] = {}
        try:
            while not stop.wait(WRITEBACK_SECONDS):
                for name in (path, path + "-journal"):
                    if name not in fds:
                        try:
                            fds[name] = os.open(name, os.O_RDONLY)
                        except OSError:  # no journal yet
                            continue
                    flush(fds[name])
        finally:
            for fd in fds.values():
                os.close(fd)

    thread = threading.Thread(target=run, name="mdm-writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


_XREF_QUERY = sa.select(
    source_records.c.source,
    source_records.c.source_key,
    source_records.c.golden_id,
    source_records.c.record_hash,
)
_GOLDEN_QUERY = sa.select(
    golden_records.c.golden_id,
    golden_records.c.record_hash,
    golden_records.c.members,
    golden_records.c.status,
    golden_records.c.created_run,
    golden_records.c.version,
)


def previous_xref(conn: Connection) -> pd.DataFrame:
    """The stored cross-reference: (source, source_key, golden_id, record_hash)."""
    return _read_texts(conn, _XREF_QUERY)


#: Rows `_read_texts` takes from the driver at a time.
READ_SLICE_ROWS = 100_000


def _read_texts(conn: Connection, query: sa.Select) -> pd.DataFrame:
    """The rows of `query` (plain columns, no bound parameters) as a frame whose text
    columns are Arrow strings (`text_dtype`), read by slices of rows.

    For the whole stored state a full run compares itself with (a million records'
    keys, golden IDs and hashes): as Python texts they were 0.4 GB held through
    the store stage, on top of its chunks; as Arrow strings a fifth of it, and
    only one slice's Python texts exist at a time.
    """
    texts = {c.key: text_dtype() for c in query.selected_columns if isinstance(c.type, sa.String)}
    sql = _driver_sql(conn, query)
    if sql is None:
        raise ValueError("_read_texts takes plain columns and no bound parameters")
    result = conn.exec_driver_sql(sql)
    parts = []
    while rows := result.fetchmany(READ_SLICE_ROWS):
        parts.append(_frame(rows, query).astype(texts))
    if not parts:
        # No rows: the frame the driver's empty answer gives, without asking again.
        return _frame([], query).astype(texts)
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


#: Characters a JSON string literal cannot hold as they are.
_JSON_ESCAPES = r'["\\\x00-\x1f]'


def _json_strings(values: pa.Array) -> pa.Array:
    """Text values as JSON string literals, in Arrow; only the rare ones that need
    escaping (a quote, a backslash, a control character) go through `json.dumps`."""
    quoted = pc.binary_join_element_wise('"', values, '"', "")
    odd = pc.match_substring_regex(values, _JSON_ESCAPES)
    if pc.any(odd).as_py():
        fixed = quoted.to_numpy(zero_copy_only=False).astype(object)
        where = np.flatnonzero(odd.to_numpy(zero_copy_only=False))
        fixed[where] = [json.dumps(v, ensure_ascii=False) for v in values.take(where).to_pylist()]
        quoted = pa.array(fixed, type=pa.string())
    return quoted


def _taken(values: np.ndarray) -> pa.Array:
    """A column of few distinct texts as Arrow strings, each text converted once."""
    codes, uniques = pd.factorize(values)
    return pa.array(np.asarray(uniques, dtype=object).astype(str), type=pa.string()).take(
        pa.array(codes)
    )


def _groups(*keys: np.ndarray) -> np.ndarray:
    """Offsets of the runs of equal `keys` in rows sorted by them (a list array's)."""
    change = np.zeros(len(keys[0]), dtype=bool)
    change[0] = True
    for key in keys:
        change[1:] |= key[1:] != key[:-1]
    return np.r_[np.flatnonzero(change), len(change)].astype(np.int32)


def _joined(offsets: np.ndarray, items: pa.Array, before: str, after: str) -> pa.Array:
    """The items of each run between `offsets`, joined by commas and wrapped."""
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), items), ",")
    return pc.binary_join_element_wise(before, joined, after, "")


def _lineage_json(records: pd.DataFrame, lineage: pd.DataFrame, index: pd.Index) -> pd.Series:
    """Lineage per golden record as JSON, by winning record then rule:
    {"source|source_key|date": {"rule": ["attribute", ...]}}, records in text order,
    rules and attributes in name order.

    Grouped so that a record's key and date are written once, not once per attribute
    it gave (an address block alone is a dozen attributes from one record): at a
    million records the lineage was the larger half of the golden records' bytes.
    Built column-wise in Arrow: each level is a list array over sorted rows, joined,
    with no JSON encoder over a wide, mostly empty frame. `audit` reads it back per
    attribute, as it reads the per-attribute form stores written before it hold.
    """
    if not len(index):
        return pd.Series([], index=index, dtype=object)
    lineage = lineage[lineage["cluster"].isin(index)]
    out = np.full(len(index), "{}", dtype=object)
    if not len(lineage):
        return pd.Series(out, index=index, dtype=object)
    where = index.get_indexer(lineage["cluster"])
    # Each winning record's label is made once, from its own row: a golden record's
    # attributes come from a few records, and labels per lineage row (a dozen times
    # as many) were texts made, then sorted, again and again.
    members, member_of = np.unique(  # noqa: TID251 (return_inverse: it sorts)
        lineage["record"].to_numpy(), return_inverse=True
    )
    updated = pd.to_datetime(records["source_updated_at"].iloc[members].to_numpy(), errors="coerce")
    # Few distinct sources, rules and dates: each formatted once and taken per row.
    day_codes, days = pd.factorize(updated)
    day_text = np.append(pd.DatetimeIndex(days).strftime("%Y-%m-%d").to_numpy(dtype=object), "")
    keys = contiguous(pa.array(records["source_key"].iloc[members], from_pandas=True))
    label = pc.binary_join_element_wise(
        _taken(records["source"].iloc[members].to_numpy()),
        pc.cast(keys, pa.string()),
        # A missing date (code -1) takes the empty text at the end.
        pa.array(day_text, type=pa.string()).take(
            pa.array(np.where(day_codes < 0, len(days), day_codes))
        ),
        "|",
    )
    # A label's rank in text order: the source and key make each record's label its own.
    label_rank = np.empty(len(members), dtype=np.int64)
    label_rank[pc.sort_indices(label).to_numpy()] = np.arange(len(members))
    label_codes = label_rank[member_of]
    # Rules and attribute names are the model's own identifiers: ranked by name and
    # quoted as they are.
    rule_codes, rules = pd.factorize(lineage["rule"], sort=True)
    name_codes, names = pd.factorize(lineage["attribute"], sort=True)
    order = np.lexsort((name_codes, rule_codes, label_codes, where))
    where, rule_codes, name_codes, label_codes, member_of = (
        a[order] for a in (where, rule_codes, name_codes, label_codes, member_of)
    )
    by_golden = _groups(where)
    by_record = _groups(where, label_codes)
    by_rule = _groups(where, label_codes, rule_codes)
    quoted = pa.array([f'"{n}"' for n in names], type=pa.string()).take(pa.array(name_codes))
    rule_key = pa.array([f'"{r}":[' for r in rules], type=pa.string())
    per_rule = pc.binary_join_element_wise(
        rule_key.take(pa.array(rule_codes[by_rule[:-1]])),
        _joined(by_rule, quoted, "", "]"),
        "",
    )
    per_record = pc.binary_join_element_wise(
        _json_strings(label.take(pa.array(member_of[by_record[:-1]]))),
        _joined(_within(by_record, by_rule), per_rule, ":{", "}"),
        "",
    )
    braced = _joined(_within(by_golden, by_record), per_record, "{", "}")
    out[where[by_golden[:-1]]] = braced.to_numpy(zero_copy_only=False)
    return pd.Series(out, index=index, dtype=object)


def _within(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Offsets of the `outer` runs counted in `inner` runs (both over the same rows,
    every outer boundary being an inner one)."""
    return np.searchsorted(inner, outer).astype(np.int32)


def _texts(payloads: np.ndarray) -> np.ndarray:
    """Payloads as text: those stored ones still as the UTF-8 bytes `read_scope` gave
    (any of them, among texts) decoded together in Arrow."""
    stored = np.fromiter((type(p) is bytes for p in payloads), dtype=bool, count=len(payloads))
    if not stored.any():
        return payloads
    out = np.array(payloads, dtype=object)
    out[stored] = (
        pa.array(out[stored], type=pa.binary()).cast(pa.string()).to_numpy(zero_copy_only=False)
    )
    return out


def _payload_hashes(
    records: pd.DataFrame,
    payload_columns: list[str],
    as_stored: pd.DataFrame | None,
    stored_at: np.ndarray | None,
) -> tuple[pd.Series, pd.Series]:
    """(hash, JSON payload) per record; those in `as_stored` keep their stored ones, as
    they were read (UTF-8 bytes from SQLite): only the few a night writes again (records
    that moved to another golden record) are decoded, by `_texts` when written.
    `stored_at`, each record's row in `as_stored` (-1: none; given with it)."""
    if as_stored is None or stored_at is None or not len(as_stored):
        return hash_rows(records[payload_columns])
    have = stored_at >= 0
    digest = pd.Series(None, index=records.index, dtype=object)
    text = pd.Series(None, index=records.index, dtype=object)
    digest[have] = as_stored["record_hash"].to_numpy(dtype=object)[stored_at[have]]
    text[have] = as_stored["payload"].to_numpy(dtype=object)[stored_at[have]]
    fresh_hash, fresh_text = hash_rows(records.loc[~have, payload_columns])
    digest[~have], text[~have] = fresh_hash.to_numpy(), fresh_text.to_numpy()
    return digest, text


def _reason(detail: dict[str, dict[str, list[str]]], steward: pd.DataFrame | None) -> str:
    """ "steward" when a decision taken or revoked since the last run explains the event."""
    if steward is None or not len(steward):
        return "automatic"
    members = {m for side in detail.values() for group in side.values() for m in group}
    for ls, lk, rs, rk in steward[
        ["left_source", "left_key", "right_source", "right_key"]
    ].itertuples(index=False):
        if f"{ls}:{lk}" in members and f"{rs}:{rk}" in members:
            return "steward"
    return "automatic"


def write_run(
    conn: Connection,
    run_id: str,
    at: datetime,
    records: pd.DataFrame,
    payload_columns: list[str],
    cluster: pd.Series,
    golden: pd.DataFrame,
    lineage: pd.DataFrame,
    quarantined: pd.DataFrame,
    loaded_sources: list[str],
    scope: Scope | None = None,
    removed: pd.DataFrame | None = None,
    as_stored: pd.DataFrame | None = None,
    steward: pd.DataFrame | None = None,
    payloads: PayloadJob | None = None,
    assigned: Callable[[pd.Series], None] | None = None,
    idle: Iterator[object] | None = None,
) -> tuple[WriteResult, pd.Series]:
    """Write records, golden records, their history and quarantine; return what changed
    and the golden ID of each record (aligned with `records`).

    Everything is compared with the stored state in pandas first, and only
    changes are written: a new golden version only when a value changes, a new
    cross-reference row only when a record changes golden record, so a rerun
    on the same input writes nothing but its run log. `at` dates every change.

    An incremental run passes only the records whose clusters it re-decided, with
    `scope` (`read_scope` of the records those clusters hold, tonight or in the
    store: only their golden records can change or retire) and `removed` (the
    records deleted at their source).
    `as_stored` (source, source_key, record_hash, payload) names records whose
    payload is the stored one, read back: they are not serialised again.
    `steward` holds the pairs (left_source, left_key, right_source, right_key) of
    decisions taken or revoked since the last run: a merge or split that puts
    both records of one in its members is logged with reason "steward".
    `payloads`, a child process making the records' payloads in `write_order`
    (`payloads.PayloadJob`), is waited for when the records are written, and its
    chunks taken instead of making them here; without `as_stored` only.
    `assigned` is told each record's golden ID as soon as it is known, before
    anything is written (the return files need nothing else).
    `idle`, the run's other writes a step at a time (`EvidenceWrite.steps`), is
    advanced whenever the connection would wait for a chunk to be prepared; the
    caller finishes what is left of it.
    """
    result = WriteResult()
    keys = _write_keys(records).assign(cluster=cluster.to_numpy())
    if scope is None:
        prev = previous_xref(conn)
        stored = _read_texts(conn, _GOLDEN_QUERY)
    else:
        # Only the golden records of the stored records in scope can change.
        prev = scope.records[[*_XREF_QUERY.selected_columns.keys(), "valid_from"]]
        stored = scope.golden
    created = stored.set_index("golden_id")["created_run"] if len(stored) else None
    # Each record's stored row (-1: none), found once: assigning golden IDs, writing
    # the records, finding removed ones and merges all pair the two. Merged each
    # time, a rerun at a million records matched a million keys four times.
    stored_row = _stored_rows(keys, prev)
    # The records the store holds, in its rows' order (as an inner merge gives them).
    both_at = np.flatnonzero(stored_row >= 0)
    both_at = both_at[np.argsort(stored_row[both_at], kind="stable")]
    prev_at = stored_row[both_at]
    assignment = _assign(
        keys["cluster"],
        pd.DataFrame(
            {
                "golden_id": prev["golden_id"].take(prev_at).reset_index(drop=True),
                "cluster": keys["cluster"].to_numpy()[both_at],
            }
        )
        if len(prev)
        else None,
        created,
    )
    gid_of_cluster = assignment.gid_of_cluster
    record_gid = pd.Series(
        gid_of_cluster.reindex(cluster.to_numpy()).to_numpy(), index=records.index
    )
    if assigned is not None:
        assigned(record_gid)

    # Golden records: compare with the stored ones and write only the changes, by
    # chunks: a million golden records' JSON texts, lineage and rows are gigabytes of
    # Python strings, held a chunk at a time. Each golden record's stored row and
    # lineage members are found once, and a chunk takes them by position.
    golden_gid = gid_of_cluster.reindex(golden.index).to_numpy()
    stored_at = pd.Index(stored["golden_id"]).get_indexer(golden_gid)
    member_of = golden.index.get_indexer(lineage["cluster"])
    by_golden = np.argsort(member_of, kind="stable")
    bounds = np.searchsorted(
        member_of[by_golden], np.arange(0, len(golden) + WRITE_CHUNK_ROWS, WRITE_CHUNK_ROWS)
    )

    def golden_chunk(i: int) -> _GoldenChunk:
        part = slice(i * WRITE_CHUNK_ROWS, (i + 1) * WRITE_CHUNK_ROWS)
        held = stored_at[part]
        return _golden_chunk(
            run_id,
            at,
            records,
            golden.iloc[part],
            golden_gid[part],
            stored.iloc[held[held >= 0]],
            lineage.iloc[by_golden[bounds[i] : bounds[i + 1]]],
        )

    def write_golden(chunk: _GoldenChunk) -> None:
        result.golden_created += chunk.created
        result.golden_updated += chunk.updated
        result.golden_unchanged += chunk.unchanged
        _write_golden(conn, run_id, at, chunk)

    # Golden records no cluster kept are retired; a merged one resolves to its survivor.
    def gone_golden(_: object) -> pd.DataFrame:
        # As Python texts: pandas' Arrow strings look values up one by one (2 s for a
        # million golden IDs, even against an empty store).
        stored_ids = stored["golden_id"].astype(object)
        return stored[
            (stored["status"] == "active")
            & ~stored_ids.isin(golden_gid)
            & (stored_ids.isin(prev["golden_id"]) if scope is not None else True)
        ]

    def retire(gone: pd.DataFrame) -> None:
        survivor = assignment.retired.set_index("golden_id")["survivor_id"]
        if len(gone):
            _archive_versions(conn, gone[["golden_id"]], at, run_id)
            conn.execute(
                golden_records.update()
                .where(golden_records.c.golden_id == sa.bindparam("gid"))
                .values(
                    status="retired",
                    members=0,
                    updated_run=run_id,
                    retired_run=run_id,
                    survivor_id=sa.bindparam("survivor"),
                ),
                [{"gid": g, "survivor": survivor.get(g)} for g in gone["golden_id"]],
            )
        result.golden_retired = len(gone)

    # Source records: current payload and golden ID, with history of both. By chunks of
    # records in key order: only one chunk's payload texts are held at a time (a
    # million payloads are gigabytes of Python strings), and each chunk's rows land
    # after the previous chunk's in the tables' B-trees.
    order = sort_order(keys, ["source", "source_key"])

    # The payloads a child made, waited for when the first records chunk is prepared
    # (in the worker, while the golden records are written), not before.
    @cache
    def made() -> Chunks | None:
        return _made_payloads(payloads, order) if as_stored is None else None

    # Each record's row in `as_stored` (-1: none; it holds each record once), found
    # once (in the worker, with the first chunk): merged chunk by chunk with the whole
    # of it, a night's four chunks factorised its keys four times, holding the GIL the
    # writes wait for.
    @cache
    def as_stored_at() -> np.ndarray | None:
        return None if as_stored is None else _stored_rows(keys, as_stored)

    def records_chunk(start: int) -> _RecordsChunk:
        rows = order[start : start + WRITE_CHUNK_ROWS]
        held = stored_row[rows]
        stored_at = as_stored_at()
        return _records_chunk(
            run_id,
            at,
            records.iloc[rows],
            keys.iloc[rows],
            record_gid.iloc[rows],
            payload_columns,
            prev.iloc[held[held >= 0]],
            as_stored,
            chunks.get(start) if (chunks := made()) is not None else None,
            stored_at[rows] if stored_at is not None else None,
            held >= 0,
        )

    def write_records(chunk: _RecordsChunk) -> None:
        result.records_written += _write_records(conn, run_id, at, chunk, scope is not None)

    # Records no longer delivered by a loaded source end their cross-reference.
    def missing_records(_: object) -> pd.DataFrame:
        if removed is not None:
            return removed[["source", "source_key"]].astype(str)
        delivered = np.zeros(len(prev), dtype=bool)
        delivered[prev_at] = True
        return prev.loc[
            ~delivered & prev["source"].isin(loaded_sources).to_numpy(), ["source", "source_key"]
        ]

    def remove(missing: pd.DataFrame) -> None:
        result.records_removed = remove_records(conn, run_id, at, missing)

    # Merges and splits, with the members before and after.
    def change_events(_: object) -> list[tuple[str, str, dict[str, dict[str, list[str]]]]]:
        return _events(
            pd.DataFrame(
                {
                    # Taken in their own dtype (Arrow texts: no Python string per record).
                    **{
                        name: prev[column].take(prev_at).reset_index(drop=True)
                        for name, column in [
                            ("source", "source"),
                            ("source_key", "source_key"),
                            ("golden_id_old", "golden_id"),
                        ]
                    },
                    "golden_id_new": record_gid.to_numpy()[both_at],
                }
            )
        )

    def write_events(found: list[tuple[str, str, dict[str, dict[str, list[str]]]]]) -> None:
        result.merges = sum(k == "merge" for k, _, _ in found)
        result.splits = sum(k == "split" for k, _, _ in found)
        if found:
            _insert(
                conn,
                events,
                pd.DataFrame(
                    {
                        "run_id": run_id,
                        "at": at,
                        "kind": [k for k, _, _ in found],
                        "reason": [_reason(d, steward) for _, _, d in found],
                        "golden_id": [g for _, g, _ in found],
                        "detail": [json.dumps(d, sort_keys=True) for _, _, d in found],
                    }
                ),
            )

    # One sequence of steps, each prepared in the worker while the one before it is
    # written, across the kinds of rows: the first chunk of one kind is made while the
    # last of the other is written, the merge events (0.4 s a night at 1M records)
    # while the last chunk is. The records no longer delivered go first: their keys
    # are known, and their removal (0.2-0.3 s of SQL) takes the time the first chunk
    # is made in, when the connection would sit idle. The other quick step comes last
    # (between, it would hold the worker's one step ahead). Until the first chunk is
    # made nothing is written, so the kind quicker to make goes first: on a night
    # (`as_stored`), the source records (a chunk of 25k made in 0.20-0.32 s against
    # 0.39-0.46 s for golden records: the connection's waits 0.37-0.43 s -> 0.26-0.28
    # s, the store stage 0.25 s shorter, docs/benchmarks.md); in a full run, the golden
    # records, while the payloads' child finishes the source records' JSON.
    with _indexes_built_after(conn, [source_records, xref], len(records)):
        golden_phase = (range(-(-len(golden) // WRITE_CHUNK_ROWS)), golden_chunk, write_golden)
        records_phase = (range(0, len(order), WRITE_CHUNK_ROWS), records_chunk, write_records)
        _overlapped(
            [
                ([None], missing_records, remove),
                *(
                    [records_phase, golden_phase]
                    if as_stored is not None
                    else [golden_phase, records_phase]
                ),
                ([None], change_events, write_events),
                ([None], gone_golden, retire),
            ],
            idle,
        )

    result.quarantine_rows = _write_quarantine(conn, run_id, quarantined, loaded_sources)
    return result, record_gid


def remove_records(conn: Connection, run_id: str, at: datetime, keys: pd.DataFrame) -> int:
    """These records (source, source_key) leave the store: their last payload goes to
    the record history and their cross-reference is closed, at `at`. Returns how
    many were asked for.

    `write_run` removes the records it is told are gone; an incremental night can
    remove its deleted ones before, while survivorship still chooses the golden
    records (`pipeline.run`), and then tells `write_run` that none are left."""
    _archive_payloads(conn, keys, at, run_id)
    _delete_keys(conn, source_records, keys)
    _close_open(conn, xref, keys, at, run_id)
    return len(keys)


def _stored_rows(keys: pd.DataFrame, stored: pd.DataFrame) -> np.ndarray:
    """Each key's row in `stored` (-1: none), both (source, source_key) frames.

    Looked up in Arrow (`joined_keys`: the stored keys hashed and tonight's probed in
    C++) where both are texts: a night's 90k keys against the 82k in scope took
    0.11-0.14 s as a pandas merge on the two columns, at the start of the store
    stage, before anything is written. Other keys are merged as before.
    (`incremental.KeyPositions` hashes the other side, the keys asked for, which
    there are a few thousand against a million stored. Here both sides are as many,
    and the stored side, the one known unique, is hashed once: a rerun's million
    keys in 0.48-0.66 s, against 1.5-1.9 s the other way round.)"""
    want, have = joined_keys(keys), joined_keys(stored)
    if want is not None and have is not None:
        return pc.index_in(want, value_set=have).fill_null(-1).to_numpy().astype(np.int64)
    return (
        keys[["source", "source_key"]]
        .merge(
            stored[["source", "source_key"]].assign(row=np.arange(len(stored))),
            on=["source", "source_key"],
            how="left",
        )["row"]
        .fillna(-1)
        .to_numpy(dtype=np.int64)
    )


def _write_keys(records: pd.DataFrame) -> pd.DataFrame:
    """(source, source_key) of each record, its key as text, as the store sorts them."""
    return records[["source", "source_key"]].assign(
        source_key=records["source_key"].astype(str).astype(text_dtype())
    )


def write_order(records: pd.DataFrame) -> np.ndarray:
    """The order `write_run` writes a full run's source records in, by chunks of
    `WRITE_CHUNK_ROWS`: by source and key (what `payloads.PayloadJob` is given)."""
    return sort_order(_write_keys(records), ["source", "source_key"])


def _made_payloads(job: PayloadJob | None, order: np.ndarray) -> Chunks | None:
    """The child's payloads, if there is a child, it succeeded, and its order and
    chunks are the ones written here."""
    if job is None:
        return None
    made = job.chunks()
    if made is None:
        return None
    if made.chunk_rows != WRITE_CHUNK_ROWS or not np.array_equal(made.order, order):
        log.warning("payloads made in a child process are not in the write order: made here")
        return None
    return made


def _overlapped(phases: Iterable[_Phase], idle: Iterator[object] | None = None) -> None:
    """`write(prepare(part))` for each part of each phase (parts, prepare, write) in
    order, the next part, of the same phase or the next one, prepared in a worker
    thread while this one is written.

    Preparing a chunk (its JSON texts and hashes, in Arrow, and its comparison with
    the stored rows, in pandas) needs no connection; writing it is mostly the
    database's own work (SQLite steps and PostgreSQL's COPY run without the GIL).
    Overlapped, the two take the store stage's two cores where one sat idle. At
    most two chunks are held at a time: the one written and the one prepared.
    Across phases too: a night's first chunk of source records, prepared after the
    last golden records were written, left the connection idle 0.4-0.6 s.
    Only this thread touches the connection; an error in either half ends the
    loop with it (the worker's is raised here when its chunk is taken).

    `idle`, other writes on the connection a step at a time (`EvidenceWrite`), takes
    the time this thread would wait for a chunk: a full run's golden records are
    slower to prepare than to write, and the waits were 2.3 s of a million
    records' store stage. Each step is advanced only while the chunk is not
    ready, so a step overruns it by at most its own length.
    """
    steps = ((part, prepare, write) for parts, prepare, write in phases for part in parts)
    first = next(steps, None)
    if first is None:
        return

    def ready(ahead: Future[Any]) -> Any:
        while idle is not None and not ahead.done():
            if next(idle, _DONE) is _DONE:
                break
        return ahead.result()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdm-store-prepare") as pool:
        # The step prepared ahead: its future chunk, and the write that takes it.
        part, prepare, write = first
        ahead, write_ahead = pool.submit(prepare, part), write
        for part, prepare, write in steps:
            chunk, write_chunk = ready(ahead), write_ahead
            ahead, write_ahead = pool.submit(prepare, part), write
            write_chunk(chunk)
        write_ahead(ready(ahead))


#: What an exhausted `idle` iterator gives.
_DONE = object()


@dataclass
class _GoldenChunk:
    """One chunk of golden records, compared with their stored rows: the rows to write
    (`write`, in the table's columns) and which of them are new."""

    write: pd.DataFrame
    is_new: np.ndarray
    created: int
    updated: int
    unchanged: int


def _golden_chunk(
    run_id: str,
    at: datetime,
    records: pd.DataFrame,
    golden: pd.DataFrame,
    golden_gid: np.ndarray,
    stored: pd.DataFrame,
    lineage: pd.DataFrame,
) -> _GoldenChunk:
    """The golden records of one chunk that are new or changed, ready to write.

    `stored` holds the stored rows of the chunk's golden IDs (those that have one),
    `lineage` the chunk's lineage members.
    """
    attrs = golden.drop(columns=["record_type", "members"])
    g_hash, g_json = hash_rows(attrs)
    new_golden = pd.DataFrame(
        {
            "golden_id": golden_gid,
            "record_type": golden["record_type"].to_numpy(),
            "status": "active",
            "members": golden["members"].astype(int).to_numpy(),
            "record_hash": g_hash.to_numpy(),
            "attributes": g_json.to_numpy(),
            "cluster": golden.index.to_numpy(),
        }
    )
    merged = new_golden.merge(stored, on="golden_id", how="left", suffixes=("", "_old"))
    is_new = merged["record_hash_old"].isna()
    changed = ~is_new & (
        (merged["record_hash"] != merged["record_hash_old"])
        | (merged["members"] != merged["members_old"])
        | (merged["status_old"] != "active")
    )
    write = merged[is_new | changed].copy()
    # Lineage is built for the golden records written only: on a quiet night, few.
    written_clusters = pd.Index(write["cluster"])
    write["lineage"] = _lineage_json(records, lineage, written_clusters).to_numpy()
    write["created_run"] = write["created_run"].fillna(run_id)
    write["updated_run"] = run_id
    write["version"] = pd.to_numeric(write["version"]).fillna(0).astype(int) + 1
    write["valid_from"] = at
    write["retired_run"] = None
    write["survivor_id"] = None
    return _GoldenChunk(
        write=write[[c.name for c in golden_records.columns]],
        is_new=is_new[write.index].to_numpy(),
        created=int(is_new.sum()),
        updated=int(changed.sum()),
        unchanged=int((~is_new & ~changed).sum()),
    )


def _write_golden(conn: Connection, run_id: str, at: datetime, chunk: _GoldenChunk) -> None:
    """Write one chunk's new and changed golden records."""
    replaced = chunk.write.loc[~chunk.is_new, ["golden_id"]]
    # The version each changed golden record is at goes to the history before its row
    # is overwritten (`_archive_versions` skips a retired one: its last version went
    # there when it retired).
    _archive_versions(conn, replaced, at, run_id)
    _replace(conn, golden_records, chunk.write, replaced)


#: Records whose payloads are built and written at a time by `write_run` (two chunks
#: are held at a time: see `_overlapped`). A full run on a store of a million records
#: peaked at 3,991-4,165 MiB with 50,000 and 3,850-3,884 MiB with 25,000, in the same
#: time (docs/benchmarks.md).
WRITE_CHUNK_ROWS = 25_000


@dataclass
class _RecordsChunk:
    """One chunk of source records, compared with their stored rows (`both`: the new
    row beside the stored one) and what must be written of them."""

    both: pd.DataFrame
    existed: pd.Series
    payload_changed: pd.Series
    moved: pd.Series
    to_write: pd.DataFrame


def _records_chunk(
    run_id: str,
    at: datetime,
    records: pd.DataFrame,
    keys: pd.DataFrame,
    record_gid: pd.Series,
    payload_columns: list[str],
    prev: pd.DataFrame,
    as_stored: pd.DataFrame | None,
    made: tuple[pd.Series, pd.Series] | None,
    stored_at: np.ndarray | None,
    stored: np.ndarray,
) -> _RecordsChunk:
    """One chunk of `write_run`'s source records with their payloads, compared with
    `prev` (the stored rows of the records `stored` marks, in their order); `made`,
    their (hash, payload) if a child process made them; `stored_at`, their rows in
    `as_stored`."""
    r_hash, r_json = made or _payload_hashes(records, payload_columns, as_stored, stored_at)
    new_xref = pd.DataFrame(
        {
            "source": keys["source"].to_numpy(),
            "source_key": keys["source_key"].to_numpy(),
            "golden_id": record_gid.to_numpy(),
            "record_type": records["record_type"].to_numpy(),
            "source_line": records["source_line"].astype(int).to_numpy(),
            "record_hash": r_hash.to_numpy(),
            "address_hash": records["address_hash"].to_numpy()
            if "address_hash" in records
            else None,
            "payload": r_json.to_numpy(),
            "updated_run": run_id,
            "valid_from": at,
            "source_hash": records["source_hash"].to_numpy() if "source_hash" in records else None,
        }
    )
    # The stored rows come in the records' order, one for each record `stored` marks:
    # put beside them by position (reindexed: a left merge's missing values where there
    # is none), not merged on their keys again.
    old = (
        prev.drop(columns=["source", "source_key"])
        .set_axis(np.flatnonzero(stored))
        .reindex(new_xref.index)
    )
    both = new_xref.join(old, rsuffix="_old")
    existed = both["record_hash_old"].notna()
    payload_changed = existed & (both["record_hash"] != both["record_hash_old"])
    moved = existed & (both["golden_id"] != both["golden_id_old"])
    dirty = ~existed | payload_changed | moved
    to_write = both[dirty][[c.name for c in source_records.columns]].copy()
    to_write["payload"] = _texts(to_write["payload"].to_numpy())
    return _RecordsChunk(both, existed, payload_changed, moved, to_write)


def _write_records(
    conn: Connection, run_id: str, at: datetime, chunk: _RecordsChunk, scoped: bool
) -> int:
    """One chunk of `write_run`'s source records: the changed ones written (the
    superseded payloads archived first) and their cross-references opened or
    moved; returns how many records were written."""
    both, existed, moved = chunk.both, chunk.existed, chunk.moved
    payload_changed, to_write = chunk.payload_changed, chunk.to_write
    dirty = ~existed | payload_changed | moved
    # Superseded payloads go to the record history before they are overwritten.
    _archive_payloads(conn, both.loc[payload_changed, ["source", "source_key"]], at, run_id)
    # A record that only moved keeps the date of its payload.
    keep_date = (moved & ~payload_changed)[dirty].to_numpy()
    if keep_date.any():
        if scoped:  # the scope's read holds the payload dates
            dates = both.loc[dirty, "valid_from_old"].to_numpy()[keep_date]
        else:
            dates = _payload_dates(conn, to_write.loc[keep_date, ["source", "source_key"]])
        to_write.loc[keep_date, "valid_from"] = dates
    _replace(
        conn,
        source_records,
        to_write,
        to_write.loc[existed[dirty].to_numpy(), ["source", "source_key"]],
        same=("golden_id", (existed & ~moved)[dirty].to_numpy()),
    )
    relinked = both[~existed | moved]
    _close_open(
        conn,
        xref,
        relinked.loc[existed[relinked.index], ["source", "source_key"]],
        at,
        run_id,
    )
    _insert(
        conn,
        xref,
        relinked.assign(valid_to=None, run_id=run_id, closed_run=None)[
            [c.name for c in xref.columns]
        ],
    )
    return len(to_write)


def npai_state_text(records: pd.DataFrame) -> pd.Series:
    """A record's NPAI flag, date and reason as one text: when it changes, the record's
    golden record must be chosen again (an NPAI address loses to a deliverable one).
    Records without NPAI columns have the empty state."""
    if "npai_flag" not in records:
        return pd.Series("", index=records.index, dtype=object)
    parts = [records[c].astype(str).where(records[c].notna(), "") for c in NPAI_STATE_COLUMNS]
    return parts[0] + "|" + parts[1] + "|" + parts[2]


NPAI_STATE_COLUMNS = ("npai_flag", "npai_date", "npai_reason")


def _archive_payloads(conn: Connection, keys: pd.DataFrame, at: datetime, run_id: str) -> None:
    """Copy the stored payload of these records to the record history, ended at `at`.

    One INSERT ... SELECT: the database copies the rows itself, without reading tens
    of thousands of payloads back into Python to send them again.
    """
    if not len(keys):
        return
    rec = source_records.c
    tmp, on = _source_keys(conn, keys)
    moved = sa.select(
        rec.source,
        rec.source_key,
        sa.func.coalesce(rec.valid_from, sa.literal(at, sa.DateTime)),
        sa.literal(at, sa.DateTime),
        rec.record_hash,
        rec.payload,
        rec.updated_run,
        sa.literal(run_id, sa.String),
    ).join(tmp, on)
    h = record_history.c
    conn.execute(
        record_history.insert().from_select(
            [
                h.source,
                h.source_key,
                h.valid_from,
                h.valid_to,
                h.record_hash,
                h.payload,
                h.run_id,
                h.closed_run,
            ],
            moved,
        )
    )


def _archive_versions(conn: Connection, keys: pd.DataFrame, at: datetime, run_id: str) -> None:
    """Close the current version of these golden records at `at`: a copy of their row,
    dated, appended to the golden history by the database itself (one INSERT ...
    SELECT, as for payloads). A retired one among them is skipped: its last version
    went to the history when it retired."""
    if not len(keys):
        return
    g = golden_records.c
    tmp = _temp_keys(conn, golden_records, keys)
    closed = (
        sa.select(
            g.golden_id,
            g.version,
            sa.func.coalesce(g.valid_from, sa.literal(at, sa.DateTime)),
            sa.literal(at, sa.DateTime),
            g.updated_run,
            sa.literal(run_id, sa.String),
            g.record_type,
            g.members,
            g.record_hash,
            g.attributes,
            g.lineage,
        )
        .join(tmp, tmp.c.golden_id == g.golden_id)
        .where(g.status == "active")
    )
    # Selected in the history's column order.
    conn.execute(golden_history.insert().from_select(list(golden_history.c), closed))


def _payload_dates(conn: Connection, keys: pd.DataFrame) -> np.ndarray:
    old = _select_keys(
        conn,
        sa.select(
            source_records.c.source, source_records.c.source_key, source_records.c.valid_from
        ),
        keys,
    )
    return keys.merge(old, how="left")["valid_from"].to_numpy()


def _temp_keys(conn: Connection, like: sa.Table, keys: pd.DataFrame) -> sa.Table:
    """`keys` loaded into a temporary table of this connection, to join on; its columns
    take the types of `like`'s, so that comparisons need no cast.

    A join lets the database walk its own indexes for a hundred thousand keys,
    where one statement per key (or per few hundred bound parameters) costs a
    round trip each.
    """
    cols = list(keys.columns)
    name = "mdm_tmp_" + "_".join(cols)
    table = sa.Table(name, sa.MetaData(), *[sa.Column(c, like.c[c].type) for c in cols])
    types = [like.c[c].type.compile(dialect=conn.dialect) for c in cols]
    conn.exec_driver_sql(
        f'CREATE TEMPORARY TABLE IF NOT EXISTS "{name}" ('
        + ", ".join(f'"{c}" {t}' for c, t in zip(cols, types, strict=True))
        + ")"
    )
    conn.exec_driver_sql(f'DELETE FROM "{name}"')
    # Sorted, so that the database walks the joined table's index in order: on a store
    # larger than memory, each index page is then read once, not once per key.
    order = sort_order(keys, cols)
    sorted_cols = [keys[c].to_numpy()[order] for c in cols]
    repeat = np.zeros(len(order), dtype=bool)
    if len(order):
        repeat[1:] = np.logical_and.reduce([v[1:] == v[:-1] for v in sorted_cols])
    _insert(conn, table, pd.DataFrame(dict(zip(cols, sorted_cols, strict=True)))[~repeat])
    return table


def _source_keys(conn: Connection, keys: pd.DataFrame) -> tuple[sa.Table, sa.ColumnElement[bool]]:
    """A key table of these (source, source_key) and the condition joining it to
    mdm_source_records: one table can serve several queries of a transaction."""
    tmp = _temp_keys(conn, source_records, keys[["source", "source_key"]].astype(str))
    rec = source_records.c
    return tmp, sa.and_(rec.source == tmp.c.source, rec.source_key == tmp.c.source_key)


def _select_keys(conn: Connection, query: sa.Select, keys: pd.DataFrame) -> pd.DataFrame:
    """Rows of `query` (over mdm_source_records) for a set of (source, source_key)."""
    tmp, on = _source_keys(conn, keys)
    return _read(conn, query.join(tmp, on))


def _write_quarantine(
    conn: Connection, run_id: str, quarantined: pd.DataFrame, loaded_sources: list[str]
) -> int:
    """The current quarantine per loaded source; unchanged rows are not rewritten."""
    q_new = quarantined.assign(line=quarantined["line"].astype(int), run_id=run_id)
    q_old = _read(conn, sa.select(quarantine).where(quarantine.c.source.in_(loaded_sources)))
    key = ["source", "location", "line"]
    cmp_cols = [*key, "source_key", "reason", "raw"]
    q_old["line"] = q_old["line"].astype(int) if len(q_old) else q_old["line"]
    # A row is unchanged when all its compared values are equal (as text: NULL-safe).
    as_text = {c: str for c in cmp_cols}
    found = (
        q_new[cmp_cols]
        .astype(as_text)
        .merge(q_old[cmp_cols].astype(as_text), how="outer", indicator=True)
    )
    kept = found.loc[found["_merge"] == "both", key].drop_duplicates()
    text_keys = dict.fromkeys(key, str)
    stale = q_old.astype(text_keys).merge(kept, how="left", indicator=True)
    stale = stale.loc[stale["_merge"] == "left_only", key].astype({"line": int})
    fresh = q_new.astype(text_keys).merge(kept, how="left", indicator=True)
    fresh = fresh[fresh["_merge"] == "left_only"].drop(columns="_merge").astype({"line": int})
    _delete_keys(conn, quarantine, stale[key])
    _insert(conn, quarantine, fresh[[c.name for c in quarantine.columns]])
    return len(q_new)


def write_evidence(conn: Connection, run_id: str, evidence: pd.DataFrame) -> int:
    """Replace the stored match evidence by this run's, writing only what changed.

    `evidence` has EVIDENCE_KEYS, rule, weight, probability, band and
    contributions (JSON text). Returns the rows written or deleted.
    """
    return EvidenceWrite(conn, run_id, lambda: evidence).finish()


#: Pairs of evidence `EvidenceWrite` writes a step: about 20 ms on SQLite, the most a
#: step can hold up the next chunk of golden records.
EVIDENCE_STEP_ROWS = 5_000


class EvidenceWrite:
    """`write_evidence` a step at a time, for `write_run`'s `idle`: made (`evidence`
    is only called at the first step), compared with the stored pairs, then written
    by slices of `EVIDENCE_STEP_ROWS`.

    A full run's evidence is the largest write after the records' own (600k pairs
    at a million records, 2.5 s on SQLite) and needs nothing `write_run` decides,
    so it can fill the time the connection would otherwise wait for the next
    chunk of golden records to be prepared. The steps run on the connection's own
    thread, in the run's transaction, like the rest of the write.
    """

    def __init__(self, conn: Connection, run_id: str, evidence: Callable[[], pd.DataFrame]) -> None:
        self.written = 0
        self._steps = self._run(conn, run_id, evidence)

    def steps(self) -> Iterator[None]:
        """The steps not taken yet (one iterator, however often asked)."""
        return self._steps

    def finish(self) -> int:
        """Take the steps left; return the pairs written or deleted."""
        for _ in self._steps:
            pass
        return self.written

    def _run(
        self, conn: Connection, run_id: str, evidence: Callable[[], pd.DataFrame]
    ) -> Iterator[None]:
        changes = compare_evidence(evidence(), _read_texts(conn, _EVIDENCE_QUERY))
        self.written = len(changes.fresh) + len(changes.gone)
        yield
        _delete_keys(conn, match_evidence, changes.gone)
        yield
        yield from _replacing(
            conn,
            match_evidence,
            changes.fresh.assign(run_id=run_id),
            changes.changed,
            EVIDENCE_STEP_ROWS,
        )


#: The stored columns a pair's evidence is compared on (everything but its run).
_EVIDENCE_COLUMNS = (*EVIDENCE_KEYS, "rule", "weight", "probability", "band", "contributions")
_EVIDENCE_QUERY = sa.select(*[match_evidence.c[c] for c in _EVIDENCE_COLUMNS])


@dataclass(frozen=True)
class EvidenceChanges:
    """What writing a run's evidence in place of stored pairs changes: the pairs to
    delete (`gone`, their keys), and those to write (`fresh`: new or changed ones,
    `changed` the keys of the latter)."""

    gone: pd.DataFrame
    fresh: pd.DataFrame
    changed: pd.DataFrame


def compare_evidence(evidence: pd.DataFrame, old: pd.DataFrame) -> EvidenceChanges:
    """`evidence` in place of the stored pairs `old`: pairs only in `old` go, new or
    changed ones are written with this run, identical ones are left as they are
    (their run stays the one that last changed them, and their pages are not
    rewritten).

    Compared exactly, weights included: with the same model a pair scores the same
    floats, and an incremental run clusters on the stored weights, so it must break
    ties exactly as a full run does.
    """
    keys = list(EVIDENCE_KEYS)
    new = evidence[list(_EVIDENCE_COLUMNS)].copy()
    new["weight"] = new["weight"].astype(float)
    new["probability"] = new["probability"].astype(float)
    if not len(old):
        # A first run: every pair is new (an outer merge on four text keys with
        # nothing took 3.5 s at 1M records).
        return EvidenceChanges(old[keys], new.reset_index(drop=True), old[keys])
    merged = new.merge(old, on=keys, how="outer", suffixes=("", "_old"), indicator=True)
    gone = merged.loc[merged["_merge"] == "right_only", keys]
    both = merged["_merge"] == "both"
    changed = both & (
        (merged["rule"] != merged["rule_old"])
        | (merged["weight"] != merged["weight_old"].astype(float))
        | (merged["probability"] != merged["probability_old"].astype(float))
        | (merged["band"] != merged["band_old"])
        | (merged["contributions"] != merged["contributions_old"])
    )
    fresh = merged.loc[(merged["_merge"] == "left_only") | changed, list(_EVIDENCE_COLUMNS)]
    return EvidenceChanges(
        gone.reset_index(drop=True),
        fresh.reset_index(drop=True),
        merged.loc[changed, keys].reset_index(drop=True),
    )


def write_evidence_changes(conn: Connection, run_id: str, changes: EvidenceChanges) -> int:
    """Apply `compare_evidence`'s changes; returns the rows written or deleted."""
    _delete_keys(conn, match_evidence, changes.gone)
    _replace(conn, match_evidence, changes.fresh.assign(run_id=run_id), changes.changed)
    return len(changes.fresh) + len(changes.gone)


def start_run(conn: Connection, run_id: str, config_hash: str, at: datetime) -> None:
    """Log the run as started (inside the run's transaction)."""
    conn.execute(
        runs.insert().values(
            run_id=run_id, started_at=at, status="running", config_hash=config_hash, manifest="{}"
        )
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(engine: Engine, run_id: str) -> Iterator[None]:
    """Hold the store's run lock for the duration of a run.

    The lock is a row, committed on its own before the run's transaction, so a
    second run sees it at once, on SQLite as on PostgreSQL (the primary key
    refuses a second holder). A lock left by a dead process on this machine is
    taken over; one held elsewhere must be released with `mdm unlock`.
    """
    host = socket.gethostname()
    row = {
        "name": "run",
        "run_id": run_id,
        "host": host,
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).replace(tzinfo=None),
    }
    with engine.begin() as conn:
        held = conn.execute(sa.select(lock).where(lock.c.name == "run")).mappings().first()
        if held is not None:
            if held["host"] == host and not _pid_alive(held["pid"]):
                log.warning("run lock of %s left by a dead process: taken over", held["run_id"])
                conn.execute(lock.delete().where(lock.c.name == "run"))
            else:
                raise StoreLockedError(
                    f"store is busy: run {held['run_id']} started at "
                    f"{held['started_at']:%Y-%m-%d %H:%M:%S} UTC on {held['host']} "
                    f"(pid {held['pid']}) still holds it; if that run is dead, `mdm unlock`"
                )
    try:
        with engine.begin() as conn:
            conn.execute(lock.insert().values(**row))
    except sa.exc.IntegrityError:
        raise StoreLockedError("store is busy: another run took the lock just now") from None
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(lock.delete().where(lock.c.name == "run", lock.c.run_id == run_id))


def unlock(engine: Engine) -> str | None:
    """Release the run lock whoever holds it; returns the run that held it."""
    with engine.begin() as conn:
        held = conn.execute(sa.select(lock.c.run_id).where(lock.c.name == "run")).scalar()
        conn.execute(lock.delete().where(lock.c.name == "run"))
    return held


def finish_run(conn: Connection, run_id: str, manifest: dict[str, object]) -> None:
    """Record the run's manifest and mark it succeeded."""
    conn.execute(
        runs.update()
        .where(runs.c.run_id == run_id)
        .values(
            finished_at=datetime.now(UTC).replace(tzinfo=None),
            status="succeeded",
            manifest=json.dumps(manifest, default=str, sort_keys=True),
        )
    )


def read_npai(engine: Engine) -> pd.DataFrame:
    """The NPAI history before this run (every flag, active or cleared)."""
    with engine.connect() as conn:
        return _read(conn, sa.select(npai))


def read_sent(engine: Engine, keys: pd.DataFrame) -> pd.DataFrame:
    """The address hash the store holds for these records (source, source_key): the
    address a return or a flag is about, as it was sent.

    Only the records asked for (those with an NPAI flag or a return tonight, a
    few thousand) are read, through a key table the database joins: read for
    every stored record, a million records' keys and hashes were 0.4 GB of
    Python texts held through the whole run.
    """
    if not len(keys):
        return pd.DataFrame(columns=["source", "source_key", "address_hash"])
    rec = source_records.c
    with engine.connect() as conn:
        found = _read(
            conn,
            sa.select(rec.source, rec.source_key, rec.address_hash).where(
                _keys_in(conn, source_records, keys[["source", "source_key"]].astype(str))
            ),
        )
    return found.dropna()


def write_npai(conn: Connection, before: pd.DataFrame, after: pd.DataFrame) -> int:
    """Insert new flags and record clearings; returns the number of rows written."""
    key = ["source", "source_key", "return_date", "reason_code"]
    merged = after.merge(
        before[[*key, "cleared_run"]], on=key, how="left", suffixes=("", "_old"), indicator=True
    )
    new = merged[merged["_merge"] == "left_only"]
    _insert(conn, npai, new[[c.name for c in npai.columns]])
    cleared = merged[
        (merged["_merge"] == "both")
        & merged["cleared_run"].notna()
        & merged["cleared_run_old"].isna()
    ]
    if len(cleared):
        conn.execute(
            npai.update()
            .where(sa.and_(*[npai.c[k] == sa.bindparam(f"k_{k}") for k in key]))
            .values(cleared_run=sa.bindparam("c_run"), cleared_reason=sa.bindparam("c_reason")),
            [
                {
                    **{f"k_{k}": row[k] for k in key},
                    "c_run": row["cleared_run"],
                    "c_reason": row["cleared_reason"],
                }
                for row in cleared.to_dict(orient="records")
            ],
        )
    return len(new) + len(cleared)


def read_model(engine: Engine, settings_hash: str) -> tuple[str, str] | None:
    """(training run, model JSON) of the latest model trained with these matching settings."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(models.c.run_id, models.c.model)
            .where(models.c.settings_hash == settings_hash)
            .order_by(models.c.created_at.desc(), models.c.run_id.desc())
            .limit(1)
        ).first()
    return (row[0], row[1]) if row else None


def write_model(
    conn: Connection, run_id: str, settings_hash: str, at: datetime, model_json: str
) -> None:
    """Keep a newly trained model (inside the run's transaction: a failed run keeps none)."""
    conn.execute(
        models.insert().values(
            run_id=run_id, settings_hash=settings_hash, created_at=at, model=model_json
        )
    )


# --- what an incremental run reads back ---------------------------------------------------


#: Parquet parts of at most this many bytes: far below PostgreSQL's 1 GB per value.
SNAPSHOT_PART_BYTES = 64 * 2**20

#: The parts a night rewrites when it keeps the snapshot's base: the rows appended since
#: the base was written ("patch"), each current record's row among base and patch with
#: its line and NPAI state tonight ("live"), and the auto-match links ("edges").
NIGHTLY_PARTS = ("patch", "live", "edges")
#: What the live index holds per record besides its row: what changes without the
#: record changing (a line that moved in the file, an NPAI flag).
LIVE_COLUMNS = ("source_line", "npai_state")


@dataclass(frozen=True)
class SnapshotParts:
    """A snapshot serialised, ready to write: (name, part number, Parquet bytes).

    `keep_base`: the parts replace the nightly ones only (`NIGHTLY_PARTS`), and the
    stored base ("records") stays; otherwise they replace the whole snapshot.
    `base`: the base's table as it was serialised, when the parts hold a new base
    (kept decoded beside the store by `write_snapshot`)."""

    parts: tuple[tuple[str, int, bytes], ...]
    keep_base: bool = False
    base: pa.Table | None = None


def serialise_snapshot(
    frames: dict[str, pd.DataFrame | pa.Table], keep_base: bool = False
) -> SnapshotParts:
    """Each frame or Arrow table as Parquet, cut in parts of `SNAPSHOT_PART_BYTES`.

    Apart from `write_snapshot`, and touching no connection, so that a run can
    serialise a million rows on a second core while its first one writes the rest
    of the store (Arrow releases the GIL while it takes and compresses).
    """
    parts = []
    base = None
    for name, frame in frames.items():
        sink = io.BytesIO()
        table = (
            frame
            if isinstance(frame, pa.Table)
            else pa.Table.from_pandas(frame, preserve_index=False)
        )
        if name == SNAPSHOT_BASE and not keep_base:
            base = table
        # No dictionary pages: most columns are near-unique texts (names, e-mails),
        # for which they only slow the next night's read.
        pq.write_table(table, sink, compression="zstd", use_dictionary=False)
        parts.extend(_cut(name, sink.getvalue()))
    return SnapshotParts(tuple(parts), keep_base, base)


def _cut(name: str, data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, part number, bytes) of `data` cut in parts of `SNAPSHOT_PART_BYTES` (one,
    empty, for no bytes): the rows of `mdm_snapshot` it is stored as."""
    return [
        (name, part, data[start : start + SNAPSHOT_PART_BYTES])
        for part, start in enumerate(range(0, max(len(data), 1), SNAPSHOT_PART_BYTES))
    ]


def write_snapshot(
    conn: Connection, run_id: str, content: dict[str, pd.DataFrame | pa.Table] | SnapshotParts
) -> None:
    """Replace the store's snapshot by these frames or Arrow tables, or by a snapshot
    already serialised (inside the run's transaction). A snapshot that keeps its base
    replaces the nightly parts only: the base's rows are neither deleted nor written
    again (a hundred megabytes of pages a night, each journaled before it is
    overwritten).

    A new base is also written decoded beside a SQLite store that its nights read
    in the background (`snapshot_child.base_cache`), from the table just
    serialised: else the next night decodes it there (a second of a core at a
    million records, in the night's first seconds, docs/benchmarks.md). Written
    before the commit, under a name that only this run's parts give: if the run
    fails, no night takes it, and the next base's file replaces it."""
    if not isinstance(content, SnapshotParts):
        content = serialise_snapshot(content)
    if content.keep_base:
        conn.execute(snapshot.delete().where(snapshot.c.name.in_(NIGHTLY_PARTS)))
    else:
        conn.execute(snapshot.delete())
    conn.execute(
        snapshot.insert(),
        [
            {"name": name, "part": part, "run_id": run_id, "data": data}
            for name, part, data in content.parts
        ],
    )
    keep_base_beside(conn.engine, run_id, content)


def keep_base_beside(engine: Engine, run_id: str, content: SnapshotParts) -> SnapshotParts:
    """Write the new base `content` holds, if any, decoded beside the store (see
    `write_snapshot`); the same parts without the table.

    A night that writes a new base (a compaction) calls it where it serialised the
    snapshot, so as not to hold the table until the store is written."""
    if content.base is None:
        return content
    from mdm_pipeline.golden_records.background import background_file

    path = background_file(engine)
    if path is not None:
        rows = [(p, run_id, len(d)) for n, p, d in content.parts if n == SNAPSHOT_BASE]
        keep_decoded_base(content.base, base_cache(path, rows))
    return replace(content, base=None)


@dataclass(frozen=True)
class StoredRecords:
    """The snapshot's records: physical rows (the base a full run or a compaction
    wrote, then the rows appended by the nights since) and, in the last run's record
    order, each record's row among them (`at`).

    Positions given to `take` and `column` are in that record order; physical rows
    are never converted or reordered as a whole, so a night pays for the rows it
    reads, not for the store's size."""

    rows: pa.Table
    at: np.ndarray
    base_rows: int

    @classmethod
    def whole(cls, table: pa.Table) -> StoredRecords:
        """A table whose rows are the records in order (no patch)."""
        return cls(table, np.arange(table.num_rows, dtype=np.int64), table.num_rows)

    def __len__(self) -> int:
        return len(self.at)

    @property
    def column_names(self) -> list[str]:
        return list(self.rows.column_names)

    @property
    def patch(self) -> pa.Table:
        """The rows appended since the base (live or superseded)."""
        return self.rows.slice(self.base_rows)

    def take(self, positions: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The records at `positions` (record order), these columns (default: all)."""
        table = self.rows if columns is None else self.rows.select(columns)
        return table.take(pa.array(self.at[np.asarray(positions, dtype=np.int64)]))

    def column(self, name: str) -> np.ndarray:
        """One numeric column for every record, in record order."""
        return self.rows.column(name).to_numpy()[self.at]


def read_snapshot(
    engine: Engine, convert: dict[str, list[str]] | None = None
) -> tuple[str, dict[str, pd.DataFrame], dict[str, Any]] | None:
    """(run that wrote it, frames, tables) of the snapshot, or None if the store has
    none or the last successful run did not write it (a store upgraded from an older
    release). `convert` names, per part, the columns its frame holds (default: all).

    The records' table is a `StoredRecords` (base and patch, with each record's row);
    their frame holds the records in the last run's order, their line and NPAI
    state those of that run."""
    found = snapshot_tables(engine)
    return None if found is None else snapshot_frames(*found, convert)


def snapshot_tables(engine: Engine) -> tuple[str, dict[str, pa.Table]] | None:
    """(run that wrote it, its parts as Arrow tables) of the snapshot, or None (see
    `read_snapshot`). Apart from `snapshot_frames`, which makes the Python objects:
    `background` does this part in another process."""
    with engine.connect() as conn:
        parts = conn.execute(
            sa.select(snapshot.c.name, snapshot.c.run_id, snapshot.c.data)
            .where(~snapshot.c.name.startswith(HELD_PREFIX, autoescape=True))
            .order_by(snapshot.c.name, snapshot.c.part)
        ).all()
    last = snapshot_run(engine, [(name, run) for name, run, _ in parts])
    if last is None:
        return None
    tables: dict[str, pa.Table] = {}
    for name in dict.fromkeys(n for n, _, _ in parts):
        data = b"".join(bytes(d) for n, _, d in parts if n == name)
        tables[name] = pq.read_table(pa.BufferReader(data))
    return last, tables


def snapshot_run(engine: Engine, parts: list[tuple[str, str]]) -> str | None:
    """The last successful run, if the snapshot parts (name, run that wrote it) are
    the snapshot it left; None otherwise (no snapshot, or an older one)."""
    previous = last_run(engine)
    last = previous[0] if previous else None
    names = dict.fromkeys(n for n, _ in parts)
    # The base may be older than the last run only when that run wrote a live index.
    nightly = [run for name, run in parts if name != "records" or "live" not in names]
    if "records" not in names or last is None or any(run != last for run in nightly):
        return None
    return last


def snapshot_frames(
    last: str, tables: dict[str, pa.Table], convert: dict[str, list[str]] | None = None
) -> tuple[str, dict[str, pd.DataFrame], dict[str, Any]]:
    """`read_snapshot`'s answer from the snapshot's Arrow tables (`snapshot_tables`)."""
    tables = dict(tables)
    base = tables.pop("records")
    patch = tables.pop("patch", None)
    live = tables.pop("live", None)
    rows = base if patch is None else pa.concat_tables([base, patch])
    records = (
        StoredRecords.whole(base)
        if live is None
        else StoredRecords(rows, live.column("row").to_numpy(), base.num_rows)
    )
    out: dict[str, Any] = {**tables, "records": records}
    frames: dict[str, pd.DataFrame] = {}
    for name, table in out.items():
        wanted = (convert or {}).get(name)
        if name == "records":
            columns = wanted or records.column_names
            if live is None:
                table = base.select(columns)
            else:  # each record's row taken; its line and NPAI state from the live index
                table = pa.table(
                    {
                        c: live.column(c)
                        if c in LIVE_COLUMNS
                        else rows.column(c).take(pa.array(records.at))
                        for c in columns
                    }
                ).replace_schema_metadata(base.schema.metadata)
        elif wanted is not None:
            table = table.select(wanted)
        # Without interning equal texts: a third faster on a million records. Only
        # the few columns of a handful of distinct values share one text object per
        # value (a million objects less each, whose memory a run would fault in).
        repeated = [
            c
            for c in _FEW_VALUES
            if c in table.column_names
            and table.schema.field(c).type in (pa.string(), pa.large_string())
        ]
        arrow = [c for c in SNAPSHOT_ARROW_TEXTS if c in table.column_names]
        frame = table.drop_columns([*repeated, *arrow]).to_pandas(deduplicate_objects=False)
        for c in sorted([*repeated, *arrow], key=table.column_names.index):
            column = table.column(c)
            values = (
                _shared_texts(column)
                if c in repeated
                else column.to_pandas(types_mapper=text_types).array
            )
            frame.insert(table.column_names.index(c), c, values)
        frames[name] = frame
    return last, frames, out


#: Snapshot columns of a few distinct values (sources, NPAI states, record types).
_FEW_VALUES = ("source", "npai_state", "record_type")
#: Snapshot columns a night reads for a few records only (the hashes,
#: `incremental.HASH_COLUMNS`): kept as Arrow-backed texts (`text_dtype`), not made a
#: million Python objects each that every reordering of the night's records then
#: copied (0.3-0.4 s of a 5% night's match stage at 1M records, docs/benchmarks.md).
SNAPSHOT_ARROW_TEXTS = ("source_hash", "address_hash")


def _shared_texts(values: pa.ChunkedArray) -> np.ndarray:
    """Texts as Python objects, one object per distinct value (None where missing)."""
    encoded = pc.dictionary_encode(values).combine_chunks()
    texts = np.asarray([*encoded.dictionary.to_pylist(), None], dtype=object)
    return texts[encoded.indices.fill_null(len(encoded.dictionary)).to_numpy()]


@dataclass(frozen=True)
class Scope:
    """The stored state of the records an incremental run re-decides the clusters of.

    `records`: source, source_key, golden_id, record_hash, valid_from, source_line
    and payload JSON (UTF-8 bytes) of those the store holds; `golden`: their golden records
    (golden_id, record_hash, members, status, created_run, version).
    """

    records: pd.DataFrame
    golden: pd.DataFrame


def read_scope(conn: Connection, keys: pd.DataFrame) -> Scope:
    """The stored state of these records (source, source_key), read in one pass: the
    payloads serve the records whose golden record is chosen again, the rest the
    write's comparison with the store.

    Their golden records are found by the database from the same key table, not
    by sending their IDs back to it."""
    tmp, on = _source_keys(conn, keys)
    return _read_scope(conn, lambda query: query.join(tmp, on))


def read_cluster_scope(conn: Connection, keys: pd.DataFrame) -> Scope:
    """`read_scope` of every record of the golden records these records belong to: the
    records whose golden record a night re-decides are mostly these (nine in ten at
    1M records), and they are known before matching (`background.ScopeRead`)."""
    tmp, on = _source_keys(conn, keys)
    rec = source_records.c
    ids = conn.execute(sa.select(rec.golden_id).join(tmp, on).distinct()).scalars().all()
    held = _temp_keys(conn, source_records, pd.DataFrame({"golden_id": ids}, dtype=object))
    return _read_scope(conn, lambda query: query.join(held, held.c.golden_id == rec.golden_id))


def _read_scope(conn: Connection, join: Callable[[sa.Select], sa.Select]) -> Scope:
    """The scope's query, its records chosen by `join`."""
    rec, gold = source_records.c, golden_records.c
    sqlite = conn.dialect.name == "sqlite"
    # One pass: each stored record is found once, with its golden record beside it,
    # instead of a second search of the records for the golden IDs they hold.
    golden_columns = [c for c in _GOLDEN_QUERY.selected_columns if c.key != "golden_id"]
    both = _read(
        conn,
        join(
            _XREF_QUERY.add_columns(
                rec.valid_from,
                rec.source_line,
                # SQLite hands the stored UTF-8 over as it is: no text object per payload
                # to encode again for the JSON parser (a cast of TEXT to BLOB keeps the
                # bytes).
                sa.cast(rec.payload, sa.LargeBinary).label("payload") if sqlite else rec.payload,
                *[c.label(f"g_{c.key}") for c in golden_columns],
            )
        ).outerjoin(golden_records, gold.golden_id == rec.golden_id),
    )
    labels = {f"g_{c.key}": c.key for c in golden_columns}
    golden = both.loc[both["g_record_hash"].notna(), ["golden_id", *labels]].rename(columns=labels)
    records = both.drop(columns=list(labels))
    if not sqlite and len(records):
        payloads = pa.array(records["payload"].to_numpy(), type=pa.string()).cast(pa.binary())
        records["payload"] = payloads.to_numpy(zero_copy_only=False)
    return _in_scope_order(records, golden)


def _in_scope_order(records: pd.DataFrame, golden: pd.DataFrame) -> Scope:
    """A scope in one order whatever its reads: records by key, golden records as their
    records first name them (once each)."""
    records = records.take(sort_order(records, ["source", "source_key"])).reset_index(drop=True)
    golden = golden.drop_duplicates("golden_id").set_index("golden_id")
    named = pd.unique(records["golden_id"].to_numpy())
    golden = golden.reindex(named[pd.Index(named).isin(golden.index)])
    return Scope(records, golden.rename_axis("golden_id").reset_index())


def merge_scopes(scopes: list[Scope]) -> Scope:
    """One scope of several (a record or golden record read twice is kept once), as
    one read of all their records would give it."""
    read = [s for s in scopes if len(s.records)] or scopes[:1]
    records = pd.concat([s.records for s in read], ignore_index=True)
    records = records.drop_duplicates(["source", "source_key"])
    golden = pd.concat([s.golden for s in read if len(s.golden)] or [read[0].golden])
    return _in_scope_order(records, golden)


def evidence_changes(
    conn: Connection, touched: pd.DataFrame, evidence: pd.DataFrame
) -> EvidenceChanges:
    """`compare_evidence` of this run's `evidence` with the stored pairs that involve a
    touched record, for `write_evidence_changes`.

    `touched` is (source, source_key) of the records an incremental run matched
    again or deleted; every other stored pair keeps its row, as a full run with
    the same model would have left it. The touched records' pairs are read
    through the evidence's indexes on either side: most pairs of a block matched
    again score as they did, and rewriting them would cost a random page each (a
    5% delta at 1M records deleted and wrote again 40k pairs of which 16k had not
    changed, docs/benchmarks.md)."""
    return compare_evidence(evidence, stored_evidence(conn, touched))


def stored_evidence(conn: Connection, touched: pd.DataFrame) -> pd.DataFrame:
    """The stored pairs that involve a touched record (source, source_key), each once:
    what `evidence_changes` compares. Apart from the comparison, because the
    records a night matches again are known before its match is done
    (`background.EvidenceRead` reads these meanwhile)."""
    keys = touched[["source", "source_key"]].astype(str)
    old = []
    for side in ("left", "right"):
        named = keys.set_axis([f"{side}_source", f"{side}_key"], axis=1)
        old.append(_read(conn, _EVIDENCE_QUERY.where(_keys_in(conn, match_evidence, named))))
    # A pair of two touched records is found from both sides (a side with no pair
    # is left out: an empty frame's untyped columns would decide nothing).
    stored = pd.concat([o for o in old if len(o)] or old[:1], ignore_index=True)
    return stored.drop_duplicates(list(EVIDENCE_KEYS))


#: Stored records whose payloads `read_returns` parses at a time: a million payloads
#: are a gigabyte of JSON, held a part at a time (about 60 MB).
RETURNS_CHUNK_ROWS = 50_000


def read_returns(
    conn: Connection,
    fields: pa.Schema,
    keys: pd.DataFrame | None = None,
    whole: Collection[str] = (),
    member_sources: Collection[str] = (),
) -> tuple[pa.Table, pd.DataFrame]:
    """What the store holds for business units' return files: (source, source_key,
    golden_id, then the payload members `fields` names, in its types) of the records
    among `keys` (source, source_key) and of every record of the sources in `whole`;
    and (source, source_key, golden_id) of every record of a source in
    `member_sources` in the golden records of its held ones (the unit's duplicates).

    A night returns the rows its extracts hold: a delta extract's few thousand of
    a source's million records are read by key, a full extract's by source (all
    of them, a scan instead of a million lookups), from the held parts the last
    run left if it left one for the source (`read_held`). The payloads come as
    bytes, a part at a time, and only the members `fields` names are parsed
    (`read_fields`), into Arrow: a million payloads read whole and parsed as
    Python objects held gigabytes of the night's memory. The members are read
    for the sources whose extract may not hold them all (a delta extract): a full
    extract holds every record of its unit."""
    rec = source_records.c
    columns = [rec.source, rec.source_key, rec.golden_id]
    kept = read_held(conn, fields, whole)
    whole = [s for s in whole if s not in kept]
    if conn.dialect.name == "postgresql":
        payload = sa.func.convert_to(rec.payload, "UTF8", type_=sa.LargeBinary)
    else:  # SQLite's text as its bytes, unchanged: no Python text per payload
        payload = sa.cast(rec.payload, sa.LargeBinary)
    query = sa.select(*columns, payload)
    parts: list[Iterable[pa.Table]] = [kept.values()]
    if whole:
        parts.append(_held(conn, query.where(rec.source.in_(sorted(whole))), fields))
    if keys is not None:
        wanted = keys.loc[~keys["source"].isin([*whole, *kept]), ["source", "source_key"]]
        if len(wanted):
            tmp, on = _source_keys(conn, wanted)
            parts.append(_held(conn, query.join(tmp, on), fields))
    key_fields = [pa.field(c, pa.string()) for c in RETURNS_KEYS]
    held = pa.concat_tables(
        [pa.schema([*key_fields, *fields]).empty_table(), *itertools.chain(*parts)]
    )
    of_members = held.select(["source", "golden_id"]).filter(
        pc.is_in(held.column("source"), pa.array(sorted(member_sources), type=pa.string()))
    )
    if not of_members.num_rows:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in RETURNS_KEYS})
        return held, empty
    in_golden = _temp_keys(conn, source_records, of_members.to_pandas())
    members = _read(
        conn,
        sa.select(*columns).join(
            in_golden,
            sa.and_(rec.source == in_golden.c.source, rec.golden_id == in_golden.c.golden_id),
        ),
    )
    return held, members


def _held(conn: Connection, query: sa.Select, fields: pa.Schema) -> Iterator[pa.Table]:
    """`query`'s rows (source, source_key, golden_id, payload as bytes) as tables of
    their keys and their payloads' `fields`, `RETURNS_CHUNK_ROWS` at a time."""
    # The statement's option, not the connection's: that would stream every later
    # statement of the connection (on PostgreSQL through a server-side cursor).
    result = conn.execute(query.execution_options(yield_per=RETURNS_CHUNK_ROWS))
    for rows in result.partitions():
        source, source_key, golden_id, payloads = zip(*rows, strict=True)
        keyed = [pa.array(v, type=pa.string()) for v in (source, source_key, golden_id)]
        values = read_fields(payloads, fields)
        yield pa.Table.from_arrays(
            [*keyed, *values.columns], names=[*RETURNS_KEYS, *values.column_names]
        )


def write_held(conn: Connection, run_id: str, parts: list[bytes]) -> None:
    """Replace the held parts (`HELD_PREFIX`) by these Parquet files (inside the run's
    transaction): each the return fields of every record of some sources sent as
    full extracts, as the run leaves them (`pipeline.exports.next_held`), the
    sources named in its metadata (`HELD_SOURCES`)."""
    conn.execute(snapshot.delete().where(snapshot.c.name.startswith(HELD_PREFIX, autoescape=True)))
    rows = [
        {"name": name, "part": part, "run_id": run_id, "data": piece}
        for n, data in enumerate(parts)
        for name, part, piece in _cut(f"{HELD_PREFIX}{n}", data)
    ]
    if rows:
        conn.execute(snapshot.insert(), rows)


#: (run ID, start) of the last run that succeeded (`last_run`, `read_held`).
_LAST_SUCCEEDED = (
    sa.select(runs.c.run_id, runs.c.started_at)
    .where(runs.c.status == "succeeded")
    .order_by(runs.c.started_at.desc(), runs.c.run_id.desc())
    .limit(1)
)


def read_held(conn: Connection, fields: pa.Schema, sources: Collection[str]) -> dict[str, pa.Table]:
    """`read_returns`' rows of each of `sources` the held parts hold (source, source_key,
    golden_id, then `fields`), if the last run that succeeded wrote them; a source
    they do not hold is left out (its payloads are read).

    A night on full extracts returns every row of each, and reading a million
    payloads back (1.5 GB of SQLite's pages, 1.1 GB of JSON parsed) took 4-6 s of
    CPU while the night loaded its extracts: the night before wrote what the
    return files needed of them, as it left the store, in a few tens of MB."""
    if not sources:
        return {}
    parts = conn.execute(
        sa.select(snapshot.c.name, snapshot.c.run_id, snapshot.c.data)
        .where(snapshot.c.name.startswith(HELD_PREFIX, autoescape=True))
        .order_by(snapshot.c.name, snapshot.c.part)
    ).all()
    last = conn.execute(_LAST_SUCCEEDED).scalar()
    if not parts or any(run != last for _, run, _ in parts):
        return {}
    expected = pa.schema([*(pa.field(c, pa.string()) for c in RETURNS_KEYS), *fields])
    found: dict[str, pa.Table] = {}
    for name in dict.fromkeys(n for n, _, _ in parts):
        table = pq.read_table(pa.BufferReader(b"".join(bytes(d) for n, _, d in parts if n == name)))
        if table.schema.remove_metadata() != expected:  # another release's fields
            continue
        held = json.loads((table.schema.metadata or {}).get(HELD_SOURCES, b"[]"))
        source = table.column("source")
        for name_ in sorted(set(held) & set(sources)):
            found[name_] = table.filter(pc.equal(source, name_)).replace_schema_metadata(None)
    return found


def last_run(engine: Engine) -> tuple[str, datetime] | None:
    """(run ID, start) of the last run that succeeded."""
    with engine.connect() as conn:
        row = conn.execute(_LAST_SUCCEEDED).first()
    return (row[0], row[1]) if row else None


def records_per_source(engine: Engine) -> dict[str, int]:
    """How many records the store holds per source."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(source_records.c.source, sa.func.count()).group_by(source_records.c.source)
        ).all()
    return {source: int(n) for source, n in rows}
