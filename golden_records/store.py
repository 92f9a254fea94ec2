"""The central store: SQLAlchemy 2 Core tables and the nightly write.

One run writes in one transaction, so a failure leaves the store as it was.
Writes are set-based: the new state is compared with the stored one in
pandas and only rows that changed are written, so a rerun on the same input
changes nothing but the run log. Golden IDs are opaque, kept from one night to
the next (a cluster keeps the ID of the stored golden record it shares the most
source records with) and never reused.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mdm_pipeline.config.errors import StoreError

metadata = sa.MetaData()

runs = sa.Table(
    "mdm_runs",
    metadata,
    sa.Column("run_id", sa.String(40), primary_key=True),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("config_hash", sa.String(64), nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),
)

source_records = sa.Table(
    "mdm_source_records",
    metadata,
    sa.Column("source", sa.String(40), primary_key=True),
    sa.Column("source_key", sa.String(200), primary_key=True),
    sa.Column("golden_id", sa.String(40), nullable=False, index=True),
    sa.Column("record_type", sa.String(16), nullable=False),
    sa.Column("source_line", sa.Integer),
    sa.Column("record_hash", sa.String(32), nullable=False),
    sa.Column("address_hash", sa.String(20)),  # normalised delivery address, for NPAI
    sa.Column("payload", sa.Text, nullable=False),  # canonical + normalised values, JSON
    sa.Column("updated_run", sa.String(40), nullable=False),
)

golden_records = sa.Table(
    "mdm_golden_records",
    metadata,
    sa.Column("golden_id", sa.String(40), primary_key=True),
    sa.Column("record_type", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # active | retired
    sa.Column("members", sa.Integer, nullable=False),
    sa.Column("record_hash", sa.String(32), nullable=False),
    sa.Column("attributes", sa.Text, nullable=False),  # golden values, JSON
    sa.Column("lineage", sa.Text, nullable=False),  # attribute -> {source, source_key, rule}
    sa.Column("created_run", sa.String(40), nullable=False),
    sa.Column("updated_run", sa.String(40), nullable=False),
)

quarantine = sa.Table(
    "mdm_quarantine",
    metadata,
    sa.Column("source", sa.String(40), primary_key=True),
    sa.Column("location", sa.String(500), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),
    sa.Column("source_key", sa.String(200)),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("raw", sa.Text, nullable=False),
    sa.Column("run_id", sa.String(40), nullable=False),
)


npai = sa.Table(
    "mdm_npai",
    metadata,
    sa.Column("source", sa.String(40), primary_key=True),
    sa.Column("source_key", sa.String(200), primary_key=True),
    sa.Column("return_date", sa.String(10), primary_key=True),
    sa.Column("reason_code", sa.String(16), primary_key=True),
    sa.Column("reason_label", sa.Text),
    sa.Column("address_hash", sa.String(20), nullable=False),  # the address that came back
    sa.Column("flagged_run", sa.String(40), nullable=False),
    sa.Column("cleared_run", sa.String(40)),  # history is kept: a flag is cleared, not deleted
    sa.Column("cleared_reason", sa.Text),
)

match_evidence = sa.Table(
    "mdm_match_evidence",
    metadata,
    sa.Column("left_source", sa.String(40), primary_key=True),
    sa.Column("left_key", sa.String(200), primary_key=True),
    sa.Column("right_source", sa.String(40), primary_key=True),
    sa.Column("right_key", sa.String(200), primary_key=True),
    sa.Column("rule", sa.String(60), nullable=False),  # the blocking rule that proposed it
    sa.Column("weight", sa.Float, nullable=False),  # log2 odds of a match
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("band", sa.String(16), nullable=False),  # auto_match | review
    sa.Column("contributions", sa.Text, nullable=False),  # comparison -> weight, JSON
    sa.Column("run_id", sa.String(40), nullable=False),  # the run that last changed it
)

EVIDENCE_KEYS = ("left_source", "left_key", "right_source", "right_key")


def connect(url: str) -> Engine:
    """An engine on the store, with its tables created if needed."""
    try:
        engine = sa.create_engine(url)
        metadata.create_all(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(
            f"store {sa.engine.make_url(url).render_as_string(hide_password=True)}: "
            f"cannot open ({exc.__class__.__name__})"
        ) from None
    return engine


def _hash_rows(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """A stable hash per row of JSON-able values, to find what changed."""
    payload = frame.to_json(orient="records", lines=True, date_format="iso", force_ascii=False)
    lines = payload.splitlines() if len(frame) else []
    digests = [hashlib.blake2b(line.encode(), digest_size=16).hexdigest() for line in lines]
    return pd.Series(digests, index=frame.index, dtype=object), pd.Series(
        lines, index=frame.index, dtype=object
    )


def new_golden_id() -> str:
    """An opaque identifier; random, so it can never be reused or guessed from data."""
    return "G" + uuid.uuid4().hex[:20].upper()


def assign_golden_ids(clusters: pd.DataFrame, previous: pd.DataFrame) -> pd.Series:
    """A golden ID per cluster, kept from the previous night where possible.

    `clusters` has (source, source_key, cluster); `previous` has (source,
    source_key, golden_id). Each cluster takes the stored ID it shares the most
    source records with; an ID goes to one cluster only (the one sharing the
    most, ties to the smaller cluster label); clusters left without one get a
    new ID.
    """
    labels = np.sort(clusters["cluster"].unique())
    assigned: dict[int, str] = {}
    if len(previous):
        shared = clusters.merge(previous, on=["source", "source_key"], how="inner")
        counts = (
            shared.groupby(["cluster", "golden_id"])
            .size()
            .rename("n")
            .reset_index()
            .sort_values(["n", "cluster", "golden_id"], ascending=[False, True, True])
        )
        taken: set[str] = set()
        while len(counts):  # each round settles at least one cluster
            best = counts.drop_duplicates("cluster").drop_duplicates("golden_id")
            for c, g in zip(best["cluster"], best["golden_id"], strict=True):
                assigned[int(c)] = g
                taken.add(g)
            counts = counts[~counts["cluster"].isin(assigned) & ~counts["golden_id"].isin(taken)]
    return pd.Series([assigned.get(int(c)) or new_golden_id() for c in labels], index=labels)


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


def _read(conn: Connection, query: sa.Select) -> pd.DataFrame:
    result = conn.execute(query)
    return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


def _delete_keys(conn: Connection, table: sa.Table, keys: pd.DataFrame) -> None:
    if len(keys):
        cols = list(keys.columns)
        cond = sa.and_(*[table.c[c] == sa.bindparam(f"k_{c}") for c in cols])
        conn.execute(
            table.delete().where(cond),
            [
                {f"k_{c}": v for c, v in zip(cols, row, strict=True)}
                for row in keys.itertuples(index=False)
            ],
        )


def _insert(conn: Connection, table: sa.Table, frame: pd.DataFrame) -> None:
    if len(frame):
        rows = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        conn.execute(table.insert(), rows)


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction for the whole write: all of it lands, or none of it."""
    with engine.begin() as conn:
        yield conn


def previous_xref(conn: Connection) -> pd.DataFrame:
    """The stored cross-reference: (source, source_key, golden_id, record_hash)."""
    return _read(
        conn,
        sa.select(
            source_records.c.source,
            source_records.c.source_key,
            source_records.c.golden_id,
            source_records.c.record_hash,
        ),
    )


def write_run(
    conn: Connection,
    run_id: str,
    records: pd.DataFrame,
    payload_columns: list[str],
    cluster: pd.Series,
    golden: pd.DataFrame,
    lineage: pd.DataFrame,
    quarantined: pd.DataFrame,
    loaded_sources: list[str],
) -> tuple[WriteResult, pd.Series]:
    """Write records, golden records and quarantine; return what changed and the IDs.

    The returned Series gives the golden ID of each record (aligned with `records`).
    """
    result = WriteResult()
    keys = records[["source", "source_key"]].assign(cluster=cluster.to_numpy())
    prev = previous_xref(conn)
    gid_of_cluster = assign_golden_ids(keys, prev[["source", "source_key", "golden_id"]])
    record_gid = pd.Series(
        gid_of_cluster.reindex(cluster.to_numpy()).to_numpy(), index=records.index
    )

    # Golden records: compare with the stored ones and write only the changes.
    lin = lineage.assign(
        source=records["source"].to_numpy()[lineage["record"].to_numpy()],
        source_key=records["source_key"].to_numpy()[lineage["record"].to_numpy()],
    )
    # Lineage per golden record as JSON {attribute: "source|source_key|rule"}, built
    # column-wise: a pivot and one to_json call, no loop over clusters.
    lin = lin.assign(v=lin["source"] + "|" + lin["source_key"].astype(str) + "|" + lin["rule"])
    wide = lin.pivot(index="cluster", columns="attribute", values="v").reindex(golden.index)
    lin_json = pd.Series(
        wide.to_json(orient="records", lines=True).splitlines() if len(wide) else [],
        index=wide.index,
        dtype=object,
    )
    attrs = golden.drop(columns=["record_type", "members"])
    g_hash, g_json = _hash_rows(attrs)
    new_golden = pd.DataFrame(
        {
            "golden_id": gid_of_cluster.reindex(golden.index).to_numpy(),
            "record_type": golden["record_type"].to_numpy(),
            "status": "active",
            "members": golden["members"].astype(int).to_numpy(),
            "record_hash": g_hash.to_numpy(),
            "attributes": g_json.to_numpy(),
            "lineage": lin_json.to_numpy(),
        }
    )
    stored = _read(
        conn,
        sa.select(
            golden_records.c.golden_id,
            golden_records.c.record_hash,
            golden_records.c.members,
            golden_records.c.status,
            golden_records.c.created_run,
        ),
    )
    merged = new_golden.merge(stored, on="golden_id", how="left", suffixes=("", "_old"))
    is_new = merged["record_hash_old"].isna()
    changed = ~is_new & (
        (merged["record_hash"] != merged["record_hash_old"])
        | (merged["members"] != merged["members_old"])
        | (merged["status_old"] != "active")
    )
    result.golden_created = int(is_new.sum())
    result.golden_updated = int(changed.sum())
    result.golden_unchanged = int((~is_new & ~changed).sum())
    write = merged[is_new | changed].copy()
    write["created_run"] = write["created_run"].fillna(run_id)
    write["updated_run"] = run_id
    _delete_keys(conn, golden_records, write.loc[~is_new[write.index], ["golden_id"]])
    _insert(conn, golden_records, write[[c.name for c in golden_records.columns]])

    # Golden records no cluster kept are retired (their ID is never reused).
    gone = stored[
        (stored["status"] == "active") & ~stored["golden_id"].isin(new_golden["golden_id"])
    ]
    if len(gone):
        conn.execute(
            golden_records.update()
            .where(golden_records.c.golden_id == sa.bindparam("gid"))
            .values(status="retired", members=0, updated_run=run_id),
            [{"gid": g} for g in gone["golden_id"]],
        )
    result.golden_retired = len(gone)

    # Cross-reference and payload of every source record.
    r_hash, r_json = _hash_rows(records[payload_columns])
    new_xref = pd.DataFrame(
        {
            "source": records["source"].to_numpy(),
            "source_key": records["source_key"].astype(str).to_numpy(),
            "golden_id": record_gid.to_numpy(),
            "record_type": records["record_type"].to_numpy(),
            "source_line": records["source_line"].astype(int).to_numpy(),
            "record_hash": r_hash.to_numpy(),
            "address_hash": records["address_hash"].to_numpy()
            if "address_hash" in records
            else None,
            "payload": r_json.to_numpy(),
            "updated_run": run_id,
        }
    )
    both = new_xref.merge(prev, on=["source", "source_key"], how="left", suffixes=("", "_old"))
    dirty = (
        both["record_hash_old"].isna()
        | (both["record_hash"] != both["record_hash_old"])
        | (both["golden_id"] != both["golden_id_old"])
    )
    to_write = both[dirty][[c.name for c in source_records.columns]]
    existed = both.loc[dirty, "record_hash_old"].notna()
    _delete_keys(conn, source_records, to_write.loc[existed, ["source", "source_key"]])
    _insert(conn, source_records, to_write)
    result.records_written = len(to_write)
    # Records no longer delivered by a loaded source leave the cross-reference.
    in_scope = prev[prev["source"].isin(loaded_sources)]
    missing = in_scope.merge(new_xref[["source", "source_key"]], how="left", indicator=True)
    missing = missing[missing["_merge"] == "left_only"][["source", "source_key"]]
    _delete_keys(conn, source_records, missing)
    result.records_removed = len(missing)

    # Quarantine: the current state per loaded source; unchanged rows are not rewritten.
    q_new = quarantined.assign(line=quarantined["line"].astype(int), run_id=run_id)
    q_old = _read(conn, sa.select(quarantine).where(quarantine.c.source.in_(loaded_sources)))
    key = ["source", "location", "line"]
    cmp_cols = [*key, "source_key", "reason", "raw"]
    if len(q_old):
        q_old["line"] = q_old["line"].astype(int)
        same = q_new[cmp_cols].astype(str).merge(q_old[cmp_cols].astype(str), how="inner")
        same_keys = set(map(tuple, same[key].to_numpy()))
    else:
        same_keys = set()
    stale = (
        q_old[[tuple(r) not in same_keys for r in q_old[key].astype(str).to_numpy()]]
        if len(q_old)
        else q_old
    )
    fresh = q_new[[tuple(r) not in same_keys for r in q_new[key].astype(str).to_numpy()]]
    _delete_keys(conn, quarantine, stale[key])
    _insert(conn, quarantine, fresh[[c.name for c in quarantine.columns]])
    result.quarantine_rows = len(q_new)
    return result, record_gid


def write_evidence(conn: Connection, run_id: str, evidence: pd.DataFrame) -> int:
    """Replace the stored match evidence by this run's, writing only what changed.

    `evidence` has EVIDENCE_KEYS, rule, weight, probability, band and
    contributions (JSON text). Weights are compared rounded to 1e-4 so that a
    rerun on the same input writes nothing. Returns the rows written.
    """
    keys = list(EVIDENCE_KEYS)
    old = _read(
        conn,
        sa.select(
            *[match_evidence.c[c] for c in (*keys, "rule", "weight", "band", "contributions")]
        ),
    )
    new = evidence.copy()
    new["weight"] = new["weight"].astype(float).round(4)
    new["probability"] = new["probability"].astype(float).round(6)
    merged = new.merge(old, on=keys, how="outer", suffixes=("", "_old"), indicator=True)
    gone = merged.loc[merged["_merge"] == "right_only", keys]
    both = merged["_merge"] == "both"
    changed = both & (
        (merged["rule"] != merged["rule_old"])
        | ((merged["weight"] - merged["weight_old"]).abs() > 1e-4)
        | (merged["band"] != merged["band_old"])
        | (merged["contributions"] != merged["contributions_old"])
    )
    _delete_keys(conn, match_evidence, pd.concat([gone, merged.loc[changed, keys]]))
    fresh = merged.loc[
        (merged["_merge"] == "left_only") | changed,
        [*keys, "rule", "weight", "probability", "band", "contributions"],
    ]
    _insert(conn, match_evidence, fresh.assign(run_id=run_id))
    return len(fresh) + len(gone)


def start_run(conn: Connection, run_id: str, config_hash: str) -> None:
    """Log the run as started (inside the run's transaction)."""
    conn.execute(
        runs.insert().values(
            run_id=run_id,
            started_at=datetime.now(UTC).replace(tzinfo=None),
            status="running",
            config_hash=config_hash,
            manifest="{}",
        )
    )


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


def read_npai(engine: Engine) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(NPAI history, the address hash the store holds per record) before this run."""
    with engine.connect() as conn:
        state = _read(conn, sa.select(npai))
        sent = _read(
            conn,
            sa.select(
                source_records.c.source, source_records.c.source_key, source_records.c.address_hash
            ),
        )
    return state, sent.dropna()


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
