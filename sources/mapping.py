"""Map one extract's rows onto the canonical customer model.

All checks are vectorised: each produces a mask and a reason, and a row
failing any check goes to quarantine with every reason that applies. Reasons
name fields and formats, never the offending value (it is personal data).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from unidecode import unidecode

from mdm_pipeline.config import schema
from mdm_pipeline.config.reference import first_name_keys, surname_keys
from mdm_pipeline.config.schema import QUARANTINE_COLUMNS, SOURCE, SOURCE_KEY
from mdm_pipeline.config.settings import (
    BoolFieldSpec,
    DateFieldSpec,
    FieldSpec,
    FullNameSpec,
    ParquetSource,
    Source,
)
from mdm_pipeline.sources.dates import parse_dates
from mdm_pipeline.sources.readers import LINE, RawExtract

#: The canonical text columns' dtype (Arrow-backed strings).
TEXT = schema.text_dtype()

_EMPTY = {"": None}


@dataclass(frozen=True)
class MappedSource:
    """The canonical records of one source and what was quarantined on the way."""

    source: str
    location: str
    records: pd.DataFrame
    raw: pd.DataFrame  # the extract's own columns of each record, aligned with `records`
    quarantine: pd.DataFrame
    rows_read: int
    duplicates: int  # rows superseded by a later version of the same source key
    fingerprint: str
    #: Keys a delta extract marks as deleted (always empty for a full extract).
    deleted: pd.Series = dc_field(default_factory=lambda: pd.Series(dtype=object))


#: What Python's `str.strip()` removes (`str.isspace`), for Arrow's trim to remove the
#: same characters, no more and no fewer. Written out rather than found by testing
#: every code point at import (0.1 s of every command's start); a test checks it
#: against `str.isspace`.
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def _clean(series: pd.Series) -> pd.Series:
    """Strip blanks, fold runs of spaces and tabs into one space, and turn empty text
    into None.

    Done in Arrow (C++ over the column, the same characters stripped and the same
    runs folded) when every value is a text or missing: pandas's string methods
    on object columns call Python once per value, a tenth of a full run's load at
    a million records. Any other value (a number in a column read as such) takes
    the pandas path, which gives it no text at all, as it always did."""
    if series.dtype == TEXT:  # a CSV extract's columns: read into Arrow already
        values = schema.contiguous(pa.array(series.array))
    else:
        try:
            values = pa.array(series.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):
            return _clean_pandas(series)
    values = pc.utf8_trim(values, characters=_WHITESPACE)
    # Only a value holding a tab or two spaces in a row has a run to fold: those few go
    # through the regular expression, found by plain substring searches (the regular
    # expression over every value took 1.6 s of a million records' load).
    odd = pc.or_(pc.match_substring(values, "\t"), pc.match_substring(values, "  "))
    if pc.any(odd).as_py():
        folded = pc.replace_substring_regex(
            pc.filter(values, odd), pattern=r"[ \t]+", replacement=" "
        )
        values = pc.replace_with_mask(values, odd, folded)
    values = pc.if_else(pc.equal(values, ""), pa.scalar(None, values.type), values)
    return pd.Series(pd.array(values, dtype=TEXT), index=series.index, name=series.name)


def _clean_pandas(series: pd.Series) -> pd.Series:
    text = series.astype(object).where(series.notna(), None)
    text = text.str.strip().str.replace(r"[ \t]+", " ", regex=True)
    return text.where(text.notna() & (text != ""), None).astype(TEXT)


def _join_columns(parts: list[pd.Series], sep: str) -> pd.Series:
    """Join several text columns, skipping empty ones, column by column (no row loop)."""
    out = parts[0]
    for part in parts[1:]:
        both = out.notna() & part.notna()
        joined = out.where(~both, out + sep + part)
        out = joined.where(joined.notna(), part)
    return out


def _field_text(rows: pd.DataFrame, spec: FieldSpec, sep: str) -> pd.Series:
    if spec.constant is not None:
        out = pd.Series(spec.constant, index=rows.index, dtype=object)
    elif spec.column is not None:
        out = _clean(rows[spec.column])
    else:
        out = _join_columns([_clean(rows[c]) for c in spec.source_columns], sep)
    if spec.values:
        recoded = out.map(spec.values)
        out = recoded.where(recoded.notna(), out)
    return out


def _split_words(text: pd.Series, order: str) -> tuple[np.ndarray, np.ndarray]:
    """`split_full_name` of names without a comma (cleaned texts): (first, last) as
    Python texts, None where empty.

    Each name's words in Arrow (split on the space, flattened, each with its row
    and place in the name), what a word tells (written in capitals, holding a
    lower-case letter, its key among first names and surnames) found once per
    distinct word in Python, as `str` and `unidecode` define it, then taken back
    to every word and summed per name in numpy; the surname's and the first
    name's words joined in Arrow. The call centre's 229k full names took 0.9 s
    as pandas frames of Python words, exploded and grouped by name."""
    names = pa.array(text.array) if text.dtype == TEXT else pa.array(text, type=pa.string())
    lists = pc.split_pattern(schema.contiguous(names), " ")
    offsets = lists.offsets.to_numpy()
    offsets = offsets - offsets[0]
    n_words = np.diff(offsets)
    row = np.repeat(np.arange(len(n_words)), n_words)
    pos = np.arange(len(row)) - offsets[:-1][row]
    words = pc.list_flatten(lists)
    encoded = words.dictionary_encode()
    distinct = encoded.dictionary.to_pylist()
    at = encoded.indices.to_numpy()
    first_keys, surname_keys_ = first_name_keys(), surname_keys()
    keys = [unidecode(w).upper() for w in distinct]
    upper = np.array([w.isupper() and len(w) > 1 for w in distinct], dtype=bool)[at]
    lower = np.array([_LOWER.search(w) is not None for w in distinct], dtype=bool)[at]
    # +1 looks like a first name, -1 like a surname, 0 undecided.
    score = np.array([(k in first_keys) - (k in surname_keys_) for k in keys], dtype=np.int64)[at]
    per_name = len(n_words)
    mixed = (np.bincount(row, upper, per_name) > 0) & (np.bincount(row, lower, per_name) > 0)
    first_score = score[offsets[:-1]]  # every name has a word
    last_score = score[offsets[1:] - 1]
    if order == "first_last":
        last_first = np.zeros(per_name, dtype=bool)
    elif order == "last_first":
        last_first = np.ones(per_name, dtype=bool)
    else:
        last_first = last_score > first_score
    n = n_words[row]
    surname_word = np.where(
        mixed[row], upper, np.where(last_first[row], pos < n - 1, (pos >= 1) | (n == 1))
    )

    def joined(keep: np.ndarray) -> np.ndarray:
        counts = np.bincount(row[keep], minlength=per_name)
        ends = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        kept = pa.ListArray.from_arrays(pa.array(ends), words.filter(pa.array(keep)))
        text = pc.binary_join(kept, pa.scalar(" ", words.type))
        text = pc.utf8_trim(text, characters=_WHITESPACE)
        return pc.if_else(pc.equal(text, ""), None, text).to_numpy(zero_copy_only=False)

    return joined(~surname_word), joined(surname_word)


#: A lower-case letter, as the surname's heuristics see one (`split_full_name`).
_LOWER = re.compile(r"[a-zà-ÿ]")


def split_full_name(full: pd.Series, order: str) -> tuple[pd.Series, pd.Series]:
    """Split "DUPONT Jean", "Jean Dupont" or "Dupont, Jean-Pierre" into (first, last).

    A comma means "last, first". Otherwise words written in capitals, beside
    words that are not, are the surname (the French administrative habit).
    Otherwise `order` decides; `auto` looks the first and last words up in the
    first-name and surname lists and falls back to "first last".
    """
    text = _clean(full)
    first = pd.Series(None, index=full.index, dtype=object)
    last = pd.Series(None, index=full.index, dtype=object)
    present = text.notna()
    comma = present & text.str.contains(",", regex=False)
    parts = text[comma].str.split(",", n=1, expand=True)
    if comma.any():
        last[comma] = _clean(parts[0])
        first[comma] = _clean(parts[1])

    rest = present & ~comma
    if rest.any():
        given, surname = _split_words(text[rest], order)
        last[rest] = surname
        first[rest] = given
    return first, last


def _parse_dates(text: pd.Series, spec: DateFieldSpec) -> pd.Series:
    parsed = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns]")
    for fmt in spec.formats:
        todo = text.notna() & parsed.isna()
        if not todo.any():
            break
        parsed[todo] = parse_dates(text[todo], fmt)
    if not spec.with_time:
        parsed = parsed.dt.normalize()
    return parsed


def _parse_bools(text: pd.Series, spec: BoolFieldSpec) -> tuple[pd.Series, pd.Series]:
    lowered = text.str.lower()
    yes = lowered.isin([v.lower() for v in spec.true_values])
    no = lowered.isin([v.lower() for v in spec.false_values])
    value = pd.Series(pd.NA, index=text.index, dtype="boolean")
    value[yes] = True
    value[no] = False
    invalid = text.notna() & ~yes & ~no
    return value, invalid


class _Reasons:
    """Collects, per row, why it cannot become a record (or, with sep="|", quality codes)."""

    def __init__(self, index: pd.Index, sep: str = "; ") -> None:
        self.text = pd.Series("", index=index, dtype=object)
        self.sep = sep

    def add(self, mask: pd.Series, reason: str) -> None:
        mask = mask.fillna(False).astype(bool)
        if mask.any():
            sep = np.where(self.text[mask] == "", "", self.sep)
            self.text[mask] = self.text[mask] + sep + reason

    @property
    def failed(self) -> pd.Series:
        return self.text != ""


def map_extract(extract: RawExtract, spec: Source, run_date: pd.Timestamp) -> MappedSource:
    """Turn a raw extract into canonical records; unmappable rows go to quarantine."""
    rows = extract.rows
    mapping = spec.mapping
    specs = mapping.specs()
    out = pd.DataFrame(index=rows.index)
    out[SOURCE] = spec.name
    reasons = _Reasons(rows.index)
    codes = _Reasons(rows.index, sep="|")

    for field, fspec in specs.items():
        if field == "full_name":
            continue
        sep = "\n" if field == "address_lines" else " "
        text = _field_text(rows, fspec, sep)
        if isinstance(fspec, DateFieldSpec):
            value = _parse_dates(text, fspec)
            invalid = text.notna() & value.isna()
            if field == "birth_date":
                out_of_range = value.notna() & (
                    (value < pd.Timestamp("1900-01-01")) | (value > run_date)
                )
                invalid |= out_of_range
                value = value.where(~out_of_range)
            out[f"{field}_raw"] = text
        elif isinstance(fspec, BoolFieldSpec):
            value, invalid = _parse_bools(text, fspec)
            out[f"{field}_raw"] = text
        else:
            value, invalid = text, pd.Series(False, index=rows.index)
        if fspec.on_invalid == "quarantine":
            reasons.add(invalid, f"{field}: value does not fit the declared format")
        else:
            value = value.where(~invalid)
            codes.add(invalid, f"{field.upper()}_INVALID")
        if fspec.required:
            reasons.add(text.isna(), f"{field}: required but empty")
        out[field] = value

    if mapping.full_name is not None:
        fn: FullNameSpec = mapping.full_name
        first, last = split_full_name(_field_text(rows, fn, " "), fn.order)
        for field, value in (("first_name", first), ("last_name", last)):
            if field in out:
                out[field] = out[field].where(out[field].notna(), value)
            else:
                out[field] = value

    out[SOURCE_KEY] = out.pop("source_key")
    reasons.add(out[SOURCE_KEY].isna(), "source_key: empty")
    if "record_type" not in out:
        out["record_type"] = spec.record_type
    else:
        out["record_type"] = out["record_type"].fillna(spec.record_type).str.lower()
        reasons.add(
            ~out["record_type"].isin(schema.RECORD_TYPES), "record_type: not person or organisation"
        )
    out[schema.TRUST] = spec.trust
    out["quality_codes"] = codes.text.replace("", None)
    out[schema.SOURCE_LINE] = rows[LINE].to_numpy()

    for col in schema.CANONICAL_COLUMNS:
        if col not in out:
            if col in schema.DATE_FIELDS or col in schema.DATETIME_FIELDS:
                out[col] = pd.Series(pd.NaT, index=rows.index, dtype="datetime64[ns]")
            elif col in schema.BOOL_FIELDS:
                out[col] = pd.Series(pd.NA, index=rows.index, dtype="boolean")
            else:
                out[col] = pd.Series(np.nan, index=rows.index, dtype=TEXT)
    out = out[list(schema.CANONICAL_COLUMNS)]
    # Constants, recoded values and split names are Python objects still.
    for col in out.select_dtypes(include="object").columns:
        out[col] = out[col].astype(TEXT)

    failed = reasons.failed
    quarantined = _to_quarantine(extract, rows, out, failed, reasons.text)
    # Rows of every column are taken once, at the end: each take of the whole frame
    # copies every column (a second for a few hundred thousand rows).
    good = out if not failed.any() else out.take(np.flatnonzero(~failed.to_numpy()))

    # Duplicate source keys: the latest source_updated_at wins, then the later line.
    order = good[["source_updated_at", schema.SOURCE_LINE, SOURCE_KEY]].sort_values(
        ["source_updated_at", schema.SOURCE_LINE], na_position="first", kind="stable"
    )
    superseded = order.duplicated(SOURCE_KEY, keep="last")
    n_dup = int(superseded.sum())
    if n_dup:
        winners = order[~superseded].set_index(SOURCE_KEY)[schema.SOURCE_LINE]
        losers = order[superseded]
        dup_reason = "duplicate source_key: superseded by line " + losers[SOURCE_KEY].map(
            winners
        ).astype(str)
        quarantined = pd.concat(
            [
                quarantined,
                _to_quarantine(extract, rows, out, out.index.isin(losers.index), dup_reason),
            ],
            ignore_index=True,
        )
        good = good.take(good.index.get_indexer(order.index[~superseded].sort_values()))
    raw = rows.loc[good.index].drop(columns=[LINE]).reset_index(drop=True)
    if not isinstance(spec, ParquetSource):
        # Written back as CSV, where the dtype leaves no trace (a Parquet file
        # written back would record it in its schema: `writers.write_back_pieces`).
        raw = _compact(raw)
    # `good` is this function's own frame (`out` or a take of it): numbered in place,
    # where `reset_index` would copy its columns again.
    records = good
    records.index = pd.RangeIndex(len(records))
    quarantine = pd.concat([extract.quarantine, quarantined], ignore_index=True)
    return MappedSource(
        spec.name,
        extract.location,
        records,
        raw,
        quarantine,
        extract.rows_read,
        n_dup,
        extract.fingerprint,
    )


def _compact(raw: pd.DataFrame) -> pd.DataFrame:
    """The extract's rows with their text columns as Arrow strings.

    The rows are kept until the run's end to be written back to their business
    unit with the golden ID beside them: as Python strings, a million rows of
    a CSV extract held 0.7 GB through every stage. Only columns holding text
    alone change; numbers, dates or mixed values (a SQL extract's)
    stay as they were, so the file written back is the same.
    """
    text = [
        c
        for c in raw.columns
        if raw[c].dtype == object and pd.api.types.infer_dtype(raw[c], skipna=True) == "string"
    ]
    return raw.astype(dict.fromkeys(text, TEXT)) if text else raw


def _to_quarantine(
    extract: RawExtract,
    rows: pd.DataFrame,
    out: pd.DataFrame,
    mask: pd.Series | np.ndarray,
    reason: pd.Series,
) -> pd.DataFrame:
    mask = pd.Series(mask, index=rows.index).astype(bool)
    if not mask.any():
        return pd.DataFrame(columns=list(QUARANTINE_COLUMNS))
    sel = schema.python_texts(rows[mask].drop(columns=[LINE]))  # missing: null, not NaN
    raws = [json.dumps(r, ensure_ascii=False) for r in sel.to_dict(orient="records")]
    return pd.DataFrame(
        {
            SOURCE: extract.source,
            "location": extract.location,
            "line": rows.loc[mask, LINE].to_numpy(),
            SOURCE_KEY: out.loc[mask, SOURCE_KEY].to_numpy(),
            "reason": reason[mask].to_numpy(),
            "raw": raws,
        },
        columns=list(QUARANTINE_COLUMNS),
    )
