"""Sources: read each business unit's extract, map it onto the canonical model,
and write files back to the business units."""

from __future__ import annotations

import pandas as pd

from mdm_pipeline.config.settings import Settings, Source
from mdm_pipeline.sources.mapping import MappedSource, map_extract
from mdm_pipeline.sources.readers import inspect_columns, read_source
from mdm_pipeline.sources.writers import write_back

__all__ = ["MappedSource", "check_columns", "inspect_columns", "load_source", "write_back"]


def load_source(spec: Source, settings: Settings, run_date: pd.Timestamp) -> MappedSource:
    """Read one extract and map it: canonical records plus quarantined rows."""
    return map_extract(read_source(spec, settings), spec, run_date)


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
    return errors
