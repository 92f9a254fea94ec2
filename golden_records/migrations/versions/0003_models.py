"""Trained matching models, kept so that every night scores with the same model
until a retraining is asked for.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mdm_models",
        sa.Column("run_id", sa.String(40), primary_key=True),
        sa.Column("settings_hash", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mdm_models")
