"""A golden record's lineage is kept once, in its version row: the current row of
`mdm_golden_records` no longer repeats it.

Lineage is the widest value of a golden record (a source, key, rule and date per
attribute). Written twice, every changed golden record cost twice its bytes, and
the current table, read and rewritten by every run, was twice as large. The
current version (`valid_to IS NULL`) holds the same text, so nothing is lost.

Revision ID: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mdm_golden_records") as batch:
        batch.drop_column("lineage")


def downgrade() -> None:
    with op.batch_alter_table("mdm_golden_records") as batch:
        batch.add_column(sa.Column("lineage", sa.Text, nullable=False, server_default=""))
    # Back from the version each golden record is at (the open one, or the last).
    op.execute(
        """
        UPDATE mdm_golden_records SET lineage = (
            SELECT v.lineage FROM mdm_golden_versions v
            WHERE v.golden_id = mdm_golden_records.golden_id
              AND v.version = mdm_golden_records.version
        )
        WHERE EXISTS (
            SELECT 1 FROM mdm_golden_versions v
            WHERE v.golden_id = mdm_golden_records.golden_id
              AND v.version = mdm_golden_records.version
        )
        """
    )
