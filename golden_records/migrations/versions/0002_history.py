"""History: dated golden versions, a dated cross-reference, superseded record
payloads, merge/split events, and the run lock.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mdm_golden_records") as batch:
        batch.add_column(sa.Column("version", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("valid_from", sa.DateTime))
        batch.add_column(sa.Column("retired_run", sa.String(40)))
        batch.add_column(sa.Column("survivor_id", sa.String(40)))
    with op.batch_alter_table("mdm_source_records") as batch:
        batch.add_column(sa.Column("valid_from", sa.DateTime))
    op.create_table(
        "mdm_golden_versions",
        sa.Column("golden_id", sa.String(40), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("valid_from", sa.DateTime, nullable=False),
        sa.Column("valid_to", sa.DateTime),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("closed_run", sa.String(40)),
        sa.Column("record_type", sa.String(16), nullable=False),
        sa.Column("members", sa.Integer, nullable=False),
        sa.Column("record_hash", sa.String(32), nullable=False),
        sa.Column("attributes", sa.Text, nullable=False),
        sa.Column("lineage", sa.Text, nullable=False),
    )
    op.create_table(
        "mdm_xref",
        sa.Column("source", sa.String(40), primary_key=True),
        sa.Column("source_key", sa.String(200), primary_key=True),
        sa.Column("valid_from", sa.DateTime, primary_key=True),
        sa.Column("valid_to", sa.DateTime),
        sa.Column("golden_id", sa.String(40), nullable=False, index=True),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("closed_run", sa.String(40)),
    )
    op.create_table(
        "mdm_record_history",
        sa.Column("source", sa.String(40), primary_key=True),
        sa.Column("source_key", sa.String(200), primary_key=True),
        sa.Column("valid_from", sa.DateTime, primary_key=True),
        sa.Column("valid_to", sa.DateTime, nullable=False),
        sa.Column("record_hash", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("closed_run", sa.String(40), nullable=False),
    )
    op.create_table(
        "mdm_events",
        sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(40), nullable=False, index=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("golden_id", sa.String(40), nullable=False, index=True),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_table(
        "mdm_lock",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
    )
    # A store written before history existed: its current state becomes version 1,
    # valid from the run that last wrote it.
    op.execute(
        """
        UPDATE mdm_golden_records SET valid_from = (
            SELECT started_at FROM mdm_runs WHERE mdm_runs.run_id = mdm_golden_records.updated_run
        )
        """
    )
    op.execute(
        """
        INSERT INTO mdm_golden_versions (golden_id, version, valid_from, valid_to, run_id,
            closed_run, record_type, members, record_hash, attributes, lineage)
        SELECT golden_id, 1, COALESCE(valid_from, CURRENT_TIMESTAMP), NULL, updated_run, NULL,
            record_type, members, record_hash, attributes, lineage
        FROM mdm_golden_records WHERE status = 'active'
        """
    )
    op.execute(
        """
        UPDATE mdm_source_records SET valid_from = (
            SELECT started_at FROM mdm_runs WHERE mdm_runs.run_id = mdm_source_records.updated_run
        )
        """
    )
    op.execute(
        """
        INSERT INTO mdm_xref (source, source_key, valid_from, valid_to, golden_id, run_id,
            closed_run)
        SELECT source, source_key, COALESCE(valid_from, CURRENT_TIMESTAMP), NULL, golden_id,
            updated_run, NULL
        FROM mdm_source_records
        """
    )


def downgrade() -> None:
    for table in ("mdm_lock", "mdm_events", "mdm_record_history", "mdm_xref"):
        op.drop_table(table)
    op.drop_table("mdm_golden_versions")
    with op.batch_alter_table("mdm_source_records") as batch:
        batch.drop_column("valid_from")
    with op.batch_alter_table("mdm_golden_records") as batch:
        for col in ("survivor_id", "retired_run", "valid_from", "version"):
            batch.drop_column(col)
