"""Addresses end to end: parse, validate against La Poste, build the NF Z10-011 block.

Produces, per record, the six RNVP lines, the parsed components, a status
(valid, corrected, invalid, unverifiable), quality codes, and an NPAI-risk
flag with its reason for addresses that cannot be delivered.
"""

from __future__ import annotations

import pandas as pd

from mdm_pipeline.normalize.codes import codes_among, codes_column, merge_codes
from mdm_pipeline.normalize.laposte import validate_locality
from mdm_pipeline.normalize.rnvp import assemble_block, parse_addresses
from mdm_pipeline.normalize.text import extract, fold, on_distinct_rows

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
    city_cedex = extract(town_fold, r"\bCEDEX\b(?:\s+(?P<office>\d{1,2}))?\s*$")
    has_cedex_word = town_fold.str.contains(r"\bCEDEX\b", regex=True, na=False)
    parts["cedex"] = parts["cedex"].fillna(False).astype(bool) | has_cedex_word
    parts["cedex_office"] = parts["cedex_office"].where(
        parts["cedex_office"].notna(), city_cedex["office"]
    )
    # Postcode + town pairs repeat heavily (75011 PARIS): each distinct one is checked once.
    locality = pd.DataFrame(
        {"postcode": pc_in, "city": town_in, "cedex": parts["cedex"], "country": country}
    )
    loc = on_distinct_rows(
        locality,
        lambda u: validate_locality(u["postcode"], u["city"], u["cedex"], u["country"]),
    )
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
    all_codes = merge_codes(loc["codes"], extra)
    risk = codes_among(all_codes, NPAI_RISK_CODES)

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
