"""The matching view moves from a table (mdm_match_fields) to a columnar snapshot
(mdm_snapshot) that an incremental run reads in one go; pairs are found by either
record for an incremental run to drop them.

The snapshot is derived data: a store upgraded to this revision has none until its
next full run, and an incremental run asks for that full run.

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TEXT_COLUMNS = (
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


def upgrade() -> None:
    op.drop_table("mdm_match_fields")
    op.create_table(
        "mdm_snapshot",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("part", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_index(
        "ix_mdm_match_evidence_right", "mdm_match_evidence", ["right_source", "right_key"]
    )


def downgrade() -> None:
    op.drop_index("ix_mdm_match_evidence_right", "mdm_match_evidence")
    op.drop_table("mdm_snapshot")
    op.create_table(
        "mdm_match_fields",
        sa.Column("source", sa.String(40), primary_key=True),
        sa.Column("source_key", sa.String(200), primary_key=True),
        sa.Column("source_line", sa.Integer),
        sa.Column("record_type", sa.String(16), nullable=False),
        sa.Column("birth_date", sa.DateTime),
        *[sa.Column(c, sa.String(200)) for c in TEXT_COLUMNS],
        sa.Column("npai_state", sa.String(200)),
    )
