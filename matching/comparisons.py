"""Comparison vectors: for each candidate pair, the agreement level of each field.

A comparison's levels are tried in order; the first that holds gives the
pair's level (0 = strongest), `len(levels)` means none held ('else') and -1
that a value is missing on either side. Everything is computed on distinct
value pairs: the pairs' values are factorised, the distinct (left, right)
combinations compared once with `rapidfuzz.process.cpdist` or numpy, and the
result spread back. Nothing loops over pairs in Python.

`compare` is a pure function of one partition of records and its pairs, plus
the term-frequency tables computed over all records, so a distributed engine
can run it partition by partition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from rapidfuzz import fuzz, process
from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler, Levenshtein

from mdm_pipeline.config.settings import Comparison, ComparisonLevel
from mdm_pipeline.matching.keys import field_values

NULL = -1
_OTHER_FIELD_KINDS = ("exact_other", "swapped", "same_field")


@dataclass(frozen=True)
class ComparisonVectors:
    """Levels per pair and comparison (int8), and the term frequency of exact agreements."""

    levels: pd.DataFrame  # one int8 column per comparison
    term_freq: dict[str, np.ndarray]  # comparison -> frequency of the agreed value, NaN else


def term_frequencies(records: pd.DataFrame, comparisons: list[Comparison]) -> dict[str, pd.Series]:
    """Share of records holding each value, for the comparisons that adjust on it."""
    tables = {}
    for comp in comparisons:
        if comp.tf_adjust:
            values = field_values(records, comp.field).dropna()
            tables[comp.name] = values.value_counts(normalize=True)
    return tables


def _date_digits(values: np.ndarray) -> np.ndarray:
    """YYYYMMDD strings as an (n, 8) matrix of code points."""
    fixed = values.astype("U8")
    return fixed.view(np.int32).reshape(len(fixed), 8)


def _level_holds(
    level: ComparisonLevel, lv: np.ndarray, rv: np.ndarray, cache: dict[str, np.ndarray]
) -> np.ndarray:
    """Whether a level holds for aligned arrays of distinct left/right values."""
    kind = level.kind
    if kind == "exact":
        return lv == rv
    if kind == "jaro_winkler":
        if "jw" not in cache:
            cache["jw"] = process.cpdist(
                lv.tolist(), rv.tolist(), scorer=JaroWinkler.normalized_similarity, workers=-1
            )
        return cache["jw"] >= level.threshold
    if kind == "levenshtein":
        if "lev" not in cache:
            cache["lev"] = process.cpdist(
                lv.tolist(), rv.tolist(), scorer=Levenshtein.distance, workers=-1
            )
        return cache["lev"] <= level.threshold
    if kind == "damerau_levenshtein":
        if "dl" not in cache:
            cache["dl"] = process.cpdist(
                lv.tolist(), rv.tolist(), scorer=DamerauLevenshtein.distance, workers=-1
            )
        return cache["dl"] <= level.threshold
    if kind == "token_set":
        if "tok" not in cache:
            cache["tok"] = (
                process.cpdist(lv.tolist(), rv.tolist(), scorer=fuzz.token_set_ratio, workers=-1)
                / 100
            )
        return cache["tok"] >= level.threshold
    if kind in ("date_swap", "date_one_digit"):
        if "dates" not in cache:
            cache["ld"], cache["rd"] = _date_digits(lv), _date_digits(rv)
            cache["dates"] = np.ones(1)
        ld, rd = cache["ld"], cache["rd"]
        if kind == "date_one_digit":
            return (ld != rd).sum(axis=1) == 1
        same_year = (ld[:, :4] == rd[:, :4]).all(axis=1)
        swapped = (ld[:, 4:6] == rd[:, 6:8]).all(axis=1) & (ld[:, 6:8] == rd[:, 4:6]).all(axis=1)
        return same_year & swapped & (lv != rv)
    if kind == "email_user":
        lu = pd.Series(lv, dtype=object).str.split("@").str[0].to_numpy()
        ru = pd.Series(rv, dtype=object).str.split("@").str[0].to_numpy()
        return lu == ru
    if kind == "phone_suffix":
        ls = pd.Series(lv, dtype=object).str[-8:].to_numpy()
        rs = pd.Series(rv, dtype=object).str[-8:].to_numpy()
        return ls == rs
    raise ValueError(f"level kind {kind!r} is compared per record pair")


def _compare_one(
    records: pd.DataFrame, left: np.ndarray, right: np.ndarray, comp: Comparison
) -> tuple[np.ndarray, np.ndarray]:
    """(level per pair, index of each pair's distinct value in the left side's vocabulary)."""
    values = field_values(records, comp.field)
    codes, uniques = pd.factorize(values)
    uniques = np.asarray(uniques, dtype=object)
    cl, cr = codes[left], codes[right]
    present = (cl >= 0) & (cr >= 0)
    n_levels = len(comp.levels)
    level = np.full(len(left), NULL, dtype=np.int8)
    if present.any():
        combo = cl[present].astype(np.int64) * (len(uniques) + 1) + cr[present]
        combo_codes, combo_uniques = pd.factorize(combo)
        ul = (combo_uniques // (len(uniques) + 1)).astype(np.int64)
        ur = (combo_uniques % (len(uniques) + 1)).astype(np.int64)
        lv, rv = uniques[ul], uniques[ur]
        holds = np.zeros((len(combo_uniques), n_levels), dtype=bool)
        cache: dict[str, np.ndarray] = {}
        for j, lvl in enumerate(comp.levels):
            if lvl.kind not in _OTHER_FIELD_KINDS:
                holds[:, j] = _level_holds(lvl, lv, rv, cache)
        pair_holds = holds[combo_codes]
        # Levels on a second field (last name against the other record's birth name, the
        # same postcode) are decided per pair on factorised codes, still in numpy.
        for j, lvl in enumerate(comp.levels):
            if lvl.kind in ("exact_other", "swapped"):
                if lvl.kind == "swapped" and lvl.threshold is not None:
                    cross = _swapped_similar(
                        records, comp.field, lvl.other, left, right, lvl.threshold
                    )
                else:
                    both = lvl.kind == "swapped"
                    cross = _crosswise(records, comp.field, lvl.other, left, right, both)
                pair_holds[:, j] = cross[present]
            elif lvl.kind == "same_field":
                pair_holds[:, j] = _same(records, lvl.other, left, right)[present]
        first = np.where(pair_holds.any(axis=1), pair_holds.argmax(axis=1), n_levels)
        level[present] = first.astype(np.int8)
    return level, cl


def _same(records: pd.DataFrame, field: str, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Whether both records hold the same (non-missing) value of `field`."""
    codes, _ = pd.factorize(field_values(records, field))
    return (codes[left] >= 0) & (codes[left] == codes[right])


def _swapped_similar(
    records: pd.DataFrame,
    field: str,
    other: str,
    left: np.ndarray,
    right: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """Whether the two fields are swapped between the records, allowing a typo each way."""
    a, b = field_values(records, field), field_values(records, other)
    codes, vocab = pd.factorize(pd.concat([a, b], ignore_index=True))
    vocab = np.asarray(vocab, dtype=object)
    ca, cb = codes[: len(a)], codes[len(a) :]
    one = _similar(vocab, ca[left], cb[right], threshold)
    two = _similar(vocab, cb[left], ca[right], threshold)
    return one & two


def _similar(vocab: np.ndarray, cl: np.ndarray, cr: np.ndarray, threshold: float) -> np.ndarray:
    """Jaro-Winkler >= threshold for pairs of vocabulary codes, once per distinct pair."""
    out = np.zeros(len(cl), dtype=bool)
    ok = (cl >= 0) & (cr >= 0)
    if ok.any():
        combo = cl[ok].astype(np.int64) * (len(vocab) + 1) + cr[ok]
        inverse, uniq = pd.factorize(combo)
        lv, rv = vocab[uniq // (len(vocab) + 1)], vocab[uniq % (len(vocab) + 1)]
        sim = process.cpdist(
            lv.tolist(), rv.tolist(), scorer=JaroWinkler.normalized_similarity, workers=-1
        )
        out[ok] = (sim >= threshold)[inverse]
    return out


def _crosswise(
    records: pd.DataFrame,
    field: str,
    other: str,
    left: np.ndarray,
    right: np.ndarray,
    both_ways: bool = False,
) -> np.ndarray:
    """Whether one record's `field` equals the other's `other`, either or both ways round."""
    a, b = field_values(records, field), field_values(records, other)
    codes, _ = pd.factorize(pd.concat([a, b], ignore_index=True))
    ca, cb = codes[: len(a)], codes[len(a) :]
    one = (ca[left] >= 0) & (ca[left] == cb[right])
    two = (cb[left] >= 0) & (cb[left] == ca[right])
    return (one & two) if both_ways else (one | two)


def compare(
    records: pd.DataFrame,
    left: np.ndarray,
    right: np.ndarray,
    comparisons: list[Comparison],
    tf_tables: dict[str, pd.Series],
) -> ComparisonVectors:
    """Comparison levels of every pair (positional ids into `records`)."""
    levels = {}
    term_freq = {}
    for comp in comparisons:
        level, _ = _compare_one(records, left, right, comp)
        levels[comp.name] = level
        if comp.name in tf_tables and comp.levels[0].kind == "exact":
            values = field_values(records, comp.field)
            freq = values.map(tf_tables[comp.name]).to_numpy(dtype=np.float64, na_value=np.nan)
            term_freq[comp.name] = np.where(level == 0, freq[left], np.nan)
    return ComparisonVectors(pd.DataFrame(levels), term_freq)
