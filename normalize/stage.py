"""The normalisation stage: canonical records in, records with normalised columns out.

Raw values are never overwritten. Each field gets a match form (`*_norm`:
upper case, no accents, single spaces) used by matching, and where people read
it a display form (`*_display`: accents kept, proper case). What was wrong
with a value is said in `quality_codes` ('|'-joined), and for addresses in
`address_codes`.
"""

from __future__ import annotations

import pandas as pd

from mdm_pipeline.config import schema
from mdm_pipeline.config.settings import NormalizeSettings
from mdm_pipeline.normalize import fields
from mdm_pipeline.normalize.addresses import ADDRESS_COLUMNS, normalize_addresses
from mdm_pipeline.normalize.text import fold

#: Columns this stage adds.
NORMALISED_COLUMNS: tuple[str, ...] = (
    "civility_norm",
    "first_name_norm",
    "last_name_norm",
    "birth_name_norm",
    "first_name_display",
    "last_name_display",
    "birth_name_display",
    "email_norm",
    "email_valid",
    "email_domain_suggestion",
    "phone_norm",
    "phone_type",
    "phone_valid",
    "street_norm",
    "postcode_norm",
    "city_norm",
    "country_norm",
    "company_name_norm",
    "company_legal_form",
    "siren_norm",
    "siret_norm",
    *ADDRESS_COLUMNS,
)


def _add_codes(codes: pd.Series, mask: pd.Series, code: str) -> pd.Series:
    mask = mask.fillna(False).astype(bool)
    sep = codes.fillna("").where(codes.fillna("") == "", codes + "|")
    return codes.where(~mask, sep.fillna("") + code)


def normalize_records(records: pd.DataFrame, settings: NormalizeSettings) -> pd.DataFrame:
    """Add the normalised companions of every canonical field."""
    schema.require_columns(records, schema.CANONICAL_COLUMNS, "normalize")
    out = records.copy()
    codes = records["quality_codes"].astype(object)

    # Names: a civility typed inside the first or last name is taken out of it.
    civ_first, first = fields.split_civility(records["first_name"])
    civ_last, last = fields.split_civility(records["last_name"])
    civility = fields.civility(records["civility"])
    out["civility_norm"] = civility.where(
        civility.notna(), civ_first.where(civ_first.notna(), civ_last)
    )
    for col, value in (
        ("first_name", first),
        ("last_name", last),
        ("birth_name", records["birth_name"]),
    ):
        out[f"{col}_norm"] = fields.names(value)
        out[f"{col}_display"] = fields.display_name(value)

    out["email_norm"], out["email_valid"] = fields.email(records["email"])
    codes = _add_codes(codes, records["email"].notna() & out["email_norm"].isna(), "EMAIL_INVALID")
    out["email_domain_suggestion"] = fields.email_domain_typo(out["email_norm"])
    codes = _add_codes(codes, out["email_domain_suggestion"].notna(), "EMAIL_DOMAIN_TYPO")

    out["phone_norm"] = fields.phone(records["phone"], settings.phone_region)
    out["phone_type"] = fields.phone_type(out["phone_norm"])
    out["phone_valid"] = out["phone_norm"].notna().where(records["phone"].notna(), pd.NA)
    out["phone_valid"] = out["phone_valid"].astype("boolean")
    codes = _add_codes(codes, records["phone"].notna() & out["phone_norm"].isna(), "PHONE_INVALID")

    country = fold(records["country"])
    out["country_norm"] = country.where(country.notna(), settings.default_country)
    person = records["record_type"] == "person"
    identity = (
        out["civility_norm"].fillna("") + " " + first.fillna("") + " " + last.fillna("")
    ).str.strip()
    identity = identity.where(person, records["company_name"]).replace("", None)
    addr = normalize_addresses(
        records["address_lines"],
        records["postcode"],
        records["city"],
        out["country_norm"],
        identity,
    )
    out = pd.concat([out, addr], axis=1)
    # Comparison forms for matching: the full street (never the shortened print form),
    # La Poste's postcode and routing label where the address could be checked.
    street = (
        addr["addr_number"].fillna("")
        + " "
        + addr["addr_repetition"].fillna("")
        + " "
        + addr["addr_street_type"].fillna("")
        + " "
        + addr["addr_street_name"].fillna("")
    )
    out["street_norm"] = street.str.replace(r"\s+", " ", regex=True).str.strip().replace("", None)
    out["postcode_norm"] = addr["addr_postcode"].where(
        addr["addr_postcode"].notna(), fields.postcode(records["postcode"])
    )
    out["city_norm"] = addr["addr_routing_label"].where(
        addr["addr_routing_label"].notna(), fields.city(records["city"])
    )

    out["company_name_norm"], out["company_legal_form"] = fields.company(records["company_name"])
    out["siret_norm"] = fields.siret(records["siret"])
    codes = _add_codes(codes, records["siret"].notna() & out["siret_norm"].isna(), "SIRET_INVALID")
    siren = fields.siren(records["siren"])
    codes = _add_codes(codes, records["siren"].notna() & siren.isna(), "SIREN_INVALID")
    out["siren_norm"] = siren.where(siren.notna(), out["siret_norm"].str[:9])
    out["quality_codes"] = codes.replace("", None)
    return out
