"""Files written back to each business unit, in the format it sent.

A CSV source gets a CSV in its own encoding and delimiter, a Parquet source a
Parquet file, a SQL source a UTF-8 CSV; each has the BU's own columns first,
then the golden ID and the normalised values the pipeline added.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mdm_pipeline.config.schema import contiguous, python_texts
from mdm_pipeline.config.settings import CsvSource, ParquetSource, Source

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

#: Rows turned into CSV text at a time: a million rows' text is hundreds of megabytes,
#: and only one chunk of it is held at once.
CSV_CHUNK_ROWS = 100_000


def _is_text(series: pd.Series) -> bool:
    """Whether a column holds texts (object or string dtype): the columns a spreadsheet
    could read a formula from. A column of another dtype (numbers, flags, dates) is
    written as pandas renders it, never as a formula."""
    return series.dtype == object or isinstance(series.dtype, pd.StringDtype)


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Prefix text cells a spreadsheet would run as a formula (=, +, -, @) with a quote.

    Every text column is checked, object and string dtype alike: an e-mail or an
    RNVP line may start with one of those characters as well as a name can."""
    out = frame.copy()
    for col in out.columns:
        if _is_text(out[col]):
            # As text: a column may mix strings with flags or numbers (a golden record's
            # attributes); a negative number there is written as text too.
            text = out[col].astype("string")
            risky = text.str.startswith(_FORMULA_START).fillna(False).astype(bool)
            if risky.any():
                out[col] = out[col].astype(object).where(~risky, "'" + text.astype(object))
    return out


def _as_arrow_text(series: pd.Series) -> pa.Array:
    """A text column as Arrow strings (null where missing); a value that is not a
    text (a number in an object column) becomes its `str`, as `to_csv` writes it."""
    if isinstance(series.dtype, pd.StringDtype):
        return contiguous(pa.array(series)).cast(pa.string())
    values = series.to_numpy(dtype=object)
    try:
        return pa.array(values, type=pa.string(), from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):
        missing = pd.isna(values)
        texts = np.array([v if isinstance(v, str) else str(v) for v in values], dtype=object)
        texts[missing] = None
        return pa.array(texts, type=pa.string())


def rendered_row_by_row(dtypes: Iterable[object]) -> bool:
    """Whether columns of these dtypes give each row the same text whatever rows are
    rendered beside it (texts, flags, whole numbers). Another dtype is rendered by
    pandas a chunk of rows at a time (dates, say, written without their time when
    no row of the chunk has one): its file must be cut into the same chunks."""
    return all(
        pd.api.types.is_bool_dtype(d)
        or pd.api.types.is_integer_dtype(d)
        or pd.api.types.is_object_dtype(d)
        or isinstance(d, pd.StringDtype)
        for d in dtypes
    )


def _rendered(series: pd.Series, sep: str, quotechar: str) -> pa.Array:
    """A column of another dtype as `to_csv` renders it, quoting included: pandas
    writes it beside a constant column (alone, an empty field would be written as
    two quotes) and each line's constant is cut off."""
    text = pd.DataFrame({"_": 0, "v": series.reset_index(drop=True)}).to_csv(
        header=False, index=False, sep=sep, quotechar=quotechar, lineterminator="\n"
    )
    lines = text.split("\n")[:-1]
    return pa.array([line[1 + len(sep) :] for line in lines], type=pa.string())


def _byte_view(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string array's UTF-8 bytes and its values' start offsets into them (one more
    than values), read in place: the characters a field is checked for are single
    bytes in UTF-8, so that one numpy pass over a column's bytes finds them all."""
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)
    offsets = offsets[values.offset : values.offset + len(values) + 1].astype(np.int64)
    data = values.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return raw, offsets


def _rows_holding(values: pa.Array, chars: str) -> np.ndarray:
    """Which values hold any of `chars`: ASCII ones by their byte, any other (a
    delimiter such as "§") by Arrow's substring search."""
    raw, offsets = _byte_view(values)
    raw = raw[offsets[0] : offsets[-1]]
    hit = np.zeros(len(raw), dtype=bool)
    for c in chars:
        if c.isascii():
            hit |= raw == ord(c)
    where = np.flatnonzero(hit) + offsets[0]
    flags = np.zeros(len(values), dtype=bool)
    flags[np.searchsorted(offsets, where, side="right") - 1] = True
    for c in chars:
        if not c.isascii():
            flags |= pc.match_substring(values, c).to_numpy(zero_copy_only=False)
    return flags


def _rows_starting_with(values: pa.Array, chars: str) -> np.ndarray:
    """Which values start with one of `chars` (ASCII characters)."""
    raw, offsets = _byte_view(values)
    filled = offsets[1:] > offsets[:-1]
    first = np.zeros(len(values), dtype=np.uint8)
    first[filled] = raw[offsets[:-1][filled]]
    return np.isin(first, np.frombuffer(chars.encode("ascii"), dtype=np.uint8))


def _quoted(values: pa.Array, sep: str, quotechar: str) -> pa.Array:
    """Fields quoted as the csv module's minimal quoting does: a field holding the
    delimiter, the quote character or a newline is put in quotes, its quotes
    doubled; missing values are empty fields."""
    values = pc.fill_null(values, "")
    need = _rows_holding(values, sep + quotechar + "\n")
    if not need.any():
        return values
    doubled = pc.replace_substring(values, quotechar, quotechar * 2)
    quoted = pc.binary_join_element_wise(quotechar, doubled, quotechar, "")
    return pc.if_else(pa.array(need), quoted, values)


def _csv_fields(series: pd.Series, sep: str, quotechar: str) -> pa.Array:
    """One column's final field texts: formulas neutralised, quoted where needed."""
    if pd.api.types.is_bool_dtype(series.dtype):
        # Flags, as `to_csv` writes them (True, False, an empty field when missing).
        flags = pa.array(series.to_numpy(dtype=object), type=pa.bool_(), from_pandas=True)
        return _quoted(pc.if_else(flags, "True", "False"), sep, quotechar)
    if pd.api.types.is_integer_dtype(series.dtype):
        whole = pa.array(series, from_pandas=True)  # its own width and sign
        return _quoted(pc.cast(whole, pa.string()), sep, quotechar)
    if not _is_text(series):
        return _rendered(series, sep, quotechar)
    values = pc.fill_null(_as_arrow_text(series), "")
    risky = _rows_starting_with(values, "".join(_FORMULA_START))
    if risky.any():
        values = pc.if_else(pa.array(risky), pc.binary_join_element_wise("'", values, ""), values)
    return _quoted(values, sep, quotechar)


def write_csv(
    frame: pd.DataFrame, path: Path, sep: str = ",", quotechar: str = '"', encoding: str = "utf-8"
) -> None:
    """`frame` as CSV, formulas neutralised: the text `neutralise_formulas` then
    `to_csv(index=False, lineterminator="\\n", errors="replace")` write, built column by
    column in Arrow by chunks of rows (`CsvWriter`).
    """
    if len(frame.columns) < 2:
        # A lone empty field is written as two quotes: pandas knows that case.
        neutralise_formulas(frame).to_csv(
            path,
            sep=sep,
            quotechar=quotechar,
            index=False,
            encoding=encoding,
            errors="replace",
            lineterminator="\n",
        )
        return
    with CsvWriter(path, [str(c) for c in frame.columns], sep, quotechar, encoding) as out:
        out.write(frame)


class CsvWriter:
    """A CSV file written a frame of rows at a time, as `write_csv` writes the frames'
    concatenation (at least two columns): each chunk of `CSV_CHUNK_ROWS` rows is
    rendered on its own, so frames of a multiple of that many rows (all but the
    last) give the whole frame's file byte for byte.

    pandas' writer turns each row into Python objects for the csv module: ten
    seconds of a full run's export at a million records. Characters the encoding
    cannot hold are replaced, as `to_csv(errors="replace")` does.
    """

    def __init__(
        self,
        path: Path,
        columns: list[str],
        sep: str = ",",
        quotechar: str = '"',
        encoding: str = "utf-8",
    ) -> None:
        if len(columns) < 2:
            raise ValueError("CsvWriter writes two columns or more (see write_csv)")
        self.sep, self.quotechar, self.columns = sep, quotechar, columns
        self._utf8 = codecs.lookup(encoding).name == "utf-8"
        self._encoder = codecs.getincrementalencoder(encoding)(errors="replace")
        self._out = path.open("wb")
        header = _quoted(pa.array(columns, type=pa.string()), sep, quotechar).to_pylist()
        self._out.write(self._encoder.encode(sep.join(header) + "\n"))

    def write(self, frame: pd.DataFrame) -> None:
        """The rows of `frame` (the writer's columns, in order)."""
        if [str(c) for c in frame.columns] != self.columns:
            raise ValueError("a frame with other columns than the file's")
        for start in range(0, len(frame), CSV_CHUNK_ROWS):
            part = frame.iloc[start : start + CSV_CHUNK_ROWS]
            fields = [
                _csv_fields(part.iloc[:, i], self.sep, self.quotechar)
                for i in range(len(self.columns))
            ]
            # Each row with its line end: the array's character data is then the
            # chunk's text, written as it lies in memory.
            rows = pc.binary_join_element_wise(*fields, self.sep)
            lines = pc.binary_join_element_wise(rows, "", "\n")
            offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
            data = lines.buffers()[2][offsets[lines.offset] : offsets[lines.offset + len(lines)]]
            if self._utf8:
                self._out.write(data)
            else:
                self._out.write(self._encoder.encode(data.to_pybytes().decode("utf-8")))

    def close(self) -> None:
        if not self._out.closed:
            self._out.write(self._encoder.encode("", final=True))
            self._out.close()

    def __enter__(self) -> CsvWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def return_path(spec: Source, out_dir: Path) -> Path:
    """Where a BU's return file goes."""
    suffix = "parquet" if isinstance(spec, ParquetSource) else "csv"
    return out_dir / f"{spec.name}_return.{suffix}"


def write_back(spec: Source, raw: pd.DataFrame, added: pd.DataFrame, out_dir: Path) -> Path:
    """Write one BU's return file and return its path."""
    return write_back_pieces(spec, [(raw, added)], out_dir)


def write_back_pieces(
    spec: Source, pieces: Iterable[tuple[pd.DataFrame, pd.DataFrame]], out_dir: Path
) -> Path:
    """One BU's return file from its rows a piece at a time, (extract rows, added
    columns) each, in order: the file `write_back` writes for their concatenation.
    A CSV file of two columns or more holds one piece at a time (`CsvWriter`), so
    pieces of a multiple of `CSV_CHUNK_ROWS` rows give the same file; a Parquet
    file, or a CSV of one column, is written from the pieces together."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = return_path(spec, out_dir)
    # A Parquet extract's text columns are kept in Arrow (`readers.read_parquet`) and
    # written back as the Python texts they were read as before: the file's schema
    # (its pandas metadata) stays as it was.
    parquet = isinstance(spec, ParquetSource)
    frames = (
        pd.concat(
            [
                (python_texts(raw) if parquet else raw).reset_index(drop=True),
                added.reset_index(drop=True),
            ],
            axis=1,
        )
        for raw, added in pieces
    )
    first = next(frames, None)
    if first is None:
        raise ValueError("no rows to write back")
    options = (
        {"sep": spec.delimiter, "quotechar": spec.quotechar, "encoding": spec.encoding}
        if isinstance(spec, CsvSource)
        else {}
    )
    if isinstance(spec, ParquetSource) or len(first.columns) < 2:
        rest = list(frames)
        whole = pd.concat([first, *rest], ignore_index=True) if rest else first
        if isinstance(spec, ParquetSource):
            whole.to_parquet(path, index=False)
        else:
            write_csv(whole, path, **options)
        return path
    with CsvWriter(path, [str(c) for c in first.columns], **options) as writer:
        writer.write(first)
        for frame in frames:
            writer.write(frame)
    return path
