"""Array helpers shared by the stages (config/schema.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mdm_pipeline.config.schema import distinct

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
    want = np.unique(values)
    assert got.dtype == want.dtype
    assert got.tolist() == want.tolist()


def test_distinct_keeps_the_extremes_and_leaves_other_kinds_to_numpy() -> None:
    big = np.array([2**64 - 1, 0, 2**64 - 1, 2**63], dtype=np.uint64)
    assert distinct(big).tolist() == [0, 2**63, 2**64 - 1]
    low = np.array([-(2**63), 5, -(2**63)], dtype=np.int64)
    assert distinct(low).tolist() == [-(2**63), 5]
    floats = np.array([1.0, np.nan, np.nan, 0.5])
    assert np.array_equal(distinct(floats), np.unique(floats), equal_nan=True)
    assert distinct(np.array(["b", "a", "b"], dtype=object)).tolist() == ["a", "b"]
    assert distinct(np.array([], dtype=np.int64)).tolist() == []
