"""The store as the first releases created it (before Alembic): runs, source records,
golden records (current state only), quarantine, NPAI flags, match evidence.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mdm_runs",
        sa.Column("run_id", sa.String(40), primary_key=True),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
    )
    op.create_table(
        "mdm_source_records",
        sa.Column("source", sa.String(40), primary_key=True),
        sa.Column("source_key", sa.String(200), primary_key=True),
        sa.Column("golden_id", sa.String(40), nullable=False, index=True),
        sa.Column("record_type", sa.String(16), nullable=False),
        sa.Column("source_line", sa.Integer),
        sa.Column("record_hash", sa.String(32), nullable=False),
        sa.Column("address_hash", sa.String(20)),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("updated_run", sa.String(40), nullable=False),
    )
    op.create_table(
        "mdm_golden_records",
        sa.Column("golden_id", sa.String(40), primary_key=True),
        sa.Column("record_type", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("members", sa.Integer, nullable=False),
        sa.Column("record_hash", sa.String(32), nullable=False),
        sa.Column("attributes", sa.Text, nullable=False),
        sa.Column("lineage", sa.Text, nullable=False),
        sa.Column("created_run", sa.String(40), nullable=False),
        sa.Column("updated_run", sa.String(40), nullable=False),
    )
    op.create_table(
        "mdm_quarantine",
        sa.Column("source", sa.String(40), primary_key=True),
        sa.Column("location", sa.String(500), primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("source_key", sa.String(200)),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("raw", sa.Text, nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
    )
    op.create_table(
        "mdm_npai",
        sa.Column("source", sa.String(40), primary_key=True),
        sa.Column("source_key", sa.String(200), primary_key=True),
        sa.Column("return_date", sa.String(10), primary_key=True),
        sa.Column("reason_code", sa.String(16), primary_key=True),
        sa.Column("reason_label", sa.Text),
        sa.Column("address_hash", sa.String(20), nullable=False),
        sa.Column("flagged_run", sa.String(40), nullable=False),
        sa.Column("cleared_run", sa.String(40)),
        sa.Column("cleared_reason", sa.Text),
    )
    op.create_table(
        "mdm_match_evidence",
        sa.Column("left_source", sa.String(40), primary_key=True),
        sa.Column("left_key", sa.String(200), primary_key=True),
        sa.Column("right_source", sa.String(40), primary_key=True),
        sa.Column("right_key", sa.String(200), primary_key=True),
        sa.Column("rule", sa.String(60), nullable=False),
        sa.Column("weight", sa.Float, nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("band", sa.String(16), nullable=False),
        sa.Column("contributions", sa.Text, nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "mdm_match_evidence",
        "mdm_npai",
        "mdm_quarantine",
        "mdm_golden_records",
        "mdm_source_records",
        "mdm_runs",
    ):
        op.drop_table(table)
