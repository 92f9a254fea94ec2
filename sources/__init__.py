"""Sources: read each business unit's extract, map it onto the canonical model,
and write files back to the business units."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from mdm_pipeline.config.settings import Settings, Source
from mdm_pipeline.sources.mapping import MappedSource, map_extract
from mdm_pipeline.sources.readers import inspect_columns, read_source
from mdm_pipeline.sources.writers import write_back

__all__ = ["MappedSource", "check_columns", "inspect_columns", "load_source", "write_back"]


def load_source(spec: Source, settings: Settings, run_date: pd.Timestamp) -> MappedSource:
    """Read one extract and map it: canonical records plus quarantined rows.

    A delta extract's deletion rows are set apart first (they need only their
    key): they are neither records nor quarantine, and are counted as deletions.
    """
    extract = read_source(spec, settings)
    if spec.delta is None:
        return map_extract(extract, spec, run_date)
    rows = extract.rows
    op = rows[spec.delta.operation_column].fillna("").astype(str).str.strip().str.upper()
    key_column = spec.mapping.specs()["source_key"].source_columns[0]
    key = rows[key_column].fillna("").astype(str).str.strip()
    # A deletion without a key cannot be applied: mapped as a record, it is
    # quarantined for its empty key like any other row.
    is_delete = (
        op.isin([v.strip().upper() for v in spec.delta.delete_values]) & (key != "")
    ).to_numpy()
    mapped = map_extract(replace(extract, rows=rows[~is_delete]), spec, run_date)
    return replace(mapped, deleted=key[is_delete].reset_index(drop=True))


def check_columns(spec: Source, settings: Settings, label: str, index: int) -> list[str]:
    """Config errors for mapped columns the extract does not have (empty when all exist)."""
    present = set(inspect_columns(spec, settings))
    errors = []
    for field, fspec in spec.mapping.specs().items():
        for col in fspec.source_columns:
            if col not in present:
                errors.append(
                    f"{label}: sources[{index}].mapping.{field}: column '{col}' "
                    f"not found in source '{spec.name}'"
                )
    if spec.delta is not None and spec.delta.operation_column not in present:
        errors.append(
            f"{label}: sources[{index}].delta.operation_column: column "
            f"'{spec.delta.operation_column}' not found in source '{spec.name}'"
        )
    return errors
