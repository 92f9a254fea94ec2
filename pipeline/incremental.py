"""What an incremental run re-decides, and the records it needs to do so.

A full extract is compared with what the store holds (a hash of each record
as its source sent it): new and changed records are normalised and matched
against every stored record; deleted ones leave. The run then re-clusters only
the connected components of auto-match links that a change can reach, and
re-survives their golden records. The result equals a full run with the same
model, because:

- a pair's score depends only on its two records and the (stored) model, and
  blocks are formed over all records, so the pairs involving a changed record
  are exactly those a full run scores; every other pair keeps its stored score;
- a block whose size crosses `max_block_size` because of a change makes all
  its members re-matched (their pairs appear or vanish in a full run too);
- clustering and survivorship work component by component and break ties on
  record order (source order, then line), which the run reproduces.

Functions here are pure (frames in, frames out); `pipeline.run` wires them to
the store and the stages.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mdm_pipeline.config import schema
from mdm_pipeline.config.schema import distinct, join_key_arrays, joined_keys, record_keys
from mdm_pipeline.config.settings import BlockingRule, MatchingSettings
from mdm_pipeline.golden_records.jsonrows import parse_json_lines
from mdm_pipeline.golden_records.schema import MATCH_COLUMNS
from mdm_pipeline.golden_records.store import SNAPSHOT_ARROW_TEXTS, StoredRecords, sort_order
from mdm_pipeline.matching.blocking import block_hashes
from mdm_pipeline.matching.clustering import components
from mdm_pipeline.matching.keys import Fields, prepare
from mdm_pipeline.normalize.stage import NORMALISED_COLUMNS

KEYS = ["source", "source_key"]

NPAI_COLUMNS = ("address_hash", "npai_flag", "npai_date", "npai_reason")
#: What a source record's stored payload holds: its canonical values as mapped, its
#: normalised ones and its NPAI state (its keys and line are columns of their own).
PAYLOAD_COLUMNS: tuple[str, ...] = tuple(
    c
    for c in (*schema.CANONICAL_COLUMNS, *NORMALISED_COLUMNS, *NPAI_COLUMNS)
    if c not in ("source", "source_key", "source_line")
)


@dataclass(frozen=True)
class Delta:
    """How tonight's extracts differ from the store's snapshot (positions into it)."""

    changed: pd.DataFrame  # loaded records that are new or differ from the stored ones
    deleted: pd.DataFrame  # (source, source_key, snap_pos) stored, of a loaded source, gone
    unchanged: pd.DataFrame  # (snap_pos, source_line): the others, with tonight's line
    index: KeyPositions  # the snapshot's record keys, for further lookups
    #: (source, source_key) of the loaded records that are unchanged: the rows of
    #: tonight's extracts among `unchanged` (a delta source's others are not).
    resent: pd.DataFrame


class KeyPositions:
    """Where record keys (`record_keys`' texts) are among the snapshot's records: what
    `pd.Index.get_indexer` of the snapshot's keys gives, without that index.

    An index of a million stored keys costs a Python text per record and a hash
    table of them, 0.45-0.55 s at 1M records before a night can find its delta.
    Here the stored keys stay one Arrow array, and each lookup hashes the few keys
    it asks for (Arrow's `index_in`, with them as its value set) and probes the
    million in C++: 0.15 s for the delta's 91k keys, array included, and about
    0.03 s for each later lookup of tens of thousands (docs/benchmarks.md).
    Keys that are not all texts take a pandas index, as before."""

    def __init__(self, frame: pd.DataFrame, keys: pa.Array | None = None) -> None:
        """The keys of `frame`'s records; `keys`, the same texts already joined in Arrow
        (`snapshot_keys`), spares making them again from the frame's Python texts."""
        self._keys = keys if keys is not None else joined_keys(frame)
        self._index = record_keys(frame) if self._keys is None else None

    def get_indexer(self, wanted: pd.Index) -> np.ndarray:
        """Each wanted key's position among the stored ones (-1: not stored)."""
        if self._index is not None:
            return self._index.get_indexer(wanted)
        target = pa.array(np.asarray(wanted, dtype=object), type=pa.string())
        if (
            len(target) == len(self._keys)
            and pc.all(pc.equal(target, self._keys), skip_nulls=False).as_py()
        ):
            # Every stored key asked for in the stored order: a night on full extracts
            # whose rows kept their places. Each is where it is asked if none is
            # stored twice, which one hash of them tells (0.12 s at 1M records,
            # against 0.55 s for the two hashes and probes below).
            if len(pc.unique(target)) != len(target):
                raise ValueError("the snapshot holds a record key twice")
            return np.arange(len(target), dtype=np.intp)
        # A key asked for twice gets the same position: each is mapped to its first.
        first = pc.index_in(target, value_set=target).to_numpy()
        hit = pc.index_in(self._keys, value_set=target).fill_null(-1).to_numpy()
        rows = np.flatnonzero(hit >= 0)
        if len(distinct(hit[rows])) != len(rows):
            raise ValueError("the snapshot holds a record key twice")
        out = np.full(len(target), -1, dtype=np.intp)
        out[hit[rows]] = rows
        return out[first]


def snapshot_keys(stored: StoredRecords) -> pa.Array | None:
    """`joined_keys` of the snapshot's records, in record order, made from its Arrow
    columns; None where a key is missing (`KeyPositions` then keys the frame).

    The frame of every stored record holds its keys as Python texts, which Arrow
    took back one by one, holding the GIL, to look keys up: a night's `find_delta`
    at 1M records took 0.22-0.38 s that way, 0.16-0.23 s with these (joined in
    0.03 s, docs/benchmarks.md)."""
    keys = join_key_arrays(*(pc.cast(stored.rows.column(name), pa.string()) for name in KEYS))
    if keys is None:
        return None
    at = stored.at
    if len(at) != len(keys) or not np.array_equal(at, np.arange(len(at))):
        keys = keys.take(pa.array(at))
    return keys.combine_chunks()


def find_delta(
    records: pd.DataFrame,
    state: pd.DataFrame,
    full_sources: list[str],
    deletions: pd.DataFrame,
    stored_keys: pa.Array | None = None,
) -> Delta:
    """Compare loaded records (with `source_hash`) with the snapshot's records.

    A full extract's stored records that it no longer holds are deleted; a
    delta extract deletes the keys it lists, and its other stored records are
    unchanged (with their stored line, as they are not in tonight's file).
    `stored_keys`, the state's keys joined in Arrow if at hand (`snapshot_keys`).
    """
    index = KeyPositions(state, stored_keys)
    pos = index.get_indexer(record_keys(records))
    found = pos >= 0
    same = np.zeros(len(pos), dtype=bool)
    # Only the delivered records' stored hashes become Python texts.
    stored_hash = state["source_hash"].take(pos[found]).to_numpy(dtype=object)
    same[found] = records["source_hash"].to_numpy(dtype=object)[found] == stored_hash
    delivered = np.zeros(len(state), dtype=bool)
    delivered[pos[found]] = True
    in_full = state["source"].isin(full_sources).to_numpy()
    gone = in_full & ~delivered
    listed = index.get_indexer(record_keys(deletions)) if len(deletions) else np.array([], int)
    gone[listed[listed >= 0]] = True
    # A delta source's records that tonight's file does not mention keep their line.
    quiet = np.flatnonzero(~in_full & ~delivered & ~gone)
    lines = records["source_line"].to_numpy(dtype=np.int64)
    unchanged = pd.DataFrame(
        {
            "snap_pos": np.r_[pos[same], quiet],
            "source_line": np.r_[lines[same], state["source_line"].to_numpy(np.int64)[quiet]],
        }
    )
    deleted = state.loc[gone, KEYS].assign(snap_pos=np.flatnonzero(gone)).reset_index(drop=True)
    resent = records.loc[same, KEYS].reset_index(drop=True)
    return Delta(records[~same].reset_index(drop=True), deleted, unchanged, index, resent)


def decision_links(decided: pd.DataFrame, keys: pd.Index) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(must-link, cannot-link) pairs of positions (left, right) in the records that
    `keys` (see `record_keys`) names; decisions on a record not there tonight wait."""
    empty = pd.DataFrame({"left": np.array([], np.int64), "right": np.array([], np.int64)})
    if not len(decided):
        return empty, empty
    left, right = (
        keys.get_indexer(
            record_keys(decided[[f"{side}_source", f"{side}_key"]].set_axis(KEYS, axis=1))
        )
        for side in ("left", "right")
    )
    here = (left >= 0) & (right >= 0)
    kind = decided["kind"].to_numpy()
    frames = [
        pd.DataFrame({"left": left[here & (kind == k)], "right": right[here & (kind == k)]})
        for k in ("must_link", "cannot_link")
    ]
    return frames[0], frames[1]


def stack(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Frames one under the other, column by column (in the first one's column order):
    pd.concat checks every value of a mostly-empty text column (a million records'
    SIREN) for missing-ness, which costs seconds a night. Frames whose columns
    differ are left to pd.concat."""
    columns = list(frames[0].columns)
    if any(set(f.columns) != set(columns) for f in frames[1:]):
        return pd.concat(frames, ignore_index=True)  # columns to align: pandas's own
    # The concatenated arrays are new already: no second copy into consolidated blocks
    # (two thirds of the time on a million records).
    return pd.DataFrame(
        {c: _stacked([f[c] for f in frames]) for c in columns}, columns=columns, copy=False
    )


def _stacked(parts: list[pd.Series]) -> Any:
    """One column's parts end to end; an extension type all parts share is kept (Arrow
    texts are joined as Arrow chunks, not turned into Python objects)."""
    dtype = parts[0].dtype
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and all(p.dtype == dtype for p in parts):
        return type(parts[0].array)._concat_same_type([p.array for p in parts])
    return np.concatenate([p.to_numpy() for p in parts])


def take_rows(
    frame: pd.DataFrame, rows: np.ndarray, columns: list[str], **override: Any
) -> pd.DataFrame:
    """`columns` of `frame` at positions `rows`, with some columns given (an array, or
    one value for every row), built column by column: `iloc`, `assign` and column
    selection each copy a million rows whole."""
    data: dict[str, Any] = {}
    for c in [*columns, *[c for c in override if c not in columns]]:
        if c in override:
            value = override[c]
            data[c] = np.full(len(rows), value) if np.ndim(value) == 0 else np.asarray(value)
        elif isinstance(frame[c].dtype, np.dtype):
            data[c] = frame[c].to_numpy()[rows]
        else:  # an extension dtype (categorical, nullable integer) is kept as it is
            data[c] = frame[c].array.take(rows)
    return pd.DataFrame(data, copy=False)


def run_order(frame: pd.DataFrame, sources: list[str]) -> pd.DataFrame:
    """Records in the order a full run holds them: sources in config order, then line,
    then key (code point order, as the store's sort: lines coincide when a delta
    file's records meet stored ones). A source the config does not list ranks last."""
    rank = pc.index_in(pa.array(frame["source"], type=pa.string()), pa.array(sources))
    order = _line_order(
        pc.fill_null(rank, len(sources)).to_numpy().astype(np.int64),
        frame["source_line"].to_numpy(dtype=np.int64),
        frame["source_key"],
    )
    # Column by column: `iloc` then `reset_index` copy a million rows twice more.
    return take_rows(frame, order, list(frame.columns))


#: Lines below 2**40 share one integer with their source's rank (`_line_order`).
_LINE_BITS = 40


def _line_order(rank: np.ndarray, line: np.ndarray, key: pd.Series) -> np.ndarray:
    """Positions that sort by (rank, line, key as text), stable.

    Rank and line sort as one integer; only the records whose rank and line
    another record shares are then ordered by key. Turning a million keys into
    texts to sort them all, for the few a delta file's lines make coincide, took
    0.3-0.5 s of a night.
    """
    if len(line) and (line.min() < 0 or line.max() >= 2**_LINE_BITS):
        keys = pd.DataFrame({"rank": rank, "line": line, "key": key.astype(str).to_numpy()})
        return sort_order(keys, ["rank", "line", "key"])
    place = (rank << _LINE_BITS) | line
    order = np.argsort(place, kind="stable")
    sorted_place = place[order]
    same = sorted_place[1:] == sorted_place[:-1]
    tied = np.zeros(len(order), dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    if tied.any():
        at = np.flatnonzero(tied)
        rows = order[at]
        ties = pd.DataFrame({"place": place[rows], "key": key.iloc[rows].astype(str).to_numpy()})
        # Each run of one (rank, line) keeps its positions; its records go by key.
        order[at] = rows[sort_order(ties, ["place", "key"])]
    return order


def block_column(rule: BlockingRule) -> str:
    """The snapshot column holding a rule's block key per record, named after the rule's
    definition: keys of a rule since changed are never taken for the new one."""
    digest = hashlib.sha1(rule.model_dump_json().encode(), usedforsecurity=False).hexdigest()
    return f"block_{digest[:12]}"


def block_keys(records: pd.DataFrame | Fields, rules: list[BlockingRule]) -> list[np.ndarray]:
    """Each rule's block key per record (`blocking.block_hashes`; 0 where none)."""
    fields = prepare(records)
    return [block_hashes(fields, rule) for rule in rules]


def stored_block_keys(stored: StoredRecords, rules: list[BlockingRule]) -> list[np.ndarray] | None:
    """The snapshot's block keys per rule and record, or None if it lacks one (a
    snapshot written before they were kept, or under other rules)."""
    names = [block_column(rule) for rule in rules]
    if any(name not in stored.column_names for name in names):
        return None
    return [stored.column(name) for name in names]


def current_block_keys(
    stored: StoredRecords,
    changed_rows: pd.DataFrame,
    stored_pos: np.ndarray,
    old_pos: np.ndarray,
    rules: list[BlockingRule],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each rule's block keys for `blocks_to_rematch`: (over the current records, over
    the snapshot rows at `old_pos`). Last night's keys come from the snapshot and only
    tonight's changed records (`changed_rows`, see `match_view`) are keyed; a snapshot
    without them has every record keyed (once: the next snapshot carries them)."""
    kept_keys = stored_block_keys(stored, rules)
    changed = stored_pos < 0
    if kept_keys is None:
        everyone = match_view(stored, changed_rows, stored_pos, np.arange(len(stored_pos)))
        old = stored.take(old_pos, list(MATCH_COLUMNS))
        return block_keys(everyone, rules), block_keys(
            old.to_pandas(deduplicate_objects=False), rules
        )
    kept_at = stored_pos[~changed]
    fresh = block_keys(changed_rows[list(MATCH_COLUMNS)].reset_index(drop=True), rules)
    now = []
    for last_night, tonight in zip(kept_keys, fresh, strict=True):
        column = np.empty(len(stored_pos), dtype=np.int64)
        column[~changed] = last_night[kept_at]
        column[changed] = tonight
        now.append(column)
    return now, [last_night[old_pos] for last_night in kept_keys]


def with_block_keys(table: pa.Table, rules: list[BlockingRule], keys: list[np.ndarray]) -> pa.Table:
    """The snapshot's records with each rule's block key per record (in its order)."""
    for rule, column in zip(rules, keys, strict=True):
        table = table.append_column(block_column(rule), pa.array(column, type=pa.int64()))
    return table


#: Bits of a block key `_positions` sieves keys by: a table of 4 Mi flags (4 MiB).
_SIEVE_BITS = 22


def _positions(lookup: pd.Index, keys: np.ndarray) -> np.ndarray:
    """`lookup.get_indexer(keys)` for the block keys of a million records against the
    few thousand blocks a night's changes touch (int64 hashes, well mixed in their high
    bits): a table of flags by each key's top bits sets aside most keys, and only the
    rest are hashed and looked up (10 ms instead of 22 ms a rule at 1M records)."""
    if len(keys) < len(lookup) * 8:
        return lookup.get_indexer(keys)
    shift = np.uint64(64 - _SIEVE_BITS)
    sieve = np.zeros(1 << _SIEVE_BITS, dtype=bool)
    sieve[lookup.to_numpy(dtype=np.int64).view(np.uint64) >> shift] = True
    maybe = np.flatnonzero(sieve[keys.view(np.uint64) >> shift])
    out = np.full(len(keys), -1, dtype=np.intp)
    out[maybe] = lookup.get_indexer(keys[maybe])
    return out


def blocks_to_rematch(
    now: list[np.ndarray], old: list[np.ndarray], changed: np.ndarray, settings: MatchingSettings
) -> tuple[np.ndarray, np.ndarray]:
    """(records to match again, records their pairs can reach): masks over the current
    records, from each rule's block keys (`block_keys`: `now` over the current
    records, `old` over the stored versions of the changed and deleted ones).

    Records to match again are the changed ones and the members of a block whose
    size crossed the cap tonight: each block's size last night is tonight's, minus
    its changed members, plus their old versions and the deleted ones. The records
    their pairs can reach are every member of a block holding one of them, for
    any rule: matching just these gives the same pairs, rules and block sizes as
    matching everyone, because every block that holds a record to match again is
    taken whole.
    """
    cap = settings.blocking.max_block_size
    rematch = changed.copy()
    # Per rule, the blocks a changed or deleted record joined or left, the current
    # records in them and which block each is in: a few records of a million, kept
    # for the reach below rather than a position per record and rule.
    moved_blocks: list[tuple[pd.Index, np.ndarray, np.ndarray]] = []
    for keys_now, keys_old in zip(now, old, strict=True):
        # Only a block a changed or deleted record joined or left can have crossed the
        # cap: sizes are counted for those few thousand keys, not for every block of a
        # million records (`pd.factorize` of every key, rule by rule, took twice as long).
        moved = distinct(np.r_[keys_now[changed], keys_old])
        moved = moved[moved != 0]  # 0: the record has no key under this rule
        lookup = pd.Index(moved)
        if not len(moved):
            moved_blocks.append((lookup, np.array([], np.intp), np.array([], np.intp)))
            continue
        here = _positions(lookup, keys_now)
        members = np.flatnonzero(here >= 0)
        moved_blocks.append((lookup, members, here[members]))
        there = lookup.get_indexer(keys_old)
        inside = here >= 0
        tonight = np.bincount(here[inside], minlength=len(moved))
        last = np.bincount(here[inside & ~changed], minlength=len(moved)) + np.bincount(
            there[there >= 0], minlength=len(moved)
        )
        crossed = (tonight > cap) != (last > cap)
        if crossed.any():
            rematch |= inside & crossed[np.maximum(here, 0)]
    # A record to match again reaches its blocks under every rule, including one whose
    # key no changed record shares (it may be matched again for another rule's block).
    reach = rematch.copy()
    for keys_now, (lookup, members, block) in zip(now, moved_blocks, strict=True):
        hit = distinct(keys_now[rematch])
        hit = hit[hit != 0]
        if not len(hit):
            continue
        # Most often every block hit is one a changed record is in: its members are
        # known from above (a lookup of a million keys fewer per rule, 0.15 s of a 5%
        # night at 1M records, docs/benchmarks.md).
        at = lookup.get_indexer(hit)
        if (at >= 0).all():
            is_hit = np.zeros(len(lookup), dtype=bool)
            is_hit[at] = True
            reach[members[is_hit[block]]] = True
        else:
            reach |= pd.Index(hit).get_indexer(keys_now) >= 0
    return rematch, reach


def affected_records(
    n_current: int,
    n_deleted: int,
    stored_edges: tuple[np.ndarray, np.ndarray],
    kept_edges: tuple[np.ndarray, np.ndarray],
    new_edges: tuple[np.ndarray, np.ndarray],
    rematched: np.ndarray,
    resurvive: np.ndarray,
) -> np.ndarray:
    """Records (mask over the current ones) whose cluster a full run could decide differently.

    Stored edges are over current records then deleted ones (positions
    n_current..). A changed or deleted record can split its old component, and
    a new link can join components: the records to re-cluster are the new
    components that meet a changed record, a record of an old component that
    held a changed or deleted one, or a record whose golden record must be
    re-chosen (`resurvive`: its NPAI state changed).
    """
    total = n_current + n_deleted
    old = components(total, *stored_edges)
    seeds = np.r_[rematched, np.ones(n_deleted, dtype=bool)]
    touched_old = np.isin(old, distinct(old[seeds]))[:n_current]
    new = components(
        n_current, np.r_[kept_edges[0], new_edges[0]], np.r_[kept_edges[1], new_edges[1]]
    )
    start = touched_old | rematched | resurvive
    return np.isin(new, distinct(new[start]))


#: What the store's snapshot keeps of every record besides its matching view.
RECORD_COLUMNS = [*KEYS, "source_line", "source_hash", "address_hash", "npai_state"]
#: The hashes among them: a night compares or writes them for a few records only (the
#: delivered ones, those flagged, those chosen again), so they stay in Arrow
#: (`store.snapshot_frames`) and out of the frame of every current record.
HASH_COLUMNS = list(SNAPSHOT_ARROW_TEXTS)
#: What a night holds of every current record as Python objects, in its run order.
CURRENT_COLUMNS = [c for c in RECORD_COLUMNS if c not in HASH_COLUMNS]

#: What the store's snapshot keeps of every record, in a full run's record order.
SNAPSHOT_COLUMNS = [*RECORD_COLUMNS, *MATCH_COLUMNS]


def match_view(
    stored: StoredRecords, changed_rows: pd.DataFrame, stored_pos: np.ndarray, rows: np.ndarray
) -> pd.DataFrame:
    """The matching view (MATCH_COLUMNS) of the current records at `rows`.

    `stored_pos` gives each current record's position in the snapshot's records, -1
    for a changed one; `changed_rows` holds the changed ones (at least their
    MATCH_COLUMNS) in current order.
    Unchanged rows are taken in Arrow and only they are converted: a night matches
    again the blocks of a few records, and converting a million records' names and
    addresses to Python strings to use a tenth of them cost seconds. Their texts
    stay Arrow-backed (`schema.text_dtype`, as normalisation gives tonight's and a
    full run matches them): as Python strings, the 130k rows a 5% night at 1M
    records matches took 0.18 s to convert, stack and order, 0.08-0.13 s so, and
    the match itself was no faster on them.
    """
    pos = stored_pos[rows]
    from_stored = pos >= 0
    columns = list(MATCH_COLUMNS)
    old = stored.take(pos[from_stored], columns).to_pandas(
        deduplicate_objects=False, types_mapper=schema.text_types
    )
    rank = np.cumsum(stored_pos < 0) - 1  # each changed record's row in changed_rows
    new = take_rows(changed_rows, rank[rows[~from_stored]], columns)
    both = stack([old, new])
    order = np.empty(len(rows), dtype=np.int64)
    order[from_stored] = np.arange(len(old))
    order[~from_stored] = len(old) + np.arange(len(new))
    return take_rows(both, order, columns)


#: A night keeps the snapshot's base while the rows appended to it since it was written
#: (live or superseded) are at most this share of it; beyond, the night writes the
#: whole snapshot again in record order, as a full run does, and the patch starts
#: empty. A 5% night appends about 5%: the base is rewritten one night in five.
PATCH_SHARE = 0.25


def next_snapshot(
    stored: StoredRecords,
    changed_rows: pd.DataFrame,
    stored_pos: np.ndarray,
    tonight: pd.DataFrame,
    rules: list[BlockingRule],
    block_now: list[np.ndarray],
) -> tuple[dict[str, pa.Table], bool]:
    """(the next snapshot's records parts, whether they keep the stored base).

    `stored_pos` gives each current record's position in the stored records, -1
    for a changed one (`changed_rows` holds those, in order, with their
    SNAPSHOT_COLUMNS); `tonight` has every current record's `source_line` and
    `npai_state`; `block_now` each rule's block key per current record.

    A night appends its changed records to the patch and writes the live index
    (each record's row, line and NPAI state): a few megabytes, where the whole
    snapshot is a hundred, taken in a new order and compressed every night. When
    the patch outgrows `PATCH_SHARE` of the base, or the base was written under
    other blocking rules, the records are written whole, in tonight's order.
    Its own inputs, not the run's records frame, so that the run can build this on
    a second thread while it writes the store.
    """
    names = [block_column(rule) for rule in rules]
    changed = stored_pos < 0
    n_new = int(changed.sum())
    physical = stored.rows.select(SNAPSHOT_COLUMNS)
    schema = physical.schema.remove_metadata()
    new = pa.Table.from_pandas(changed_rows[SNAPSHOT_COLUMNS], schema=schema, preserve_index=False)
    row = np.empty(len(stored_pos), dtype=np.int64)
    row[~changed] = stored.at[stored_pos[~changed]]
    row[changed] = stored.rows.num_rows + np.arange(n_new)
    lines = pa.array(tonight["source_line"].to_numpy(), type=pa.int64())
    states = pa.array(tonight["npai_state"].to_numpy(), type=pa.string(), from_pandas=True)
    same_rules = [c for c in stored.column_names if c.startswith("block_")] == names
    if same_rules and stored.patch.num_rows + n_new <= PATCH_SHARE * stored.base_rows:
        appended = with_block_keys(new, rules, [keys[changed] for keys in block_now])
        patch = pa.concat_tables(
            [stored.patch.replace_schema_metadata(None), appended], promote_options="none"
        )
        live = pa.table({"row": row, "source_line": lines, "npai_state": states})
        return {"patch": patch, "live": live}, True
    both = pa.concat_tables([physical.replace_schema_metadata(None), new])
    out = both.take(pa.array(row))
    for col, values in (("source_line", lines), ("npai_state", states)):
        i = schema.get_field_index(col)
        out = out.set_column(i, schema.field(col), values.cast(schema.field(col).type))
    return {"records": with_block_keys(out, rules, block_now)}, False


def snapshot_edges(
    left: np.ndarray, right: np.ndarray, weight: np.ndarray, probability: np.ndarray
) -> pd.DataFrame:
    """Auto-match links by record position in the snapshot, smaller position first, sorted."""
    lo, hi = np.minimum(left, right), np.maximum(left, right)
    order = np.lexsort((hi, lo))
    return pd.DataFrame(
        {
            "left": lo[order].astype(np.int64),
            "right": hi[order].astype(np.int64),
            "weight": np.asarray(weight, dtype=np.float64)[order],
            "probability": np.asarray(probability, dtype=np.float64)[order],
        }
    )


def records_from_payload(payloads: pd.DataFrame, like: pd.Series | None = None) -> pd.DataFrame:
    """Stored records back as the frame normalisation produced (types restored).

    `like` (column -> dtype, from tonight's normalised records) gives each column
    the type normalisation gives it, so that the two frames concatenate without
    converting either: Arrow-backed texts stay in Arrow.
    """
    if not len(payloads):
        return pd.DataFrame(columns=[*KEYS, "source_line"])
    like = like if like is not None else pd.Series(dtype=object)
    strings = [c for c, d in like.items() if isinstance(d, pd.StringDtype)]
    lines = payloads["payload"].tolist()
    # UTF-8 bytes as the store's scope read gives them, or text.
    frame = parse_json_lines((b"\n" if isinstance(lines[0], bytes) else "\n").join(lines), strings)
    # A payload leaves out its missing fields: one that none of these lines holds is
    # put back empty, as a line holding it as null parsed it (Arrow text, or None):
    # tonight's columns, or without `like` all of a payload's.
    wanted = [c for c in PAYLOAD_COLUMNS if c in like] if len(like) else list(PAYLOAD_COLUMNS)
    for name in wanted:
        if name not in frame:
            frame[name] = (
                pd.Series(np.nan, index=frame.index, dtype=like[name])
                if name in strings
                else pd.Series(None, index=frame.index, dtype=object)
            )
    frame.insert(0, "source", payloads["source"].to_numpy())
    frame.insert(1, "source_key", payloads["source_key"].astype(str).to_numpy())
    frame.insert(2, "source_line", payloads["source_line"].astype(int).to_numpy())
    for col in (*schema.DATE_FIELDS, *schema.DATETIME_FIELDS):
        if col in frame:
            frame[col] = pd.to_datetime(frame[col])
    for col in schema.BOOL_FIELDS:
        if col in frame:
            frame[col] = frame[col].astype("boolean")
    if "npai_flag" in frame:
        frame["npai_flag"] = frame["npai_flag"].astype("boolean").fillna(False).astype(bool)
    if schema.TRUST in frame:
        frame[schema.TRUST] = frame[schema.TRUST].astype(int)
    for col, dtype in like.items():
        if col not in frame or frame[col].dtype == dtype or isinstance(dtype, pd.StringDtype):
            continue
        # A numpy bool or integer column cannot hold a missing value: never cast one in.
        if isinstance(dtype, np.dtype) and dtype.kind in "biu" and frame[col].isna().any():
            continue
        with contextlib.suppress(TypeError, ValueError):  # else kept as read
            frame[col] = frame[col].astype(dtype)
    return frame.astype(
        {
            c: object
            for c in frame.columns
            if c not in like and frame[c].dtype == "float64" and frame[c].isna().all()
        }
    )
