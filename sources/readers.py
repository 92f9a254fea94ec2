"""Read one business unit's extract into a frame of text columns.

Every row read ends in exactly one of two places: the returned frame (with its
physical line number) or the quarantine frame (with file, line and reason).
Readers never stop on a bad row; they stop only when the whole source is
unusable (missing file, no header), with a `SourceError` naming it.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import sqlalchemy as sa

from mdm_pipeline.config.errors import SourceError
from mdm_pipeline.config.schema import (
    QUARANTINE_COLUMNS,
    SOURCE,
    SOURCE_KEY,
    empty_quarantine,
    only_text,
    text_dtype,
    text_types,
)
from mdm_pipeline.config.settings import CsvSource, ParquetSource, Settings, Source, SqlSource

LINE = "__line__"  # physical line (CSV) or 1-based row number of each row read

#: The text dtype of the stages (Arrow-backed strings).
TEXT = text_dtype()
#: Arrow's CSV block: a row must fit in one. An address is never that long, but a
#: broken quote can swallow a file: the source is then reported unreadable.
BLOCK_BYTES = 16 * 2**20
#: How a Parquet or SQL extract's datetimes are written as text.
ISO_SECONDS = "%Y-%m-%dT%H:%M:%S"


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


#: Undecodable bytes (Python's surrogate escapes, U+DC80 + byte) become characters of
#: a block of Unicode's private use plane, U+F0000 + byte, the block moved on while
#: the file holds such characters itself: unlike surrogates they are valid UTF-8,
#: which Arrow parses, and the rows that hold them are found by a search afterwards.
_ESCAPES = "[\udc80-\udcff]"
_MARK_BASE, _MARK_STEP = 0xF0000, 0x80


def _decoded(data: bytes, encoding: str) -> tuple[bytes, str | None]:
    """The file as UTF-8, and the pattern of the characters standing for undecodable
    bytes (None when every byte decoded).

    A UTF-8 file that decodes is taken as it is; any other is transcoded in one call
    (a second or so per 100 MB)."""
    if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig"):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return data.removeprefix(codecs.BOM_UTF8), None
    text = data.decode(encoding, "surrogateescape").removeprefix("\ufeff")
    if re.search(_ESCAPES, text) is None:
        return text.encode("utf-8"), None
    base = _MARK_BASE
    while re.search(marks := f"[{chr(base)}-{chr(base + _MARK_STEP - 1)}]", text) is not None:
        base += _MARK_STEP
    marked = text.translate({0xDC80 + i: base + i for i in range(_MARK_STEP)})
    return marked.encode("utf-8"), marks


def _read_table(
    data: bytes, spec: CsvSource, location: str, width: int | None = None
) -> tuple[pa.Table, list[tuple[int, int, str]]]:
    """Arrow's CSV parser over the whole file, every value as text, header included
    (its first row): the C++ tokenizer takes quoted values with embedded newlines, any
    delimiter, and rows of the wrong width, which it hands to `invalid` with their
    row number (counted serially, blank lines included) instead of stopping.

    Every column must be read as text (a column left to Arrow's type inference
    would read "007" as 7): the header's width is guessed from the file's first
    64 KiB, and the file read again with the width Arrow found if that fell short."""
    invalid: list[tuple[int, int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, row.actual_columns, row.text))
        return "skip"

    if width is None:
        first = data[: 1 << 16].decode("utf-8", "replace")
        header = csv.reader(io.StringIO(first), delimiter=spec.delimiter, quotechar=spec.quotechar)
        width = len(next(header, []))
    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(
                autogenerate_column_names=True,
                use_threads=False,  # the serial reader numbers the rows it hands back
                block_size=BLOCK_BYTES,
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=spec.delimiter,
                quote_char=spec.quotechar,
                double_quote=True,
                newlines_in_values=True,
                ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={f"f{i}": pa.string() for i in range(max(width, 1))},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise SourceError(f"{location}: source '{spec.name}': no header line") from None
        # Arrow's message can quote the row: only its kind is told.
        reason = "a row longer than 16 MiB" if "straddl" in str(exc) else "unparseable"
        raise SourceError(f"{location}: source '{spec.name}': unreadable CSV ({reason})") from None
    if any(column.type != pa.string() for column in table.columns):
        return _read_table(data, spec, location, table.num_columns)
    return table, invalid


def _newlines(table: pa.Table) -> np.ndarray:
    """Newlines inside each row's values: a row spans that many lines more than one."""
    total = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        total += pc.count_substring(column, "\n").to_numpy(zero_copy_only=False)
    return total


def _blank_rows(data: bytes, lines: np.ndarray, spec: CsvSource) -> np.ndarray:
    """Whether each of these rows of empty values, at these lines, is an empty line of
    the file: Arrow reads an empty line as a row of empty values, which is also what
    a line of bare delimiters gives, and only the latter is a row read.

    Where every line ends with a line feed, a row's line is the file's line of that
    number. A carriage return alone also ends a row (an old Mac file), and then the
    lines cannot be counted without parsing: the csv module's reading of the file,
    which gives an empty line no field at all, tells them apart (a rare file, read
    twice)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    after_return = np.append(buf, 0)[np.flatnonzero(buf == 13) + 1]
    if np.all(after_return == 10):
        ends = np.flatnonzero(buf == 10)
        starts = np.concatenate(([0], ends + 1))
        bounds = np.append(ends, len(buf))
        return np.array([data[starts[i - 1] : bounds[i - 1]] in (b"", b"\r") for i in lines])
    text = io.StringIO(data.decode("utf-8"), newline="")
    rows = csv.reader(text, delimiter=spec.delimiter, quotechar=spec.quotechar)
    line, empty_at = 1, {}
    for row in rows:
        empty_at[line] = not row
        line += 1 + sum(value.count("\n") for value in row)
    return np.array([empty_at.get(int(i), False) for i in lines])


def read_csv(spec: CsvSource, path: Path) -> RawExtract:
    """Read a delimited file with exact physical line numbers.

    Arrow's C++ tokenizer parses the file (the csv module built a Python list
    per row, a tenth of a million records' load); a row's line is the line after
    the previous row's end, from the newlines inside each row's values. Text
    columns come out as Arrow strings, the dtype the stages work in.
    """
    if not path.is_file():
        raise SourceError(f"{path}: source '{spec.name}': file not found")
    location = str(path)
    data, marks = _decoded(path.read_bytes(), spec.encoding)
    table, invalid = _read_table(data, spec, location)
    if table.num_rows == 0:
        raise SourceError(f"{path}: source '{spec.name}': no header line")
    header_row = table.slice(0, 1).to_pylist()[0]
    header = [str(header_row[f"f{i}"]).strip() for i in range(table.num_columns)]
    if header == [""]:
        raise SourceError(f"{path}: source '{spec.name}': no header line")
    if len(set(header)) != len(header):
        raise SourceError(f"{path}: line 1: duplicate column names in header")
    width = len(header)
    header_lines = 1 + int(_newlines(table.slice(0, 1))[0])
    body = table.slice(1).rename_columns(header)

    # Every row after the header, in file order: the parsed ones and, at the places
    # their serial numbers give, the ones of the wrong width.
    n_rows = body.num_rows + len(invalid)
    wrong = np.zeros(n_rows, dtype=bool)
    at = np.array([number - 2 for number, _, _ in invalid], dtype=np.int64)
    wrong[at] = True
    span = np.ones(n_rows, dtype=np.int64)
    span[~wrong] += _newlines(body)
    span[at] += np.array([text.count("\n") for _, _, text in invalid], dtype=np.int64)
    start = header_lines + 1 + np.concatenate(([0], np.cumsum(span)[:-1]))
    parsed_start = start[~wrong]

    empty = np.ones(body.num_rows, dtype=bool)
    for column in body.columns:
        empty &= pc.equal(column, "").to_numpy(zero_copy_only=False)
    blank = np.zeros(body.num_rows, dtype=bool)
    if empty.any():
        blank[empty] = _blank_rows(data, parsed_start[empty], spec)
    undecodable = np.zeros(body.num_rows, dtype=bool)
    if marks is not None:
        for column in body.columns:
            undecodable |= pc.match_substring_regex(column, marks).to_numpy(zero_copy_only=False)

    q_lines = [int(start[i]) for i in at] + [int(x) for x in parsed_start[undecodable]]
    reasons = [f"expected {width} fields, found {n}" for _, n, _ in invalid]
    reasons += [f"bytes not valid in declared encoding {spec.encoding}"] * int(undecodable.sum())
    raws = [text for _, _, text in invalid]
    if undecodable.any():
        rows = body.filter(pa.array(undecodable)).to_pylist()
        raws += [spec.delimiter.join(row.values()) for row in rows]
    if marks is not None:
        raws = [re.sub(marks, "\ufffd", raw) for raw in raws]
    order = np.argsort(q_lines, kind="stable")

    keep = ~blank & ~undecodable
    kept = body if keep.all() else body.filter(pa.array(keep))
    frame = pd.DataFrame(
        {name: pd.array(kept.column(name), dtype=TEXT) for name in header}, index=None
    )
    frame[LINE] = parsed_start[keep]
    return RawExtract(
        source=spec.name,
        location=location,
        rows=frame,
        quarantine=_quarantine(
            spec.name,
            location,
            [q_lines[i] for i in order],
            [reasons[i] for i in order],
            [raws[i] for i in order],
        ),
        rows_read=n_rows - int(blank.sum()),
        fingerprint=_fingerprint(path),
    )


def _datetime_text(series: pd.Series) -> pd.Series:
    """A datetime column written as ISO text to the second (missing stays missing).

    Naive datetimes are floored to the second, as pandas truncates, and written by
    Arrow's cast to text, its space made a "T": in C++, where pandas' `strftime`
    took 0.15 s of a 50,000-row extract and Arrow's 0.06 s (the cast: 3 ms). A
    zoned column keeps pandas', which writes a historic local mean time offset
    (Paris before 1911: +00:09:21) to the minute, where Arrow keeps its seconds."""
    if series.dt.tz is not None:
        return series.dt.strftime(ISO_SECONDS)
    values = pc.floor_temporal(pa.array(series), unit="second").cast(pa.timestamp("s"))
    # "YYYY-MM-DD HH:MM:SS", whatever the year's width: its only space is replaced.
    text = pc.replace_substring(values.cast(pa.string()), " ", "T", max_replacements=1)
    return pd.Series(pd.array(text, dtype=TEXT), index=series.index)


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Every column as text, the way CSV rows arrive: Arrow strings as they are
    (missing as NaN), any other column as Python texts (None for missing)."""
    out = pd.DataFrame(index=frame.index)
    for col in frame.columns:
        series = frame[col]
        if series.dtype == TEXT:  # a Parquet file's text columns, kept in Arrow
            text = series
        elif pd.api.types.is_datetime64_any_dtype(series):
            text = _datetime_text(series)
        else:
            text = series.astype(object).where(series.notna(), None)
            # A text column (most of them) is left as it is: only numbers, decimals,
            # dates or mixed values are written out, one by one.
            if not only_text(text):
                text = text.map(lambda v: v if v is None or isinstance(v, str) else str(v))
        # Arrow texts keep their own missing values; Python ones are None.
        out[str(col)] = text if text.dtype == TEXT else text.where(series.notna(), None)
    return out


def read_parquet(spec: ParquetSource, path: Path) -> RawExtract:
    """Read a Parquet file; the "line" of a row is its 1-based row number."""
    if not path.is_file():
        raise SourceError(f"{path}: source '{spec.name}': file not found")
    try:
        # Text columns stay Arrow strings (`text_types`), as a CSV extract's are: made
        # into a Python string per value, then back into Arrow by the mapping, a
        # 50,000-row extract took 0.3 s more to load (docs/benchmarks.md).
        frame = pq.read_table(path).to_pandas(types_mapper=text_types)
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
