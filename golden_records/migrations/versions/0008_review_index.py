"""A partial index on the match evidence's review band.

Every run's report counts the review pairs awaiting a decision, and the review
queue lists them: without an index both read the whole evidence table (about
600,000 pairs at a million records, a second on a cold cache) to find a few
thousand. The index holds only the review-band rows, so it costs nothing to the
auto-match pairs a run writes.

Revision ID: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_WHERE = sa.text("band = 'review'")


def upgrade() -> None:
    op.create_index(
        "ix_mdm_match_evidence_review",
        "mdm_match_evidence",
        ["band"],
        sqlite_where=_WHERE,
        postgresql_where=_WHERE,
    )


def downgrade() -> None:
    op.drop_index("ix_mdm_match_evidence_review", table_name="mdm_match_evidence")
