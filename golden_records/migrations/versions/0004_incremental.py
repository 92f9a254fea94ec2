"""What an incremental run needs to match changed records against the stored ones
without reading every payload: the matching fields of every record, and a hash of
each record as its source sent it (to find what changed in a full extract).

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
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
    with op.batch_alter_table("mdm_source_records") as batch:
        batch.add_column(sa.Column("source_hash", sa.String(32)))
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


def downgrade() -> None:
    op.drop_table("mdm_match_fields")
    with op.batch_alter_table("mdm_source_records") as batch:
        batch.drop_column("source_hash")
