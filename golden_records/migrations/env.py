"""Alembic environment: migrations run on the connection `store.connect` hands over.

There is no alembic.ini: the tool, not a separate command, owns its schema, so
every `mdm` command that opens a store brings it to the current revision first.
"""

from __future__ import annotations

from alembic import context

from mdm_pipeline.golden_records.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things in place: batch mode copies the table.
    render_as_batch=True,
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
