"""One JSON object per row of a frame, in Arrow, with exactly the text pandas writes.

Stored payloads and golden records are hashed on their JSON text, so the text
must never change from one version of the pipeline to the next: a changed
byte would make every stored record look changed. That text is what
`DataFrame.to_json(orient="records", date_format="iso", force_ascii=False)`
writes for each row. pandas' encoder visits every value as a Python object
(20 s of a full run at a million records); here each column's values are
rendered once, vectorised, and the rows are joined in Arrow:

- texts: quoted, with `"`, `\\` and `/` escaped as pandas does; the rare text
  holding a control character takes `json.dumps` (pandas' escapes are JSON's);
- flags and whole numbers: Arrow's own rendering, which is pandas';
- any other column (dates, decimals, mixed objects): each distinct value is
  rendered by pandas itself, then taken per row.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from mdm_pipeline.config import schema
from mdm_pipeline.config.schema import contiguous


def _pandas_values(values: pd.Series) -> pa.Array:
    """Values as pandas' JSON encoder writes them: a one-column frame encoded as
    lines, each line's key and braces cut off in Arrow."""
    if not len(values):
        return pa.array([], type=pa.string())
    frame = pd.DataFrame({"v": values.to_numpy()})
    text = frame.to_json(orient="records", lines=True, date_format="iso", force_ascii=False)
    lines = pc.split_pattern(pa.array([text.rstrip("\n")], type=pa.large_string()), "\n")
    cut = pc.utf8_slice_codeunits(lines.flatten(), len('{"v":'), -1)
    return cut.cast(pa.string())


def _missing_as_null(texts: pa.Array) -> pa.Array:
    """pandas' rendered values with its "null" as a missing value ("null" is only ever
    one: a text "null" is quoted)."""
    return pc.if_else(pc.equal(texts, "null"), pa.scalar(None, pa.string()), texts)


def _distinct_values(series: pd.Series) -> pa.Array:
    """A column of few distinct values (dates, numbers): each rendered once by pandas,
    missing ones null."""
    codes, uniques = pd.factorize(series)
    texts = _missing_as_null(_pandas_values(pd.Series(uniques)))
    return texts.take(pa.array(codes, mask=codes < 0))


#: The escapes JSON has a short form for, in the order they are applied (the backslash
#: first: the others add backslashes). pandas also escapes "/".
_SHORT_ESCAPES = (
    ("\\", "\\\\"),
    ('"', '\\"'),
    ("/", "\\/"),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\t", "\\t"),
    ("\b", "\\b"),
    ("\f", "\\f"),
)
#: Control characters JSON writes as \u00XX.
_LONG_ESCAPES = np.array([c for c in range(32) if chr(c) not in "\n\r\t\b\f"], dtype=np.uint8)


def _utf8_bytes(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string array's UTF-8 bytes (those of its values only) and its offsets into them."""
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)
    offsets = offsets[values.offset : values.offset + len(values) + 1].astype(np.int64)
    data = values.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return raw[offsets[0] : offsets[-1]], offsets - offsets[0]


def json_texts(values: pa.Array) -> pa.Array:
    """Text values as pandas writes them in JSON ("null" where missing)."""
    return pc.fill_null(_quoted(values), "null")


def _quoted(values: pa.Array, prefix: str = "") -> pa.Array:
    """Text values as pandas writes them in JSON after `prefix`, missing ones null.

    One count of the column's bytes says which escapes it needs (all are single
    bytes in UTF-8): a column without any is only quoted, and each escape a
    column does need is one replacement over it. A value holding a control
    character without a short escape (rare) takes `json.dumps`. The prefix (a
    member's key) goes into the join that quotes: one pass over the texts fewer."""
    raw, offsets = _utf8_bytes(values)
    present = np.bincount(raw, minlength=256)
    escaped = values
    for char, escape in _SHORT_ESCAPES:
        if present[ord(char)]:
            escaped = pc.replace_substring(escaped, char, escape)
    quoted = pc.binary_join_element_wise(prefix + '"', escaped, '"', "")
    if present[_LONG_ESCAPES].any():
        hit = np.flatnonzero(np.isin(raw, _LONG_ESCAPES))
        where = schema.distinct(np.searchsorted(offsets, hit, side="right") - 1)
        fixed = quoted.to_numpy(zero_copy_only=False).astype(object)
        fixed[where] = [
            prefix + json.dumps(v, ensure_ascii=False).replace("/", "\\/")
            for v in values.take(pa.array(where)).to_pylist()
        ]
        quoted = pa.array(fixed, type=pa.string(), from_pandas=True)
    return quoted


def as_texts(series: pd.Series) -> pa.Array | None:
    """A column as Arrow strings if it holds only texts and missing values, else None."""
    if isinstance(series.dtype, pd.StringDtype):
        # Already Arrow strings (the normalised columns): taken as they are, in one piece.
        return contiguous(pa.array(series)).cast(pa.string())
    if series.dtype != object:
        return None
    try:
        return pa.array(series.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):
        return None


def _members(series: pd.Series, prefix: str = "") -> pa.Array:
    """One column's values as JSON texts after `prefix`, missing ones null: a sparse
    row leaves them out without looking at its texts again."""
    texts = as_texts(series)
    if texts is not None:
        return _quoted(texts, prefix)
    values = _values(series)
    return pc.binary_join_element_wise(prefix, values, "") if prefix else values


def _values(series: pd.Series) -> pa.Array:
    """A column of other values than texts as JSON texts, missing ones null."""
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        flags = pa.array(series.to_numpy(dtype=object), type=pa.bool_(), from_pandas=True)
        return pc.if_else(flags, "true", "false")
    if pd.api.types.is_integer_dtype(dtype):
        whole = pa.array(series, from_pandas=True)  # its own width and sign
        return pc.cast(whole, pa.string())
    if dtype == np.dtype(object):
        # Mixed values (a number beside a text): factorising would take 1, 1.0 and True
        # for one value, so pandas renders every row.
        return _missing_as_null(_pandas_values(series))
    return _distinct_values(series)


def json_rows(frame: pd.DataFrame, sparse: bool = False) -> pa.Array:
    """Each row of `frame` as the JSON object pandas writes for it (see the module).

    `sparse` leaves out the members whose value is missing: the same text with
    every `"name":null` member cut (`drop_nulls` on pandas' text gives it, byte
    for byte). A stored payload is mostly empty fields (two fifths of its bytes
    were `null` members), and every byte written costs the store's write.
    """
    if not len(frame.columns):
        return pa.array(["{}"] * len(frame), type=pa.string())
    keys = [json_texts(pa.array([str(c)], type=pa.string()))[0].as_py() for c in frame.columns]
    # One concatenation over the whole row: the keys, with their braces and commas,
    # are constants between the columns' values.
    parts: list[pa.Array] = []
    if not sparse:
        for i, key in enumerate(keys):
            member = ("{" if i == 0 else ",") + key + ":"
            parts.append(pc.fill_null(_members(frame.iloc[:, i], member), member + "null"))
        return pc.binary_join_element_wise(*parts, "}", "")
    for i, key in enumerate(keys):
        # A missing value makes its whole member null, and the row's join skips it.
        parts.append(_members(frame.iloc[:, i], "," + key + ":"))
    joined = pc.binary_join_element_wise(*parts, "}", "", null_handling="replace")
    return _opened(joined)


def _opened(members: pa.Array) -> pa.Array:
    """`,"a":1,"b":2}` as `{"a":1,"b":2}`: every member starts with a comma, and the
    first one's becomes the brace in place (a search and replace over the texts
    cost a fifth of a payload's making); a row without members, `}`, becomes `{}`."""
    raw, offsets = _utf8_bytes(members)
    raw = raw.copy()
    starts = offsets[:-1][np.diff(offsets) > 0]
    first = raw[starts]
    raw[starts[first == ord(",")]] = ord("{")
    opened = pa.StringArray.from_buffers(
        len(members), pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(raw)
    )
    if (first == ord("}")).any():
        opened = pc.if_else(pc.equal(opened, "}"), "{}", opened)
    return opened


#: A member whose value is null, followed by its comma: a key is an identifier between
#: quotes followed by a colon, which no text value can hold unescaped (a quote inside a
#: JSON text is written \"), so only real members match.
_NULL_MEMBER = r'"[A-Za-z0-9_]+":null,'
#: The last member, null, with the comma before it (if any).
_LAST_NULL_MEMBER = r',?"[A-Za-z0-9_]+":null}'


def drop_nulls(texts: pa.Array) -> pa.Array:
    """JSON objects of identifier keys and scalar values without their null members:
    `json_rows(frame, sparse=True)` from `json_rows(frame)`'s text. Migration 0011
    brings the payloads of stores written before payloads were sparse to it, and
    their hashes with them: its result must never change."""
    cut = pc.replace_substring_regex(texts, _NULL_MEMBER, "")
    return pc.replace_substring_regex(cut, _LAST_NULL_MEMBER, "}")


def parse_json_lines(text: str | bytes, strings: Collection[str] = ()) -> pd.DataFrame:
    """JSON lines into a frame with Arrow's parser (several times pandas' speed).

    Arrow reads text that looks like a timestamp as one, which would turn a raw
    value into a date: columns it read so are read again as text, and only they
    (the other fields are skipped: a third of a full parse). The text columns
    named in `strings` stay in Arrow (pandas's Arrow-backed string dtype, as
    normalisation makes them) instead of becoming Python objects.
    """
    data = text if isinstance(text, bytes) else text.encode()
    table = pa_json.read_json(pa.BufferReader(data))
    timestamps = [f.name for f in table.schema if pa.types.is_timestamp(f.type)]
    if timestamps:
        options = pa_json.ParseOptions(
            explicit_schema=pa.schema([pa.field(name, pa.string()) for name in timestamps]),
            unexpected_field_behavior="ignore",
        )
        texts = pa_json.read_json(pa.BufferReader(data), parse_options=options)
        for name in timestamps:
            i = table.schema.get_field_index(name)
            table = table.set_column(i, pa.field(name, pa.string()), texts.column(name))
    # A column no line has a value in is read as Arrow's null type: typed as text too
    # (a column of Python Nones is what pandas's concatenation scans value by value).
    text_like = (pa.string(), pa.null())
    kept = [
        n for n in strings if n in table.column_names and table.schema.field(n).type in text_like
    ]
    frame = table.drop_columns(kept).to_pandas()
    for name in kept:
        frame[name] = table.column(name).cast(pa.string()).to_pandas(types_mapper=schema.text_types)
    return frame[table.column_names]


def read_fields(rows: Sequence[bytes], fields: pa.Schema) -> pa.Table:
    """The members `fields` names of JSON objects (`rows`, each one's UTF-8 text), in
    the types `fields` gives them, missing ones null: a table of `len(rows)` rows.

    A business unit's return file needs a sixth of a stored payload's members; Arrow's
    parser told which ones (and their types) skips the others instead of building
    them, and the texts stay in Arrow: parsing a million payloads whole and making
    them Python objects held gigabytes. A member of another type than `fields` gives
    (a number where a text is expected) makes Arrow's typed parse fail: those rows
    are parsed again by Python's parser, and each value converted as pandas
    converts it (a number to its text, as the frames of the stages would)."""
    if not rows:
        return fields.empty_table()
    data = b"\n".join(rows)
    try:
        options = pa_json.ParseOptions(explicit_schema=fields, unexpected_field_behavior="ignore")
        table = pa_json.read_json(pa.BufferReader(data), parse_options=options)
    except pa.ArrowInvalid:
        table = _inferred_fields(data, fields)
    if table.num_rows != len(rows):
        raise ValueError("a stored JSON object spans several lines or none")
    return table.select(fields.names)


def _inferred_fields(data: bytes, fields: pa.Schema) -> pa.Table:
    """`read_fields` of JSON lines whose members are not all of their field's type: each
    line by Python's parser (no store written by this pipeline needs it: its payloads
    hold each column in one type), each value converted as pandas converts it."""
    objects = [json.loads(line) for line in data.split(b"\n")]
    columns = []
    for field in fields:
        values = pd.Series([o.get(field.name) for o in objects], dtype=object)
        if pa.types.is_boolean(field.type):
            values = values.astype("boolean")
        elif pa.types.is_string(field.type):
            values = values.astype(schema.text_dtype())
        columns.append(pa.array(values, type=field.type, from_pandas=True))
    return pa.Table.from_arrays(columns, schema=fields)
