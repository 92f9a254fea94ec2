"""Payload and golden record JSON: the columnar writer writes pandas' text, byte for byte
(stored hashes depend on it)."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdm_pipeline.golden_records import store
from mdm_pipeline.golden_records.jsonrows import drop_nulls, json_rows, read_fields

#: Characters and pieces that JSON escapes, or that look like a member's boundary (a
#: null member inside a text must survive `drop_nulls`).
_TEXT = st.lists(
    st.sampled_from(
        [*'ab /\\"\n\t\x00\x01\x1f\x7féœ€漢😀\u2028},{:', '":null,', '"a":null}', "null", ',"x":']
    ),
    max_size=6,
).map("".join)
_WHEN = st.datetimes(min_value=datetime(1890, 1, 1), max_value=datetime(2100, 1, 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), _TEXT),
            st.one_of(st.none(), st.booleans()),
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=False, width=64)),
            st.one_of(st.none(), _WHEN),
            st.integers(-(2**40), 2**40),
            st.booleans(),
            st.one_of(st.none(), _TEXT, st.integers(-5, 5), st.booleans(), st.floats(-9, 9)),
        ),
        max_size=10,
    )
)
def test_columnar_json_is_pandas_json(rows: list) -> None:
    columns = ["text", "flag", "amount", "when", "n", "valid", "mixed"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["text"] = frame["text"].astype(object)
    frame["text_str"] = frame["text"].astype("string")
    frame["text_arrow"] = frame["text"].astype(pd.StringDtype("pyarrow", na_value=np.nan))
    frame["flag"] = frame["flag"].astype("boolean")
    frame["amount"] = frame["amount"].astype(float)
    frame["when"] = pd.to_datetime(frame["when"])
    frame["n"] = frame["n"].astype(np.int64)
    frame["valid"] = frame["valid"].astype(bool)
    frame["mixed"] = frame["mixed"].astype(object)
    frame["blank"] = np.nan  # a column with no value at all
    full = store._json_rows(frame)
    assert json_rows(frame).to_pylist() == full
    # Sparse: pandas' text without its null members, whichever way it is cut.
    sparse = json_rows(frame, sparse=True).to_pylist()
    assert sparse == drop_nulls(pa.array(full, type=pa.string())).to_pylist()
    for line, whole in zip(sparse, full, strict=True):
        values = json.loads(whole)
        assert list(json.loads(line).items()) == [
            (k, v) for k, v in values.items() if v is not None
        ]


def test_row_hash_is_blake2b_of_the_pandas_text() -> None:
    import hashlib

    frame = pd.DataFrame({"name": ["é/x", None], "day": pd.to_datetime(["2024-01-02", None])})
    digests, lines = store.hash_rows(frame)
    # Stored without its null members.
    expected = ['{"name":"é\\/x","day":"2024-01-02T00:00:00.000"}', "{}"]
    assert store._json_rows(frame) == [expected[0], '{"name":null,"day":null}']
    assert lines.tolist() == expected
    assert digests.tolist() == [
        hashlib.blake2b(line.encode(), digest_size=16).hexdigest() for line in expected
    ]


def test_integers_of_every_width_sign_and_nullability_are_pandas_json() -> None:
    frame = pd.DataFrame(
        {
            "u64": np.array([2**64 - 1, 0], dtype=np.uint64),
            "i8": np.array([-128, 5], dtype=np.int8),
            "nullable": pd.array([1, None], dtype="Int64"),
        }
    )
    assert json_rows(frame).to_pylist() == store._json_rows(frame)


def test_a_text_column_in_several_chunks_is_written_as_one_in_one_chunk() -> None:
    """Records concatenated from several sources hold text columns of several Arrow
    chunks: a slice of them (as `hash_rows` takes) gives pandas' text all the same."""
    from mdm_pipeline.config.schema import text_dtype

    first = pd.DataFrame({"name": ["Jean", "Zoé/Ana"]}, dtype=text_dtype())
    second = pd.DataFrame({"name": ['"Élise"', None, "Luc"]}, dtype=text_dtype())
    chunked = pd.concat([first, second], ignore_index=True).iloc[1:4]
    assert chunked["name"].array._pa_array.num_chunks == 2
    assert json_rows(chunked).to_pylist() == store._json_rows(chunked)


FIELDS = pa.schema(
    [("email_norm", pa.string()), ("email_valid", pa.bool_()), ("npai_date", pa.string())]
)


def test_fields_read_from_payloads_are_those_python_s_parser_reads() -> None:
    """Only the named members, in their types (a date-looking text stays a text),
    missing ones null, the others skipped; a row per payload, empty ones included."""
    frame = pd.DataFrame(
        {
            "last_name": ["Lévy", None, "O'Neil"],
            "email_norm": ['a"b@x.fr', None, "c/d@x.fr"],
            "email_valid": [True, None, False],
            "npai_date": ["2026-07-10", None, None],
        }
    )
    payloads = [t.encode() for t in json_rows(frame, sparse=True).to_pylist()]
    payloads.append(b"{}")
    got = read_fields(payloads, FIELDS)
    assert got.schema == FIELDS
    want = [json.loads(p) for p in payloads]
    assert got.to_pylist() == [{f: w.get(f) for f in FIELDS.names} for w in want]
    assert read_fields([], FIELDS).num_rows == 0


def test_a_member_of_another_type_is_read_as_pandas_converts_it() -> None:
    """A member stored as a number where the field is a text (or a flag stored as a
    text) does not fail the read: its rows are read as pandas converts the values."""
    payloads = [b'{"email_norm":12,"email_valid":true}', b'{"email_norm":"x","npai_date":null}']
    got = read_fields(payloads, FIELDS)
    assert got.schema == FIELDS
    assert got.column("email_norm").to_pylist() == ["12", "x"]
    assert got.column("email_valid").to_pylist() == [True, None]
