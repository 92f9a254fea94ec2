"""Deterministic generator of four business units' extracts with known truth.

Writes, at any size, the same files as `data/samples/`: an e-commerce CSV
(UTF-8), a store loyalty CSV (cp1252, `;`, civility, ADR1..ADR4 in shuffled
order, DD/MM/YYYY), a call-centre CSV (latin-1, `|`, full names in either
order, the whole address in one quoted multi-line field), a B2B Parquet file,
a La Poste NPAI return file, and `truth.csv` (which records are one customer).

Customers are drawn from real French names (frequency-ranked) and real
postcode-commune pairs of La Poste's base. Records carry the defects that make
matching hard: typos, dropped accents, abbreviations, swapped names, maiden and
married names, people who moved, missing fields, households sharing an address
and a landline, and common surnames that must not merge. A few rows are
deliberately broken so that quarantine is exercised.

Sampling is vectorised with numpy; only the few corrupted values go through a
small Python function. The same seed and size always give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from unidecode import unidecode

from mdm_pipeline.config.reference import laposte_base, names

FILES = {
    "ecommerce": "ecommerce_clients.csv",
    "stores": "magasins_fidelite.csv",
    "callcentre": "centre_appels.csv",
    "b2b": "b2b_comptes.parquet",
    "npai": "laposte_retours_npai.csv",
    "truth": "truth.csv",
}

STREET_NAMES = (
    "de la République",
    "Victor Hugo",
    "Jean Jaurès",
    "du Général de Gaulle",
    "de la Gare",
    "des Lilas",
    "Pasteur",
    "du Moulin",
    "de l'Église",
    "des Écoles",
    "Gambetta",
    "de la Paix",
    "des Acacias",
    "du Château",
    "Voltaire",
    "Émile Zola",
    "de la Liberté",
    "des Tilleuls",
    "du Stade",
    "Jules Ferry",
    "Saint-Michel",
    "des Fleurs",
    "du Maréchal Foch",
    "de Verdun",
    "des Peupliers",
    "Sainte-Anne",
    "du 8 Mai 1945",
    "Anatole France",
    "de la Fontaine",
    "des Vignes",
    "du Commandant Charcot",
    "Georges Clemenceau",
    "de Bretagne",
    "des Roses",
    "du Professeur Calmette",
    "Paul Bert",
    "Lamartine",
    "d'Alsace-Lorraine",
    "de la Mairie",
    "des Jardins",
    "Saint-Exupéry",
    "des Mimosas",
    "du Port",
    "de Lattre de Tassigny",
)
STREET_TYPES = (
    "Rue",
    "Avenue",
    "Boulevard",
    "Chemin",
    "Impasse",
    "Allée",
    "Place",
    "Route",
    "Square",
    "Quai",
    "Lotissement",
)
STREET_TYPE_P = (0.46, 0.12, 0.06, 0.08, 0.07, 0.06, 0.04, 0.05, 0.02, 0.02, 0.02)
ABBREVIATIONS = {
    "Rue": ("R.", "R"),
    "Avenue": ("Av.", "AV", "Ave"),
    "Boulevard": ("Bd", "BLD", "Bvd"),
    "Chemin": ("Ch.", "CHE"),
    "Impasse": ("Imp.", "IMP"),
    "Allée": ("All.", "ALL"),
    "Place": ("Pl.", "PL"),
    "Route": ("Rte", "RTE"),
    "Square": ("Sq",),
    "Quai": ("Q.",),
    "Lotissement": ("Lot.", "LOT"),
}
COMPLEMENTS = (
    "Appartement {n}",
    "Apt {n}",
    "Bâtiment {l}",
    "Résidence Les Pins",
    "Résidence du Parc",
    "Escalier {n}",
    "Étage {n}",
    "Chez M. Bernard",
    "Entrée {l}",
    "Immeuble Le Central",
)
EMAIL_DOMAINS = (
    "gmail.com",
    "orange.fr",
    "free.fr",
    "hotmail.fr",
    "laposte.net",
    "sfr.fr",
    "wanadoo.fr",
    "yahoo.fr",
    "outlook.fr",
    "icloud.com",
)
COMPANY_WORDS = (
    "Boulangerie",
    "Garage",
    "Transports",
    "Menuiserie",
    "Cabinet",
    "Atelier",
    "Pharmacie",
    "Plomberie",
    "Imprimerie",
    "Librairie",
    "Fromagerie",
    "Électricité",
)
LEGAL_FORMS = ("SARL", "SAS", "SA", "EURL", "SASU")
NPAI_MOTIFS = (
    "N'habite pas à l'adresse indiquée",
    "Destinataire inconnu à l'adresse",
    "Défaut d'accès ou d'adressage",
    "Pli refusé par le destinataire",
    "Pli avisé et non réclamé",
    "Décédé",
)
BU_SHARE = {"ecommerce": 0.40, "stores": 0.35, "callcentre": 0.25}
REFERENCE_DATE = pd.Timestamp("2026-11-01")

SAMPLE_CONFIG = """\
# mdm-pipeline configuration for the shipped samples (and for `mdm generate` output).
# Every key is documented in README.md, "Configuration reference".
version: 1

store:
  # url: postgresql+psycopg://mdm@db-host/mdm   # default: mdm.sqlite next to this file
  url: null                                      # MDM_STORE_URL in the environment overrides it

export:
  dir: out            # files written back to each business unit, relative to this file

normalize:
  default_country: FR
  phone_region: FR

matching:
  # Comparisons (with their m priors) and training blocks use the shipped French
  # customer model; see docs/matching.md to override them.
  blocking:
    max_block_size: 500           # larger blocks are skipped, with a warning naming the rule
    rules:
      - {name: email, keys: [email]}
      - {name: phone, keys: [phone]}
      - name: birth_date_last_name
        keys: [birth_date, {field: last_name, transform: phonetic_fr}]
      - name: birth_date_first_name
        keys: [birth_date, {field: first_name, transform: phonetic_fr}]
      - name: postcode_names
        keys:
          - postcode
          - {field: last_name, transform: phonetic_fr}
          - {field: first_name, transform: phonetic_fr}
      - name: birth_date_postcode
        keys: [birth_date, postcode]
      - name: street_first_name
        keys: [street, postcode, {field: first_name, transform: prefix, length: 1}]
      - {name: siren, keys: [siren], record_type: organisation}
      - name: company_postcode
        record_type: organisation
        keys: [{field: company_name, transform: prefix, length: 6}, postcode]
  bands:
    auto_match: 0.95              # merged without review
    review: 0.50                  # listed for a steward
  clustering:
    max_cluster_size: 20
    strong_link: 0.9999

sources:
  - name: ecommerce
    format: csv
    path: ecommerce_clients.csv
    encoding: utf-8
    delimiter: ","
    trust: 2
    mapping:
      source_key: {column: customer_id}
      email: email
      first_name: first_name
      last_name: last_name
      birth_date: {column: birth_date, format: "%Y-%m-%d"}
      phone: phone
      address_lines: address
      postcode: zip
      city: city
      country: {column: country, values: {France: FR}}
      consent_email: {column: newsletter_optin}
      source_updated_at: {column: updated_at, format: "ISO8601"}

  - name: stores
    format: csv
    path: magasins_fidelite.csv
    encoding: cp1252
    delimiter: ";"
    trust: 3
    mapping:
      source_key: {column: NUM_CARTE}
      civility: CIVILITE
      last_name: NOM
      first_name: PRENOM
      birth_date: {column: DATE_NAISSANCE, format: "%d/%m/%Y"}
      phone: TEL
      email: EMAIL
      address_lines: {columns: [ADR1, ADR2, ADR3, ADR4]}
      postcode: CP
      city: VILLE
      country: {constant: FR}
      consent_sms: {column: OPTIN_SMS}
      consent_post: {column: OPTIN_COURRIER}
      source_updated_at: {column: DATE_MAJ, format: "%d/%m/%Y %H:%M"}

  - name: callcentre
    format: csv
    path: centre_appels.csv
    encoding: latin-1
    delimiter: "|"
    trust: 1
    mapping:
      source_key: {column: REF_CLIENT}
      full_name: {column: NOM_COMPLET, order: auto}
      phone: TELEPHONE
      email: MAIL
      address_lines: ADRESSE
      birth_date: {column: NE_LE, format: "%d.%m.%Y", on_invalid: "null"}
      consent_sms: {column: ACCORD_SMS}
      source_updated_at: {column: DERNIER_CONTACT, format: "%d/%m/%Y %H:%M:%S"}

  - name: b2b
    format: parquet
    path: b2b_comptes.parquet
    record_type: organisation
    trust: 2
    mapping:
      source_key: {column: account_id}
      company_name: raison_sociale
      siret: siret
      first_name: contact_prenom
      last_name: contact_nom
      email: contact_email
      phone: contact_tel
      address_lines: {columns: [adresse_1, adresse_2]}
      postcode: code_postal
      city: ville
      country: pays
      source_updated_at: {column: updated_at, format: "ISO8601"}

npai_returns:
  - path: laposte_retours_npai.csv
    encoding: utf-8
    delimiter: ";"
    source_column: CODE_BU
    key_column: REFERENCE_CLIENT
    date_column: DATE_RETOUR
    date_format: "%d/%m/%Y"
    reason_column: MOTIF
"""


@dataclass(frozen=True)
class Generated:
    """What `generate` wrote."""

    out_dir: Path
    records: dict[str, int]  # rows written per source (including deliberately broken ones)
    entities: int


def _zipf_choice(rng: np.random.Generator, items: np.ndarray, size: int, a: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, len(items) + 1) ** a
    return items[rng.choice(len(items), size=size, p=weights / weights.sum())]


def _typo(word: str, r: float, pos: float, letter: str) -> str:
    """One keyboard slip: substitution, deletion, transposition or insertion."""
    if len(word) < 3:
        return word
    i = int(pos * (len(word) - 1))
    if r < 0.3:
        return word[:i] + letter + word[i + 1 :]
    if r < 0.55:
        return word[:i] + word[i + 1 :]
    if r < 0.8 and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return word[:i] + letter + word[i:]


def _apply_typos(values: pd.Series, mask: np.ndarray, rng: np.random.Generator) -> pd.Series:
    out = values.copy()
    idx = np.flatnonzero(mask & values.notna().to_numpy())
    draws = rng.random((len(idx), 3))
    letters = rng.choice(list("aeinorstul"), size=len(idx))
    for j, i in enumerate(idx):
        out.iat[i] = _typo(out.iat[i], draws[j, 0], draws[j, 1], letters[j])
    return out


def _luhn_complete(prefix: np.ndarray) -> np.ndarray:
    """Append the Luhn check digit to each row of digits (SIREN and SIRET are Luhn-valid)."""
    digits = prefix.copy()
    n = digits.shape[1] + 1
    # Positions counted from the right of the full number; the check digit is position 1.
    weights = np.where((n - np.arange(digits.shape[1])) % 2 == 0, 2, 1)
    prod = digits * weights
    prod = np.where(prod > 9, prod - 9, prod)
    check = (10 - prod.sum(axis=1) % 10) % 10
    return np.concatenate([digits, check[:, None]], axis=1)


def _digits_to_str(digits: np.ndarray) -> np.ndarray:
    return np.array(["".join(map(str, row)) for row in digits], dtype=object)


def _people(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """The true customers: one row per person with their reference values."""
    ref = names()
    last = ref.loc[ref["kind"] == "last", "name"].to_numpy()
    fem = ref.loc[ref["kind"] == "first_female", "name"].to_numpy()
    mal = ref.loc[ref["kind"] == "first_male", "name"].to_numpy()
    base = laposte_base()

    female = rng.random(n) < 0.52
    first = np.where(female, _zipf_choice(rng, fem, n, 0.8), _zipf_choice(rng, mal, n, 0.8))
    surname = _zipf_choice(rng, last, n, 1.0)
    birth = REFERENCE_DATE - pd.to_timedelta(rng.integers(18 * 365, 88 * 365, n), unit="D")
    people = pd.DataFrame(
        {
            "female": female,
            "first_name": first,
            "last_name": surname,
            "birth_date": birth.normalize(),
        }
    )

    # Addresses: a real postcode-commune pair; a fifth in Paris, Lyon or Marseille.
    plm = base[base["insee"].str.match(r"^(751\d\d|6938\d|132\d\d)$")].index.to_numpy()
    pick = np.where(rng.random(n) < 0.2, rng.choice(plm, n), rng.choice(base.index.to_numpy(), n))
    commune = base.loc[pick].reset_index(drop=True)

    def address(size: int) -> pd.DataFrame:
        number = rng.integers(1, 160, size)
        rep = rng.choice(["", "", "", "", "", "", "", "", "bis", "ter"], size)
        stype = rng.choice(np.array(STREET_TYPES), size, p=STREET_TYPE_P)
        sname = np.where(
            rng.random(size) < 0.8,
            rng.choice(np.array(STREET_NAMES), size),
            "de la Croix " + rng.choice(last, size),
        )
        template = np.where(rng.random(size) < 0.25, rng.choice(np.array(COMPLEMENTS), size), "")
        n_compl = rng.integers(1, 40, size)
        l_compl = rng.choice(list("ABCDEF"), size)
        compl = pd.Series(
            [t.format(n=a, l=b) for t, a, b in zip(template, n_compl, l_compl, strict=True)],
            dtype=object,
        )
        return pd.DataFrame(
            {
                "number": number,
                "rep": rep,
                "street_type": stype,
                "street_name": sname,
                "complement": compl,
            }
        )

    people = pd.concat(
        [people, address(n), commune[["postcode", "routing_label", "insee"]]], axis=1
    )

    # Households: a fifth of people live with someone already drawn (same address and
    # surname, often the landline): family members, never one customer.
    joins = np.flatnonzero(rng.random(n) < 0.2)
    joins = joins[joins > 0]
    hosts = (rng.random(len(joins)) * joins).astype(int)
    shared = [
        "number",
        "rep",
        "street_type",
        "street_name",
        "complement",
        "postcode",
        "routing_label",
        "insee",
        "last_name",
    ]
    people.loc[joins, shared] = people.loc[hosts, shared].to_numpy()
    people["household"] = np.arange(n)
    people.loc[joins, "household"] = people.loc[hosts, "household"].to_numpy()

    # Married women: the surname above is the married one, with a different birth name.
    married = female & (rng.random(n) < 0.35)
    people["birth_name"] = np.where(married, _zipf_choice(rng, last, n, 1.0), None)

    # Contacts.
    mobile = rng.integers(10_000_000, 99_999_999, n)
    people["mobile"] = np.where(rng.random(n) < 0.5, "06", "07") + pd.Series(mobile).astype(str)
    landline = rng.integers(10_000_000, 99_999_999, n)
    region = rng.choice(["01", "02", "03", "04", "05"], n)
    people["landline"] = pd.Series(region) + pd.Series(landline).astype(str)
    people.loc[joins, "landline"] = people.loc[hosts, "landline"].to_numpy()
    key = (
        pd.Series(first).map(lambda s: unidecode(s).lower().replace(" ", "-"))
        + rng.choice([".", "_", ""], n)
        + people["last_name"].map(lambda s: unidecode(s).lower().replace(" ", ""))
    )
    suffix = np.where(rng.random(n) < 0.4, rng.integers(1, 99, n).astype(str), "")
    local = key + suffix
    domain = pd.Series(rng.choice(np.array(EMAIL_DOMAINS), n))
    # An address belongs to one person: namesakes get told apart by a digit...
    clash = (local + "@" + domain).duplicated(keep="first")
    while clash.any():
        local[clash] = local[clash] + rng.integers(0, 10, int(clash.sum())).astype(str)
        clash = (local + "@" + domain).duplicated(keep="first")
    email = local + "@" + domain
    people["email"] = email
    # ...but some family members share one address (a hard case for matching).
    family_mail = joins[rng.random(len(joins)) < 0.15]
    people.loc[family_mail, "email"] = people.loc[
        hosts[np.isin(joins, family_mail)], "email"
    ].to_numpy()

    # A tenth moved: their old address shows up in older extracts.
    moved = rng.random(n) < 0.1
    old = address(n)
    old_commune = base.loc[rng.choice(base.index.to_numpy(), n)].reset_index(drop=True)
    for col in old.columns:
        people["old_" + col] = old[col].astype(object).where(moved, None)
    for col in ("postcode", "routing_label"):
        people["old_" + col] = old_commune[col].astype(object).where(moved, None)
    people["moved"] = moved
    return people


def _street_line(
    recs: pd.DataFrame, rng: np.random.Generator, abbreviate: float, prefix: str = ""
) -> pd.Series:
    n = len(recs)
    stype = recs[prefix + "street_type"].astype(str)
    short = np.array([rng.choice(ABBREVIATIONS[t]) for t in stype], dtype=object) if n else []
    use_short = rng.random(n) < abbreviate
    stype = pd.Series(np.where(use_short, short, stype), index=recs.index)
    rep = recs[prefix + "rep"].astype(str)
    rep_form = np.where(rng.random(n) < 0.5, " " + rep, rep.str[:1].str.upper())
    rep = pd.Series(np.where(rep == "", "", rep_form), index=recs.index)
    return (
        recs[prefix + "number"].astype(str)
        + rep
        + " "
        + stype
        + " "
        + recs[prefix + "street_name"].astype(str)
    )


def _city_variant(label: pd.Series, postcode: pd.Series, rng: np.random.Generator) -> pd.Series:
    """How people type their town: cases, SAINT/ST, arrondissements, the odd CEDEX."""
    n = len(label)
    r = rng.random(n)
    title = label.str.title().str.replace(r"\bSt\b", "Saint", regex=True)
    hyphen = title.str.replace(" ", "-", regex=False)
    out = pd.Series(np.where(r < 0.45, label, np.where(r < 0.75, title, hyphen)), index=label.index)
    plm = label.isin(["PARIS", "LYON", "MARSEILLE"])
    arr_num = pd.to_numeric(postcode.str[-2:], errors="coerce").fillna(0).astype(int)
    form = rng.random(n)
    with_arr = np.where(
        form < 0.4,
        label + " " + arr_num.astype(str),
        np.where(
            form < 0.6,
            title + " " + arr_num.astype(str) + "e",
            np.where(form < 0.65, label + " CEDEX " + arr_num.map("{:02d}".format), label),
        ),
    )
    return pd.Series(np.where(plm, with_arr, out), index=label.index)


def _phone_variant(phone: pd.Series, rng: np.random.Generator) -> pd.Series:
    n = len(phone)
    r = rng.random(n)
    spaced = phone.str.replace(r"(\d\d)(?=\d)", r"\1 ", regex=True)
    dotted = phone.str.replace(r"(\d\d)(?=\d)", r"\1.", regex=True)
    intl = "+33 " + phone.str[1:].str.replace(r"(\d\d?)(?=(\d\d)+$)", r"\1 ", regex=True)
    return pd.Series(
        np.where(
            r < 0.35,
            phone,
            np.where(
                r < 0.6,
                spaced,
                np.where(r < 0.75, dotted, np.where(r < 0.9, intl, "0033" + phone.str[1:])),
            ),
        ),
        index=phone.index,
    )


def _blank(values: pd.Series, p: float, rng: np.random.Generator) -> pd.Series:
    return values.where(rng.random(len(values)) >= p, None)


def _records(people: pd.DataFrame, rng: np.random.Generator, n_person_records: int) -> pd.DataFrame:
    """Draw source records of people: which BU, which variant of each value."""
    n = len(people)
    copies = rng.choice([1, 2, 3, 4], n, p=[0.45, 0.33, 0.16, 0.06])
    entity = np.repeat(np.arange(n), copies)[:n_person_records]
    recs = people.loc[entity].reset_index(names="entity")
    m = len(recs)
    recs["bu"] = rng.choice(list(BU_SHARE), m, p=list(BU_SHARE.values()))
    recs["updated"] = REFERENCE_DATE - pd.to_timedelta(rng.integers(1, 3 * 365 * 24, m), unit="h")

    # Older records of movers carry the old address.
    first_copy = ~recs.duplicated("entity", keep="first")
    use_old = (recs["moved"] & first_copy & recs.duplicated("entity", keep=False)).to_numpy()
    for col in (
        "number",
        "rep",
        "street_type",
        "street_name",
        "complement",
        "postcode",
        "routing_label",
    ):
        recs[col] = recs[col].astype(object).where(~use_old, recs["old_" + col])
    recs.loc[use_old, "updated"] = recs.loc[use_old, "updated"] - pd.Timedelta(days=3 * 365)
    recs["old_address"] = use_old

    # Value variants.
    recs["last_name"] = recs["last_name"].astype(str)
    maiden = recs["birth_name"].notna() & (rng.random(m) < 0.3)
    recs.loc[maiden, "last_name"] = recs.loc[maiden, "birth_name"]
    recs["first_name"] = _apply_typos(recs["first_name"].astype(str), rng.random(m) < 0.05, rng)
    recs["last_name"] = _apply_typos(recs["last_name"], rng.random(m) < 0.06, rng)
    swap = rng.random(m) < 0.03
    recs.loc[swap, ["first_name", "last_name"]] = recs.loc[
        swap, ["last_name", "first_name"]
    ].to_numpy()
    recs["phone"] = np.where(rng.random(m) < 0.75, recs["mobile"], recs["landline"])
    recs["email"] = recs["email"].where(rng.random(m) >= 0.04, recs["email"].str.upper())
    recs["postcode"] = recs["postcode"].astype(str)
    typo_pc = rng.random(m) < 0.01
    pc = recs["postcode"]
    recs.loc[typo_pc, "postcode"] = (
        pc[typo_pc].str[0] + pc[typo_pc].str[2] + pc[typo_pc].str[1] + pc[typo_pc].str[3:]
    )
    return recs


def _fmt_dates(values: pd.Series, fmt: str) -> pd.Series:
    return pd.to_datetime(values).dt.strftime(fmt).where(values.notna(), None)


def _ecommerce(recs: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    m = len(recs)
    keys = pd.Series(np.arange(1, m + 1)).map("EC{:07d}".format).to_numpy()
    street = _street_line(recs, rng, 0.15)
    line = street.where(recs["complement"] == "", street + ", " + recs["complement"])
    accentless = rng.random(m) < 0.3
    first = recs["first_name"].where(~accentless, recs["first_name"].map(unidecode))
    return pd.DataFrame(
        {
            "customer_id": keys,
            "email": _blank(recs["email"], 0.05, rng),
            "first_name": first,
            "last_name": recs["last_name"].where(
                rng.random(m) < 0.7, recs["last_name"].str.upper()
            ),
            "birth_date": _blank(_fmt_dates(recs["birth_date"], "%Y-%m-%d"), 0.25, rng),
            "phone": _blank(_phone_variant(recs["phone"], rng), 0.2, rng),
            "address": line,
            "zip": recs["postcode"],
            "city": _city_variant(recs["routing_label"].astype(str), recs["postcode"], rng),
            "country": rng.choice(["FR", "France", ""], m, p=[0.6, 0.3, 0.1]),
            "newsletter_optin": rng.choice(["true", "false", ""], m, p=[0.4, 0.4, 0.2]),
            "updated_at": recs["updated"].dt.strftime("%Y-%m-%dT%H:%M:%S").to_numpy(),
        }
    )


def _stores(recs: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    m = len(recs)
    keys = pd.Series(np.arange(1, m + 1)).map("29{:010d}".format).to_numpy()
    civ_f = rng.choice(["MME", "Mme", "MLLE", "Madame"], m, p=[0.5, 0.3, 0.1, 0.1])
    civ_m = rng.choice(["M.", "M", "MR", "Monsieur"], m, p=[0.5, 0.2, 0.2, 0.1])
    civility = np.where(recs["female"], civ_f, civ_m)
    street = _street_line(recs, rng, 0.6).str.upper()
    lines = np.full((m, 4), "", dtype=object)
    lines[:, 0] = street.to_numpy()
    lines[:, 1] = recs["complement"].str.upper().to_numpy()
    order = np.argsort(rng.random((m, 4)), axis=1)  # inconsistent column order
    lines = np.take_along_axis(lines, order, axis=1)
    return pd.DataFrame(
        {
            "NUM_CARTE": keys,
            "CIVILITE": _blank(pd.Series(civility), 0.1, rng),
            "NOM": recs["last_name"].str.upper(),
            "PRENOM": recs["first_name"].str.upper(),
            "DATE_NAISSANCE": _blank(_fmt_dates(recs["birth_date"], "%d/%m/%Y"), 0.1, rng),
            "TEL": _blank(_phone_variant(recs["phone"], rng), 0.15, rng),
            "EMAIL": _blank(recs["email"], 0.4, rng),
            "ADR1": lines[:, 0],
            "ADR2": lines[:, 1],
            "ADR3": lines[:, 2],
            "ADR4": lines[:, 3],
            "CP": recs["postcode"],
            "VILLE": _city_variant(
                recs["routing_label"].astype(str), recs["postcode"], rng
            ).str.upper(),
            "OPTIN_SMS": rng.choice(["O", "N", ""], m, p=[0.3, 0.5, 0.2]),
            "OPTIN_COURRIER": rng.choice(["O", "N", ""], m, p=[0.5, 0.3, 0.2]),
            "DATE_MAJ": recs["updated"].dt.strftime("%d/%m/%Y %H:%M").to_numpy(),
        }
    )


def _callcentre(recs: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    m = len(recs)
    keys = pd.Series(np.arange(1, m + 1)).map("CC-{:07d}".format).to_numpy()
    first, last = recs["first_name"], recs["last_name"]
    r = rng.random(m)
    full = np.where(
        r < 0.35,
        last.str.upper() + " " + first,
        np.where(
            r < 0.7,
            first + " " + last,
            np.where(r < 0.85, last + ", " + first, first + " " + last.str.upper()),
        ),
    )
    street = _street_line(recs, rng, 0.3)
    city = _city_variant(recs["routing_label"].astype(str), recs["postcode"], rng)
    with_compl = street.where(recs["complement"] == "", recs["complement"] + "\n" + street)
    sep = np.where(rng.random(m) < 0.5, "\n", ", ")
    address = with_compl + sep + recs["postcode"] + " " + city
    return pd.DataFrame(
        {
            "REF_CLIENT": keys,
            "NOM_COMPLET": full,
            "TELEPHONE": _blank(_phone_variant(recs["phone"], rng), 0.05, rng),
            "MAIL": _blank(recs["email"].str.lower(), 0.5, rng),
            "ADRESSE": address.to_numpy(),
            "NE_LE": _blank(_fmt_dates(recs["birth_date"], "%d.%m.%Y"), 0.7, rng),
            "ACCORD_SMS": rng.choice(["oui", "non", ""], m, p=[0.3, 0.3, 0.4]),
            "DERNIER_CONTACT": recs["updated"].dt.strftime("%d/%m/%Y %H:%M:%S").to_numpy(),
        }
    )


def _b2b(
    rng: np.random.Generator, n_records: int, people: pd.DataFrame, first_entity: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Companies (one establishment each) with 1-3 account records."""
    n_orgs = max(1, int(n_records / 1.6))
    siren = _luhn_complete(rng.integers(0, 10, (n_orgs, 8)))
    siret = _digits_to_str(
        _luhn_complete(
            np.concatenate(
                [siren, np.zeros((n_orgs, 3), dtype=int), rng.integers(1, 10, (n_orgs, 1))], axis=1
            )
        )
    )
    trade = (
        rng.choice(np.array(COMPANY_WORDS), n_orgs)
        + " "
        + people["last_name"]
        .sample(n_orgs, replace=True, random_state=rng.integers(1 << 31))
        .to_numpy()
    )
    form = rng.choice(np.array(LEGAL_FORMS), n_orgs)
    orgs = people.sample(n_orgs, replace=True, random_state=rng.integers(1 << 31)).reset_index(
        drop=True
    )
    orgs["siret"] = siret
    orgs["trade"] = trade
    orgs["form"] = form
    copies = rng.choice([1, 2, 3], n_orgs, p=[0.5, 0.35, 0.15])
    idx = np.repeat(np.arange(n_orgs), copies)[:n_records]
    recs = orgs.loc[idx].reset_index(names="org")
    m = len(recs)
    name_r = rng.random(m)
    company = np.where(
        name_r < 0.4,
        recs["trade"] + " " + recs["form"],
        np.where(
            name_r < 0.7,
            recs["form"] + " " + recs["trade"],
            np.where(
                name_r < 0.85,
                recs["trade"].str.upper(),
                recs["trade"] + " " + recs["form"].str.replace(r"(.)", r"\1.", regex=True),
            ),
        ),
    )
    spaced_siret = recs["siret"].str.replace(
        r"^(\d{3})(\d{3})(\d{3})(\d{5})$", r"\1 \2 \3 \4", regex=True
    )
    siret_col = np.where(
        rng.random(m) < 0.2, None, np.where(rng.random(m) < 0.3, spaced_siret, recs["siret"])
    )
    updated = REFERENCE_DATE - pd.to_timedelta(rng.integers(1, 2 * 365 * 24, m), unit="h")
    frame = pd.DataFrame(
        {
            "account_id": pd.Series(np.arange(1, m + 1)).map("ACC{:06d}".format),
            "raison_sociale": company,
            "siret": siret_col,
            "contact_prenom": _blank(recs["first_name"].astype(str), 0.1, rng),
            "contact_nom": _blank(recs["last_name"].astype(str), 0.1, rng),
            "contact_email": _blank(recs["email"], 0.3, rng),
            "contact_tel": _blank(_phone_variant(recs["landline"], rng), 0.2, rng),
            "adresse_1": _street_line(recs, rng, 0.3).to_numpy(),
            "adresse_2": recs["complement"].where(recs["complement"] != "", None).to_numpy(),
            "code_postal": recs["postcode"].astype(str),
            "ville": recs["routing_label"].astype(str),
            "pays": "FR",
            "updated_at": updated.to_numpy(),
        }
    )
    truth = pd.DataFrame(
        {
            "source": "b2b",
            "source_key": frame["account_id"],
            "entity_id": (first_entity + recs["org"]).map("O{:07d}".format),
        }
    )
    return frame, truth


def _break_rows(frames: dict[str, pd.DataFrame], rng: np.random.Generator) -> None:
    """Deliberately broken rows (about 0.5%): they must end in quarantine, not in the store."""
    eco = frames["ecommerce"]
    n_bad = max(1, len(eco) // 200)
    bad = rng.choice(len(eco), n_bad, replace=False)
    eco.loc[bad[: max(1, n_bad // 2)], "birth_date"] = "1985-13-45"
    eco.loc[bad[max(1, n_bad // 2) :], "customer_id"] = ""
    # A customer exported twice: the older version must be superseded, not merged.
    dup = eco.iloc[[int(rng.integers(len(eco)))]].copy()
    dup["updated_at"] = "2020-01-01T00:00:00"
    frames["ecommerce"] = pd.concat([eco, dup], ignore_index=True)


def _write_csv(
    frame: pd.DataFrame, path: Path, encoding: str, sep: str, extra_fields: int = 0
) -> None:
    frame.to_csv(path, sep=sep, index=False, encoding=encoding, lineterminator="\n")
    if extra_fields:  # a few lines with a field too many, as hand-edited extracts have
        lines = path.read_bytes().split(b"\n")
        step = max(2, len(lines) // (extra_fields + 1))
        for i in range(step, len(lines) - 1, step)[:extra_fields]:
            if b'"' not in lines[i]:
                lines[i] = lines[i] + sep.encode() + b"EXTRA"
        path.write_bytes(b"\n".join(lines))


def generate(out_dir: Path, n_records: int = 2000, seed: int = 20261122) -> Generated:
    """Write the four extracts, the NPAI return file, the truth and a config to `out_dir`."""
    if n_records < 20:
        raise ValueError("n_records must be at least 20")
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_b2b = max(5, int(n_records * 0.05))
    n_person_records = n_records - n_b2b
    people = _people(rng, max(10, int(n_person_records / 1.9)))
    recs = _records(people, rng, n_person_records)
    recs = recs.sample(frac=1.0, random_state=rng.integers(1 << 31)).reset_index(drop=True)

    builders = {"ecommerce": _ecommerce, "stores": _stores, "callcentre": _callcentre}
    frames: dict[str, pd.DataFrame] = {}
    truths = []
    for bu, build in builders.items():
        part = recs[recs["bu"] == bu].reset_index(drop=True)
        frame = build(part, rng)
        frames[bu] = frame
        key_col = frame.columns[0]
        truths.append(
            pd.DataFrame(
                {
                    "source": bu,
                    "source_key": frame[key_col],
                    "entity_id": part["entity"].map("P{:07d}".format),
                }
            )
        )
    b2b, b2b_truth = _b2b(rng, n_b2b, people, 0)
    truths.append(b2b_truth)
    truth = pd.concat(truths, ignore_index=True)

    # NPAI returns: mostly the addresses people left, some others.
    eco_keys = frames["ecommerce"]["customer_id"]
    stores_part = recs[recs["bu"] == "stores"].reset_index(drop=True)
    returned = np.flatnonzero(
        stores_part["old_address"].to_numpy() | (rng.random(len(stores_part)) < 0.01)
    )
    eco_returned = rng.choice(len(eco_keys), max(1, len(eco_keys) // 100), replace=False)
    npai = pd.concat(
        [
            pd.DataFrame(
                {
                    "CODE_BU": "stores",
                    "REFERENCE_CLIENT": frames["stores"]["NUM_CARTE"].iloc[returned],
                }
            ),
            pd.DataFrame({"CODE_BU": "ecommerce", "REFERENCE_CLIENT": eco_keys.iloc[eco_returned]}),
        ],
        ignore_index=True,
    )
    npai["DATE_RETOUR"] = (
        REFERENCE_DATE - pd.to_timedelta(rng.integers(1, 300, len(npai)), unit="D")
    ).strftime("%d/%m/%Y")
    npai["MOTIF"] = rng.choice(
        np.array(NPAI_MOTIFS), len(npai), p=[0.35, 0.25, 0.2, 0.08, 0.08, 0.04]
    )

    _break_rows(frames, rng)
    _write_csv(frames["ecommerce"], out_dir / FILES["ecommerce"], "utf-8", ",")
    _write_csv(
        frames["stores"],
        out_dir / FILES["stores"],
        "cp1252",
        ";",
        extra_fields=max(1, len(frames["stores"]) // 400),
    )
    _write_csv(frames["callcentre"], out_dir / FILES["callcentre"], "latin-1", "|")
    b2b.to_parquet(out_dir / FILES["b2b"], index=False)
    npai.to_csv(
        out_dir / FILES["npai"], sep=";", index=False, encoding="utf-8", lineterminator="\n"
    )
    truth.to_csv(out_dir / FILES["truth"], index=False, lineterminator="\n")
    (out_dir / "config.yaml").write_text(SAMPLE_CONFIG, encoding="utf-8")
    counts = {bu: len(f) for bu, f in frames.items()} | {"b2b": len(b2b)}
    return Generated(out_dir, counts, int(truth["entity_id"].nunique()))
