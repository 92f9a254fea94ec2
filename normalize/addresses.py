"""Addresses end to end: parse, validate against La Poste, build the NF Z10-011 block.

Produces, per record, the six RNVP lines, the parsed components, a status
(valid, corrected, invalid, unverifiable), quality codes, and an NPAI-risk
flag with its reason for addresses that cannot be delivered.
"""

from __future__ import annotations

import pandas as pd

from mdm_pipeline.normalize.laposte import codes_column, validate_locality
from mdm_pipeline.normalize.rnvp import assemble_block, parse_addresses
from mdm_pipeline.normalize.text import fold

#: Codes that make an address undeliverable (NPAI risk).
NPAI_RISK_CODES = (
    "ADDRESS_EMPTY",
    "POSTCODE_MISSING",
    "POSTCODE_UNKNOWN",
    "COMMUNE_MISSING",
    "COMMUNE_MISMATCH",
    "STREET_MISSING",
    "NUMBER_MISSING",
)

ADDRESS_COLUMNS = (
    "rnvp_line1",
    "rnvp_line2",
    "rnvp_line3",
    "rnvp_line4",
    "rnvp_line5",
    "rnvp_line6",
    "addr_number",
    "addr_repetition",
    "addr_street_type",
    "addr_street_name",
    "addr_lieu_dit",
    "addr_service",
    "addr_postcode",
    "addr_routing_label",
    "addr_insee",
    "addr_cedex",
    "address_status",
    "address_codes",
    "npai_risk",
    "npai_risk_reason",
)


def normalize_addresses(
    lines: pd.Series, postcode: pd.Series, city: pd.Series, country: pd.Series, identity: pd.Series
) -> pd.DataFrame:
    """All address columns (ADDRESS_COLUMNS) for aligned raw inputs."""
    parts = parse_addresses(lines)
    pc_in = postcode.where(postcode.notna(), parts["postcode_in_lines"])
    town_in = city.where(city.notna(), parts["locality_in_lines"])
    town_fold = fold(town_in)
    city_cedex = town_fold.str.extract(r"\bCEDEX\b(?:\s+(\d{1,2}))?\s*$")
    has_cedex_word = town_fold.str.contains(r"\bCEDEX\b", regex=True, na=False)
    parts["cedex"] = parts["cedex"].fillna(False).astype(bool) | has_cedex_word
    parts["cedex_office"] = parts["cedex_office"].where(
        parts["cedex_office"].notna(), city_cedex[0]
    )
    loc = validate_locality(pc_in, town_in, parts["cedex"], country)
    block = assemble_block(identity, parts, loc["postcode"], loc["routing_label"], loc["line5"])

    no_street = parts["street_name"].isna() & parts["street_type"].isna()
    no_delivery_point = parts["service"].isna() & parts["lieu_dit"].isna()
    codes = {
        "STREET_MISSING": no_street & no_delivery_point & lines.notna(),
        "NUMBER_MISSING": parts["street_type"].notna()
        & parts["number"].isna()
        & parts["service"].isna(),
        "STREET_SHORTENED": block["street_shortened"],
        "LINE_TRUNCATED": block["line_truncated"],
    }
    extra = codes_column(codes, lines.index)
    all_codes = _merge_codes(loc["codes"], extra)
    risk = _codes_among(all_codes, NPAI_RISK_CODES)

    out = block.drop(columns=["street_shortened", "line_truncated"])
    out["addr_number"] = parts["number"]
    out["addr_repetition"] = parts["repetition"]
    out["addr_street_type"] = parts["street_type"]
    out["addr_street_name"] = parts["street_name"]
    out["addr_lieu_dit"] = parts["lieu_dit"]
    out["addr_service"] = parts["service"]
    out["addr_postcode"] = loc["postcode"]
    out["addr_routing_label"] = loc["routing_label"]
    out["addr_insee"] = loc["insee"]
    out["addr_cedex"] = parts["cedex"]
    out["address_status"] = loc["status"]
    out["address_codes"] = all_codes
    out["npai_risk"] = risk.notna()
    out["npai_risk_reason"] = risk
    return out[list(ADDRESS_COLUMNS)]


def _merge_codes(a: pd.Series, b: pd.Series) -> pd.Series:
    joined = a.fillna("") + "|" + b.fillna("")
    return joined.str.strip("|").replace("", None)


def _codes_among(codes: pd.Series, wanted: tuple[str, ...]) -> pd.Series:
    """The codes of `wanted` present in each record's code list, '|'-joined."""
    text = pd.Series("", index=codes.index, dtype=object)
    padded = "|" + codes.fillna("") + "|"
    for name in wanted:
        hit = padded.str.contains(f"|{name}|", regex=False).to_numpy()
        text[hit] = text[hit] + "|" + name
    return text.str.lstrip("|").replace("", None)
