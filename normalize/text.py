"""Text helpers shared by the normalisers.

Each function takes and returns a pandas Series. Expensive per-value work
(transliteration, phone parsing) runs once per distinct value and is mapped
back, because customer fields repeat heavily (MARTIN, PARIS, 75015).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from unidecode import unidecode

#: pandas' pyarrow-backed string dtype with NaN for missing values (pandas 3's default):
#: its `.str` methods run in Arrow's compute kernels instead of a Python loop.
STR = pd.StringDtype("pyarrow", na_value=np.nan)


def as_str(series: pd.Series) -> pd.Series:
    """The same text in the Arrow-backed dtype (no-op when it already is)."""
    return series if series.dtype == STR else series.astype(STR)


def per_distinct(series: pd.Series, func: Callable[[str], object]) -> pd.Series:
    """Apply `func` once per distinct non-null value and map the results back."""
    present = series.dropna()
    if present.empty:
        return pd.Series(None, index=series.index, dtype=object)
    uniq = present.unique()
    table = dict(zip(uniq, map(func, uniq), strict=True))
    return series.map(table)


def ascii_upper(series: pd.Series) -> pd.Series:
    """Upper case without accents (AFNOR postal form); ligatures spelled out (Œ → OE)."""
    return per_distinct(series, lambda s: unidecode(s).upper())


def fold(series: pd.Series) -> pd.Series:
    """Upper case, no accents, punctuation to spaces, single spaces: the comparison form."""
    out = as_str(ascii_upper(series))
    out = out.str.replace(r"[^A-Z0-9 ]+", " ", regex=True).str.replace(r"\s+", " ", regex=True)
    out = out.str.strip()
    return out.where(out.notna() & (out != ""), None)
