"""Stand-alone address cleaning (`mdm rnvp`): one CSV in, the same CSV plus RNVP columns out.

A business unit can clean a file without a deployment configuration; the
same reader (quarantine of unreadable rows, line numbers) and the same
normaliser as the nightly job are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mdm_pipeline.config.errors import ConfigError
from mdm_pipeline.config.settings import CsvSource
from mdm_pipeline.normalize.addresses import ADDRESS_COLUMNS, normalize_addresses
from mdm_pipeline.normalize.text import fold
from mdm_pipeline.sources.readers import LINE, read_csv
from mdm_pipeline.sources.writers import write_csv


@dataclass
class RnvpSummary:
    """What `clean_addresses_file` did."""

    rows_read: int
    rows_written: int
    quarantined: int
    status: dict[str, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    npai_risk: int = 0
    quarantine_file: str | None = None


def clean_addresses_file(
    in_path: Path,
    out_path: Path,
    address_columns: list[str],
    postcode_column: str | None,
    city_column: str | None,
    country_column: str | None = None,
    name_column: str | None = None,
    encoding: str = "utf-8",
    delimiter: str = ",",
    default_country: str = "FR",
) -> RnvpSummary:
    """Write `in_path` again to `out_path` with the NF Z10-011 lines, components and status."""
    spec = CsvSource.model_validate(
        {
            "name": "rnvp",
            "format": "csv",
            "path": in_path,
            "encoding": encoding,
            "delimiter": delimiter,
            "mapping": {"source_key": {"constant": "-"}},
        }
    )
    raw = read_csv(spec, in_path)
    rows = raw.rows
    wanted = [*address_columns, postcode_column, city_column, country_column, name_column]
    missing = [c for c in wanted if c is not None and c not in rows.columns]
    if missing:
        raise ConfigError(
            f"{in_path}: column '{missing[0]}' not found "
            f"(columns: {', '.join(c for c in rows.columns if c != LINE)})"
        )

    def col(name: str | None) -> pd.Series:
        if name is None:
            return pd.Series(None, index=rows.index, dtype=object)
        text = rows[name].str.strip()
        return text.where(text.notna() & (text != ""), None)

    lines = col(address_columns[0])
    for name in address_columns[1:]:
        part = col(name)
        both = lines.notna() & part.notna()
        lines = lines.where(~both, lines + "\n" + part).where(lines.notna() | part.isna(), part)
    country = fold(col(country_column)).fillna(default_country)
    result = normalize_addresses(
        lines, col(postcode_column), col(city_column), country, col(name_column)
    )
    out = pd.concat([rows.drop(columns=[LINE]), result], axis=1)
    write_csv(out, out_path, sep=delimiter, encoding=encoding)
    summary = RnvpSummary(
        rows_read=raw.rows_read,
        rows_written=len(out),
        quarantined=len(raw.quarantine),
        status=result["address_status"].value_counts().to_dict(),
        codes=result["address_codes"].dropna().str.split("|").explode().value_counts().to_dict(),
        npai_risk=int(result["npai_risk"].sum()),
    )
    if len(raw.quarantine):
        q_path = out_path.with_suffix(out_path.suffix + ".quarantine.csv")
        raw.quarantine[["location", "line", "reason"]].to_csv(q_path, index=False)
        summary.quarantine_file = str(q_path)
    return summary


assert "address_status" in ADDRESS_COLUMNS
