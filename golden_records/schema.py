"""The central store's tables (SQLAlchemy Core), as the latest migration leaves them.

Current state and history live side by side: `mdm_golden_records` and
`mdm_source_records` hold what is true now (fast reads for the applications),
`mdm_golden_history`, `mdm_xref` and `mdm_record_history` hold every earlier
state with its validity dates (what auditors ask for), `mdm_events` every merge
and split. The view `mdm_golden_versions` puts every version of a golden record,
earlier and current, in one place for whoever asks in SQL. The schema itself is
created and upgraded by the Alembic migrations in `migrations/`; a test checks
that they leave exactly these tables.
"""

from __future__ import annotations

import sqlalchemy as sa

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
    sa.Column("valid_from", sa.DateTime),  # of the current payload
    sa.Column("source_hash", sa.String(32)),  # the record as its source sent it
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
    # attribute -> "source|source_key|rule|date" of the current version, JSON
    sa.Column("lineage", sa.Text, nullable=False, server_default="{}"),
    sa.Column("created_run", sa.String(40), nullable=False),
    sa.Column("updated_run", sa.String(40), nullable=False),
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("valid_from", sa.DateTime),  # of the current version
    sa.Column("retired_run", sa.String(40)),
    sa.Column("survivor_id", sa.String(40)),  # a retired record resolves to it
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
    # An incremental run drops the pairs of a changed record, on either side.
    sa.Index("ix_mdm_match_evidence_right", "right_source", "right_key"),
    # The review queue and the run report's backlog: a few thousand pairs of a
    # million, found without reading the whole table.
    sa.Index(
        "ix_mdm_match_evidence_review",
        "band",
        sqlite_where=sa.text("band = 'review'"),
        postgresql_where=sa.text("band = 'review'"),
    ),
    # One B-tree keyed by the pair on SQLite (migration 0009); ignored elsewhere.
    sqlite_with_rowid=False,
)

#: Every version of a golden record that is no longer current: a new night's version,
#: a retirement or a merge closes the one in `mdm_golden_records` by copying it here
#: with the date and run that closed it. Closed versions are only ever appended: a
#: night that changes 40k golden records writes 40k rows at the end of this table,
#: rather than reaching 40k scattered pages to date the rows it supersedes
#: (migration 0010).
golden_history = sa.Table(
    "mdm_golden_history",
    metadata,
    sa.Column("golden_id", sa.String(40), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("valid_from", sa.DateTime, nullable=False),
    sa.Column("valid_to", sa.DateTime, nullable=False),
    sa.Column("run_id", sa.String(40), nullable=False),  # the run that wrote it
    sa.Column("closed_run", sa.String(40), nullable=False),
    sa.Column("record_type", sa.String(16), nullable=False),
    sa.Column("members", sa.Integer, nullable=False),
    sa.Column("record_hash", sa.String(32), nullable=False),
    sa.Column("attributes", sa.Text, nullable=False),
    sa.Column("lineage", sa.Text, nullable=False),
)

xref = sa.Table(
    "mdm_xref",
    metadata,
    sa.Column("source", sa.String(40), primary_key=True),
    sa.Column("source_key", sa.String(200), primary_key=True),
    sa.Column("valid_from", sa.DateTime, primary_key=True),
    sa.Column("valid_to", sa.DateTime),  # NULL: the record belongs to it now
    sa.Column("golden_id", sa.String(40), nullable=False, index=True),
    sa.Column("run_id", sa.String(40), nullable=False),
    sa.Column("closed_run", sa.String(40)),
    sqlite_with_rowid=False,  # see migration 0009
)

record_history = sa.Table(
    "mdm_record_history",
    metadata,
    sa.Column("source", sa.String(40), primary_key=True),
    sa.Column("source_key", sa.String(200), primary_key=True),
    sa.Column("valid_from", sa.DateTime, primary_key=True),
    sa.Column("valid_to", sa.DateTime, nullable=False),
    sa.Column("record_hash", sa.String(32), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # values and quality codes as they were
    sa.Column("run_id", sa.String(40), nullable=False),
    sa.Column("closed_run", sa.String(40), nullable=False),
)

events = sa.Table(
    "mdm_events",
    metadata,
    sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(40), nullable=False, index=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # merge | split
    sa.Column("reason", sa.String(16), nullable=False),  # automatic | steward
    sa.Column("golden_id", sa.String(40), nullable=False, index=True),
    sa.Column("detail", sa.Text, nullable=False),  # members before and after, JSON
)

#: Steward decisions on pairs of source records: `must_link` (same customer) or
#: `cannot_link` (different customers). Every run honours the active ones (not
#: revoked); a revoked decision keeps its row, with who revoked it and when.
decisions = sa.Table(
    "mdm_decisions",
    metadata,
    sa.Column("decision_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),  # must_link | cannot_link
    sa.Column("left_source", sa.String(40), nullable=False),
    sa.Column("left_key", sa.String(200), nullable=False),
    sa.Column("right_source", sa.String(40), nullable=False),
    sa.Column("right_key", sa.String(200), nullable=False),
    sa.Column("author", sa.String(100), nullable=False),
    sa.Column("comment", sa.Text),
    sa.Column("decided_at", sa.DateTime, nullable=False),
    sa.Column("review_item", sa.String(40)),  # the review item it answered, if any
    sa.Column("revoked_at", sa.DateTime),
    sa.Column("revoked_by", sa.String(100)),
    sa.Column("revoke_comment", sa.Text),
    sa.Index("ix_mdm_decisions_left", "left_source", "left_key"),
    sa.Index("ix_mdm_decisions_right", "right_source", "right_key"),
)

lock = sa.Table(
    "mdm_lock",
    metadata,
    sa.Column("name", sa.String(16), primary_key=True),
    sa.Column("run_id", sa.String(40), nullable=False),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
)

models = sa.Table(
    "mdm_models",
    metadata,
    sa.Column("run_id", sa.String(40), primary_key=True),  # the run that trained it
    sa.Column("settings_hash", sa.String(64), nullable=False, index=True),  # matching settings
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("model", sa.Text, nullable=False),  # parameters, term frequencies, prior: JSON
)

#: Normalised text fields matching reads (see matching.keys.FIELD_COLUMNS).
MATCH_TEXT_COLUMNS = (
    "first_name_norm",
    "last_name_norm",
    "birth_name_norm",
    "email_norm",
    "phone_norm",
    "postcode_norm",
    "city_norm",
    "street_norm",
    "company_name_norm",
    "siren_norm",
    "siret_norm",
    "customer_ref_norm",
)

#: What an incremental run reads of every record (matching fields, source hash, NPAI
#: state) and the auto-match links, as Parquet: read in one go in seconds where the
#: same rows read through SQL take tens of seconds at a million records. Derived
#: data, written by every run in its own transaction, so it always matches the
#: tables it was derived from. A full run writes it whole; an incremental one writes
#: its changed records as a patch on the stored base, and the live index of every
#: record's row (`store.read_snapshot`).
snapshot = sa.Table(
    "mdm_snapshot",
    metadata,
    sa.Column("name", sa.String(16), primary_key=True),  # records | patch | live | edges
    sa.Column("part", sa.Integer, primary_key=True),  # a Parquet file cut in parts
    sa.Column("run_id", sa.String(40), nullable=False),  # the run that wrote it
    sa.Column("data", sa.LargeBinary, nullable=False),
)
#: Snapshot parts named so (`held.0`, `held.1`) hold what a night read back for the
#: return files, as it left it: every stored record of the sources sent as full
#: extracts (`store.write_held`). Apart from the snapshot proper, which its readers
#: read without them.
HELD_PREFIX = "held."
#: The Parquet metadata key of a held part that lists its sources (JSON): a source
#: without a record is there too.
HELD_SOURCES = b"mdm_sources"
#: A held part's (and `store.read_returns`') own columns, before the return fields.
RETURNS_KEYS = ("source", "source_key", "golden_id")
#: Views the migrations create; declared apart from `metadata`, which lists the tables.
views = sa.MetaData()

#: Every version of every golden record: the closed ones of `mdm_golden_history` and
#: the current one of each active golden record (`valid_to` NULL). What "golden
#: versions" meant before migration 0010, when it was a table.
golden_versions = sa.Table(
    "mdm_golden_versions",
    views,
    sa.Column("golden_id", sa.String(40)),
    sa.Column("version", sa.Integer),
    sa.Column("valid_from", sa.DateTime),
    sa.Column("valid_to", sa.DateTime),  # NULL: the current version
    sa.Column("run_id", sa.String(40)),
    sa.Column("closed_run", sa.String(40)),
    sa.Column("record_type", sa.String(16)),
    sa.Column("members", sa.Integer),
    sa.Column("record_hash", sa.String(32)),
    sa.Column("attributes", sa.Text),
    sa.Column("lineage", sa.Text),
)

#: Columns of the snapshot's records an incremental run reads as the matching view.
MATCH_COLUMNS = ("record_type", "birth_date", *MATCH_TEXT_COLUMNS)
