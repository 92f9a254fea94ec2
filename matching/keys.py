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
import pyarrow as pa
import pyarrow.compute as pc

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


class Fields:
    """Records as matching reads them: every field as integer codes into its distinct values.

    Blocking rules, training blocks and comparisons read the same fields many
    times over a night; factorising each field once, and deriving keys (phonetic
    codes, prefixes, e-mail user parts) once per distinct value rather than per
    record or per pair, is what keeps a million records fast. Fields are encoded
    on first use, so a run pays only for the fields its rules and comparisons
    name. Codes are -1 where a value is missing. A partition of records is
    prepared on its own: codes differ, values and hence comparisons do not.
    """

    def __init__(self, records: pd.DataFrame) -> None:
        self.records = records
        self.record_type = records["record_type"].to_numpy(dtype=object)
        self._codes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._derived: dict[tuple[str, str, int | None], tuple[np.ndarray, np.ndarray]] = {}
        self._hashes: dict[tuple[str, str, int | None], np.ndarray] = {}
        self._joint: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._type_codes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.record_type)

    @property
    def type_codes(self) -> np.ndarray:
        if self._type_codes is None:
            self._type_codes = pd.factorize(self.record_type)[0].astype(np.int32)
        return self._type_codes

    def encoded(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """(code per record, distinct values) of a field's comparison form."""
        if field not in self._codes:
            self._codes[field] = self._encode(field)
        return self._codes[field]

    def values(self, field: str) -> pd.Series:
        """The comparison form of a field per record, None where missing."""
        codes, vocab = self.encoded(field)
        return pd.Series(np.append(vocab, None)[codes], dtype=object)

    def _encode(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        records = self.records
        if field == "address":
            # The postal point as one value: postcode then street, built per distinct pair.
            pc, pc_vocab = self.encoded("postcode")
            st, st_vocab = self.encoded("street")
            present = (pc >= 0) | (st >= 0)
            combo = (pc.astype(np.int64) + 1) * (len(st_vocab) + 1) + (st + 1)
            combo_codes, uniq = pd.factorize(combo[present])
            pcs = np.append(pc_vocab, "")[uniq // (len(st_vocab) + 1) - 1]
            sts = np.append(st_vocab, "")[uniq % (len(st_vocab) + 1) - 1]
            text = (pd.Series(pcs, dtype=object) + " " + pd.Series(sts, dtype=object)).str.strip()
            recoded, vocab = pd.factorize(text)
            codes = np.full(len(records), -1, dtype=np.int32)
            codes[present] = recoded[combo_codes]
            return codes, np.asarray(vocab, dtype=object)
        col = records[FIELD_COLUMNS[field]]
        if field == "birth_date":
            dates = pd.to_datetime(col, errors="coerce")
            # Integer arithmetic, then text for the distinct dates only.
            number = (dates.dt.year * 10000 + dates.dt.month * 100 + dates.dt.day).astype("Int64")
            codes, uniq = pd.factorize(number)
            return codes.astype(np.int32), np.asarray(uniq.astype(str), dtype=object)
        codes, uniq = pd.factorize(col)
        return codes.astype(np.int32), np.asarray(uniq, dtype=object)

    def derived(self, field: str, transform: str, length: int | None = None) -> np.ndarray:
        """Codes of a field's values reduced by a transform (a blocking key, an e-mail's
        user part), indexed by the field's own codes: -1 (the last entry) for missing."""
        return self._reduced(field, transform, length)[0]

    def _reduced(
        self, field: str, transform: str, length: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(`derived`'s codes, the reduced values they number): a transform runs once
        per field, whether its values are wanted as codes or as hashes."""
        cache_key = (field, transform, length)
        if cache_key not in self._derived:
            _, vocab = self.encoded(field)
            reduced = _reduce(pd.Series(vocab, dtype=object), transform, length)
            codes, uniques = pd.factorize(reduced)
            self._derived[cache_key] = (
                np.append(codes, -1).astype(np.int32),
                np.asarray(uniques, dtype=object),
            )
        return self._derived[cache_key]

    def key_codes(self, key: BlockingKey) -> np.ndarray:
        """One blocking-key part per record, as codes (-1 where the field is missing)."""
        codes, _ = self.encoded(key.field)
        if key.transform == "exact":
            return codes
        return self.derived(key.field, key.transform, key.length)[codes]

    def key_hashes(self, key: BlockingKey) -> np.ndarray:
        """One blocking-key part per record as a 64-bit hash of its text (0 where the
        field is missing): unlike codes, the same value hashes the same in any set of
        records, so block keys can be kept from one night to the next."""
        codes, vocab = self.encoded(key.field)
        cache_key = (key.field, key.transform, key.length)
        if cache_key not in self._hashes:
            # Per distinct value of the field (the last entry, 0, for missing): a part
            # shared by several rules (a postcode, a phonetic name) is hashed once,
            # and its transform is the one the blocking already ran (`_reduced`).
            if key.transform == "exact":
                by_value, texts = np.append(np.arange(len(vocab)), -1), vocab
            else:
                by_value, texts = self._reduced(key.field, key.transform, key.length)
            table = pd.util.hash_array(
                pd.Series(texts, dtype=object).astype(str).to_numpy(dtype=object)
            ) | np.uint64(1)
            self._hashes[cache_key] = np.append(table, np.uint64(0))[by_value]
        return self._hashes[cache_key][codes]

    def joint(self, field: str, other: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Two fields' values in one vocabulary (a last name against a first name):
        (map of `field`'s codes, map of `other`'s codes, shared values); maps end in -1."""
        if (field, other) not in self._joint:
            _, va = self.encoded(field)
            _, vb = self.encoded(other)
            codes, vocab = pd.factorize(np.concatenate([va, vb]))
            self._joint[(field, other)] = (
                np.append(codes[: len(va)], -1),
                np.append(codes[len(va) :], -1),
                np.asarray(vocab, dtype=object),
            )
        return self._joint[(field, other)]


def prepare(records: pd.DataFrame | Fields) -> Fields:
    """The records as matching reads them; a `Fields` is returned as it is."""
    return records if isinstance(records, Fields) else Fields(records)


def per_distinct_value(series: pd.Series, func: Callable[[str], str]) -> pd.Series:
    """`func` applied once per distinct non-null value, mapped back (None stays None)."""
    return on_distinct_values(
        series, lambda uniques: np.array([func(v) or None for v in uniques], dtype=object)
    )


def on_distinct_values(series: pd.Series, func: Callable[[np.ndarray], np.ndarray]) -> pd.Series:
    """`func` of the distinct non-null values at once (an object array, each value's
    result or None), mapped back (None stays None)."""
    codes, uniques = pd.factorize(series)
    table = np.append(func(np.asarray(uniques, dtype=object)), None)
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


#: `_FR_RULES` as Arrow's regular expressions (RE2) run them, but for the last, which
#: needs a back-reference (`_squeeze_runs`). RE2 has no look-ahead: the nasal rules
#: take the letter after the vowel and put it back, which changes nothing, since that
#: letter is not a vowel and every nasal starts with one (no match can begin on it).
_FR_ARROW_RULES: tuple[tuple[str, str], ...] = tuple(
    (p.replace("(?=[^AEIOU]|$)", "([^AEIOU]|$)"), r + r"\2" if "(?=" in p else r)
    for p, r in _FR_RULES[:-1]
)


def _squeeze_runs(codes: pa.StringArray) -> pa.StringArray:
    """Each run of one ASCII character in each text cut to one character (the last
    French rule), over the array's bytes at once: no text holds a null."""
    offsets = np.frombuffer(codes.buffers()[1], dtype=np.int32)[
        codes.offset : codes.offset + len(codes) + 1
    ]
    data = np.frombuffer(codes.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    keep = np.ones(len(data), dtype=bool)
    keep[1:] = data[1:] != data[:-1]
    keep[offsets[:-1][offsets[:-1] < len(data)]] = True  # a text's first character
    kept = np.concatenate(([0], np.cumsum(keep, dtype=np.int32)))[offsets]
    return pa.StringArray.from_buffers(
        len(codes), pa.py_buffer(kept.astype(np.int32)), pa.py_buffer(data[keep].tobytes())
    )


def phonetic_fr_codes(names: np.ndarray) -> np.ndarray:
    """`phonetic_fr` of each of these texts (no null), None where it leaves nothing.

    The ASCII ones (all that normalisation leaves) go through Arrow's regular
    expressions, a rule at a time over all of them: `phonetic_fr` called once per
    distinct name took 0.16 s of a 5% night at 1M records. Any other text keeps
    Python's upper-casing, which can add letters (ß: SS)."""
    text = pa.array(names, type=pa.string())
    ascii_ = pc.string_is_ascii(text).to_numpy(zero_copy_only=False)
    out = np.empty(len(names), dtype=object)
    if ascii_.any():
        codes = pc.utf8_upper(text.filter(pa.array(ascii_)))
        for pattern, repl in _FR_ARROW_RULES:
            codes = pc.replace_substring_regex(codes, pattern=pattern, replacement=repl)
        codes = _squeeze_runs(pa.array(codes) if isinstance(codes, pa.ChunkedArray) else codes)
        out[ascii_] = pc.if_else(pc.equal(codes, ""), None, codes).to_numpy(zero_copy_only=False)
    out[~ascii_] = [phonetic_fr(v) or None for v in names[~ascii_]]
    return out


_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "soundex": jellyfish.soundex,
    "metaphone": jellyfish.metaphone,
    "nysiis": jellyfish.nysiis,
    "phonetic_fr": phonetic_fr,
}


def _reduce(values: pd.Series, transform: str, length: int | None) -> pd.Series:
    """A transform applied to distinct values (None where it leaves nothing).

    String cuts run in Arrow's kernels: pandas' `.str` methods loop in Python,
    and a million distinct e-mails make that loop the slowest step of a run.
    """
    if transform == "phonetic_fr":
        return on_distinct_values(values, phonetic_fr_codes)
    if transform in _TRANSFORMS:
        return per_distinct_value(values, _TRANSFORMS[transform])
    text = pa.array(values.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
    if transform == "prefix":
        assert length is not None
        cut = pc.utf8_slice_codeunits(pc.replace_substring(text, " ", ""), 0, length)
        cut = pc.if_else(pc.equal(pc.utf8_length(cut), length), cut, None)
    elif transform == "year":
        cut = pc.utf8_slice_codeunits(text, 0, 4)
    elif transform == "email_user":
        cut = pc.list_element(pc.split_pattern(text, "@", max_splits=1), 0)
    elif transform == "phone_suffix":
        cut = pc.utf8_slice_codeunits(text, -8)
    else:
        raise ValueError(f"unknown key transform {transform!r}")
    return pd.Series(cut.to_numpy(zero_copy_only=False), index=values.index, dtype=object)
