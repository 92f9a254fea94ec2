"""Read La Poste return (PND/NPAI) files with the layout declared in the configuration."""

from __future__ import annotations

import pandas as pd

from mdm_pipeline.config.errors import ConfigError
from mdm_pipeline.config.settings import CsvSource, NpaiReturnFile, Settings
from mdm_pipeline.sources.readers import LINE, read_csv


def read_returns(spec: NpaiReturnFile, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(returns, quarantine): source, source_key, return_date, reason_text per readable row.

    Rows without a key or with an unreadable date go to quarantine with their line.
    """
    path = settings.resolve(spec.path)
    csv_spec = CsvSource.model_validate(
        {
            "name": "npai",
            "format": "csv",
            "path": path,
            "encoding": spec.encoding,
            "delimiter": spec.delimiter,
            "mapping": {"source_key": {"constant": "-"}},
        }
    )
    raw = read_csv(csv_spec, path)
    # Python strings, as the state of the flags they join holds them (a return file is
    # small: thousands of rows).
    rows = raw.rows.astype(dict.fromkeys(raw.rows.columns.drop(LINE), object))
    for i, col in enumerate(
        (spec.source_column, spec.key_column, spec.date_column, spec.reason_column)
    ):
        if col not in rows.columns:
            name = ("source_column", "key_column", "date_column", "reason_column")[i]
            raise ConfigError(f"{path.name}: npai_returns: {name}: column '{col}' not found")
    date = pd.to_datetime(rows[spec.date_column], format=spec.date_format, errors="coerce")
    key = rows[spec.key_column].str.strip()
    bad = date.isna() | key.isna() | (key == "")
    returns = pd.DataFrame(
        {
            "source": rows[spec.source_column].str.strip(),
            "source_key": key,
            "return_date": date.dt.strftime("%Y-%m-%d"),
            "reason_text": rows[spec.reason_column],
        }
    )[~bad].reset_index(drop=True)
    quarantine = pd.concat(
        [
            raw.quarantine,
            pd.DataFrame(
                {
                    "source": "npai",
                    "location": str(path),
                    "line": rows.loc[bad, LINE],
                    "source_key": key[bad],
                    "reason": "return date or record key unreadable",
                    "raw": "",
                }
            ),
        ],
        ignore_index=True,
    )
    return returns, quarantine
