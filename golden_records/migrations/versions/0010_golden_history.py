"""A golden record's current version lives in `mdm_golden_records` (its lineage with
it); closed versions are appended to `mdm_golden_history`; the view
`mdm_golden_versions` shows both as the table of that name did.

Until now every version, the current one included, was a row of
`mdm_golden_versions`, and a night that changed a golden record rewrote the row of
its previous version to date its end. On a store of a million golden records a 5%
delta changes about 35k of them: 35k version rows spread over the whole table,
each a page read and journaled and written back (55k of the 238k pages such a
night changed). The current state now holds the current version whole, as
`mdm_source_records` and `mdm_record_history` already did for source records:
closing a version copies the current row to the end of the history, dated, and
rewrites the current row, which the night rewrote anyway. A full run writes each
golden record once instead of twice.

Revision ID: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_VERSION_COLUMNS = (
    "golden_id, version, valid_from, valid_to, run_id, closed_run, record_type, members, "
    "record_hash, attributes, lineage"
)

#: The current version of an active golden record is its row of the current state;
#: a retired one's last version was closed when it retired.
_VIEW = f"""
CREATE VIEW mdm_golden_versions AS
SELECT {_VERSION_COLUMNS} FROM mdm_golden_history
UNION ALL
SELECT golden_id, version, valid_from, NULL, updated_run, NULL, record_type, members,
       record_hash, attributes, lineage
FROM mdm_golden_records WHERE status = 'active'
"""


def _version_table(name: str, closed: bool) -> None:
    op.create_table(
        name,
        sa.Column("golden_id", sa.String(40), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("valid_from", sa.DateTime, nullable=False),
        sa.Column("valid_to", sa.DateTime, nullable=not closed),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("closed_run", sa.String(40), nullable=not closed),
        sa.Column("record_type", sa.String(16), nullable=False),
        sa.Column("members", sa.Integer, nullable=False),
        sa.Column("record_hash", sa.String(32), nullable=False),
        sa.Column("attributes", sa.Text, nullable=False),
        sa.Column("lineage", sa.Text, nullable=False),
    )


def upgrade() -> None:
    with op.batch_alter_table("mdm_golden_records") as batch:
        batch.add_column(sa.Column("lineage", sa.Text, nullable=False, server_default="{}"))
    # The lineage of the version each golden record is at (its open version, or for a
    # retired one its last).
    op.execute(
        """
        UPDATE mdm_golden_records SET lineage = COALESCE((
            SELECT v.lineage FROM mdm_golden_versions v
            WHERE v.golden_id = mdm_golden_records.golden_id
              AND v.version = mdm_golden_records.version
        ), '{}')
        """
    )
    _version_table("mdm_golden_history", closed=True)
    op.execute(
        f"INSERT INTO mdm_golden_history ({_VERSION_COLUMNS}) "
        f"SELECT {_VERSION_COLUMNS} FROM mdm_golden_versions WHERE valid_to IS NOT NULL "
        "ORDER BY golden_id, version"
    )
    op.drop_table("mdm_golden_versions")
    op.execute(_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW mdm_golden_versions")
    _version_table("mdm_golden_versions", closed=False)
    op.execute(
        f"INSERT INTO mdm_golden_versions ({_VERSION_COLUMNS}) "
        f"SELECT {_VERSION_COLUMNS} FROM mdm_golden_history"
    )
    op.execute(
        f"INSERT INTO mdm_golden_versions ({_VERSION_COLUMNS}) "
        "SELECT golden_id, version, COALESCE(valid_from, CURRENT_TIMESTAMP), NULL, updated_run,"
        " NULL, record_type, members, record_hash, attributes, lineage "
        "FROM mdm_golden_records WHERE status = 'active'"
    )
    op.drop_table("mdm_golden_history")
    with op.batch_alter_table("mdm_golden_records") as batch:
        batch.drop_column("lineage")
