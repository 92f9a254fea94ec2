"""Files written back to each business unit, in the format it sent.

A CSV source gets a CSV in its own encoding and delimiter, a Parquet source a
Parquet file, a SQL source a UTF-8 CSV; each has the BU's own columns first,
then the golden ID and the normalised values the pipeline added.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mdm_pipeline.config.settings import CsvSource, ParquetSource, Source

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Prefix text cells a spreadsheet would run as a formula (=, +, -, @) with a quote."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object:
            # As text: a column may mix strings with flags or numbers (a golden record's
            # attributes); a negative number there is written as text too.
            text = out[col].astype("string")
            risky = text.str.startswith(_FORMULA_START).fillna(False).astype(bool)
            if risky.any():
                out[col] = out[col].where(~risky, "'" + text.astype(object))
    return out


def write_back(spec: Source, raw: pd.DataFrame, added: pd.DataFrame, out_dir: Path) -> Path:
    """Write one BU's return file and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.concat([raw.reset_index(drop=True), added.reset_index(drop=True)], axis=1)
    if isinstance(spec, ParquetSource):
        path = out_dir / f"{spec.name}_return.parquet"
        frame.to_parquet(path, index=False)
        return path
    frame = neutralise_formulas(frame)
    path = out_dir / f"{spec.name}_return.csv"
    if isinstance(spec, CsvSource):
        frame.to_csv(
            path,
            sep=spec.delimiter,
            quotechar=spec.quotechar,
            index=False,
            encoding=spec.encoding,
            errors="replace",
            lineterminator="\n",
        )
    else:
        frame.to_csv(path, index=False, encoding="utf-8", lineterminator="\n")
    return path
