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
from mdm_pipeline.normalize.codes import codes_column, merge_codes
from mdm_pipeline.normalize.text import as_str, fold

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
    "customer_ref_norm",
    *ADDRESS_COLUMNS,
)


def normalize_records(records: pd.DataFrame, settings: NormalizeSettings) -> pd.DataFrame:
    """Add the normalised companions of every canonical field."""
    schema.require_columns(records, schema.CANONICAL_COLUMNS, "normalize")
    if not len(records):
        # Nothing to clean (an incremental night without changes): the columns, empty.
        return records.assign(**{c: pd.Series(dtype=object) for c in NORMALISED_COLUMNS})
    # New columns only: the input's own columns are never written to.
    out = records.copy(deep=False)
    flags: dict[str, pd.Series] = {}

    # Names: a civility typed inside the first or last name is taken out of it.
    name_forms = {col: fields.person_name(records[col]) for col in ("first_name", "last_name")}
    name_forms["birth_name"] = fields.person_name(records["birth_name"], strip_civility=False)
    first, last = name_forms["first_name"]["name"], name_forms["last_name"]["name"]
    civ_first, civ_last = name_forms["first_name"]["civility"], name_forms["last_name"]["civility"]
    civility = fields.civility(records["civility"])
    out["civility_norm"] = civility.where(
        civility.notna(), civ_first.where(civ_first.notna(), civ_last)
    )
    for col, forms in name_forms.items():
        out[f"{col}_norm"] = forms["norm"]
        out[f"{col}_display"] = forms["display"]

    out["email_norm"], out["email_valid"] = fields.email(records["email"])
    flags["EMAIL_INVALID"] = records["email"].notna() & out["email_norm"].isna()
    out["email_domain_suggestion"] = fields.email_domain_typo(out["email_norm"])
    flags["EMAIL_DOMAIN_TYPO"] = out["email_domain_suggestion"].notna()

    out["phone_norm"] = fields.phone(records["phone"], settings.phone_region)
    out["phone_type"] = fields.phone_type(out["phone_norm"])
    out["phone_valid"] = out["phone_norm"].notna().where(records["phone"].notna(), pd.NA)
    out["phone_valid"] = out["phone_valid"].astype("boolean")
    flags["PHONE_INVALID"] = records["phone"].notna() & out["phone_norm"].isna()

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
    for col in addr.columns:
        out[col] = addr[col]
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
    street = as_str(street).str.replace(r"\s+", " ", regex=True).str.strip()
    out["street_norm"] = street.where(street != "", None)
    out["postcode_norm"] = addr["addr_postcode"].where(
        addr["addr_postcode"].notna(), fields.postcode(records["postcode"])
    )
    out["city_norm"] = addr["addr_routing_label"].where(
        addr["addr_routing_label"].notna(), fields.city(records["city"])
    )

    out["company_name_norm"], out["company_legal_form"] = fields.company(records["company_name"])
    out["siret_norm"] = fields.siret(records["siret"])
    flags["SIRET_INVALID"] = records["siret"].notna() & out["siret_norm"].isna()
    siren = fields.siren(records["siren"])
    flags["SIREN_INVALID"] = records["siren"].notna() & siren.isna()
    out["siren_norm"] = siren.where(siren.notna(), out["siret_norm"].str[:9])
    # Customer numbers are written with spaces or dashes by some units, not by others.
    ref = fold(records["customer_ref"]).str.replace(" ", "", regex=False)
    out["customer_ref_norm"] = ref.where(ref.notna() & (ref != ""), None)
    out["quality_codes"] = merge_codes(records["quality_codes"], codes_column(flags, out.index))
    # Columns some helper left as Python strings go on as Arrow strings, like the rest:
    # made here, on whichever core normalised the source, they are a buffer per column
    # to hand back and hold, not a Python object per value (a million records held
    # some 18 such columns).
    for col in [*NORMALISED_COLUMNS, "quality_codes"]:
        if out[col].dtype == object and schema.only_text(out[col]):
            out[col] = as_str(out[col])
    return out
