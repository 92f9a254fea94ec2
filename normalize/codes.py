"""Quality codes: machine-readable flags joined with '|' in one column per record.

A record carries few codes and the combinations are few, so every function
here works on distinct combinations (a bit mask per record, or the distinct
code strings) and spreads the result back: a handful of Python string joins
for a million records instead of one per record.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mdm_pipeline.normalize.text import on_distinct, on_distinct_rows


def codes_column(flags: dict[str, pd.Series], index: pd.Index) -> pd.Series:
    """Boolean flags to one column: the names of the flags set, in the dict's order."""
    names = list(flags)
    if not names:
        return pd.Series(None, index=index, dtype=object)
    bits = np.zeros(len(index), dtype=np.int64)
    for j, name in enumerate(names):
        mask = flags[name].reindex(index, fill_value=False).fillna(False).to_numpy(dtype=bool)
        bits |= mask.astype(np.int64) << j
    combos, inverse = np.unique(bits, return_inverse=True)  # noqa: TID251 (return_inverse: it sorts)
    labels = np.array(
        ["|".join(n for j, n in enumerate(names) if c >> j & 1) or None for c in combos],
        dtype=object,
    )
    return pd.Series(labels[inverse], index=index, dtype=object)


def merge_codes(*columns: pd.Series) -> pd.Series:
    """Several code columns joined into one (empty parts dropped, order kept)."""
    frame = pd.DataFrame({str(i): col.astype(object) for i, col in enumerate(columns)})

    def join(u: pd.DataFrame) -> pd.DataFrame:
        joined = u.fillna("").astype(str).agg("|".join, axis=1).str.strip("|")
        joined = joined.str.replace(r"\|+", "|", regex=True)
        return pd.DataFrame({"codes": joined.where(joined != "", None)})

    return on_distinct_rows(frame, join)["codes"].astype(object)


def codes_among(codes: pd.Series, wanted: tuple[str, ...]) -> pd.Series:
    """The codes of `wanted` present in each record's code list, '|'-joined."""

    def pick(u: pd.Series) -> pd.DataFrame:
        present = u.str.split("|").map(set)
        text = present.map(lambda s: "|".join(w for w in wanted if w in s))
        return pd.DataFrame({"codes": text.where(text != "", None)})

    return on_distinct(codes.astype(object), pick)["codes"].astype(object)
