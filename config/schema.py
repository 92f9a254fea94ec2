"""The canonical customer model: the column contract between stages.

Every source is mapped onto these columns (docs/canonical-model.md). The raw
text of each mapped field is kept as-is; normalisation adds `*_norm` columns
beside it so that auditors and return files can always show what the business
unit sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas is imported where frames are made: `mdm why` never needs it
    import numpy as np
    import pandas as pd
    import pyarrow as pa

from mdm_pipeline.config.errors import DataContractError

# Identification and lineage, set by the loader.
SOURCE = "source"
SOURCE_KEY = "source_key"
SOURCE_LINE = "source_line"  # physical line (CSV) or 1-based row number (Parquet, SQL)
RECORD_TYPE = "record_type"  # "person" | "organisation"
TRUST = "trust"

# Text fields mapped from the business units' columns (raw, as sent).
TEXT_FIELDS: tuple[str, ...] = (
    "civility",
    "first_name",
    "last_name",
    "birth_name",
    "email",
    "phone",
    "address_lines",  # all raw address lines, newline-separated, in the order sent
    "postcode",
    "city",
    "country",
    "company_name",
    "siren",
    "siret",
    "customer_ref",  # a customer number shared across units (loyalty card, account)
)
DATE_FIELDS: tuple[str, ...] = ("birth_date",)
DATETIME_FIELDS: tuple[str, ...] = ("source_updated_at",)
BOOL_FIELDS: tuple[str, ...] = ("consent_email", "consent_sms", "consent_post")

#: Fields a source mapping may fill (besides `source_key` and `full_name`).
MAPPABLE_FIELDS: tuple[str, ...] = (
    RECORD_TYPE,
    *TEXT_FIELDS,
    *DATE_FIELDS,
    *DATETIME_FIELDS,
    *BOOL_FIELDS,
)

#: Typed fields keep their raw text in `<field>_raw`.
TYPED_FIELDS: tuple[str, ...] = DATE_FIELDS + DATETIME_FIELDS + BOOL_FIELDS

CANONICAL_COLUMNS: tuple[str, ...] = (
    SOURCE,
    SOURCE_KEY,
    SOURCE_LINE,
    RECORD_TYPE,
    TRUST,
    *TEXT_FIELDS,
    *DATE_FIELDS,
    *DATETIME_FIELDS,
    *BOOL_FIELDS,
    *tuple(f"{f}_raw" for f in TYPED_FIELDS),
    "quality_codes",  # '|'-joined codes of what was wrong with the record's values
)

RECORD_TYPES = ("person", "organisation")

# Quarantine frame: one row per input row that did not become a record.
QUARANTINE_COLUMNS: tuple[str, ...] = (
    SOURCE,
    "location",  # file path or table/query label
    "line",
    SOURCE_KEY,
    "reason",
    "raw",  # the row as read, kept for reprocessing (store only, never logged)
)


def record_keys(frame: pd.DataFrame) -> pd.Index:
    """(source, source_key) as one text per record: one hash table serves every lookup.

    Joined in Arrow when both columns are texts without gaps (a million records'
    keys in a tenth of the time of Python string additions); other values (a
    numeric key, a missing one) take pandas' `astype(str)`, as they always did.
    """
    import pandas as pd  # here, not at the top: see the import above

    joined = joined_keys(frame)
    if joined is None:
        return pd.Index(frame[SOURCE].astype(str) + KEY_SEPARATOR + frame[SOURCE_KEY].astype(str))
    return pd.Index(joined.to_numpy(zero_copy_only=False), dtype=object)


#: Between a record's source and key in `record_keys`' texts.
KEY_SEPARATOR = "\x1f"


def joined_keys(frame: pd.DataFrame) -> pa.Array | None:
    """`record_keys`' texts as one Arrow array, when both columns are texts without
    gaps; None otherwise (`record_keys` then joins them in pandas)."""
    import pyarrow as pa  # here, not at the top: see the import above

    try:
        source = pa.array(frame[SOURCE], type=pa.string(), from_pandas=True)
        key = pa.array(frame[SOURCE_KEY], type=pa.string(), from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    return join_key_arrays(source, key)


def join_key_arrays(
    source: pa.Array | pa.ChunkedArray, key: pa.Array | pa.ChunkedArray
) -> pa.Array | pa.ChunkedArray | None:
    """`record_keys`' texts of two Arrow text columns, row by row; None if a key is
    missing (its text would not be `record_keys`')."""
    import pyarrow.compute as pc  # here, not at the top: see the import above

    if source.null_count or key.null_count:
        return None
    return pc.binary_join_element_wise(source, key, KEY_SEPARATOR)


def require_columns(frame: pd.DataFrame, columns: Iterable[str], boundary: str) -> None:
    """Fail loudly when a stage receives a frame missing columns it relies on."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataContractError(f"{boundary}: missing columns {', '.join(missing)}")


def empty_quarantine() -> pd.DataFrame:
    """A quarantine frame with no rows and the contract's columns."""
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype="object") for c in QUARANTINE_COLUMNS})


def contiguous(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """An Arrow column in one piece. A text column of records concatenated from
    several sources, sliced, is a chunked array (`pa.array` of a pandas column gives
    one when the column has several chunks), whose bytes cannot be read in place:
    its chunks are copied together; a plain array is taken as it is."""
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    return values


def distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values of an array, sorted: `np.unique(values)`.

    Integers (cluster labels, positions, key hashes, random ID tails) are sorted,
    then each value unlike the one before it kept: numpy 2.4's `np.unique` finds
    them another way, 30 times slower (a million cluster labels: 0.47 s against
    0.015 s). Other kinds (floats with NaN, objects) are left to `np.unique`.
    """
    import numpy as np

    values = np.asarray(values).ravel()
    if values.dtype.kind not in "biu":
        return np.unique(values)  # noqa: TID251 (not integers: it sorts)
    ordered = np.sort(values)
    keep = np.ones(len(ordered), dtype=bool)
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def in_one_piece(frame: pd.DataFrame) -> None:
    """Each Arrow column of `frame` in one piece, in place (a frame concatenated from
    several sources holds each as chunks). Arrow takes rows from a chunked column by
    copying its chunks together first: every chunk of rows a stage takes (the store
    writes a million records in forty) copied whole columns, 7-9 times the take's own
    time, and as much memory again at that moment. The column is replaced in the
    frame itself, so that its chunks are freed as soon as nothing else holds them."""
    import pandas as pd
    import pyarrow as pa

    for name in frame.columns:
        values = frame[name].array
        if not isinstance(values, pd.arrays.ArrowExtensionArray | pd.arrays.ArrowStringArray):
            continue
        chunked = pa.array(values)
        if isinstance(chunked, pa.ChunkedArray) and chunked.num_chunks > 1:
            frame[name] = pd.array(chunked.combine_chunks(), dtype=frame[name].dtype)


def only_text(values: pd.Series) -> bool:
    """Whether every value is a Python string or missing (an all-missing column too):
    such a column can be handed on as the stages' text (`text_dtype`) or left as it is
    without writing a value out; any other (numbers, dates, mixed) needs that."""
    import pandas as pd

    return pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty")


def text_dtype() -> pd.StringDtype:
    """The dtype of every text column the stages hand each other.

    pandas' Arrow-backed strings, missing as NaN (pandas 3's default): a column
    is one buffer of UTF-8 bytes, not a Python object per value. At a million
    records with some forty text columns that is gigabytes less to hold, and the
    `.str` methods run in Arrow's kernels instead of a Python loop.
    """
    import numpy as np
    import pandas as pd

    return pd.StringDtype("pyarrow", na_value=np.nan)


def row_hashes(values: pd.DataFrame | pd.Series) -> np.ndarray:
    """`pd.util.hash_pandas_object(values, index=False)`: the same 64-bit value per row,
    its text columns hashed by their distinct values, found in Arrow.

    Stores keep such hashes (a record's as its source sent it, a flagged address),
    so they must not change. pandas hashes an Arrow text column by making a
    Python string of every value, finding the distinct ones in a hash table of
    Python objects, then encoding each to UTF-8 and hashing its bytes: two
    seconds of a million records' load. Its hash of a column is by design the
    column's as categories (each distinct value hashed once, missing ones at the
    highest value), so the distinct values are found by Arrow's dictionary
    encoding instead and handed to pandas as categories of UTF-8 bytes, which it
    hashes as it hashes the texts. A test compares both on random frames."""
    import numpy as np
    import pandas as pd

    if isinstance(values, pd.Series):
        hashed = pd.util.hash_pandas_object(pd.Series(_as_categories(values)), index=False)
    else:
        columns = {name: _as_categories(values[name]) for name in values.columns}
        hashed = pd.util.hash_pandas_object(pd.DataFrame(columns, copy=False), index=False)
    return hashed.to_numpy(np.uint64)


def _as_categories(values: pd.Series) -> pd.api.extensions.ExtensionArray:
    """A text column of the stages' dtype as categories of UTF-8 bytes (`row_hashes`);
    any other column's values as they are."""
    import pandas as pd
    import pyarrow as pa

    if values.dtype != text_dtype():
        return values.array
    encoded = contiguous(pa.array(values.array)).dictionary_encode()
    distinct_values = encoded.dictionary.cast(pa.binary()).to_numpy(zero_copy_only=False)
    return pd.Categorical.from_codes(
        encoded.indices.fill_null(-1).to_numpy(),
        dtype=pd.CategoricalDtype(pd.Index(distinct_values, dtype=object)),
        validate=False,
    )


def python_texts(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with its `text_dtype` columns as Python texts (None for missing), where
    a value must be a Python object (JSON) or a dtype would be recorded (Parquet)."""
    text = [c for c in frame.columns if frame[c].dtype == text_dtype()]
    if not text:
        return frame
    out = frame.copy(deep=False)
    for c in text:
        out[c] = frame[c].to_numpy(dtype=object, na_value=None)
    return out


def text_types(arrow_type: pa.DataType) -> pd.StringDtype | None:
    """`to_pandas`'s types mapper for the stages' texts: an Arrow text column becomes
    `text_dtype` (its buffers kept, no Python string per value), any other type what
    Arrow makes of it."""
    import pyarrow as pa

    return text_dtype() if arrow_type in (pa.string(), pa.large_string()) else None
