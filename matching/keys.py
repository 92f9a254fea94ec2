"""Field values as matching sees them, and the keys derived from them for blocking.

Every matchable field maps to one normalised column. Keys that reduce a value
(phonetic codes, prefixes, years) are computed once per distinct value: a
million customers carry a few tens of thousands of distinct names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jellyfish
import numpy as np
import pandas as pd

from mdm_pipeline.config.settings import BlockingKey

#: Matchable field -> the normalised column that holds its comparison form.
FIELD_COLUMNS = {
    "first_name": "first_name_norm",
    "last_name": "last_name_norm",
    "birth_name": "birth_name_norm",
    "birth_date": "birth_date",
    "email": "email_norm",
    "phone": "phone_norm",
    "postcode": "postcode_norm",
    "city": "city_norm",
    "street": "street_norm",
    "company_name": "company_name_norm",
    "siren": "siren_norm",
    "siret": "siret_norm",
    "customer_ref": "customer_ref_norm",
}
#: Fields built from several columns.
DERIVED_FIELDS = ("address",)


def field_values(records: pd.DataFrame, field: str) -> pd.Series:
    """The comparison form of a field as text (dates as YYYYMMDD), None where missing.

    'address' is the postcode followed by the street: the postal point as one value.
    """
    prepared = f"f_{field}"
    if prepared in records.columns:
        return records[prepared]
    if field == "address":
        pc, street = records["postcode_norm"], records["street_norm"]
        text = (pc.fillna("").astype(object) + " " + street.fillna("").astype(object)).str.strip()
        return text.where(pc.notna() | street.notna(), None)
    col = records[FIELD_COLUMNS[field]]
    if field == "birth_date":
        dates = pd.to_datetime(col, errors="coerce")
        # Integer arithmetic, then one conversion: strftime per date is ten times slower.
        number = dates.dt.year * 10000 + dates.dt.month * 100 + dates.dt.day
        text = number.astype("Int64").astype(str).astype(object)
        return text.where(dates.notna(), None)
    return col.astype(object).where(col.notna(), None)


def prepare(records: pd.DataFrame) -> pd.DataFrame:
    """The record type and every field's comparison form, computed once for a whole run.

    Blocking rules, training blocks and comparisons all read fields many times;
    reading them from this frame spares rebuilding dates and addresses each time.
    """
    fields = {f"f_{f}": field_values(records, f) for f in (*FIELD_COLUMNS, *DERIVED_FIELDS)}
    return pd.DataFrame({"record_type": records["record_type"].to_numpy(), **fields})


def per_distinct_value(series: pd.Series, func: Callable[[str], str]) -> pd.Series:
    """`func` applied once per distinct non-null value, mapped back (None stays None)."""
    codes, uniques = pd.factorize(series)
    table = np.array([func(v) or None for v in uniques] + [None], dtype=object)
    return pd.Series(table[codes], index=series.index)


# --- A phonetic key for French names -------------------------------------------------
# Soundex and Metaphone were built for English spelling; French writes one sound in many
# ways (PH/F, C/K/QU, AU/EAU/O, AN/EN, silent final letters). The rules below, applied in
# order to an upper-case unaccented name, bring those spellings to one code.
_FR_RULES: tuple[tuple[str, str], ...] = (
    (r"[^A-Z]", ""),
    (r"^MAC", "MC"),
    (r"GU([EI])", r"K\1"),
    (r"G([EIY])", r"J\1"),
    (r"QU?", "K"),
    (r"C([EIY])", r"S\1"),
    (r"SCH|SH|CH", "#"),  # the 'ch' sound
    (r"PH", "F"),
    (r"CK|CC|C", "K"),
    (r"G", "K"),
    (r"H", ""),
    (r"W", "V"),
    (r"Z", "S"),
    (r"Y", "I"),
    (r"BV", "V"),
    (r"EAU|AU|O", "O"),
    (r"(AIN|EIN|IN|IM|UN|UM)(?=[^AEIOU]|$)", "1"),  # the nasal 'in'
    (r"(AN|AM|EN|EM)(?=[^AEIOU]|$)", "2"),  # the nasal 'an'
    (r"AI|EI", "E"),
    (r"(ER|EZ|ET|ES|ENT)$", "E"),
    (r"([TDSXP])$", ""),
    (r"E$", ""),
    (r"(.)\1+", r"\1"),
)
_FR_COMPILED = tuple((re.compile(p), r) for p, r in _FR_RULES)


def phonetic_fr(name: str) -> str:
    """French phonetic code: PHILIPPE/FILIPE, GAUTHIER/GOTIE, LEFEBVRE/LEFEVRE agree."""
    code = name.upper()
    for pattern, repl in _FR_COMPILED:
        code = pattern.sub(repl, code)
    return code


_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "soundex": jellyfish.soundex,
    "metaphone": jellyfish.metaphone,
    "nysiis": jellyfish.nysiis,
    "phonetic_fr": phonetic_fr,
}


def key_values(records: pd.DataFrame, key: BlockingKey) -> pd.Series:
    """One blocking-key part per record (None where the field is missing)."""
    values = field_values(records, key.field)
    if key.transform == "exact":
        return values
    if key.transform == "prefix":
        text = values.str.replace(" ", "", regex=False).str[: key.length]
        return text.where(text.str.len() == key.length, None)
    if key.transform == "year":
        return values.str[:4]
    if key.transform == "email_user":
        return values.str.split("@").str[0]
    return per_distinct_value(values, _TRANSFORMS[key.transform])
