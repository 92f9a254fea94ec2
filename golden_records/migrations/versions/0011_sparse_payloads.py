"""Stored payloads and golden attributes leave out their null members.

A source record's payload held every field of the model, two fifths of its bytes
`"name":null` members; at a million records that is 0.6 GB of the 1.9 GB table,
written by every full run and read back by every night. A run now writes them
without (`jsonrows.json_rows(sparse=True)`) and hashes that text.

This revision brings the current rows to the new text and hash, so that the next
run finds them unchanged: each current payload (`mdm_source_records`) and each
golden record's attributes (`mdm_golden_records`) loses its null members
(`jsonrows.drop_nulls`, byte for byte the text a run now writes for the same
values) and takes the BLAKE2b of its new text as its `record_hash`. Without it,
the first run after the upgrade would find every record changed and archive
every payload and golden version for a change of spelling only.

The history (`mdm_record_history`, `mdm_golden_history`) keeps the texts and
hashes it was written with: it is what was stored then, and every reader takes
an absent member as null. A downgrade has nothing to undo: readers of either
form read both.

Revision ID: 0011
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from alembic import op

from mdm_pipeline.golden_records.jsonrows import drop_nulls

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

#: Rows read, rewritten and written back at a time.
CHUNK_ROWS = 20_000


def _rewrite(table: str, keys: tuple[str, ...], text: str) -> None:
    """Every row's `text` without its null members, and its new hash, by chunks of
    rows in key order (a keyset walk: each chunk starts after the last key seen)."""
    conn = op.get_bind()
    t = sa.table(table, *(sa.column(c) for c in (*keys, text, "record_hash")))
    key_cols = [t.c[k] for k in keys]
    update = (
        sa.update(t)
        .where(*(t.c[k] == sa.bindparam(f"k_{k}") for k in keys))
        .values({text: sa.bindparam("v_text"), "record_hash": sa.bindparam("v_hash")})
    )
    last: tuple | None = None
    while True:
        query = sa.select(*key_cols, t.c[text]).order_by(*key_cols).limit(CHUNK_ROWS)
        if last is not None:
            query = query.where(sa.tuple_(*key_cols) > sa.tuple_(*last))
        rows = conn.execute(query).all()
        if not rows:
            return
        last = tuple(rows[-1][: len(keys)])
        before = pa.array([r[-1] for r in rows], type=pa.string())
        after = drop_nulls(before)
        changed = pc.not_equal(before, after).to_numpy(zero_copy_only=False)
        texts = after.to_pylist()
        params = [
            {
                **{f"k_{k}": row[i] for i, k in enumerate(keys)},
                "v_text": texts[n],
                "v_hash": hashlib.blake2b(texts[n].encode(), digest_size=16).hexdigest(),
            }
            for n, row in enumerate(rows)
            if changed[n]
        ]
        if params:
            conn.execute(update, params)


def upgrade() -> None:
    _rewrite("mdm_source_records", ("source", "source_key"), "payload")
    _rewrite("mdm_golden_records", ("golden_id",), "attributes")


def downgrade() -> None:
    pass
