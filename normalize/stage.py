"""The normalisation stage: canonical records in, records with `*_norm` columns out."""

from __future__ import annotations

import pandas as pd

from mdm_pipeline.config import schema
from mdm_pipeline.config.settings import NormalizeSettings
from mdm_pipeline.normalize import address, fields
from mdm_pipeline.normalize.text import fold

#: Columns this stage adds.
NORMALISED_COLUMNS: tuple[str, ...] = (
    "civility_norm",
    "first_name_norm",
    "last_name_norm",
    "birth_name_norm",
    "email_norm",
    "email_valid",
    "phone_norm",
    "street_norm",
    "postcode_norm",
    "city_norm",
    "country_norm",
    "company_name_norm",
    "siren_norm",
    "siret_norm",
)


def normalize_records(records: pd.DataFrame, settings: NormalizeSettings) -> pd.DataFrame:
    """Add normalised companions to every canonical field; raw values stay untouched."""
    schema.require_columns(records, schema.CANONICAL_COLUMNS, "normalize")
    out = records.copy()
    out["civility_norm"] = fields.civility(records["civility"])
    for col in ("first_name", "last_name", "birth_name"):
        out[f"{col}_norm"] = fields.names(records[col])
    out["email_norm"], out["email_valid"] = fields.email(records["email"])
    out["phone_norm"] = fields.phone(records["phone"], settings.phone_region)

    parts = address.split_lines(records["address_lines"])
    out["street_norm"] = parts["street"]
    postcode = records["postcode"].where(records["postcode"].notna(), parts["postcode_in_lines"])
    town = records["city"].where(records["city"].notna(), parts["city_in_lines"])
    out["postcode_norm"] = fields.postcode(postcode)
    out["city_norm"] = fields.city(town)
    country = fold(records["country"])
    out["country_norm"] = country.where(country.notna(), settings.default_country)

    out["company_name_norm"] = fold(records["company_name"])
    out["siret_norm"] = fields.siret(records["siret"])
    siren = fields.digits(records["siren"])
    siren = siren.where(siren.str.len() == 9, None)
    out["siren_norm"] = siren.where(siren.notna(), out["siret_norm"].str[:9])
    return out
