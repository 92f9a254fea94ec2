"""Read one business unit's extract into a frame of text columns.

Every row read ends in exactly one of two places: the returned frame (with its
physical line number) or the quarantine frame (with file, line and reason).
Readers never stop on a bad row; they stop only when the whole source is
unusable (missing file, no header), with a `SourceError` naming it.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from mdm_pipeline.config.errors import SourceError
from mdm_pipeline.config.schema import QUARANTINE_COLUMNS, SOURCE, SOURCE_KEY, empty_quarantine
from mdm_pipeline.config.settings import CsvSource, ParquetSource, Settings, Source, SqlSource

LINE = "__line__"  # physical line (CSV) or 1-based row number of each row read

# Python's csv module refuses fields above 128 KiB by default; an address is never that long,
# but a broken quote can swallow a file: raise the cap and report the row instead.
csv.field_size_limit(16 * 1024 * 1024)


@dataclass(frozen=True)
class RawExtract:
    """What a reader returns: the rows as text, and the rows it could not read."""

    source: str
    location: str
    rows: pd.DataFrame  # text columns as in the extract, plus LINE
    quarantine: pd.DataFrame  # QUARANTINE_COLUMNS
    rows_read: int  # data rows seen (blank lines excluded)
    fingerprint: str  # identifies the input for the run manifest


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}"


def _quarantine(
    source: str, location: str, lines: list[int], reasons: list[str], raws: list[str]
) -> pd.DataFrame:
    if not lines:
        return empty_quarantine()
    return pd.DataFrame(
        {
            SOURCE: source,
            "location": location,
            "line": lines,
            SOURCE_KEY: None,
            "reason": reasons,
            "raw": raws,
        },
        columns=list(QUARANTINE_COLUMNS),
    )


def _has_undecodable(series: pd.Series) -> pd.Series:
    """Rows whose text held bytes invalid in the declared encoding (kept as surrogates)."""
    return series.str.contains("[\udc80-\udcff]", regex=True)


def read_csv(spec: CsvSource, path: Path) -> RawExtract:
    """Read a delimited file with exact physical line numbers.

    The C tokenizer of the csv module handles quoted fields with embedded
    newlines and any delimiter; `list(reader)` keeps the row loop in C. Line
    numbers are then derived from the newlines inside each row, vectorised.
    """
    if not path.is_file():
        raise SourceError(f"{path}: source '{spec.name}': file not found")
    location = str(path)
    with path.open("r", encoding=spec.encoding, errors="surrogateescape", newline="") as handle:
        try:
            rows = list(csv.reader(handle, delimiter=spec.delimiter, quotechar=spec.quotechar))
        except csv.Error as exc:
            raise SourceError(f"{path}: source '{spec.name}': unreadable CSV ({exc})") from None
    if not rows or not rows[0]:
        raise SourceError(f"{path}: source '{spec.name}': no header line")
    header = [h.strip() for h in rows[0]]
    if spec.encoding == "utf-8" and header and header[0].startswith("\ufeff"):
        header[0] = header[0].lstrip("\ufeff")  # UTF-8 with BOM declared as plain UTF-8
    if len(set(header)) != len(header):
        raise SourceError(f"{path}: line 1: duplicate column names in header")
    body = rows[1:]
    width = len(header)
    lengths = np.fromiter(map(len, body), dtype=np.int64, count=len(body))
    good = lengths == width
    blank = lengths == 0

    # Newlines inside each row: '\n'.join(row) has len(row)-1 separators plus embedded ones.
    joined = pd.Series(list(map("\x1f".join, body)), dtype=object)
    embedded = joined.str.count("\n").to_numpy(dtype=np.int64)
    header_lines = "\x1f".join(rows[0]).count("\n") + 1
    # A row starts on the line after the previous row ended.
    span = embedded + 1
    start = header_lines + 1 + np.concatenate(([0], np.cumsum(span)[:-1]))

    undecodable = np.zeros(len(body), dtype=bool)
    if len(body):
        undecodable = _has_undecodable(joined).to_numpy(dtype=bool)

    bad = ~good & ~blank
    reasons: list[str] = []
    q_lines: list[int] = []
    raws: list[str] = []
    bad_idx = np.flatnonzero(bad | (good & undecodable))
    for i in bad_idx:  # only the (few) broken rows are looked at one by one
        if not good[i]:
            reasons.append(f"expected {width} fields, found {lengths[i]}")
        else:
            reasons.append(f"bytes not valid in declared encoding {spec.encoding}")
        q_lines.append(int(start[i]))
        raws.append(joined.iat[i].encode("utf-8", "surrogateescape").decode("utf-8", "replace"))

    keep = good & ~undecodable
    frame = (
        pd.DataFrame(
            [r for r, k in zip(body, keep, strict=True) if k] if not keep.all() else body,
            columns=header,
            dtype=object,
        )
        if keep.any()
        else pd.DataFrame({h: pd.Series(dtype=object) for h in header})
    )
    frame[LINE] = start[keep]
    return RawExtract(
        source=spec.name,
        location=location,
        rows=frame.reset_index(drop=True),
        quarantine=_quarantine(spec.name, location, q_lines, reasons, raws),
        rows_read=int((~blank).sum()),
        fingerprint=_fingerprint(path),
    )


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Every column as text (None for missing), the way CSV rows arrive."""
    out = pd.DataFrame(index=frame.index)
    for col in frame.columns:
        series = frame[col]
        if pd.api.types.is_datetime64_any_dtype(series):
            text = series.dt.strftime("%Y-%m-%dT%H:%M:%S")
        else:
            text = series.astype(object).where(series.notna(), None)
            text = text.map(lambda v: v if v is None or isinstance(v, str) else str(v))
        out[str(col)] = text.where(series.notna(), None)
    return out


def read_parquet(spec: ParquetSource, path: Path) -> RawExtract:
    """Read a Parquet file; the "line" of a row is its 1-based row number."""
    if not path.is_file():
        raise SourceError(f"{path}: source '{spec.name}': file not found")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise SourceError(f"{path}: source '{spec.name}': unreadable Parquet ({exc})") from None
    frame = _as_text(frame.reset_index(drop=True))
    frame[LINE] = np.arange(1, len(frame) + 1)
    return RawExtract(
        spec.name, str(path), frame, empty_quarantine(), len(frame), _fingerprint(path)
    )


def read_sql(spec: SqlSource) -> RawExtract:
    """Read a table or query; the "line" of a row is its 1-based position in the result."""
    url = spec.url if spec.url is not None else os.environ.get(spec.url_env or "")
    if not url:
        raise SourceError(f"source '{spec.name}': environment variable {spec.url_env} is not set")
    label = f"{spec.name}:{spec.table}" if spec.table else f"{spec.name}:query"
    query = (
        sa.select(sa.text("*")).select_from(sa.table(spec.table))
        if spec.table
        else sa.text(spec.query or "")
    )
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            frame = pd.read_sql(query, conn)
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(
            f"source '{spec.name}': SQL read failed ({exc.__class__.__name__}: "
            f"{str(getattr(exc, 'orig', exc)).splitlines()[0]})"
        ) from None
    finally:
        engine.dispose()
    frame = _as_text(frame)
    frame[LINE] = np.arange(1, len(frame) + 1)
    return RawExtract(
        spec.name, label, frame, empty_quarantine(), len(frame), f"{label}:{len(frame)}"
    )


def read_source(spec: Source, settings: Settings) -> RawExtract:
    """Dispatch on the source's format."""
    if isinstance(spec, CsvSource):
        return read_csv(spec, settings.resolve(spec.path))
    if isinstance(spec, ParquetSource):
        return read_parquet(spec, settings.resolve(spec.path))
    return read_sql(spec)


def inspect_columns(spec: Source, settings: Settings) -> list[str]:
    """The extract's column names, read cheaply (header, schema or an empty query)."""
    if isinstance(spec, CsvSource):
        path = settings.resolve(spec.path)
        if not path.is_file():
            raise SourceError(f"{path}: source '{spec.name}': file not found")
        with path.open("r", encoding=spec.encoding, errors="replace", newline="") as handle:
            first = next(
                csv.reader(
                    io.StringIO(handle.read(1 << 16)),
                    delimiter=spec.delimiter,
                    quotechar=spec.quotechar,
                ),
                [],
            )
        return [c.strip().lstrip("\ufeff") for c in first]
    if isinstance(spec, ParquetSource):
        import pyarrow.parquet as pq

        path = settings.resolve(spec.path)
        if not path.is_file():
            raise SourceError(f"{path}: source '{spec.name}': file not found")
        return list(pq.read_schema(path).names)
    extract = read_sql(spec)
    return [c for c in extract.rows.columns if c != LINE]
