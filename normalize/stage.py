"""The normalisation stage: canonical records in, records with `*_norm` columns out."""

from __future__ import annotations

import pandas as pd

from mdm_pipeline.config import schema
from mdm_pipeline.config.settings import NormalizeSettings
from mdm_pipeline.normalize import fields
from mdm_pipeline.normalize.addresses import normalize_addresses
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

    country = fold(records["country"])
    out["country_norm"] = country.where(country.notna(), settings.default_country)
    person = records["record_type"] == "person"
    identity = (
        out["civility_norm"].fillna("")
        + " "
        + records["first_name"].fillna("")
        + " "
        + records["last_name"].fillna("")
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

    out["company_name_norm"] = fold(records["company_name"])
    out["siret_norm"] = fields.siret(records["siret"])
    siren = fields.digits(records["siren"])
    siren = siren.where(siren.str.len() == 9, None)
    out["siren_norm"] = siren.where(siren.notna(), out["siret_norm"].str[:9])
    return out
