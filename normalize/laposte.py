"""Check postcodes and towns against La Poste's base (data/reference, Licence Ouverte).

Every address gets a status — valid, corrected, invalid, unverifiable — and
quality codes saying what was changed or what is wrong. All lookups are
merges against the base; fuzzy commune matching compares aligned candidate
pairs with `rapidfuzz.process.cpdist`, never record by record.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd
import pyarrow as pa
from rapidfuzz import fuzz, process

from mdm_pipeline.config.reference import laposte_base
from mdm_pipeline.normalize.codes import codes_column
from mdm_pipeline.normalize.text import fold, is_in

VALID, CORRECTED, INVALID, UNVERIFIABLE = "valid", "corrected", "invalid", "unverifiable"
FUZZY_MIN_SCORE = 80.0
_PLM = {"PARIS": 75000, "LYON": 69000, "MARSEILLE": 13000}
_DOMESTIC = {"FR", "FRANCE", "F", "FRA", "MC", "MONACO"}

#: Codes that leave the postal locality unresolved (status invalid).
BLOCKING_CODES = (
    "POSTCODE_MISSING",
    "POSTCODE_UNKNOWN",
    "COMMUNE_MISSING",
    "COMMUNE_MISMATCH",
    "ADDRESS_EMPTY",
)


@cache
def _keys() -> pd.DataFrame:
    """Every name a town may be written under, per postcode: commune, routing label, line 5."""
    base = laposte_base()
    parts = []
    for col in ("commune", "routing_label", "line5"):
        part = base.loc[base[col] != "", ["postcode", "insee", "routing_label", "line5"]].copy()
        part["key"] = base.loc[base[col] != "", col]
        part["via"] = col
        parts.append(part)
    keys = pd.concat(parts, ignore_index=True)
    keys["line5"] = keys["line5"].where(keys["via"] == "line5", "")
    return keys.drop_duplicates(["postcode", "key"]).reset_index(drop=True)


@cache
def _postcodes() -> pa.Array:
    """La Poste's postcodes, each once, as the value set of `is_in` (built once)."""
    return pa.array(sorted(set(laposte_base()["postcode"])), type=pa.string())


@cache
def _single_label() -> pd.Series:
    """Postcodes whose communes all share one routing label -> that label."""
    base = laposte_base()
    labels = base.groupby("postcode")["routing_label"].agg(["nunique", "first"])
    return labels.loc[labels["nunique"] == 1, "first"]


@cache
def _postcodes_by_key() -> pd.DataFrame:
    """Town key -> its postcode when the key points to exactly one postcode."""
    keys = _keys()
    n = keys.groupby("key")["postcode"].nunique()
    unique = keys[keys["key"].isin(n[n == 1].index)].drop_duplicates("key")
    return unique.set_index("key")[["postcode", "insee", "routing_label", "line5"]]


def town_key(city: pd.Series) -> tuple[pd.Series, pd.Series]:
    """La Poste's spelling of a typed town, and the arrondissement number if one was typed.

    SAINT/SAINTE become ST/STE as in the base; CEDEX and its office number are
    dropped; "PARIS 15", "Paris 15e", "LYON 3EME" give (PARIS, 15), (LYON, 3).
    """
    key = fold(city)
    key = (
        key.str.replace(r"\bSAINTE\b", "STE", regex=True)
        .str.replace(r"\bSAINTS\b", "STS", regex=True)
        .str.replace(r"\bSAINT\b", "ST", regex=True)
    )
    key = key.str.replace(r"\s*\bCEDEX\b(\s+\d{1,2})?\s*$", "", regex=True)
    arr = key.str.extract(
        r"^(PARIS|LYON|MARSEILLE)\s+(\d{1,2})\s*(?:E|ER|EME|ARR|ARRT|ARRONDISSEMENT)?$"
    )
    key = key.where(arr[0].isna(), arr[0])
    return key.replace("", None), pd.to_numeric(arr[1], errors="coerce")


def _best_fuzzy(query: pd.Series, postcode: pd.Series) -> pd.DataFrame:
    """Best commune of the same postcode for misspelt towns (unique best above the bar)."""
    empty = pd.DataFrame(columns=["key", "postcode", "routing_label", "insee", "line5", "score"])
    if query.empty:
        return empty
    cand = pd.DataFrame(
        {"rid": query.index, "postcode": postcode.to_numpy(), "q": query.to_numpy()}
    ).merge(_keys(), on="postcode")
    if cand.empty:
        return empty
    cand["score"] = process.cpdist(
        cand["q"].tolist(), cand["key"].tolist(), scorer=fuzz.ratio, workers=1
    )
    cand = cand.sort_values(["rid", "score"], ascending=[True, False])
    second = cand.groupby("rid")["score"].nth(1)
    best = cand.drop_duplicates("rid").set_index("rid")
    best["second"] = (
        second.reindex(best.index).set_axis(best.index).fillna(0) if len(second) else 0.0
    )
    # A tie between two different routing labels is ambiguous; the same town under two
    # names (commune and routing label) is not.
    same_town = cand.groupby("rid")["routing_label"].nunique().reindex(best.index) == 1
    ok = (best["score"] >= FUZZY_MIN_SCORE) & ((best["score"] > best["second"]) | same_town)
    return best[ok]


def validate_locality(
    postcode: pd.Series, city: pd.Series, cedex: pd.Series, country: pd.Series
) -> pd.DataFrame:
    """Postcode, routing label, INSEE code, La Poste line 5, status and codes per record."""
    idx = postcode.index
    codes: dict[str, pd.Series] = {}

    def flag(name: str, mask: pd.Series) -> None:
        codes[name] = mask.fillna(False).astype(bool).reindex(idx, fill_value=False)

    base_pcs = _postcodes()
    pc = postcode.str.replace(r"\D", "", regex=True)
    pc = pc.where(pc.str.len() != 4, "0" + pc)
    pc = pc.where(pc.str.len() == 5, None)
    key, arr = town_key(city)
    cedex = cedex.fillna(False).astype(bool)
    foreign = country.notna() & ~fold(country).isin(_DOMESTIC)

    out = pd.DataFrame(
        index=idx, columns=["postcode", "routing_label", "insee", "line5"], dtype=object
    )
    resolved = pd.Series(False, index=idx)

    # Paris, Lyon, Marseille: the arrondissement gives the postcode when none is usable.
    arr_pc = (key.map(_PLM) + arr).dropna().astype(int).map("{:05d}".format)
    use_arr = arr_pc.index[~is_in(pc[arr_pc.index], base_pcs)] if len(arr_pc) else []
    pc_from_arr = pd.Series(False, index=idx)
    pc_from_arr[use_arr] = True
    pc = pc.copy()
    pc[use_arr] = arr_pc[use_arr]

    # 1. The (postcode, town) pair exists.
    pairs = pd.DataFrame({"rid": idx, "postcode": pc.to_numpy(), "key": key.to_numpy()})
    exact = pairs.dropna().merge(_keys(), on=["postcode", "key"], how="inner")
    exact = exact.drop_duplicates("rid").set_index("rid")
    out.loc[exact.index, ["postcode", "routing_label", "insee", "line5"]] = exact[
        ["postcode", "routing_label", "insee", "line5"]
    ].to_numpy()
    resolved[exact.index] = True

    # 2. A misspelt town of a known postcode.
    todo = ~resolved & is_in(pc, base_pcs) & key.notna()
    fuzzy = _best_fuzzy(key[todo], pc[todo])
    out.loc[fuzzy.index, ["postcode", "routing_label", "insee", "line5"]] = fuzzy[
        ["postcode", "routing_label", "insee", "line5"]
    ].to_numpy()
    resolved[fuzzy.index] = True
    flag("COMMUNE_CORRECTED", pd.Series(True, index=fuzzy.index))

    # 3. A town that points to a single postcode fixes a wrong or missing postcode.
    todo = ~resolved & key.notna()
    by_key = _postcodes_by_key().reindex(key[todo].to_numpy())
    by_key.index = key[todo].index
    found = by_key["postcode"].notna()
    hit = by_key[found]
    out.loc[hit.index, ["postcode", "routing_label", "insee", "line5"]] = hit[
        ["postcode", "routing_label", "insee", "line5"]
    ].to_numpy()
    resolved[hit.index] = True
    had_pc = pc[hit.index].notna()
    flag("POSTCODE_CORRECTED", had_pc[had_pc])
    flag("POSTCODE_ADDED", ~had_pc[~had_pc])

    # 4. No town, but the postcode has a single routing label.
    todo = ~resolved & key.isna() & is_in(pc, base_pcs)
    label = pc[todo].map(_single_label()).dropna()
    out.loc[label.index, "postcode"] = pc[label.index]
    out.loc[label.index, "routing_label"] = label
    resolved[label.index] = True
    flag("COMMUNE_ADDED", pd.Series(True, index=label.index))

    flag("POSTCODE_FROM_ARRONDISSEMENT", pc_from_arr & resolved)
    known_pc = is_in(pc, base_pcs)
    unresolved = ~resolved
    empty = pc.isna() & key.isna()
    flag("ADDRESS_EMPTY", unresolved & empty & ~foreign)
    flag("POSTCODE_MISSING", unresolved & pc.isna() & key.notna() & ~cedex & ~foreign)
    flag("POSTCODE_UNKNOWN", unresolved & pc.notna() & ~known_pc & ~cedex & ~foreign)
    flag("COMMUNE_MISSING", unresolved & known_pc & key.isna() & ~foreign)
    flag("COMMUNE_MISMATCH", unresolved & known_pc & key.notna() & ~cedex & ~foreign)
    flag("CEDEX_UNVERIFIABLE", cedex & ~foreign & ~empty)
    flag("FOREIGN_ADDRESS", foreign)
    typed_differs = resolved & key.notna() & (out["routing_label"] != key) & ~pc_from_arr
    flag("ROUTING_LABEL_APPLIED", typed_differs & ~codes["COMMUNE_CORRECTED"])
    flag("LINE5_FROM_LAPOSTE", out["line5"].fillna("") != "")

    # Unverifiable addresses keep what was typed, in the postal form.
    keep_typed = (cedex | foreign) & ~resolved
    out.loc[keep_typed, "postcode"] = pc[keep_typed]
    out.loc[keep_typed, "routing_label"] = key[keep_typed]

    blocking = np.logical_or.reduce([codes[c].to_numpy() for c in BLOCKING_CODES])
    corrected = np.logical_or.reduce(
        [
            codes[c].to_numpy()
            for c in (
                "COMMUNE_CORRECTED",
                "POSTCODE_CORRECTED",
                "POSTCODE_ADDED",
                "COMMUNE_ADDED",
                "POSTCODE_FROM_ARRONDISSEMENT",
            )
        ]
    )
    unverifiable = (codes["CEDEX_UNVERIFIABLE"] | codes["FOREIGN_ADDRESS"]).to_numpy()
    status = np.where(
        unverifiable,
        UNVERIFIABLE,
        np.where(blocking, INVALID, np.where(corrected, CORRECTED, VALID)),
    )
    out["status"] = status
    out["codes"] = codes_column(dict(sorted(codes.items())), idx)
    out["line5"] = out["line5"].replace("", None)
    return out
