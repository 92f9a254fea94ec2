"""RNVP: French postal addresses restructured into the NF Z10-011 block.

Raw address lines arrive in any order (ADR1..ADR4 shuffled, or one string with
the whole address). Every line is folded (upper case, no accents, no
punctuation), classified by compiled regular expressions applied to whole
columns, and the pieces are put back in the standard's order:

    1 identity · 2 inside-building complement · 3 outside-building complement
    4 number + repetition index + street type + street name
    5 lieu-dit, BP/CS/TSA, or La Poste's Ligne_5 (former commune)
    6 postcode + routing label [+ CEDEX nn]

Street labels are written in full and shortened only when they exceed 32
characters, in the standard's order: street type, titles, first names to
initials, articles, SAINT → ST. Nothing here loops over records in Python:
lines are exploded into one long Series, processed column-wise, and grouped
back by record.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np
import pandas as pd
import pyarrow as pa

from mdm_pipeline.config.reference import address_words, first_name_keys, street_types
from mdm_pipeline.normalize.text import (
    STR,
    as_str,
    extract,
    fold,
    is_in,
    on_distinct,
    per_distinct,
    split_lines,
    sub,
)

MAX_LINE = 38
MAX_STREET_LABEL = 32

#: Input spellings of street types that the reference table does not list.
_TYPE_VARIANTS = {
    "R": "RUE",
    "AVE": "AVENUE",
    "AVN": "AVENUE",
    "BLD": "BOULEVARD",
    "BVD": "BOULEVARD",
    "BOUL": "BOULEVARD",
    "BOULV": "BOULEVARD",
    "CH": "CHEMIN",
    "CHEM": "CHEMIN",
    "CHEMI": "CHEMIN",
    "RT": "ROUTE",
    "PLACA": "PLACA",
    "AL": "ALLEE",
    "ALLE": "ALLEE",
    "ALLEES": "ALLEE",
    "IMPA": "IMPASSE",
    "SQR": "SQUARE",
    "Q": "QUAI",
    "QU": "QUAI",
    "FBG": "FAUBOURG",
    "FAUB": "FAUBOURG",
    "PRO": "PROMENADE",
    "VLGE": "VILLAGE",
    "LOTISS": "LOTISSEMENT",
    "LOTT": "LOTISSEMENT",
    "RPT": "ROND POINT",
    "RDPT": "ROND POINT",
    "ROND PT": "ROND POINT",
    "LIEUDIT": "LIEU DIT",
    "L D": "LIEU DIT",
    "PASS": "PASSAGE",
    "TRAV": "TRAVERSE",
    "CITE": "CITE",
    "CRS": "COURS",
    "HAM": "HAMEAU",
    "PRV": "PARVIS",
}
#: Abbreviations that stand for several types: recognised, expanded to the commonest.
_AMBIGUOUS_PREFERRED = {
    "SEN": "SENTIER",
    "VALL": "VALLEE",
    "GPL": "GRANDE PLACE",
    "ZA": "ZONE ARTISANALE",
    "GAL": "GALERIE",
    "PTE": "PORTE",
}
#: Types that start a line but are not a street when no number precedes them.
_BUILDING_TYPES = {
    "RESIDENCE",
    "IMMEUBLE",
    "TOUR",
    "VILLA",
    "HAMEAU",
    "LIEU DIT",
    "ESCALIER",
    "DOMAINE",
    "CHALET",
    "MAISON",
    "CAMPING",
    "CENTRE COMMERCIAL",
    "HLM",
}
_LIEU_DIT_TYPES = {
    "HAMEAU",
    "LIEU DIT",
    "LE BOURG",
    "BOURG",
    "ECART",
    "QUARTIER",
    "MAS",
    "DOMAINE",
    "FERME",
}

_REPETITION = {
    "BIS": "BIS",
    "TER": "TER",
    "QUATER": "QUATER",
    "QUINQUIES": "QUINQUIES",
    "B": "BIS",
    "T": "TER",
    "Q": "QUATER",
    "C": "QUINQUIES",
}
_REPETITION_LETTER = {"BIS": "B", "TER": "T", "QUATER": "Q", "QUINQUIES": "C"}
_ARTICLES = ("LE", "LA", "LES", "L", "DU", "DES", "D", "AU", "AUX")

_INSIDE = (
    r"^(?:\d+\s*(?:E|ER|ERE|EME|ND|NDE)?\s+ETAGE\b|APPARTEMENT|APPART|APPT|APP|APT|AP|ETAGE|ETG|"
    r"ESCALIER|ESC|PORTE|PTE|CHEZ|C O|CO|CHAMBRE|CHBRE|LOGEMENT|LOGT|LOG|BOITE|BAL|COULOIR|"
    r"PALIER|STUDIO)\b"
)
_OUTSIDE = (
    r"^(?:BATIMENT|BAT|BT|BLOC|RESIDENCE|RESID|RES|IMMEUBLE|IMM|ENTREE|ENT|TOUR|PAVILLON|"
    r"VILLA|CITE|CENTRE COMMERCIAL|ZONE INDUSTRIELLE|ZI|ZA|ZAC|PARC D ACTIVITES?)\b"
)
_SERVICE = r"^(?:BP|B P|BOITE POSTALE|CS|TSA|CIDEX|CEDEX|POSTE RESTANTE)\b\s*\d*"
_LIEU_DIT = r"^(?:LIEU DIT|LIEUDIT|LD|L D|HAMEAU|HAM|LE BOURG|ECART|QUARTIER)\b"
_POSTCODE_LINE = r"^(?:F\s*)?(?P<postcode>\d{5}|\d{2}\s\d{3})(?:\s+(?P<locality>.*))?$"
_NUMBERED = r"^\d{1,4}\s*[A-Z]"

_COMPLEMENT_WORDS = {
    "APPART": "APPARTEMENT",
    "APPT": "APPARTEMENT",
    "APT": "APPARTEMENT",
    "AP": "APPARTEMENT",
    "APP": "APPARTEMENT",
    "ETG": "ETAGE",
    "ESC": "ESCALIER",
    "BAT": "BATIMENT",
    "BT": "BATIMENT",
    "RES": "RESIDENCE",
    "RESID": "RESIDENCE",
    "IMM": "IMMEUBLE",
    "ENT": "ENTREE",
    "C O": "CHEZ",
    "CO": "CHEZ",
    "LOGT": "LOGEMENT",
    "LOG": "LOGEMENT",
    "CHBRE": "CHAMBRE",
}

#: What a raw address line can be.
_LINE_KINDS = ("unknown", "postcode", "service", "lieu_dit", "inside", "outside", "street", "town")

#: Output columns of `parse_addresses`.
COMPONENTS = (
    "line2",
    "line3",
    "number",
    "repetition",
    "street_type",
    "street_name",
    "lieu_dit",
    "lieu_dit_line",
    "service",
    "postcode_in_lines",
    "locality_in_lines",
    "cedex",
    "cedex_office",
)


@cache
def _type_spellings() -> pa.Array:
    """`type_lookup`'s spellings as the value set of `is_in` (built once)."""
    return pa.array(sorted(type_lookup()), type=pa.string())


@cache
def type_lookup() -> dict[str, str]:
    """Every accepted spelling of a street type -> its full canonical word(s)."""
    table = street_types()
    lookup = {full: full for full in table["full_word"]}
    counts = table["abbreviation"].value_counts()
    for full, abbr in zip(table["full_word"], table["abbreviation"], strict=True):
        if counts[abbr] == 1:
            lookup.setdefault(abbr, full)
    lookup.update(_AMBIGUOUS_PREFERRED)
    for variant, full in _TYPE_VARIANTS.items():
        lookup.setdefault(variant, full)
    # Plurals typed by hand (ALLEES, QUAIS) fold to the singular type.
    for full in table["full_word"]:
        lookup.setdefault(full + "S", full)
    return lookup


@cache
def type_abbreviation() -> dict[str, str]:
    """Full street type -> standard abbreviation (used only when a label is too long)."""
    table = street_types()
    return dict(zip(table["full_word"], table["abbreviation"], strict=True))


@cache
def _word_table(category: str) -> dict[str, str]:
    table = address_words()
    sel = table[table["category"] == category]
    return dict(zip(sel["full_word"], sel["abbreviation"], strict=True))


@cache
def _title_expansions() -> dict[str, str]:
    """Abbreviated titles typed by hand, expanded so that both sides compare in full."""
    expand = {
        abbr: full
        for full, abbr in _word_table("titre").items()
        if abbr not in {"PAST", "PREF", "MED", "ING"}
    }  # ambiguous as plain words
    expand.update(
        {
            "DR": "DOCTEUR",
            "PR": "PROFESSEUR",
            "PROF": "PROFESSEUR",
            "ST": "SAINT",
            "STE": "SAINTE",
            "MCHL": "MARECHAL",
            "GEN": "GENERAL",
            "CDT": "COMMANDANT",
            "CNE": "CAPITAINE",
            "CAP": "CAPITAINE",
        }
    )
    return expand


def _replace_words(series: pd.Series, table: dict[str, str]) -> pd.Series:
    """Replace whole words (longest first) using one compiled alternation per call."""
    if not table or series.empty:
        return series
    keys = sorted(table, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, keys)) + r")\b")
    # RE2 has no dictionary replacement: Python's re does it, once per distinct label.
    return per_distinct(series, lambda s: pattern.sub(lambda m: table[m.group(1)], s))


def _explode_lines(lines: pd.Series) -> tuple[pd.Series, pd.Series]:
    """One row per raw line (newlines, commas and semicolons split lines), folded.

    Returns (lines with a positional index, the record label of each line);
    empty lines are dropped and the order within a record is kept.
    """
    # "12, rue de la Paix": a comma right after the house number does not end the line.
    text = sub(
        lines.dropna(), r"(?i)(^|\n)\s*(\d{1,4}\s*(?:bis|ter|quater|[a-d])?)\s*,\s*", r"\1\2 "
    )
    pieces = split_lines(text, r"[\n,;]")
    # A house-number range keeps its first number (15/17 -> 15).
    pieces = sub(pieces, r"^\s*(\d{1,4})\s*[/-]\s*\d{1,4}\b", r"\1")
    folded = fold(pieces).dropna()
    record = pd.Series(folded.index.to_numpy(dtype=np.int64))
    folded = folded.reset_index(drop=True)
    # A line holding only a house number (ADR1 = "12", ADR2 = "RUE DE LA PAIX") belongs to
    # the line that follows it in the same record.
    bare = folded.str.match(r"^\d{1,4}(?: (?:BIS|TER|QUATER|QUINQUIES|[A-D]))?$", na=False)
    has_next = record.shift(-1).eq(record)
    next_is_postcode = folded.shift(-1).str.match(_POSTCODE_LINE, na=False)
    glue = bare & has_next & ~next_is_postcode
    if glue.any():
        nxt = glue[glue].index + 1
        folded[nxt] = folded[glue].to_numpy() + " " + folded[nxt].to_numpy()
        keep = ~glue
        folded, record = folded[keep].reset_index(drop=True), record[keep].reset_index(drop=True)
    return folded, record


def _first_words(series: pd.Series, k: int) -> pd.Series:
    return extract(series, rf"^(?P<words>(?:\S+ ){{{k - 1}}}\S+)")["words"]


def _split_type(rest: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(canonical street type or None, the rest of the label) — longest known prefix wins."""
    parts = on_distinct(rest, _split_type_distinct)
    return parts["street_type"], parts["name"]


def _split_type_distinct(rest: pd.Series) -> pd.DataFrame:
    lookup = type_lookup()
    rest = as_str(rest)
    stype = pd.Series(None, index=rest.index, dtype=object)
    name = rest.astype(object)
    for k in (4, 3, 2, 1):
        cand = _first_words(rest, k).map(lookup).astype(object)
        take = (cand.notna() & stype.isna()).to_numpy(dtype=bool)
        if take.any():
            stype.loc[take] = cand[take].to_numpy()
            name.loc[take] = (
                rest[take].str.replace(rf"^(?:\S+ ){{{k - 1}}}\S+ ?", "", regex=True).to_numpy()
            )
    name = name.where(name.notna() & (name != ""), None)
    return pd.DataFrame({"street_type": stype, "name": name})


def _parse_street(line: pd.Series) -> pd.DataFrame:
    """Number, repetition index, street type and name of line-4 candidates."""
    return on_distinct(line, _parse_street_distinct)


def _parse_street_distinct(line: pd.Series) -> pd.DataFrame:
    m = extract(
        line,
        r"^(?P<number>\d{1,4})\s*"
        r"(?P<rep>BIS|TER|QUATER|QUINQUIES|[A-Z]\b)?\s*(?P<rest>.*)$",
    )
    rest = m["rest"].where(m["number"].notna(), line)
    # A lone letter after the number is an index (12 B AV ...) unless it is itself the
    # street type and no type follows (12 R DE LA PAIX: R is RUE).
    lone = m["rep"].str.len() == 1
    stype, name = _split_type(rest.fillna(""))
    letter_as_type = lone.fillna(False) & stype.isna() & is_in(m["rep"], _type_spellings())
    if letter_as_type.any():
        t2, n2 = _split_type((m["rep"] + " " + rest)[letter_as_type])
        stype[letter_as_type] = t2
        name[letter_as_type] = n2
        m.loc[letter_as_type, "rep"] = None
    rep = m["rep"].map(_REPETITION).where(m["rep"].str.len() != 1, m["rep"].map(_REPETITION))
    rep = rep.where(rep.notna(), m["rep"])  # A, D... stay letters
    name = _replace_words(name.fillna(""), _title_expansions()).replace("", None)
    number = m["number"].str.lstrip("0").replace("", None)
    return pd.DataFrame(
        {"number": number, "repetition": rep, "street_type": stype, "street_name": name},
        index=line.index,
    )


def _complement(series: pd.Series) -> pd.Series:
    """Complements with their key word in full (APT 12 -> APPARTEMENT 12)."""
    return _replace_words(series, _COMPLEMENT_WORDS)


def _join_group(series: pd.Series, record: pd.Series, index: pd.Index) -> pd.Series:
    """Join a record's pieces with single spaces, in order; None where there are none."""
    if series.empty:
        return pd.Series(None, index=index, dtype=object)
    joined = (series + " ").groupby(record[series.index], sort=False).sum().str.strip()
    return joined.reindex(index).replace("", None)


def _first_per_record(
    series: pd.Series, record: pd.Series, index: pd.Index, keep: str = "first"
) -> pd.Series:
    rec = record[series.index]
    chosen = series[~rec.duplicated(keep=keep).to_numpy()]
    return pd.Series(chosen.to_numpy(), index=rec[chosen.index].to_numpy()).reindex(index)


def parse_addresses(lines: pd.Series) -> pd.DataFrame:
    """Components of each record's raw address lines (see COMPONENTS)."""
    # Records are numbered by position so that grouping lines back is an integer groupby.
    labels = lines.index
    lines = lines.reset_index(drop=True)
    exploded, record = _explode_lines(lines)
    kind = pd.Series(
        pd.Categorical(["unknown"] * len(exploded), categories=_LINE_KINDS), index=exploded.index
    )
    pc = extract(exploded, _POSTCODE_LINE)
    is_pc = pc["postcode"].notna()
    kind[is_pc] = "postcode"
    rest = ~is_pc
    for label, pattern in (("service", _SERVICE), ("lieu_dit", _LIEU_DIT), ("inside", _INSIDE)):
        hit = rest & exploded.str.match(pattern, na=False)
        kind[hit] = label
        rest &= ~hit
    numbered = rest & exploded.str.match(_NUMBERED, na=False)
    kind[numbered] = "street"
    rest &= ~numbered
    outside = rest & exploded.str.match(_OUTSIDE, na=False)
    kind[outside] = "outside"
    rest &= ~outside
    # An unnumbered line that starts with a street type is a street (RUE DE LA PAIX).
    stype, _ = _split_type(exploded[rest])
    typed = pd.Series(False, index=exploded.index)
    typed[rest] = (stype.notna() & ~stype.isin(_BUILDING_TYPES)).to_numpy()
    kind[typed] = "street"
    rest &= ~typed

    has_street = (kind == "street").groupby(record).transform("any")
    has_postcode = (kind == "postcode").groupby(record).transform("any")
    is_last = ~record.duplicated(keep="last")
    # Without a postcode line, a last unknown line after a street is the town (Paris 11e).
    town = rest & is_last & has_street & ~has_postcode
    kind[town] = "town"
    rest &= ~town
    # Records without a street: their first unknown line is the street (LA CANEBIERE);
    # other unknown lines are locality complements (line 5).
    first_unknown = rest & rest.groupby(record).cumsum().eq(1)
    as_street = first_unknown & ~has_street
    kind[as_street] = "street"
    kind[rest & ~as_street] = "lieu_dit"

    # One street per record: the first numbered one, else the last street-like line (in the
    # standard's order line 4 follows line 3); other street-like lines become line-3 complements.
    is_street = kind == "street"
    numbered_street = is_street & exploded.str.match(r"^\d", na=False)
    has_numbered = numbered_street.groupby(record).transform("any")
    first_numbered = numbered_street & numbered_street.groupby(record).cumsum().eq(1)
    last_street = is_street & ~is_street[::-1].groupby(record[::-1]).cumsum().gt(1)[::-1]
    chosen = np.where(has_numbered, first_numbered, last_street)
    kind[is_street & ~chosen] = "outside"

    index = lines.index
    out = pd.DataFrame(index=index)
    out["line2"] = _join_group(_complement(exploded[kind == "inside"]), record, index)
    out["line3"] = _join_group(_complement(exploded[kind == "outside"]), record, index)
    street_lines = exploded[kind == "street"]
    street = _parse_street(street_lines)
    street.index = record[street_lines.index].to_numpy()
    for col in ("number", "repetition", "street_type", "street_name"):
        out[col] = street[col].reindex(index)
    # Line 5 keeps "LIEU DIT" (so that the line reads the same when parsed again); the
    # component used for matching is the name alone.
    lieu_line = exploded[kind == "lieu_dit"].str.replace(
        r"^(LIEUDIT|LD|L D)\b", "LIEU DIT", regex=True
    )
    out["lieu_dit_line"] = _join_group(lieu_line, record, index)
    lieu = lieu_line.str.replace(r"^LIEU DIT\s+", "", regex=True)
    out["lieu_dit"] = _join_group(lieu, record, index)
    service = exploded[kind == "service"].str.replace(r"^B P\b", "BP", regex=True)
    service = service.str.replace(r"^BOITE POSTALE\b", "BP", regex=True)
    out["service"] = _join_group(service[~service.str.startswith("CEDEX")], record, index)

    pcs = pc.loc[is_pc, "postcode"].str.replace(" ", "", regex=False)
    locality = pc.loc[is_pc, "locality"].fillna("")
    town_lines = exploded[kind == "town"]
    out["postcode_in_lines"] = _first_per_record(pcs, record, index, keep="last")
    all_towns = pd.concat([locality, town_lines]).sort_index()
    town_text = _first_per_record(all_towns, record, index, keep="last")
    cedex = extract(town_text, r"\bCEDEX(?:\s+(?P<office>\d{1,2}))?\s*$")
    out["cedex"] = town_text.str.contains(r"\bCEDEX\b", regex=True, na=False).astype(bool)
    out["cedex_office"] = cedex["office"]
    town_clean = town_text.str.replace(r"\s*\bCEDEX(\s+\d{1,2})?\s*$", "", regex=True)
    out["locality_in_lines"] = town_clean.replace("", None)
    return out[list(COMPONENTS)].set_axis(labels)


def _shorten_step(label: pd.Series, too_long: pd.Series, table: dict[str, str]) -> pd.Series:
    if too_long.any():
        label = label.copy()
        label[too_long] = _replace_words(label[too_long], table)
    return label


def street_label(
    street_type: pd.Series, street_name: pd.Series, budget: pd.Series | None = None
) -> tuple[pd.Series, pd.Series]:
    """Type + name, shortened only when too long, in the standard's order.

    Too long means past 32 characters, or past what line 4 leaves once the
    number and index are written (`budget`, 38 minus "12 BIS "). Returns
    (label, shortened flag).
    """
    label = as_str(street_type.fillna("") + " " + street_name.fillna("")).str.strip()
    label = label.where(label != "", None)
    original = label.copy()
    limit = (
        pd.Series(MAX_STREET_LABEL, index=label.index)
        if budget is None
        else budget.clip(upper=MAX_STREET_LABEL)
    )

    def long_(s: pd.Series) -> pd.Series:
        return s.fillna("").str.len() > limit

    # 1. The street type, at the start of the label only.
    if long_(label).any():
        sel = long_(label) & street_type.notna()
        abbr = street_type[sel].map(type_abbreviation())
        label[sel] = (abbr.fillna(street_type[sel]) + " " + street_name[sel].fillna("")).str.strip()
    # 2. Titles (military, religious, civil, and DOCTEUR, PROFESSEUR...).
    titles = _word_table("titre") | _word_table("civilite_titre")
    label = _shorten_step(label, long_(label), titles)
    # 3. First names to initials (not the last word: it is the main word of the name).
    if long_(label).any():
        sel = long_(label)
        words = label[sel].str.split(" ").explode()
        pos = words.groupby(level=0).cumcount()
        last = words.groupby(level=0).transform("size") - 1
        initial = words.isin(first_name_keys()) & (pos > 0) & (pos < last)
        words = words.where(~initial, words.str[0])
        label[sel] = (words + " ").groupby(level=0, sort=False).sum().str.strip()
    # 4. Articles (the nobiliary DE stays).
    if long_(label).any():
        sel = long_(label)
        # Not the first word nor the last: a space on each side. Twice, for "DE LA" runs.
        articles = r" (?:" + "|".join(_ARTICLES) + r") "
        for _ in range(2):
            label[sel] = label[sel].str.replace(articles, " ", regex=True)
    # 5. Common words, then SAINT -> ST.
    label = _shorten_step(label, long_(label), _word_table("mot"))
    label = _shorten_step(label, long_(label), _word_table("saint"))
    return label, (label != original) & label.notna()


def assemble_block(
    identity: pd.Series,
    parts: pd.DataFrame,
    postcode: pd.Series,
    routing_label: pd.Series,
    line5_laposte: pd.Series,
) -> pd.DataFrame:
    """The six NF Z10-011 lines (None where empty) and a flag per record if a line was cut."""

    def line4_with(repetition: pd.Series) -> tuple[pd.Series, pd.Series]:
        number = as_str(parts["number"].fillna("") + " " + repetition.fillna("")).str.strip()
        budget = MAX_LINE - number.str.len() - (number != "").astype(int)
        label, short = street_label(parts["street_type"], parts["street_name"], budget)
        return (number + " " + label.fillna("")).str.strip(), short

    line4, shortened = line4_with(parts["repetition"])
    # Last resort before cutting: the repetition index as its letter (TER -> T), as La Poste
    # allows.
    over = line4.str.len() > MAX_LINE
    if over.any():
        letters = parts["repetition"].map(_REPETITION_LETTER)
        letters = letters.where(letters.notna(), parts["repetition"])
        short4, _ = line4_with(letters.where(over, parts["repetition"]))
        line4 = line4.where(~over, short4)
        shortened = shortened.where(~over, True)
    line5 = parts["service"].where(parts["service"].notna(), parts["lieu_dit_line"])
    line5 = line5.where(line5.notna(), line5_laposte)
    cedex = np.where(
        parts["cedex"].fillna(False).astype(bool),
        (" CEDEX " + parts["cedex_office"].fillna("")).str.rstrip(),
        "",
    )
    line6 = (postcode.fillna("") + " " + routing_label.fillna("") + cedex).str.strip()
    block = pd.DataFrame(
        {
            "rnvp_line1": fold(identity),
            "rnvp_line2": parts["line2"],
            "rnvp_line3": parts["line3"],
            "rnvp_line4": line4,
            "rnvp_line5": fold(line5),
            "rnvp_line6": line6,
        }
    )
    block = block.astype(STR).replace("", None)
    truncated = pd.Series(False, index=block.index)
    for col in block.columns:
        over = block[col].str.len() > MAX_LINE
        if over.any():
            block.loc[over, col] = block.loc[over, col].str[:MAX_LINE].str.rstrip()
            truncated |= over
    block["street_shortened"] = shortened
    block["line_truncated"] = truncated
    return block
