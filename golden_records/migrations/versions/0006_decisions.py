"""Steward decisions (must-link / cannot-link on pairs of source records), kept with
their author, date and revocation, and honoured by every later run.

Revision ID: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mdm_decisions",
        sa.Column("decision_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("left_source", sa.String(40), nullable=False),
        sa.Column("left_key", sa.String(200), nullable=False),
        sa.Column("right_source", sa.String(40), nullable=False),
        sa.Column("right_key", sa.String(200), nullable=False),
        sa.Column("author", sa.String(100), nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("decided_at", sa.DateTime, nullable=False),
        sa.Column("review_item", sa.String(40)),
        sa.Column("revoked_at", sa.DateTime),
        sa.Column("revoked_by", sa.String(100)),
        sa.Column("revoke_comment", sa.Text),
    )
    op.create_index("ix_mdm_decisions_left", "mdm_decisions", ["left_source", "left_key"])
    op.create_index("ix_mdm_decisions_right", "mdm_decisions", ["right_source", "right_key"])


def downgrade() -> None:
    op.drop_table("mdm_decisions")
