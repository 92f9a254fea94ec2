"""Array helpers shared by the stages (config/schema.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mdm_pipeline.config.schema import distinct, row_hashes, text_dtype

_INTEGERS = st.sampled_from([np.int64, np.int32, np.uint64, np.int8])


@given(
    hnp.arrays(
        _INTEGERS,
        st.integers(0, 60),
        # Few distinct values among many, so that repeats are the rule.
        elements=st.integers(0, 5) | st.integers(0, 2**6),
    )
    | hnp.arrays(np.bool_, st.integers(0, 20))
)
def test_distinct_integers_are_numpys_unique(values: np.ndarray) -> None:
    got = distinct(values)
    want = np.unique(values)  # noqa: TID251 (the oracle)
    assert got.dtype == want.dtype
    assert got.tolist() == want.tolist()


def test_distinct_keeps_the_extremes_and_leaves_other_kinds_to_numpy() -> None:
    big = np.array([2**64 - 1, 0, 2**64 - 1, 2**63], dtype=np.uint64)
    assert distinct(big).tolist() == [0, 2**63, 2**64 - 1]
    low = np.array([-(2**63), 5, -(2**63)], dtype=np.int64)
    assert distinct(low).tolist() == [-(2**63), 5]
    floats = np.array([1.0, np.nan, np.nan, 0.5])
    assert np.array_equal(distinct(floats), np.unique(floats), equal_nan=True)  # noqa: TID251
    assert distinct(np.array(["b", "a", "b"], dtype=object)).tolist() == ["a", "b"]
    assert distinct(np.array([], dtype=np.int64)).tolist() == []


#: Texts as sources send them: repeats, the empty text, accents, other scripts, NUL.
_TEXTS = st.none() | st.sampled_from(["", "A", "a", "É", "DUPONT"]) | st.text(max_size=6)


@given(
    st.integers(0, 12).flatmap(
        lambda n: st.tuples(
            st.lists(_TEXTS, min_size=n, max_size=n),
            st.lists(_TEXTS, min_size=n, max_size=n),
            st.lists(st.none() | st.booleans(), min_size=n, max_size=n),
            st.lists(st.none() | st.integers(-(10**5), 10**5), min_size=n, max_size=n),
        )
    ),
    st.booleans(),
)
@example(
    (["a", None, "a", ""], [None, None, None, None], [True, None, False, True], [1, 2, None, 1]),
    True,
)
def test_row_hashes_are_pandas_hashes_of_the_same_values(columns: tuple, chunked: bool) -> None:
    """Stores keep these hashes: they must be pandas' own, whatever the text's dtype."""
    first, second, flags, days = columns
    as_objects = pd.DataFrame(
        {
            "first": pd.Series(first, dtype=object),
            "second": pd.Series(second, dtype=object),
            "flag": pd.array(flags, dtype="boolean"),
            "day": pd.to_datetime(pd.Series(days, dtype="float64"), unit="D"),
        },
        index=pd.RangeIndex(len(first)) * 3,  # not the rows' positions
    )
    frame = as_objects.astype({"first": text_dtype(), "second": text_dtype()})
    if chunked and len(frame) > 1:  # two sources concatenated: texts in two pieces
        frame = pd.concat([frame.iloc[:1], frame.iloc[1:]])
        assert isinstance(pa.array(frame["first"].array), pa.ChunkedArray)
    want = pd.util.hash_pandas_object(as_objects, index=False).to_numpy(np.uint64)
    got = row_hashes(frame)
    assert got.dtype == np.uint64
    assert got.tolist() == want.tolist()
    assert got.tolist() == pd.util.hash_pandas_object(frame, index=False).tolist()
    for name in ("first", "second"):  # one column: its own hash, not combined with others
        alone = pd.util.hash_pandas_object(as_objects[name], index=False).tolist()
        assert row_hashes(frame[name]).tolist() == alone
