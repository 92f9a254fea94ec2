"""Loaders of the reference data shipped in `data/reference/` (see its README).

Facts shared by several stages (La Poste's postcode base, the first-name list)
are read here, in the bottom layer, once per process.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pandas as pd
from unidecode import unidecode

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "data" / "reference"


@cache
def laposte_base() -> pd.DataFrame:
    """La Poste's postcode base: insee, commune, postcode, routing label, line 5."""
    frame = pd.read_csv(
        REFERENCE_DIR / "laposte_hexasmal.csv",
        sep=";",
        dtype=str,
        keep_default_na=False,
        encoding="utf-8",
    )
    frame.columns = [c.lstrip("#") for c in frame.columns]
    return frame.rename(
        columns={
            "Code_commune_INSEE": "insee",
            "Nom_de_la_commune": "commune",
            "Code_postal": "postcode",
            "Libellé_d_acheminement": "routing_label",
            "Ligne_5": "line5",
        }
    )


@cache
def names() -> pd.DataFrame:
    """French first names and surnames with their frequency rank."""
    return pd.read_csv(REFERENCE_DIR / "names_fr.csv", dtype={"rank": int}, keep_default_na=False)


@cache
def first_name_keys() -> frozenset[str]:
    """Upper-case, unaccented first names (and their hyphen parts), to tell them from surnames."""
    frame = names()
    first = frame.loc[frame["kind"].str.startswith("first"), "name"]
    keys = {unidecode(n).upper() for n in first}
    keys |= {part for n in keys for part in n.split("-")}
    return frozenset(keys)


@cache
def surname_keys() -> frozenset[str]:
    """Upper-case, unaccented common surnames."""
    frame = names()
    return frozenset(unidecode(n).upper() for n in frame.loc[frame["kind"] == "last", "name"])


@cache
def street_types() -> pd.DataFrame:
    """NF Z10-011 street types: full word -> standard abbreviation."""
    return pd.read_csv(
        REFERENCE_DIR / "street_types_nfz10011.csv", dtype=str, keep_default_na=False
    )


@cache
def address_words() -> pd.DataFrame:
    """Titles, SAINT, repetition indexes, complements, distribution services, common words."""
    return pd.read_csv(
        REFERENCE_DIR / "address_words_nfz10011.csv", dtype=str, keep_default_na=False
    )
