"""Files out of the store: a business unit's records back in its own format, and the
golden records for the applications that read them as a file.

Both commands read the store as the last run left it; neither changes it. An
incremental night's return files are made here too (`NightReturns`): the same
file `mdm export bu` writes, from what the night made of the records it
re-decided and what the store held of the others.
"""

from __future__ import annotations

import io
import logging
import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

from mdm_pipeline.config import schema
from mdm_pipeline.config.errors import ConfigError, StoreError
from mdm_pipeline.config.loader import store_url
from mdm_pipeline.config.settings import Settings, Source
from mdm_pipeline.golden_records import background, store
from mdm_pipeline.golden_records.jsonrows import parse_json_lines
from mdm_pipeline.golden_records.schema import golden_records, source_records
from mdm_pipeline.golden_records.zygote import Zygote
from mdm_pipeline.pipeline.exporting import (
    HELD_PARQUET,
    RETURN_FIELDS,
    as_held,
    bu_duplicates,
    held_schema,
    held_sources,
    held_table,
    return_columns,
    typed_returns,
)
from mdm_pipeline.pipeline.loading import shared_out
from mdm_pipeline.sources import load_source, write_back
from mdm_pipeline.sources.writers import write_csv

log = logging.getLogger(__name__)


def export_bu(settings: Settings, name: str, out_dir: Path | None = None) -> Path:
    """Write business unit `name`'s extract back, row for row, in its own format, with
    what the store knows of each row (golden ID, cleaned address, flags, its duplicates).

    A row the store does not hold (new since the last run) comes back with the added
    columns empty; rows that could not be read are in quarantine, not in the file.
    """
    try:
        spec = settings.source(name)
    except KeyError:
        known = ", ".join(s.name for s in settings.sources)
        raise ConfigError(f"export bu: no source named '{name}' (sources: {known})") from None
    mapped = load_source(spec, settings, pd.Timestamp(datetime.now(UTC).date()))
    engine = store.connect(store_url(settings))
    try:
        with engine.connect() as conn:
            held_any = sa.select(source_records.c.source).where(source_records.c.source == name)
            if conn.execute(held_any.limit(1)).first() is None:
                raise StoreError(
                    f"export bu: the store holds no record of '{name}': run `mdm run` first"
                )
            keys = mapped.records["source_key"]
            wanted = pd.DataFrame({"source": name, "source_key": keys.astype(str)})
            held, members = store.read_returns(conn, RETURN_FIELDS, wanted, member_sources=[name])
            added = stored_return_columns(keys, held, members)
    finally:
        engine.dispose()
    target = out_dir if out_dir is not None else settings.resolve(settings.export.dir)
    return write_back(spec, mapped.raw, added, target)


def _positions(keys: pa.Array, records: pa.Table) -> np.ndarray:
    """Each key's row among `records` (their first with it), -1 where none has it."""
    found = pc.index_in(keys, value_set=records.column("source_key"))
    return pc.fill_null(found, -1).to_numpy()


def stored_return_columns(
    keys: pd.Series,
    held: pa.Table,
    members: pd.DataFrame,
    tonight: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The columns a return file adds to rows whose source keys are `keys` (in the
    file's order), as `return_columns` makes them for a run's records.

    Each row's record is taken from `tonight` (source_key, golden_id and the return
    fields of the records a night chose golden records for, as it wrote them) or
    else from the store as the night found it (`held`: `store.read_returns`' table;
    the records it holds that are not among the rows, a full extract's deleted
    ones, are not their duplicates either); a row in neither comes back with the
    columns empty. Its duplicates are the unit's other records in its golden
    record, among those and the stored `members` (source_key, golden_id) of the
    golden records `held` names: a golden record the night did not re-decide has
    the same members as in the store, one it did has all its members among
    `tonight`.

    The rows are found among the records by one hash lookup in Arrow each, and
    taken there: a full extract's million rows as pandas frames keyed by text
    took most of the files' time.
    """
    wanted = pa.array(keys.astype(str).to_numpy(dtype=object), type=pa.string())
    held = held.select(["source_key", "golden_id", *RETURN_FIELDS.names])
    fresh = as_held(tonight) if tonight is not None else held.schema.empty_table()
    if len(members) and fresh.num_rows:
        # A stored golden record one of tonight's records was in was re-decided whole:
        # its stored members are tonight's records (or deleted), none a member now.
        was_in = pc.is_in(held.column("source_key"), value_set=fresh.column("source_key"))
        redecided = held.column("golden_id").filter(was_in).to_numpy(zero_copy_only=False)
        members = members[~members["golden_id"].astype(str).isin(redecided)]
    # Each row's record: tonight's over the stored.
    at_fresh, at_held = _positions(wanted, fresh), _positions(wanted, held)
    at = np.where(at_fresh >= 0, at_fresh, np.where(at_held >= 0, fresh.num_rows + at_held, -1))
    both = pa.concat_tables([fresh, held])
    rows = both.take(pa.array(at, mask=at < 0))
    frame = typed_returns(
        rows.select(RETURN_FIELDS.names).to_pandas(types_mapper=schema.text_types)
    )
    # A row the store does not hold is not flagged either (`typed_returns`).
    golden_ids = rows.column("golden_id").to_numpy(zero_copy_only=False)
    frame.insert(0, "golden_id", golden_ids)
    frame.insert(0, "source_key", keys.astype(str).to_numpy(dtype=object))
    # The unit's records that may share a golden record with a row: the rows, tonight's
    # other records (re-decided, not in a delta extract), the stored members.
    used = np.zeros(fresh.num_rows, dtype=bool)
    used[at_fresh[at_fresh >= 0]] = True
    others = fresh.filter(pa.array(~used))
    extra = members[["source_key", "golden_id"]].astype(str)
    if len(extra):
        known = pa.concat_arrays([wanted, others.column("source_key").combine_chunks()])
        extra = extra[~pc.is_in(pa.array(extra["source_key"]), value_set=known).to_numpy(False)]
    member_keys = np.concatenate(
        [
            frame["source_key"].to_numpy(),
            others.column("source_key").to_numpy(zero_copy_only=False),
            extra["source_key"].to_numpy(dtype=object),
        ]
    )
    member_ids = np.concatenate(
        [
            golden_ids,
            others.column("golden_id").to_numpy(zero_copy_only=False),
            extra["golden_id"].to_numpy(dtype=object),
        ]
    )
    duplicates = bu_duplicates(member_keys, member_ids)[: len(frame)]
    return return_columns(frame, duplicates)


def night_return_files(
    specs: list[Source],
    raws: list[pd.DataFrame],
    keys: list[pd.Series],
    stored: tuple[pa.Table, pd.DataFrame],
    tonight: pd.DataFrame,
    out_dir: Path,
) -> list[Path]:
    """An incremental night's return files: each source's rows of tonight (`raws[i]`,
    their keys `keys[i]`: a delta extract's upserts, a full extract's every row)
    written back into `out_dir`, as a full run writes them, with what the night made
    of their records (`tonight`: source, source_key, golden_id and the return fields
    of the records it re-decided) or else what the store held of them (`stored`:
    `store.read_returns` of the rows whose records did not change)."""
    held, members = stored
    paths = []
    for spec, raw, rows in zip(specs, raws, keys, strict=True):
        added = stored_return_columns(
            rows,
            held.filter(pc.equal(held.column("source"), spec.name)),
            members[members["source"] == spec.name],
            tonight[tonight["source"] == spec.name],
        )
        paths.append(write_back(spec, raw, added, out_dir))
    return paths


def next_held(
    specs: list[Source], held: pa.Table, tonight: pd.DataFrame, deleted: pd.DataFrame
) -> bytes | None:
    """What `store.read_returns` reads of the full extracts' sources among `specs` once
    the night is stored, as a held part (`store.write_held`): the stored rows the
    night read (`held`: every record of such a source) less the records it deleted
    (`deleted`: source, source_key) or re-decided, and its re-decided ones
    (`tonight`), as it wrote them. None without a full extract among `specs`.

    The next night then reads these instead of a million payloads (a test compares
    them with the payloads it would read)."""
    whole = held_sources(specs)
    if not whole:
        return None
    names = pa.array(whole, type=pa.string())
    mine = tonight[tonight["source"].isin(whole)]
    fresh = held_table(
        pa.array(mine["source"].astype(str).to_numpy(dtype=object), pa.string()), mine
    )
    stored = held.filter(pc.is_in(held.column("source"), value_set=names))
    gone = pd.concat([mine[["source", "source_key"]], deleted[["source", "source_key"]]])
    gone_keys = pc.binary_join_element_wise(
        *(pa.array(gone[c].astype(str).to_numpy(dtype=object), pa.string()) for c in gone), "\x1f"
    )
    stored_keys = pc.binary_join_element_wise(
        stored.column("source"), stored.column("source_key"), "\x1f"
    )
    kept = stored.filter(pc.invert(pc.is_in(stored_keys, value_set=gone_keys)))
    table = pa.concat_tables([kept.select(fresh.column_names), fresh]).cast(held_schema(whole))
    sink = io.BytesIO()
    pq.write_table(table, sink, **HELD_PARQUET)
    return sink.getvalue()


#: The child process that writes a night's return files (`NightReturns`).
RETURNS_CHILD_MODULE = "mdm_pipeline.pipeline.returns_child"
#: The sources' specs, extract rows and keys, and the output folder, in its folder.
RETURNS_SOURCES = "sources.pickle"


#: Rows of return files from which a night shares them between its writing child and
#: its own process: a night on full extracts of a million records returns them all,
#: 4.4 s of the child's CPU at the night's end while the run, its store written in
#: a few tenths of a second, only waited.
RETURNS_SPLIT_ROWS = 200_000


#: What writing one re-decided record to the store weighs in rows of return files, for
#: the run's process, whose thread writes its share of them beside the store's writes:
#: a steady night at 1M records writes 91k records in 4.2-4.6 s, and a return file
#: row takes 5-6 µs (docs/benchmarks.md, session 38).
STORE_RECORD_ROWS = 8
#: What a row of return files weighs in the child against the run's process: it reads
#: its inputs and fills new memory first (6.6-7.3 µs a row against 4.8-5.8 µs at 1M
#: records, session 38).
CHILD_ROW_COST = 1.3


def writers_shares(rows: list[int], redecided: int = 0) -> list[list[int]]:
    """The sources' positions the writing child takes, then (with many rows) those the
    run's process writes: all to the child below `RETURNS_SPLIT_ROWS` rows in all
    (or with one source), else two shares of about as many rows
    (`loading.shared_out`, which shares the load).

    The child takes the share that makes the two sides end sooner: the run's process
    also writes the store meanwhile, `redecided` records (`STORE_RECORD_ROWS`), and
    the child is slower by the row (`CHILD_ROW_COST`). A night that re-decided few
    records leaves the larger share to the run's process, whose store is written in
    tenths of a second; one that re-decided many leaves the larger to the child.
    """
    everything = list(range(len(rows)))
    if sum(rows) < RETURNS_SPLIT_ROWS or len(rows) < 2:
        return [everything]
    away = shared_out(list(rows), start_bytes=0)
    small, large = sorted(
        [[i for i in everything if i not in away], away], key=lambda s: sum(rows[i] for i in s)
    )
    store = STORE_RECORD_ROWS * redecided

    def ends(child: list[int], run: list[int]) -> float:
        return max(CHILD_ROW_COST * sum(rows[i] for i in child), store + sum(rows[i] for i in run))

    return [small, large] if ends(small, large) <= ends(large, small) else [large, small]


class NightReturns:
    """An incremental night's return files (`night_return_files`), written by a child
    process while the store is written, or on a thread of this process.

    Made in the run's process, on a thread beside the store's writes, they cost a
    steady night at 1M records 2.3 s and 4 s of CPU (docs/benchmarks.md, session
    34): the stored rows' JSON, the duplicates and the files hold Python's lock. A
    child (forked from the night's zygote, where the night's other children are)
    is started with the night's reads, ahead of its inputs, and is handed them
    all (the sources' rows, the stored rows as their reader's file, tonight's
    records) once the golden IDs are assigned; the store's own writes leave the
    machine's other core to it.

    When the files hold many rows (a night on full extracts), the store's writes
    are short and the files are the end of the night: the run's process writes a
    share of the sources on a thread meanwhile (`writers_shares`). A second child
    would do it as fast, but it would hold its share's rows beside the run's
    memory, which a run keeps at its peak (`allocator`): the night's tree of
    processes peaked 0.4-0.5 GiB higher at 1M records. On a store no child reads
    (`background`), or if the child fails, this process writes every share, from
    the same inputs, with the same code. Each writer also makes the held part of
    its full extracts' sources for the next night (`next_held`)."""

    def __init__(
        self,
        engine: sa.Engine,
        specs: list[Source],
        raws: list[pd.DataFrame],
        keys: list[pd.Series],
        zygote: Zygote | None = None,
    ) -> None:
        self._sources = (specs, raws, keys)
        #: The writers' shares (`writers_shares`), the child's first: chosen by `start`,
        #: once the records the night re-decided are known.
        self._shares: list[list[int]] = []
        self._child = background.Child(engine, RETURNS_CHILD_MODULE, None, zygote=zygote)
        self._stored: tuple[pa.Table, pd.DataFrame] | None = None
        self._tonight: pd.DataFrame | None = None
        self._deleted: pd.DataFrame | None = None
        self._out_dir: Path | None = None
        self._here: list[Future[tuple[list[Path], bytes | None]]] = []
        #: The held parts the files' writers made (`next_held`), once `files` is done.
        self.held_parts: list[bytes] = []

    @property
    def folder(self) -> str | None:
        """The child's private folder, where an input can be placed ahead (`start`)."""
        return self._child.folder if self._child.started else None

    def start(
        self,
        stored: background.Returns,
        tonight: pd.DataFrame,
        deleted: pd.DataFrame,
        out_dir: Path,
        pool: ThreadPoolExecutor,
    ) -> None:
        """Everything is known: the child writes its share of the files from now on,
        a thread of `pool` the rest. The stored rows' table is handed over as its
        file when it is in the child's folder already
        (`background.ReturnsRead.result`). `deleted`: the records the night removes
        (source, source_key), for the next night's held parts (`next_held`)."""
        self._stored = (stored.held, stored.members)
        self._tonight, self._deleted, self._out_dir = tonight, deleted, out_dir
        self._shares = writers_shares([len(k) for k in self._sources[2]], len(tonight))
        handed = self._hand_over(stored, tonight, deleted, out_dir)
        here = self._shares[1:] if handed else self._shares
        self._here = [pool.submit(self._write_here, share) for share in here]

    def _hand_over(
        self,
        stored: background.Returns,
        tonight: pd.DataFrame,
        deleted: pd.DataFrame,
        out_dir: Path,
    ) -> bool:
        """Whether the child took its share's inputs."""
        folder = self.folder
        if folder is None:
            return False
        try:
            share = self._shares[0]
            mine = [[values[i] for i in share] for values in self._sources]
            with open(Path(folder) / RETURNS_SOURCES, "wb") as out:
                pickle.dump((*mine, str(out_dir)), out, protocol=5)
            tables = {"members": pa.Table.from_pandas(stored.members, preserve_index=False)}
            tables["tonight"] = pa.Table.from_pandas(tonight, preserve_index=False)
            tables["deleted"] = pa.Table.from_pandas(
                deleted[["source", "source_key"]].astype(str), preserve_index=False
            )
            placed = stored.file is not None and stored.file.parent == Path(folder)
            if not placed:
                tables["held"] = stored.held
            self._child.go(tables, placed=["held"] if placed else [])
            return True
        except (OSError, pa.ArrowException) as exc:
            log.warning("return files could not be handed to a child (%s)", type(exc).__name__)
            self._child.stop()
            return False

    def _write_here(self, share: list[int]) -> tuple[list[Path], bytes | None]:
        """Share `share`'s files and held part, made in this process."""
        assert self._stored is not None and self._tonight is not None and self._out_dir
        assert self._deleted is not None
        specs, raws, keys = ([values[i] for i in share] for values in self._sources)
        paths = night_return_files(specs, raws, keys, self._stored, self._tonight, self._out_dir)
        return paths, next_held(specs, self._stored[0], self._tonight, self._deleted)

    def files(self) -> list[Path]:
        """The return files, in the sources' order, once written (by the child, else
        here)."""
        if self._stored is None:
            self.close()
            raise RuntimeError("the return files need their inputs first")
        try:
            written = [future.result() for future in self._here]
            if len(written) < len(self._shares):  # the child's share comes first
                written.insert(0, self._childs_files())
            paths = {
                i: path
                for share, (got, _) in zip(self._shares, written, strict=True)
                for i, path in zip(share, got, strict=True)
            }
            self.held_parts = [part for _, part in written if part is not None]
            return [paths[i] for i in range(len(paths))]
        finally:
            self.close()

    def _childs_files(self) -> tuple[list[Path], bytes | None]:
        """The child's share of the files and its held part, from its answer, else
        made here."""
        share = self._shares[0]
        answer = self._child.answer()
        if answer is not None:
            paths = [Path(p) for p in answer.get("paths", [])]
            held = answer.get("held")
            if len(paths) == len(share) and all(p.is_file() for p in paths):
                try:
                    return paths, Path(held).read_bytes() if held else None
                except OSError:
                    log.warning("a held part made by a child is missing: made here")
            else:
                log.warning("return files written by a child are missing: written here")
        return self._write_here(share)

    def close(self) -> None:
        """Stop the child if it still runs and remove its files (idempotent)."""
        self._child.close()


def export_golden(settings: Settings, path: Path) -> int:
    """Write the active golden records (one column per attribute) to CSV or Parquet, by
    the file's suffix; returns how many. CSV cells a spreadsheet would run as a formula
    are neutralised."""
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise ConfigError(f"export golden: '{path}': the file must end in .csv or .parquet")
    engine = store.connect(store_url(settings))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    golden_records.c.golden_id,
                    golden_records.c.record_type,
                    golden_records.c.members,
                    golden_records.c.version,
                    golden_records.c.valid_from,
                    golden_records.c.attributes,
                )
                .where(golden_records.c.status == "active")
                .order_by(golden_records.c.golden_id)
            ).all()
    finally:
        engine.dispose()
    head = pd.DataFrame(
        rows, columns=["golden_id", "record_type", "members", "version", "valid_from", "attributes"]
    )
    values = (
        parse_json_lines("\n".join(head["attributes"].tolist())) if len(head) else pd.DataFrame()
    )
    frame = pd.concat([head.drop(columns="attributes"), values], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        write_csv(frame, path)
    return len(frame)
