"""Files out of the store: a business unit's records back in its own format, and the
golden records for the applications that read them as a file.

Both read the store as the last run left it; neither changes it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from mdm_pipeline.config.errors import ConfigError, StoreError
from mdm_pipeline.config.loader import store_url
from mdm_pipeline.config.settings import Settings
from mdm_pipeline.golden_records import store
from mdm_pipeline.golden_records.schema import golden_records, source_records
from mdm_pipeline.pipeline.exporting import RETURN_COLUMNS, return_columns
from mdm_pipeline.pipeline.incremental import parse_json_lines
from mdm_pipeline.sources import load_source, write_back
from mdm_pipeline.sources.writers import write_csv

#: What a business unit's return file needs from each stored payload.
_PAYLOAD_FIELDS = [c for c in RETURN_COLUMNS if c != "golden_id"]


def export_bu(settings: Settings, name: str, out_dir: Path | None = None) -> Path:
    """Write business unit `name`'s extract back, row for row, in its own format, with
    what the store knows of each row (golden ID, cleaned address, flags, its duplicates).

    A row the store does not hold (new since the last run) comes back with the added
    columns empty; rows that could not be read are in quarantine, not in the file.
    """
    try:
        spec = settings.source(name)
    except KeyError:
        known = ", ".join(s.name for s in settings.sources)
        raise ConfigError(f"export bu: no source named '{name}' (sources: {known})") from None
    mapped = load_source(spec, settings, pd.Timestamp(datetime.now(UTC).date()))
    engine = store.connect(store_url(settings))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    source_records.c.source_key,
                    source_records.c.golden_id,
                    source_records.c.payload,
                ).where(source_records.c.source == name)
            ).all()
    finally:
        engine.dispose()
    if not rows:
        raise StoreError(f"export bu: the store holds no record of '{name}': run `mdm run` first")
    held = pd.DataFrame(rows, columns=["source_key", "golden_id", "payload"])
    values = parse_json_lines("\n".join(held["payload"].tolist())).reindex(columns=_PAYLOAD_FIELDS)
    stored = pd.concat([held[["source_key", "golden_id"]], values], axis=1)
    keys = mapped.records[["source_key"]].astype(str)
    frame = keys.merge(stored.astype({"source_key": str}), on="source_key", how="left")
    target = out_dir if out_dir is not None else settings.resolve(settings.export.dir)
    return write_back(spec, mapped.raw, return_columns(frame), target)


def export_golden(settings: Settings, path: Path) -> int:
    """Write the active golden records (one column per attribute) to CSV or Parquet, by
    the file's suffix; returns how many. CSV cells a spreadsheet would run as a formula
    are neutralised."""
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise ConfigError(f"export golden: '{path}': the file must end in .csv or .parquet")
    engine = store.connect(store_url(settings))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    golden_records.c.golden_id,
                    golden_records.c.record_type,
                    golden_records.c.members,
                    golden_records.c.version,
                    golden_records.c.valid_from,
                    golden_records.c.attributes,
                )
                .where(golden_records.c.status == "active")
                .order_by(golden_records.c.golden_id)
            ).all()
    finally:
        engine.dispose()
    head = pd.DataFrame(
        rows, columns=["golden_id", "record_type", "members", "version", "valid_from", "attributes"]
    )
    values = (
        parse_json_lines("\n".join(head["attributes"].tolist())) if len(head) else pd.DataFrame()
    )
    frame = pd.concat([head.drop(columns="attributes"), values], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        write_csv(frame, path)
    return len(frame)
