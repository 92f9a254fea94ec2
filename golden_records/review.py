"""The steward's review queue and decisions, read from and written to the store.

The queue is the pairs the last runs scored in the review band that no active
decision answers yet, most uncertain first. A decision is kept as a
must-link (accept) or cannot-link (reject) constraint on a pair of source
records, with its author, date and comment; every later run honours it until
it is revoked. Decisions name records by (source, key), never by position or
golden ID, so they survive renumbering, merges and splits.
"""

from __future__ import annotations

import csv
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sqlalchemy.engine import Engine

from mdm_pipeline.golden_records.refs import RecordRef, ReviewError
from mdm_pipeline.golden_records.schema import decisions, match_evidence, source_records

KINDS = {"accept": "must_link", "reject": "cannot_link"}
PAIR_COLUMNS = ["left_source", "left_key", "right_source", "right_key"]


def pair_item_id(left_source: str, left_key: str, right_source: str, right_key: str) -> str:
    """A short stable ID for a pair (the same pair gets the same ID on every night)."""
    text = "\x1f".join((left_source, left_key, right_source, right_key))
    return "P" + hashlib.blake2b(text.encode(), digest_size=5).hexdigest().upper()


def _ordered(a: RecordRef, b: RecordRef) -> tuple[RecordRef, RecordRef]:
    """Pairs are stored smaller (source, key) first, as match evidence is."""
    return (a, b) if (a.source, a.key) <= (b.source, b.key) else (b, a)


def active_decisions(engine: Engine) -> pd.DataFrame:
    """Decisions not revoked: kind and the pair of records."""
    with engine.connect() as conn:
        return _active(conn)


def _active(conn: sa.Connection) -> pd.DataFrame:
    rows = conn.execute(
        sa.select(
            decisions.c.decision_id, decisions.c.kind, *[decisions.c[c] for c in PAIR_COLUMNS]
        )
        .where(decisions.c.revoked_at.is_(None))
        .order_by(decisions.c.decision_id)
    )
    return pd.DataFrame(rows.fetchall(), columns=list(rows.keys()))


def decisions_changed_since(engine: Engine, since: datetime | None) -> pd.DataFrame:
    """Pairs of the decisions taken or revoked after `since` (all of them if None)."""
    query = sa.select(*[decisions.c[c] for c in PAIR_COLUMNS])
    if since is not None:
        query = query.where(sa.or_(decisions.c.decided_at > since, decisions.c.revoked_at > since))
    with engine.connect() as conn:
        rows = conn.execute(query)
        return pd.DataFrame(rows.fetchall(), columns=list(rows.keys()))


#: The two records of a stored pair, for `_undecided_pairs` and its conditions.
_LEFT = source_records.alias("l")
_RIGHT = source_records.alias("r")


def _undecided_pairs(conn: sa.Connection, *where: Any, extra: tuple = ()) -> pd.DataFrame:
    """Stored scored pairs (with `extra` evidence columns and each side's golden ID)
    matching `where`, less the pairs an active decision answers: what both the review
    pairs and the guard-split clusters of the queue are made of."""
    ev = match_evidence.c
    left_rec, right_rec = _LEFT, _RIGHT
    query = (
        sa.select(
            *[ev[c] for c in PAIR_COLUMNS],
            *extra,
            ev.probability,
            left_rec.c.golden_id.label("left_golden_id"),
            right_rec.c.golden_id.label("right_golden_id"),
        )
        .join(
            left_rec,
            sa.and_(left_rec.c.source == ev.left_source, left_rec.c.source_key == ev.left_key),
        )
        .join(
            right_rec,
            sa.and_(right_rec.c.source == ev.right_source, right_rec.c.source_key == ev.right_key),
        )
        .where(*where)
    )
    rows = conn.execute(query)
    pairs = pd.DataFrame(rows.fetchall(), columns=list(rows.keys()))
    decided = _active(conn)
    if len(decided) and len(pairs):
        hit = pairs.merge(decided[PAIR_COLUMNS], on=PAIR_COLUMNS, how="left", indicator=True)
        pairs = pairs[(hit["_merge"] == "left_only").to_numpy()].reset_index(drop=True)
    return pairs


def review_queue(
    engine: Engine,
    source: str | None = None,
    min_probability: float | None = None,
    max_probability: float | None = None,
    min_size: int | None = None,
) -> pd.DataFrame:
    """Review-band pairs without an active decision, most uncertain first.

    `size` is the number of source records the two sides' golden records hold
    together: what accepting the pair would put in one golden record.
    """
    ev = match_evidence.c
    where = [ev.band == "review"]
    if source is not None:
        where.append(sa.or_(ev.left_source == source, ev.right_source == source))
    if min_probability is not None:
        where.append(ev.probability >= min_probability)
    if max_probability is not None:
        where.append(ev.probability <= max_probability)
    with engine.connect() as conn:
        pairs = _undecided_pairs(conn, *where, extra=(ev.rule, ev.weight))
        gids = pd.concat([pairs["left_golden_id"], pairs["right_golden_id"]]).unique().tolist()
        sizes = _members(conn, gids)
    together = pairs["left_golden_id"] == pairs["right_golden_id"]
    left_size = pairs["left_golden_id"].map(sizes).fillna(1).astype(int)
    right_size = pairs["right_golden_id"].map(sizes).fillna(1).astype(int)
    pairs = pairs.assign(
        item=[pair_item_id(*row) for row in pairs[PAIR_COLUMNS].itertuples(index=False)],
        together=together.to_numpy(),
        size=(left_size + right_size.where(~together, 0)).to_numpy(),
        uncertainty=(pairs["probability"] - 0.5).abs().to_numpy(),
    )
    if min_size is not None:
        pairs = pairs[pairs["size"] >= min_size]
    pairs = pairs.sort_values(["uncertainty", "item"]).reset_index(drop=True)
    return pairs[
        [
            "item",
            *PAIR_COLUMNS,
            "probability",
            "weight",
            "rule",
            "left_golden_id",
            "right_golden_id",
            "together",
            "size",
        ]
    ]


def review_backlog(engine: Engine) -> int:
    """How many review-band pairs await a decision: `len(review_queue(engine))`, counted
    by the database (the run report wants the number, not a million rows read back).

    The stored evidence only holds pairs of stored records (a run drops the pairs of
    the records it deletes), so the count needs no join with them: on a large store
    those joins are two random lookups per pair.
    """
    ev, dec = match_evidence.c, decisions.c
    answered = (
        sa.select(sa.literal(1))
        .where(dec.revoked_at.is_(None), *[dec[c] == ev[c] for c in PAIR_COLUMNS])
        .exists()
    )
    query = sa.select(sa.func.count()).select_from(match_evidence)
    with engine.connect() as conn:
        return int(conn.execute(query.where(ev.band == "review", ~answered)).scalar_one())


def guard_splits(engine: Engine, source: str | None = None) -> pd.DataFrame:
    """Clusters the chaining guard split: auto-matched pairs whose records ended in
    different golden records (the guard cut the link), grouped by the golden records
    the cut links join; pairs a steward has decided on are left out.

    Derived from the stored evidence and cross-reference alone, so it holds after
    full and incremental runs alike. One row per split cluster: its item ID, the
    golden records, the cut links (pairs of records) and their probabilities.
    """
    ev = match_evidence.c
    with engine.connect() as conn:
        cut = _undecided_pairs(
            conn, ev.band == "auto_match", _LEFT.c.golden_id != _RIGHT.c.golden_id
        )
        columns = ["item", "golden_ids", "links", "probability", "size", "sources"]
        if not len(cut):
            return pd.DataFrame(columns=columns)
        gids, codes = np.unique(  # noqa: TID251 (return_inverse: it sorts)
            np.r_[cut["left_golden_id"].to_numpy(), cut["right_golden_id"].to_numpy()],
            return_inverse=True,
        )
        n = len(cut)
        graph = coo_matrix((np.ones(n), (codes[:n], codes[n:])), shape=(len(gids), len(gids)))
        label = connected_components(graph, directed=False)[1]
        cut["cluster"] = label[codes[:n]]
        sizes = _members(conn, gids.tolist())
    out = []
    for _, part in cut.groupby("cluster", sort=False):
        members = sorted(set(part["left_golden_id"]) | set(part["right_golden_id"]))
        links = [
            f"{ls}:{lk} / {rs}:{rk}"
            for ls, lk, rs, rk in part[PAIR_COLUMNS].itertuples(index=False)
        ]
        out.append(
            {
                "item": "C"
                + hashlib.blake2b("\x1f".join(members).encode(), digest_size=5).hexdigest().upper(),
                "golden_ids": members,
                "links": sorted(links),
                "probability": float(part["probability"].min()),
                "size": int(sum(sizes.get(g, 0) for g in members)),
                "sources": sorted(set(part["left_source"]) | set(part["right_source"])),
            }
        )
    found = pd.DataFrame(out, columns=columns)
    if source is not None:
        found = found[found["sources"].map(lambda names: source in names)]
    return found.reset_index(drop=True)


def full_queue(
    engine: Engine,
    kind: str = "all",
    source: str | None = None,
    min_probability: float | None = None,
    max_probability: float | None = None,
    min_size: int | None = None,
) -> pd.DataFrame:
    """Review pairs and guard-split clusters in one queue, most uncertain first: item,
    kind, records, probability (a cluster's weakest cut link), rule, golden, size, and
    each kind's own columns."""
    parts = []
    if kind in ("pair", "all"):
        pairs = review_queue(engine, source, min_probability, max_probability, min_size)
        left = pairs["left_source"] + ":" + pairs["left_key"]
        right = pairs["right_source"] + ":" + pairs["right_key"]
        golden = pairs["left_golden_id"].where(
            pairs["together"], pairs["left_golden_id"] + " / " + pairs["right_golden_id"]
        )
        parts.append(pairs.assign(kind="pair", records=left + " / " + right, golden=golden))
    if kind in ("cluster", "all"):
        split = guard_splits(engine, source)
        keep = pd.Series(True, index=split.index)
        if min_probability is not None:
            keep &= split["probability"] >= min_probability
        if max_probability is not None:
            keep &= split["probability"] <= max_probability
        if min_size is not None:
            keep &= split["size"] >= min_size
        split = split[keep]
        parts.append(
            split.assign(
                kind="cluster",
                rule="chaining guard",
                records=split["links"].map(" + ".join),
                golden=split["golden_ids"].map(" / ".join),
            )
        )
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(
            columns=["item", "kind", "records", "probability", "rule", "golden", "size"]
        )
    queue = pd.concat(parts, ignore_index=True)
    queue["uncertainty"] = (queue["probability"] - 0.5).abs()
    queue = queue.sort_values(["uncertainty", "item"]).drop(columns="uncertainty")
    first = ["item", "kind", "records", "probability", "rule", "golden", "size"]
    return queue[first + [c for c in queue.columns if c not in first]].reset_index(drop=True)


def split_links(engine: Engine, item: str) -> list[tuple[RecordRef, RecordRef]]:
    """The cut links of a split cluster item."""
    found = guard_splits(engine)
    row = found[found["item"] == item]
    if not len(row):
        raise ReviewError(f"review item '{item}' is not a cluster the chaining guard split")
    pairs = []
    for link in row["links"].iloc[0]:
        left, right = link.split(" / ")
        pairs.append((RecordRef.parse(left), RecordRef.parse(right)))
    return pairs


def decide_item(
    engine: Engine, item: str, kind: str, author: str, comment: str | None = None
) -> list[int]:
    """A decision on a review item: a pair (P…) or a split cluster (C…), whose cut links
    all get the decision (accept: one customer after all; reject: the split stands)."""
    pairs = split_links(engine, item) if item.startswith("C") else [find_item(engine, item)]
    if not author.strip():
        raise ReviewError("a decision needs its author (--author)")
    with engine.begin() as conn:
        return [_record(conn, kind, a, b, author, comment, item) for a, b in pairs]


def _members(conn: sa.Connection, golden_ids: list[str]) -> dict[str, int]:
    if not golden_ids:
        return {}
    out: dict[str, int] = {}
    for i in range(0, len(golden_ids), 500):
        chunk = golden_ids[i : i + 500]
        rows = conn.execute(
            sa.select(source_records.c.golden_id, sa.func.count())
            .where(source_records.c.golden_id.in_(chunk))
            .group_by(source_records.c.golden_id)
        )
        out.update({g: int(n) for g, n in rows})
    return out


def _items(engine: Engine) -> dict[str, tuple[RecordRef, RecordRef]]:
    """Every review-band pair by its item ID."""
    ev = match_evidence.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(*[ev[c] for c in PAIR_COLUMNS]).where(ev.band == "review"))
        return {
            pair_item_id(ls, lk, rs, rk): (RecordRef(ls, lk), RecordRef(rs, rk))
            for ls, lk, rs, rk in rows
        }


def find_item(engine: Engine, item: str) -> tuple[RecordRef, RecordRef]:
    """The pair of records behind a review item ID (the queue's, or an already decided one)."""
    found = _items(engine).get(item)
    if found is None:
        raise ReviewError(f"review item '{item}' is not in the store's review band")
    return found


def show_pair(engine: Engine, item: str) -> dict[str, Any]:
    """What a steward needs to decide on a pair: both records' values (raw and
    normalised, as stored), the pair's score with each comparison's weight, and
    the decisions already taken on it."""
    left, right = find_item(engine, item)
    ev = match_evidence.c
    with engine.connect() as conn:
        score = conn.execute(
            sa.select(ev.rule, ev.weight, ev.probability, ev.contributions).where(
                ev.left_source == left.source,
                ev.left_key == left.key,
                ev.right_source == right.source,
                ev.right_key == right.key,
            )
        ).one()
        sides = []
        for ref in (left, right):
            row = conn.execute(
                sa.select(source_records.c.golden_id, source_records.c.payload).where(
                    source_records.c.source == ref.source, source_records.c.source_key == ref.key
                )
            ).one()
            sides.append({"ref": str(ref), "golden_id": row[0], "values": json.loads(row[1])})
        taken = conn.execute(
            sa.select(decisions)
            .where(
                decisions.c.left_source == left.source,
                decisions.c.left_key == left.key,
                decisions.c.right_source == right.source,
                decisions.c.right_key == right.key,
            )
            .order_by(decisions.c.decision_id)
        )
        history = [dict(r._mapping) for r in taken]
    return {
        "item": item,
        "left": sides[0],
        "right": sides[1],
        "rule": score.rule,
        "weight": float(score.weight),
        "probability": float(score.probability),
        "contributions": json.loads(score.contributions),
        "decisions": history,
    }


#: `mdm review apply`: what each decision word records.
CSV_DECISIONS = {
    "accept": "must_link",
    "reject": "cannot_link",
    "merge": "must_link",
    "split": "cannot_link",
}


def apply_csv(engine: Engine, path: Path) -> list[int]:
    """Record the decisions of a CSV file in one transaction: every line is checked
    first, and one bad line (named with its number and column) records none."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReviewError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    items = _items(engine)
    planned: list[tuple[str, RecordRef, RecordRef, str, str | None, str | None]] = []
    for line, row in enumerate(rows, start=2):
        word = (row.get("decision") or "").strip().lower()
        if word not in CSV_DECISIONS:
            raise ReviewError(
                f"{path}:{line}: column 'decision': expected one of {sorted(CSV_DECISIONS)}"
            )
        author = (row.get("author") or "").strip()
        if not author:
            raise ReviewError(f"{path}:{line}: column 'author' is empty")
        item = (row.get("item") or "").strip() or None
        try:
            if item is not None:
                if item not in items:
                    raise ReviewError(f"review item '{item}' is not in the store's review band")
                left, right = items[item]
            else:
                left = RecordRef.parse((row.get("left") or "").strip())
                right = RecordRef.parse((row.get("right") or "").strip())
            _check_records(engine, [left, right])
        except ReviewError as exc:
            raise ReviewError(f"{path}:{line}: {exc}") from None
        comment = (row.get("comment") or "").strip() or None
        planned.append((CSV_DECISIONS[word], left, right, author, comment, item))
    with engine.begin() as conn:
        return [_record(conn, *decision) for decision in planned]


def _check_records(engine: Engine, refs: list[RecordRef]) -> None:
    with engine.connect() as conn:
        for ref in refs:
            found = conn.execute(
                sa.select(sa.func.count()).where(
                    source_records.c.source == ref.source, source_records.c.source_key == ref.key
                )
            ).scalar()
            if not found:
                raise ReviewError(f"record {ref} is not in the store")


def decide(
    engine: Engine,
    kind: str,
    left: RecordRef,
    right: RecordRef,
    author: str,
    comment: str | None = None,
    item: str | None = None,
) -> int:
    """Record a must-link or cannot-link on two stored records; returns its decision ID.

    A new decision on a pair replaces (revokes) an active one on the same pair,
    so the latest word of a steward is the one runs honour.
    """
    if kind not in KINDS.values():
        raise ReviewError(f"decision kind '{kind}': expected one of {sorted(KINDS.values())}")
    if not author.strip():
        raise ReviewError("a decision needs its author (--author)")
    if left == right:
        raise ReviewError(f"record {left}: a decision links two different records")
    _check_records(engine, [left, right])
    with engine.begin() as conn:
        return _record(conn, kind, left, right, author, comment, item)


def _record(
    conn: sa.Connection,
    kind: str,
    left: RecordRef,
    right: RecordRef,
    author: str,
    comment: str | None,
    item: str | None,
) -> int:
    a, b = _ordered(left, right)
    now = datetime.now(UTC).replace(tzinfo=None)
    same_pair = sa.and_(
        decisions.c.left_source == a.source,
        decisions.c.left_key == a.key,
        decisions.c.right_source == b.source,
        decisions.c.right_key == b.key,
        decisions.c.revoked_at.is_(None),
    )
    conn.execute(
        decisions.update()
        .where(same_pair)
        .values(revoked_at=now, revoked_by=author, revoke_comment="replaced by a new decision")
    )
    result = conn.execute(
        decisions.insert().values(
            kind=kind,
            left_source=a.source,
            left_key=a.key,
            right_source=b.source,
            right_key=b.key,
            author=author,
            comment=comment,
            decided_at=now,
            review_item=item,
        )
    )
    return int(result.inserted_primary_key[0])


def revoke(engine: Engine, decision_id: int, author: str, comment: str | None = None) -> None:
    """End a decision: later runs no longer honour it (its row stays, for the audit)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        done = conn.execute(
            decisions.update()
            .where(decisions.c.decision_id == decision_id, decisions.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_by=author, revoke_comment=comment)
        ).rowcount
    if not done:
        raise ReviewError(f"decision {decision_id} does not exist or is already revoked")


def list_decisions(engine: Engine, include_revoked: bool = False) -> pd.DataFrame:
    """Decisions with their author, date and comment, oldest first."""
    query = sa.select(decisions).order_by(decisions.c.decision_id)
    if not include_revoked:
        query = query.where(decisions.c.revoked_at.is_(None))
    with engine.connect() as conn:
        rows = conn.execute(query)
        return pd.DataFrame(rows.fetchall(), columns=list(rows.keys()))
