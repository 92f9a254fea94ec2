"""Normalisers for names, civility, e-mail, phone, identifiers, postcode and city.

Pure functions of Series: no I/O, no global state. They keep raw values
untouched and return the normalised companion columns.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import phonenumbers

from mdm_pipeline.normalize.text import fold, per_distinct

_CIVILITY = {
    "M": "M",
    "MR": "M",
    "MONSIEUR": "M",
    "MM": "M",
    "MME": "MME",
    "MADAME": "MME",
    "MLLE": "MME",
    "MADEMOISELLE": "MME",
    "MS": "MME",
}

_EMAIL = re.compile(r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}$")


def names(series: pd.Series) -> pd.Series:
    """Comparison form of a person's name: DE LA FONTAINE, JEAN PIERRE, LE GOFF."""
    return fold(series)


def civility(series: pd.Series) -> pd.Series:
    """M or MME (French administrations no longer use MLLE); anything else is dropped."""
    return fold(series).str.replace(" ", "", regex=False).map(_CIVILITY)


def email(series: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Lower-cased e-mail and whether its syntax is valid; invalid ones do not match."""
    text = series.str.strip().str.lower()
    valid = text.str.match(_EMAIL, na=False)
    return text.where(valid, None), valid.where(series.notna(), other=pd.NA).astype("boolean")


def _e164(value: str, region: str) -> str | None:
    try:
        parsed = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def phone(series: pd.Series, region: str = "FR") -> pd.Series:
    """E.164 phone numbers (+33612345678); invalid numbers become empty.

    French numbers, the bulk of the data, are recognised with vectorised
    string operations; only the rest go through libphonenumber, once per
    distinct value.
    """
    digits = series.str.replace(r"[^\d+]", "", regex=True)
    digits = digits.str.replace(r"^00", "+", regex=True)
    national = digits.str.extract(r"^(?:\+33|0033|33(?=\d{9}$))?0?([1-9]\d{8})$")[0]
    french_form = digits.str.match(r"^(\+33|0)[1-9]\d{8}$", na=False)
    out = pd.Series(None, index=series.index, dtype=object)
    fast = french_form & national.notna()
    out[fast] = "+33" + national[fast]
    rest = series.notna() & ~fast
    if rest.any():
        out[rest] = per_distinct(series[rest], lambda v: _e164(v, region))
    return out


def digits(series: pd.Series) -> pd.Series:
    """Only the digits (SIRET typed with spaces, postcodes with a stray dot)."""
    out = series.str.replace(r"\D", "", regex=True)
    return out.where(out.notna() & (out != ""), None)


def luhn_valid(series: pd.Series) -> pd.Series:
    """Luhn check of digit strings (SIREN, SIRET), vectorised over a digit matrix."""
    result = pd.Series(False, index=series.index)
    for length in series.dropna().str.len().unique():
        sel = series.str.len() == length
        mat = np.array([list(s) for s in series[sel]], dtype=np.int64)
        weights = np.where((length - np.arange(length)) % 2 == 0, 2, 1)
        prod = mat * weights
        prod = np.where(prod > 9, prod - 9, prod)
        result[sel] = prod.sum(axis=1) % 10 == 0
    return result


def siret(series: pd.Series) -> pd.Series:
    """14-digit, Luhn-valid SIRET or empty."""
    d = digits(series)
    ok = (d.str.len() == 14).fillna(False) & luhn_valid(d.where(d.str.len() == 14))
    return d.where(ok, None)


def postcode(series: pd.Series) -> pd.Series:
    """Five-digit French postcode; a 4-digit one lost its leading zero in a spreadsheet."""
    d = digits(series)
    d = d.where(d.str.len() != 4, "0" + d)
    return d.where(d.str.len() == 5, None)


def city(series: pd.Series) -> pd.Series:
    """Comparison form of a town: SAINT for ST, no arrondissement or CEDEX suffix."""
    out = fold(series)
    out = out.str.replace(r"\bSTE\b", "SAINTE", regex=True).str.replace(
        r"\bST\b", "SAINT", regex=True
    )
    out = out.str.replace(r"\s+CEDEX(\s+\d+)?$", "", regex=True)
    out = out.str.replace(r"^(PARIS|LYON|MARSEILLE)\s+\d{1,2}(E|EME|ER)?$", r"\1", regex=True)
    return out
