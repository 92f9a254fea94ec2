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
from mdm_pipeline.matching.keys import Fields, prepare

NULL = -1
_OTHER_FIELD_KINDS = ("exact_other", "swapped", "same_field")


@dataclass(frozen=True)
class ComparisonVectors:
    """Levels per pair and comparison (int8), and the term frequency of exact agreements."""

    levels: pd.DataFrame  # one int8 column per comparison
    term_freq: dict[str, np.ndarray]  # comparison -> frequency of the agreed value, NaN else


#: Level kinds decided on codes alone: no need to gather distinct value pairs first.
_CODE_KINDS = ("exact", "email_user", "phone_suffix")


def term_frequencies(
    records: pd.DataFrame | Fields, comparisons: list[Comparison]
) -> dict[str, pd.Series]:
    """Share of records holding each value, for the comparisons that adjust on it."""
    fields = prepare(records)
    tables = {}
    for comp in comparisons:
        if comp.tf_adjust:
            codes, vocab = fields.encoded(comp.field)
            counts = np.bincount(codes[codes >= 0], minlength=len(vocab))
            tables[comp.name] = pd.Series(counts / max(int(counts.sum()), 1), index=vocab)
    return tables


def _date_digits(values: np.ndarray) -> np.ndarray:
    """YYYYMMDD strings as an (n, 8) matrix of code points."""
    fixed = values.astype("U8")
    return fixed.view(np.int32).reshape(len(fixed), 8)


def _level_holds(
    level: ComparisonLevel,
    fields: Fields,
    field: str,
    ul: np.ndarray,
    ur: np.ndarray,
    cache: dict[str, object],
) -> np.ndarray:
    """Whether a level holds for aligned arrays of left/right value codes of `field`."""
    kind = level.kind
    if kind == "exact":
        return ul == ur
    if kind in ("email_user", "phone_suffix"):
        reduced = fields.derived(field, kind)
        return (reduced[ul] >= 0) & (reduced[ul] == reduced[ur])
    _, vocab = fields.encoded(field)
    if "lv" not in cache:
        cache["lv"], cache["rv"] = vocab[ul].tolist(), vocab[ur].tolist()
    lv, rv = cache["lv"], cache["rv"]
    scorers = {
        "jaro_winkler": JaroWinkler.normalized_similarity,
        "levenshtein": Levenshtein.distance,
        "damerau_levenshtein": DamerauLevenshtein.distance,
        "token_set": fuzz.token_set_ratio,
    }
    if kind in scorers:
        if kind not in cache:
            cache[kind] = process.cpdist(lv, rv, scorer=scorers[kind], workers=-1)
        score = np.asarray(cache[kind])
        if kind == "token_set":
            return score / 100 >= level.threshold
        if kind == "jaro_winkler":
            return score >= level.threshold
        return score <= level.threshold
    if kind in ("date_swap", "date_one_digit"):
        if "digits" not in cache:
            cache["digits"] = _date_digits(vocab)
        digits = np.asarray(cache["digits"])
        ld, rd = digits[ul], digits[ur]
        if kind == "date_one_digit":
            return (ld != rd).sum(axis=1) == 1
        same_year = (ld[:, :4] == rd[:, :4]).all(axis=1)
        swapped = (ld[:, 4:6] == rd[:, 6:8]).all(axis=1) & (ld[:, 6:8] == rd[:, 4:6]).all(axis=1)
        return same_year & swapped & (ul != ur)
    raise ValueError(f"level kind {kind!r} is compared per record pair")


def _compare_one(
    fields: Fields, left: np.ndarray, right: np.ndarray, comp: Comparison
) -> np.ndarray:
    """The level of every pair for one comparison."""
    codes, vocab = fields.encoded(comp.field)
    cl, cr = codes[left], codes[right]
    present = (cl >= 0) & (cr >= 0)
    n_levels = len(comp.levels)
    level = np.full(len(left), NULL, dtype=np.int8)
    if not present.any():
        return level
    pl, pr = cl[present], cr[present]
    own = [(j, lvl) for j, lvl in enumerate(comp.levels) if lvl.kind not in _OTHER_FIELD_KINDS]
    pair_holds = np.zeros((len(pl), n_levels), dtype=bool)
    # Where the first level is exact, pairs that agree exactly are settled without
    # computing anything else: in candidate pairs that is most of them.
    todo = np.ones(len(pl), dtype=bool)
    if comp.levels[0].kind == "exact":
        pair_holds[:, 0] = pl == pr
        todo = ~pair_holds[:, 0]
        own = own[1:]
    tl, tr = pl[todo], pr[todo]
    spread = None
    if any(lvl.kind not in _CODE_KINDS for _, lvl in own):
        # Similarities are computed once per distinct (left, right) value pair and spread back.
        combo = tl.astype(np.int64) * (len(vocab) + 1) + tr
        spread, uniq = pd.factorize(combo)
        tl, tr = uniq // (len(vocab) + 1), uniq % (len(vocab) + 1)
    holds = np.zeros((len(tl), n_levels), dtype=bool)
    cache: dict[str, object] = {}
    for j, lvl in own:
        holds[:, j] = _level_holds(lvl, fields, comp.field, tl, tr, cache)
    if own:
        pair_holds[todo] = holds[spread] if spread is not None else holds
        if comp.levels[0].kind == "exact":
            pair_holds[:, 0] = ~todo
    # Levels on a second field (last name against the other record's birth name, the
    # same postcode) are decided per pair on codes, still in numpy.
    # Only pairs an earlier level has not settled need them.
    rest = np.flatnonzero(present)[todo]
    rl, rr = left[rest], right[rest]
    for j, lvl in enumerate(comp.levels):
        if lvl.kind in ("exact_other", "swapped"):
            assert lvl.other is not None
            if lvl.kind == "swapped" and lvl.threshold is not None:
                cross = _swapped_similar(fields, comp.field, lvl.other, rl, rr, lvl.threshold)
            else:
                both = lvl.kind == "swapped"
                cross = _crosswise(fields, comp.field, lvl.other, rl, rr, both)
            pair_holds[todo, j] = cross
        elif lvl.kind == "same_field":
            assert lvl.other is not None
            pair_holds[todo, j] = _same(fields, lvl.other, rl, rr)
    first = np.where(pair_holds.any(axis=1), pair_holds.argmax(axis=1), n_levels)
    level[present] = first.astype(np.int8)
    return level


def _same(fields: Fields, field: str, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Whether both records hold the same (non-missing) value of `field`."""
    codes, _ = fields.encoded(field)
    return (codes[left] >= 0) & (codes[left] == codes[right])


def _joint_codes(
    fields: Fields, field: str, other: str, left: np.ndarray, right: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both fields of both records as codes of one shared vocabulary."""
    map_a, map_b, vocab = fields.joint(field, other)
    ca, cb = fields.encoded(field)[0], fields.encoded(other)[0]
    return map_a[ca[left]], map_b[cb[left]], map_a[ca[right]], map_b[cb[right]], vocab


def _swapped_similar(
    fields: Fields,
    field: str,
    other: str,
    left: np.ndarray,
    right: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """Whether the two fields are swapped between the records, allowing a typo each way."""
    al, bl, ar, br, vocab = _joint_codes(fields, field, other, left, right)
    out = _similar(vocab, al, br, threshold)
    # The second way round only where the first holds: most pairs fail the first.
    out[out] = _similar(vocab, bl[out], ar[out], threshold)
    return out


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
    fields: Fields,
    field: str,
    other: str,
    left: np.ndarray,
    right: np.ndarray,
    both_ways: bool = False,
) -> np.ndarray:
    """Whether one record's `field` equals the other's `other`, either or both ways round."""
    al, bl, ar, br, _ = _joint_codes(fields, field, other, left, right)
    one = (al >= 0) & (al == br)
    two = (bl >= 0) & (bl == ar)
    return (one & two) if both_ways else (one | two)


def compare(
    records: pd.DataFrame | Fields,
    left: np.ndarray,
    right: np.ndarray,
    comparisons: list[Comparison],
    tf_tables: dict[str, pd.Series],
) -> ComparisonVectors:
    """Comparison levels of every pair (positional ids into `records`)."""
    fields = prepare(records)
    levels = {}
    term_freq = {}
    for comp in comparisons:
        level = _compare_one(fields, left, right, comp)
        levels[comp.name] = level
        if comp.name in tf_tables and comp.levels[0].kind == "exact":
            codes, vocab = fields.encoded(comp.field)
            freq = tf_tables[comp.name].reindex(vocab).to_numpy(dtype=np.float64, na_value=np.nan)
            agreed = level == 0
            out = np.full(len(left), np.nan)
            out[agreed] = freq[codes[left[agreed]]]
            term_freq[comp.name] = out
    return ComparisonVectors(pd.DataFrame(levels), term_freq)
