"""Normalisers for names, civility, e-mail, phone, identifiers, postcode and city.

Pure functions of Series: no I/O, no global state. They keep raw values
untouched and return the normalised companion columns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import phonenumbers
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from mdm_pipeline.normalize.text import as_str, extract, fold, on_distinct, per_distinct, sub

_CIVILITY = {
    "M": "M",
    "MR": "M",
    "MONSIEUR": "M",
    "MME": "MME",
    "MADAME": "MME",
    "MS": "MME",
    "MLLE": "MLLE",
    "MADEMOISELLE": "MLLE",
    "MM": "MM",
    "MESSIEURS": "MM",
    "MMES": "MMES",
    "MESDAMES": "MMES",
}
_CIVILITY_PREFIX = (
    r"^\s*(MONSIEUR|MADAME|MADEMOISELLE|MESSIEURS|MESDAMES|MLLE|MME|MMES|MR|MM|M)\.?\s+"
)
_LEGAL_FORMS = (
    "SARL",
    "SASU",
    "SAS",
    "SA",
    "EURL",
    "SCI",
    "SNC",
    "SCOP",
    "SELARL",
    "SELAS",
    "EIRL",
    "EI",
    "SCM",
    "SCP",
    "GIE",
    "SEM",
    "SCA",
    "ASSOCIATION",
)
_REAL_TLDS = {
    "com",
    "net",
    "org",
    "fr",
    "de",
    "es",
    "it",
    "be",
    "ch",
    "co.uk",
    "uk",
    "ca",
    "eu",
    "lu",
    "nl",
    "pt",
    "info",
    "re",
    "mc",
}
#: Domains people mistype most, for the typo check.
COMMON_DOMAINS = (
    "gmail.com",
    "hotmail.fr",
    "hotmail.com",
    "orange.fr",
    "free.fr",
    "sfr.fr",
    "wanadoo.fr",
    "laposte.net",
    "yahoo.fr",
    "yahoo.com",
    "outlook.fr",
    "outlook.com",
    "icloud.com",
    "live.fr",
    "bbox.fr",
    "neuf.fr",
    "aol.com",
    "gmx.fr",
    "numericable.fr",
    "protonmail.com",
)

_EMAIL = r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}$"


def names(series: pd.Series) -> pd.Series:
    """Comparison form of a person's name: DE LA FONTAINE, JEAN PIERRE, LE GOFF."""
    return fold(series)


def civility(series: pd.Series) -> pd.Series:
    """M, MME, MLLE, MM or MMES from any spelling; anything else is dropped."""

    def table(u: pd.Series) -> pd.DataFrame:
        return pd.DataFrame({"civility": fold(u).str.replace(" ", "", regex=False).map(_CIVILITY)})

    return on_distinct(series, table)["civility"].astype(object)


def split_civility(names: pd.Series) -> tuple[pd.Series, pd.Series]:
    """A civility typed inside a name field ("Mme Hélène", "M. DUPONT"): (civility, name)."""
    upper = names.str.upper()
    prefix = upper.str.extract(_CIVILITY_PREFIX, expand=False)
    rest = names.str.replace(_CIVILITY_PREFIX, "", regex=True, case=False)
    rest = rest.where(prefix.notna(), names)
    return civility(prefix), rest.where(rest.str.strip() != "", None)


def display_name(series: pd.Series) -> pd.Series:
    """Proper case with accents kept: "jean-pierre DE LA FONTAINE" -> "Jean-Pierre de La Fontaine".

    Lower-case particles (de, du, des, d') only inside a name, never at its start.
    """
    text = series.str.strip().str.replace(r"\s+", " ", regex=True).str.lower()
    text = text.str.title()  # capitalises after spaces, hyphens and apostrophes
    # Inside the name (a space on each side), particles are written in lower case.
    for particle in ("De", "Du", "Des"):
        text = text.str.replace(f" {particle} ", f" {particle.lower()} ", regex=False)
    text = text.str.replace(" D'", " d'", regex=False)
    return text.where(text.notna() & (text != ""), None)


def person_name(series: pd.Series, strip_civility: bool = True) -> pd.DataFrame:
    """Everything derived from one name field, computed once per distinct spelling.

    Columns: civility typed inside the name, the name without it, its match
    form and its display form. Names repeat heavily (MARTIN, Marie), so the
    work is done on the distinct values only.
    """

    def forms(uniq: pd.Series) -> pd.DataFrame:
        none = pd.Series(None, index=uniq.index, dtype=object)
        civ, name = split_civility(uniq) if strip_civility else (none, uniq)
        return pd.DataFrame(
            {"civility": civ, "name": name, "norm": names(name), "display": display_name(name)}
        )

    return on_distinct(series, forms)


def company(series: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(company name without its legal form, legal form): "S.A.R.L. Dupont" -> (DUPONT, SARL)."""
    parts = on_distinct(series, _company_distinct)
    return parts["name"], parts["form"]


def _company_distinct(series: pd.Series) -> pd.DataFrame:
    text = fold(series)
    # Dotted forms fold to spaced letters: S A R L -> SARL.
    for form in _LEGAL_FORMS:
        if len(form) > 1 and form != "ASSOCIATION":
            text = text.str.replace(rf"\b{' '.join(form)}\b", form, regex=True)
    forms = "|".join(_LEGAL_FORMS)
    start = text.str.extract(rf"^({forms})\s+", expand=False)
    end = text.str.extract(rf"\s+({forms})$", expand=False)
    form = start.where(start.notna(), end)
    name = text.str.replace(rf"^({forms})\s+|\s+({forms})$", "", regex=True)
    return pd.DataFrame({"name": name.where(name != "", None), "form": form})


def email(series: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Lower-cased e-mail and whether its syntax is valid; invalid ones do not match."""
    text = as_str(series).str.strip().str.lower()
    valid = text.str.match(_EMAIL, na=False)
    return text.where(valid, None), valid.where(series.notna(), other=pd.NA).astype("boolean")


def email_domain_typo(email_norm: pd.Series) -> pd.Series:
    """The common domain a mistyped one was meant to be (gmial.com -> gmail.com), or None."""
    domain = extract(email_norm, r"@(?P<domain>.*)$")["domain"]
    uniq = domain.dropna().unique()
    if len(uniq) == 0:
        return pd.Series(None, index=email_norm.index, dtype=object)
    dist = process.cdist(uniq, COMMON_DOMAINS, scorer=Levenshtein.distance, workers=1)
    best = dist.argmin(axis=1)
    close = (dist.min(axis=1) <= 2) & ~np.isin(uniq, COMMON_DOMAINS)
    # Another national domain of the same provider (hotmail.de) is not a typo; gmail.con is.
    same_provider = np.array(
        [
            u.split(".", 1)[0] == COMMON_DOMAINS[b].split(".", 1)[0]
            and u.split(".", 1)[-1] in _REAL_TLDS
            for u, b in zip(uniq, best, strict=True)
        ],
        dtype=bool,
    )
    close &= ~same_provider
    table = {u: COMMON_DOMAINS[b] for u, b, c in zip(uniq, best, close, strict=True) if c}
    return domain.map(table)


def phone_type(e164: pd.Series) -> pd.Series:
    """mobile, fixed, voip or other, from the number plan (French numbers by prefix)."""
    out = pd.Series(None, index=e164.index, dtype=object)
    fr = as_str(e164).str.startswith("+33", na=False)
    digit = as_str(e164).str[3]
    out[fr & digit.isin(["6", "7"])] = "mobile"
    out[fr & digit.isin(["1", "2", "3", "4", "5"])] = "fixed"
    out[fr & digit.isin(["9"])] = "voip"
    out[fr & digit.isin(["8"])] = "other"
    rest = e164.notna() & ~fr
    if rest.any():
        out[rest] = per_distinct(e164[rest], _number_type)
    return out


def _number_type(value: str) -> str:
    kind = phonenumbers.number_type(phonenumbers.parse(value, None))
    return {
        phonenumbers.PhoneNumberType.MOBILE: "mobile",
        phonenumbers.PhoneNumberType.FIXED_LINE: "fixed",
        phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE: "fixed_or_mobile",
        phonenumbers.PhoneNumberType.VOIP: "voip",
    }.get(kind, "other")


def siren(series: pd.Series) -> pd.Series:
    """9-digit, Luhn-valid SIREN or empty."""
    d = digits(series)
    ok = (d.str.len() == 9).fillna(False) & luhn_valid(d.where(d.str.len() == 9))
    return d.where(ok, None)


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
    digits = as_str(series).str.replace(r"[^\d+]", "", regex=True)
    digits = digits.str.replace(r"^00", "+", regex=True)
    national = extract(digits, r"^(?:\+33|0033|33)?0?(?P<national>[1-9]\d{8})$")["national"]
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
    out = as_str(series).str.replace(r"\D", "", regex=True)
    return out.where(out.notna() & (out != ""), None)


def luhn_valid(series: pd.Series) -> pd.Series:
    """Luhn check of digit strings (SIREN, SIRET), vectorised over a digit matrix."""
    result = pd.Series(False, index=series.index)
    for length in series.dropna().str.len().unique():
        sel = series.str.len() == length
        # Fixed-length digit strings laid end to end are a digit matrix: no per-row loop.
        blob = "".join(series[sel].tolist()).encode("ascii")
        mat = np.frombuffer(blob, dtype=np.uint8).reshape(-1, int(length)).astype(np.int64) - 48
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
    d = digits(as_str(series))
    d = d.where(d.str.len() != 4, "0" + d)
    return d.where(d.str.len() == 5, None)


def city(series: pd.Series) -> pd.Series:
    """Comparison form of a town: SAINT for ST, no arrondissement or CEDEX suffix."""
    return on_distinct(series, _city_distinct)["city"]


def _city_distinct(series: pd.Series) -> pd.DataFrame:
    out = fold(series)
    out = out.str.replace(r"\bSTE\b", "SAINTE", regex=True).str.replace(
        r"\bST\b", "SAINT", regex=True
    )
    out = out.str.replace(r"\s+CEDEX(\s+\d+)?$", "", regex=True)
    out = sub(out, r"^(PARIS|LYON|MARSEILLE)\s+\d{1,2}(E|EME|ER)?$", r"\1")
    return pd.DataFrame({"city": out})
