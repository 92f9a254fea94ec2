"""The column helpers the normalisers are built on (Arrow kernels, distinct-value work)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from mdm_pipeline.normalize.codes import codes_among, codes_column, merge_codes
from mdm_pipeline.normalize.text import (
    STR,
    ascii_upper,
    extract,
    fold,
    is_in,
    on_distinct,
    on_distinct_rows,
    split_lines,
    sub,
)


def values(series: pd.Series) -> list:
    return [None if pd.isna(v) else v for v in series]


def test_extract_no_match_and_empty_group_are_null() -> None:
    s = pd.Series(["12 B AV X", "RUE Y", None, "12"], index=[10, 11, 12, 13], dtype=object)
    m = extract(s, r"^(?P<number>\d+)\s*(?P<rep>[A-Z]\b)?\s*(?P<rest>.*)$")
    assert list(m.index) == [10, 11, 12, 13]
    assert values(m["number"]) == ["12", None, None, "12"]
    assert values(m["rep"]) == ["B", None, None, None]
    assert values(m["rest"]) == ["AV X", None, None, None]


def test_extract_refuses_unnamed_groups() -> None:
    with pytest.raises(ValueError, match="named"):
        extract(pd.Series(["a"]), r"(a)")


def test_sub_takes_back_references_and_inline_flags() -> None:
    s = pd.Series(["12, rue de la Paix", "3 bis , av X", None], dtype=object)
    out = sub(s, r"(?i)^(\d+\s*(?:bis)?)\s*,\s*", r"\1 ")
    assert values(out) == ["12 rue de la Paix", "3 bis av X", None]


def test_split_lines_keeps_the_row_label() -> None:
    s = pd.Series(["a\nb,c", None, "d"], index=[5, 6, 7], dtype=object)
    out = split_lines(s, r"[\n,]")
    assert list(out.index) == [5, 5, 5, 7]
    assert list(out) == ["a", "b", "c", "d"]


def test_on_distinct_calls_once_per_value_and_spreads_back() -> None:
    seen: list[int] = []

    def upper(u: pd.Series) -> pd.DataFrame:
        seen.append(len(u))
        return pd.DataFrame({"up": u.str.upper(), "n": u.str.len()})

    out = on_distinct(pd.Series(["a", "b", "a", None, "b"], index=list("vwxyz")), upper)
    assert seen == [2]
    assert list(out.index) == list("vwxyz")
    assert values(out["up"]) == ["A", "B", "A", None, "B"]


def test_on_distinct_rows_keys_on_every_column_nulls_included() -> None:
    frame = pd.DataFrame({"a": ["1", "1", None, None, "1"], "b": ["x", "y", None, "y", "x"]})
    out = on_distinct_rows(
        frame, lambda u: pd.DataFrame({"j": u["a"].fillna("-") + u["b"].fillna("-"), "n": len(u)})
    )
    assert list(out["j"]) == ["1x", "1y", "--", "-y", "1x"]
    assert set(out["n"]) == {4}


def test_ascii_upper_drops_accents_and_spells_ligatures() -> None:
    s = pd.Series(["République", "Œuvre", "Straße", "l’église", None])
    assert values(ascii_upper(s)) == ["REPUBLIQUE", "OEUVRE", "STRASSE", "L'EGLISE", None]
    assert values(fold(s)) == ["REPUBLIQUE", "OEUVRE", "STRASSE", "L EGLISE", None]


def test_codes_column_keeps_the_given_order() -> None:
    idx = pd.RangeIndex(4)
    flags = {
        "Z_FIRST": pd.Series([True, False, True, False]),
        "A_SECOND": pd.Series([True, True, False, False]),
    }
    assert values(codes_column(flags, idx)) == ["Z_FIRST|A_SECOND", "A_SECOND", "Z_FIRST", None]


def test_merge_and_pick_codes() -> None:
    a = pd.Series(["X|Y", None, "Y", None])
    b = pd.Series(["Z", "Z", None, None])
    merged = merge_codes(a, b)
    assert values(merged) == ["X|Y|Z", "Z", "Y", None]
    assert values(codes_among(merged, ("Z", "X"))) == ["Z|X", "Z", None, None]


@pytest.mark.parametrize("dtype", [object, STR])
def test_is_in_is_pandas_isin_with_missing_values_in_no_set(dtype: object) -> None:
    s = pd.Series(["75011", None, "99999", "", "75011"], index=[5, 6, 7, 8, 9], dtype=dtype)
    lookup = pa.array(["75011", "", "13001"], type=pa.string())
    got = is_in(s, lookup)
    assert got.dtype == bool and list(got.index) == [5, 6, 7, 8, 9]
    want = [True, False, False, True, True]
    assert got.tolist() == s.isin(["75011", "", "13001"]).tolist() == want
    # A large_string value set, or series, is cast to the other's type.
    assert is_in(s, lookup.cast(pa.large_string())).tolist() == got.tolist()
    assert not is_in(s.iloc[:0], lookup).any()
