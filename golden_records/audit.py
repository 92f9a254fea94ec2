"""What an auditor asks the store: a golden record now, its history, what it said on
a date, and why two source records are (or are not) together.

Every answer comes from indexed lookups (golden ID, source key), never from a
scan of the store, so that each takes well under a second on a million golden
records. A retired golden ID resolves to the one that absorbed it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mdm_pipeline.config.errors import MdmError
from mdm_pipeline.golden_records.refs import RecordRef
from mdm_pipeline.golden_records.schema import (
    decisions,
    events,
    golden_records,
    golden_versions,
    match_evidence,
    source_records,
    xref,
)

#: A chain of merges longer than this is a corrupt store, not a history.
MAX_RESOLVE = 100
#: `why` looks for the chain of links inside golden records up to this size (one
#: lookup per pair of members); the clustering guard keeps clusters far smaller.
MAX_CHAIN_MEMBERS = 60


class AuditError(MdmError):
    """An ID or record the store does not hold."""

    exit_code = 2


def _golden_row(conn: Connection, golden_id: str) -> sa.Row[Any]:
    row = conn.execute(
        sa.select(golden_records).where(golden_records.c.golden_id == golden_id)
    ).first()
    if row is None:
        raise AuditError(f"golden ID {golden_id} is not in the store")
    return row


def resolve(conn: Connection, golden_id: str) -> tuple[str, list[str]]:
    """(the active golden ID this one is now, the retired IDs on the way)."""
    path: list[str] = []
    current = golden_id
    for _ in range(MAX_RESOLVE):
        row = _golden_row(conn, current)
        if row.status == "active" or row.survivor_id is None:
            return current, path
        path.append(current)
        current = row.survivor_id
    raise AuditError(f"golden ID {golden_id}: merge chain longer than {MAX_RESOLVE}")


def _members(conn: Connection, golden_id: str) -> list[str]:
    rows = conn.execute(
        sa.select(source_records.c.source, source_records.c.source_key)
        .where(source_records.c.golden_id == golden_id)
        .order_by(source_records.c.source, source_records.c.source_key)
    )
    return [f"{s}:{k}" for s, k in rows]


def _lineage(text: str) -> dict[str, dict[str, str]]:
    """{attribute: {source, source_key, rule, date}} from the stored lineage: grouped
    by record, {"source|key|date": {rule: [attribute, ...]}}, or per attribute,
    {attribute: "source|key|rule|date"}, as stores wrote it before (closed versions
    keep it)."""
    out: dict[str, dict[str, str]] = {}
    for name, value in json.loads(text or "{}").items():
        if isinstance(value, dict):
            # From the right: a source key may hold a "|", a date cannot.
            head, _, date = name.rpartition("|")
            source, _, key = head.partition("|")
            for rule, attributes in value.items():
                for attribute in attributes:
                    out[attribute] = {
                        "source": source,
                        "source_key": key,
                        "rule": rule,
                        "date": date,
                    }
            continue
        if value is None:
            continue
        # From the right: a source key may hold a "|", a rule or a date cannot.
        head, rule, date = (
            [*str(value).rsplit("|", 2), "", ""][:3] if "|" in str(value) else (str(value), "", "")
        )
        source, _, key = head.partition("|")
        out[name] = {"source": source, "source_key": key, "rule": rule, "date": date}
    return dict(sorted(out.items()))


def golden_show(engine: Engine, golden_id: str) -> dict[str, Any]:
    """Current values of a golden record with the lineage of each, and its members."""
    with engine.connect() as conn:
        active, retired = resolve(conn, golden_id)
        row = _golden_row(conn, active)
        return {
            "golden_id": active,
            "asked": golden_id,
            "resolved_from": retired,
            "status": row.status,
            "record_type": row.record_type,
            "version": row.version,
            "valid_from": row.valid_from,
            "created_run": row.created_run,
            "updated_run": row.updated_run,
            "attributes": json.loads(row.attributes),
            "lineage": _lineage(row.lineage),
            "members": _members(conn, active),
        }


def golden_history(engine: Engine, golden_id: str) -> dict[str, Any]:
    """Versions, merges, splits, retirement and steward decisions of one golden ID, by
    date (the ID asked for, not its survivor: a retired ID's history ends with it)."""
    with engine.connect() as conn:
        row = _golden_row(conn, golden_id)
        # The view: the closed versions of the history, then the current one.
        versions = conn.execute(
            sa.select(golden_versions)
            .where(golden_versions.c.golden_id == golden_id)
            .order_by(golden_versions.c.version)
        ).all()
        found = conn.execute(
            sa.select(events).where(events.c.golden_id == golden_id).order_by(events.c.event_id)
        ).all()
        links = conn.execute(
            sa.select(xref.c.source, xref.c.source_key).where(xref.c.golden_id == golden_id)
        ).all()
        taken = _decisions_on(conn, [RecordRef(s, k) for s, k in links])
    history: list[dict[str, Any]] = []
    previous: dict[str, Any] = {}
    for v in versions:
        attributes = json.loads(v.attributes)
        changed = sorted(
            k for k in attributes.keys() | previous.keys() if attributes.get(k) != previous.get(k)
        )
        previous = attributes
        history.append(
            {
                "at": v.valid_from,
                "what": "version",
                "version": v.version,
                "run_id": v.run_id,
                "valid_to": v.valid_to,
                "members": v.members,
                "changed": changed if v.version > 1 else [],
            }
        )
    for e in found:
        history.append(
            {
                "at": e.at,
                "what": e.kind,
                "run_id": e.run_id,
                "reason": e.reason,
                "detail": json.loads(e.detail),
            }
        )
    if row.status == "retired":
        history.append(
            {
                "at": versions[-1].valid_to if versions else None,
                "what": "retired",
                "run_id": row.retired_run,
                "survivor_id": row.survivor_id,
            }
        )
    for d in taken:
        history.append({"at": d["decided_at"], "what": "decision", **d})
        if d["revoked_at"] is not None:
            history.append(
                {
                    "at": d["revoked_at"],
                    "what": "revocation",
                    "decision_id": d["decision_id"],
                    "revoked_by": d["revoked_by"],
                    "comment": d["revoke_comment"],
                }
            )
    history.sort(key=lambda h: (h["at"] is None, h["at"] or datetime.min))
    return {"golden_id": golden_id, "status": row.status, "history": history}


def golden_as_of(engine: Engine, golden_id: str, when: datetime) -> dict[str, Any]:
    """The version of a golden record in force at `when`, with its lineage."""
    with engine.connect() as conn:
        _golden_row(conn, golden_id)
        v = conn.execute(
            sa.select(golden_versions).where(
                golden_versions.c.golden_id == golden_id,
                golden_versions.c.valid_from <= when,
                sa.or_(golden_versions.c.valid_to.is_(None), golden_versions.c.valid_to > when),
            )
        ).first()
    if v is None:
        raise AuditError(f"golden ID {golden_id} had no version in force on {when:%Y-%m-%d %H:%M}")
    return {
        "golden_id": golden_id,
        "as_of": when,
        "version": v.version,
        "valid_from": v.valid_from,
        "valid_to": v.valid_to,
        "run_id": v.run_id,
        "members": v.members,
        "attributes": json.loads(v.attributes),
        "lineage": _lineage(v.lineage),
    }


def _decisions_on(conn: Connection, refs: list[RecordRef]) -> list[dict[str, Any]]:
    """Decisions (in force or revoked) naming any of these records, oldest first."""
    found: dict[int, dict[str, Any]] = {}
    for ref in dict.fromkeys(refs):
        for side in ("left", "right"):
            rows = conn.execute(
                sa.select(decisions).where(
                    decisions.c[f"{side}_source"] == ref.source,
                    decisions.c[f"{side}_key"] == ref.key,
                )
            )
            for r in rows:
                found[r.decision_id] = dict(r._mapping)
    return [found[k] for k in sorted(found)]


def _link(conn: Connection, a: RecordRef, b: RecordRef) -> dict[str, Any] | None:
    """The stored evidence on a pair (auto-match or review band), either way round."""
    first, second = (a, b) if (a.source, a.key) <= (b.source, b.key) else (b, a)
    ev = match_evidence.c
    row = conn.execute(
        sa.select(ev.rule, ev.weight, ev.probability, ev.band, ev.contributions, ev.run_id).where(
            ev.left_source == first.source,
            ev.left_key == first.key,
            ev.right_source == second.source,
            ev.right_key == second.key,
        )
    ).first()
    if row is None:
        return None
    return {
        "left": str(first),
        "right": str(second),
        "rule": row.rule,
        "weight": float(row.weight),
        "probability": float(row.probability),
        "band": row.band,
        "contributions": json.loads(row.contributions),
        "run_id": row.run_id,
    }


def _path(conn: Connection, a: RecordRef, b: RecordRef, members: list[str]) -> list[dict[str, Any]]:
    """The auto-match links that join a to b inside their golden record (shortest chain)."""
    refs = [RecordRef.parse(m) for m in members]
    if len(refs) > MAX_CHAIN_MEMBERS:
        return []
    edges: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for i, x in enumerate(refs):
        for y in refs[i + 1 :]:
            link = _link(conn, x, y)
            if link is not None and link["band"] == "auto_match":
                edges.setdefault(str(x), []).append((str(y), link))
                edges.setdefault(str(y), []).append((str(x), link))
    seen = {str(a): []}
    frontier = [str(a)]
    while frontier:
        nxt = []
        for node in frontier:
            for other, link in edges.get(node, []):
                if other not in seen:
                    seen[other] = [*seen[node], link]
                    nxt.append(other)
        frontier = nxt
    return seen.get(str(b), [])


def why(engine: Engine, a: RecordRef, b: RecordRef) -> dict[str, Any]:
    """Are two source records in one golden record, since when, and on what evidence:
    their own pair's score (rule, weights) or the chain of links that joins them, and
    the steward decisions on either."""
    with engine.connect() as conn:
        gids = {}
        for ref in (a, b):
            gid = conn.execute(
                sa.select(source_records.c.golden_id).where(
                    source_records.c.source == ref.source, source_records.c.source_key == ref.key
                )
            ).scalar()
            if gid is None:
                raise AuditError(f"record {ref} is not in the store")
            gids[str(ref)] = gid
        together = gids[str(a)] == gids[str(b)]
        since = None
        if together:
            opened = [
                conn.execute(
                    sa.select(sa.func.max(xref.c.valid_from)).where(
                        xref.c.source == ref.source,
                        xref.c.source_key == ref.key,
                        xref.c.valid_to.is_(None),
                    )
                ).scalar()
                for ref in (a, b)
            ]
            since = max(o for o in opened if o is not None) if any(opened) else None
        direct = _link(conn, a, b)
        chain = (
            _path(conn, a, b, _members(conn, gids[str(a)]))
            if together and (direct is None or direct["band"] != "auto_match")
            else []
        )
        taken = [
            d
            for d in _decisions_on(conn, [a, b])
            if {f"{d['left_source']}:{d['left_key']}", f"{d['right_source']}:{d['right_key']}"}
            == {str(a), str(b)}
        ]
    return {
        "left": str(a),
        "right": str(b),
        "golden_ids": gids,
        "together": together,
        "since": since,
        "evidence": direct,
        "chain": chain,
        "decisions": taken,
    }
