"""Literal tables for the field normalisers: names, civility, e-mail, phone, identifiers."""

from __future__ import annotations

import pandas as pd
import pytest

from mdm_pipeline.normalize import fields


def one(func, value):
    out = func(pd.Series([value], dtype=object))
    if isinstance(out, tuple):
        return tuple(None if pd.isna(v.iloc[0]) else v.iloc[0] for v in out)
    return None if pd.isna(out.iloc[0]) else out.iloc[0]


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("M.", "M"),
        ("M", "M"),
        ("Mr", "M"),
        ("Monsieur", "M"),
        ("MME", "MME"),
        ("Mme", "MME"),
        ("Madame", "MME"),
        ("Mlle", "MLLE"),
        ("Mademoiselle", "MLLE"),
        ("MM.", "MM"),
        ("Messieurs", "MM"),
        ("Mesdames", "MMES"),
        ("Dr", None),
        ("", None),
        (None, None),
    ],
)
def test_civility(raw, norm) -> None:
    assert one(fields.civility, raw) == norm


@pytest.mark.parametrize(
    ("raw", "civ", "rest"),
    [
        ("Mme Hélène", "MME", "Hélène"),
        ("M. DUPONT", "M", "DUPONT"),
        ("MR Jean", "M", "Jean"),
        ("Mlle Zoé", "MLLE", "Zoé"),
        ("Martin", None, "Martin"),
        ("Marie", None, "Marie"),
        ("Monsieur Jean-Pierre", "M", "Jean-Pierre"),
    ],
)
def test_civility_inside_a_name(raw, civ, rest) -> None:
    assert one(fields.split_civility, raw) == (civ, rest)


@pytest.mark.parametrize(
    ("raw", "match", "display"),
    [
        ("Jean-Pierre", "JEAN PIERRE", "Jean-Pierre"),
        ("jean-pierre", "JEAN PIERRE", "Jean-Pierre"),
        ("DE LA FONTAINE", "DE LA FONTAINE", "De La Fontaine"),
        (
            "Marie-Claire de la fontaine",
            "MARIE CLAIRE DE LA FONTAINE",
            "Marie-Claire de La Fontaine",
        ),
        ("Hélène", "HELENE", "Hélène"),
        ("LEFÈVRE", "LEFEVRE", "Lefèvre"),
        ("d'Artagnan", "D ARTAGNAN", "D'Artagnan"),
        ("Le  Goff", "LE GOFF", "Le Goff"),
        ("Œuvray", "OEUVRAY", "Œuvray"),
        ("  ", None, None),
    ],
)
def test_name_forms(raw, match, display) -> None:
    assert one(fields.names, raw) == match
    assert one(fields.display_name, raw) == display


@pytest.mark.parametrize(
    ("raw", "name", "form"),
    [
        ("S.A.R.L. Dupont", "DUPONT", "SARL"),
        ("Boulangerie Martin SAS", "BOULANGERIE MARTIN", "SAS"),
        ("SAS Garage Petit", "GARAGE PETIT", "SAS"),
        ("Atelier Roux", "ATELIER ROUX", None),
        ("Transports Morel EURL", "TRANSPORTS MOREL", "EURL"),
        ("SCI Les Tilleuls", "LES TILLEULS", "SCI"),
        ("Garage Sasso", "GARAGE SASSO", None),
    ],
)
def test_company_legal_form(raw, name, form) -> None:
    assert one(fields.company, raw) == (name, form)


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Jean.Dupont@Orange.FR", "jean.dupont@orange.fr"),
        (" a@b.fr ", "a@b.fr"),
        ("pas-un-mail", None),
        ("a@b", None),
        ("a@@b.fr", None),
        ("a b@c.fr", None),
    ],
)
def test_email(raw, norm) -> None:
    assert one(lambda s: fields.email(s)[0], raw) == norm


@pytest.mark.parametrize(
    ("email", "suggestion"),
    [
        ("a@gmial.com", "gmail.com"),
        ("a@gmail.con", "gmail.com"),
        ("a@hotmial.fr", "hotmail.fr"),
        ("a@yahooo.fr", "yahoo.fr"),
        ("a@oragne.fr", "orange.fr"),
        ("a@gmail.com", None),
        ("a@hotmail.de", None),
        ("a@entreprise-dupont.fr", None),
    ],
)
def test_email_domain_typos(email, suggestion) -> None:
    assert one(fields.email_domain_typo, email) == suggestion


@pytest.mark.parametrize(
    ("raw", "e164", "kind"),
    [
        ("06 12 34 56 78", "+33612345678", "mobile"),
        ("0612345678", "+33612345678", "mobile"),
        ("06.12.34.56.78", "+33612345678", "mobile"),
        ("+33 6 12 34 56 78", "+33612345678", "mobile"),
        ("0033612345678", "+33612345678", "mobile"),
        ("07 53 88 45 76", "+33753884576", "mobile"),
        ("01 45 67 89 01", "+33145678901", "fixed"),
        ("04 10 16 15 33", "+33410161533", "fixed"),
        ("09 12 34 56 78", "+33912345678", "voip"),
        ("+44 20 7946 0958", "+442079460958", "fixed"),
        ("123", None, None),
        ("06 12 34", None, None),
    ],
)
def test_phone(raw, e164, kind) -> None:
    assert one(fields.phone, raw) == e164
    if e164:
        assert one(fields.phone_type, e164) == kind


@pytest.mark.parametrize(
    ("raw", "siret"),
    [
        ("732 829 320 00074", "73282932000074"),
        ("73282932000074", "73282932000074"),
        ("73282932000075", None),
        ("7328293200007", None),
    ],
)
def test_siret_luhn(raw, siret) -> None:
    assert one(fields.siret, raw) == siret


@pytest.mark.parametrize(
    ("raw", "siren"),
    [
        ("732 829 320", "732829320"),
        ("732829321", None),
        ("12345", None),
    ],
)
def test_siren_luhn(raw, siren) -> None:
    assert one(fields.siren, raw) == siren


@pytest.mark.parametrize(
    ("raw", "pc"),
    [
        ("75011", "75011"),
        ("1400", "01400"),
        ("75 011", "75011"),
        ("7501", "07501"),
        ("ABC", None),
    ],
)
def test_postcode(raw, pc) -> None:
    assert one(fields.postcode, raw) == pc
