"""Dates read from an extract's text in the format its mapping declares.

pandas reads a format such as ``%d/%m/%Y`` (French extracts' usual one) with
Python's `strptime` machinery, value by value: 0.4-0.55 s for 350,000
distinct dates, about 1.3 s of a million records' load, where the ISO formats
take 0.02 s. So a format made only of numeric day, month, year, hour, minute
and second, each followed by a separator that is not a digit, is read here in
Arrow and numpy: one regular expression over the column (pandas' own pattern
for each directive, from Python's `_strptime`), the parts turned into
numbers, impossible days and dates beyond pandas' range made missing, as
pandas makes them. A value that the expression does not match goes to
pandas, with all its peculiarities ("today" is a date to it); so does any
other format. A test compares both on generated values.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mdm_pipeline.config import schema

#: Each directive read here, as Python's `_strptime` (which pandas uses) matches it:
#: the same alternatives in the same order, digits written out (`\d` would take
#: other scripts' digits in Python and only ASCII ones in Arrow).
_DIRECTIVES = {
    "d": r"3[01]|[12][0-9]|0[1-9]|[1-9]| [1-9]",
    "m": r"1[0-2]|0[1-9]|[1-9]",
    "Y": r"[0-9][0-9][0-9][0-9]",
    "H": r"2[0-3]|[01][0-9]|[0-9]",
    "M": r"[0-5][0-9]|[0-9]",
    "S": r"6[01]|[0-5][0-9]|[0-9]",
}
#: Python's `\s` on ASCII text (a run of blanks in a format matches a run of these);
#: Arrow's `\s` has neither the vertical tab nor the four separators \x1c-\x1f.
_BLANKS = r"[\t\n\x0b\x0c\r\x1c-\x1f ]+"
#: pandas' nanosecond timestamps' range, in whole seconds (its first second is partly
#: before the range: the next one is the first whole second in it).
_FIRST = np.datetime64(pd.Timestamp.min.value // 10**9 + 1, "s")
_LAST = np.datetime64(pd.Timestamp.max.value // 10**9, "s")


def arrow_pattern(fmt: str) -> str | None:
    """The regular expression (RE2, anchored) that reads `fmt` here, or None if pandas
    must read it.

    Only numeric directives, each once, each followed by the end or by a literal
    that does not start with a digit, and ASCII literals: then a value matches
    pandas' pattern exactly when it matches this one (each number runs to its
    separator), and ``%Y`` does not come first (pandas reads those formats with
    its own ISO parser, as fast as this)."""
    pieces = re.split(r"(%.)", fmt)
    literals, directives = pieces[0::2], [p[1] for p in pieces[1::2]]
    if not directives or directives[0] == "Y" or not fmt.isascii():
        return None
    if any(d not in _DIRECTIVES for d in directives) or len(set(directives)) < len(directives):
        return None
    if any(not text or text[0].isdigit() for text in literals[1:-1]):
        return None
    if literals[-1][:1].isdigit():
        return None
    out = ["(?i)^"]  # Python's pattern ignores case (a literal "T" matches "t")
    for i, text in enumerate(literals):
        for blank, other in re.findall(r"(\s+)|(\S)", text):
            out.append(_BLANKS if blank else ("\\" + other if not other.isalnum() else other))
        if i < len(directives):
            out.append(f"(?P<{directives[i]}>{_DIRECTIVES[directives[i]]})")
    out.append("$")
    return "".join(out)


def parse_dates(text: pd.Series, fmt: str) -> pd.Series:
    """`pd.to_datetime(text, format=fmt, errors="coerce")` as naive datetime64[ns]
    (a zoned result converted to UTC), the values Arrow can read read there."""
    parsed = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns]")
    pattern = arrow_pattern(fmt)
    rest = np.ones(len(text), dtype=bool)
    if pattern is not None and text.dtype == schema.text_dtype() and len(text):
        values, read = _read(schema.contiguous(pa.array(text.array)), pattern)
        parsed[:] = values
        rest = ~read
    if rest.any():
        attempt = pd.to_datetime(text[rest], format=fmt, errors="coerce")
        if getattr(attempt.dt, "tz", None) is not None:
            attempt = attempt.dt.tz_convert("UTC").dt.tz_localize(None)
        parsed[rest] = attempt.astype("datetime64[ns]")
    return parsed


def _read(values: pa.Array, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """(datetime64[ns] of each value, NaT where it is no date; whether the pattern
    matched it: a value it did not match is left to pandas).

    Each distinct value is read once (birth dates repeat: a million records hold
    some thirty thousand), as pandas does when values repeat."""
    encoded = values.dictionary_encode()
    positions = encoded.indices.fill_null(-1).to_numpy()
    found, matched = _read_distinct(encoded.dictionary, pattern)
    # A missing value's position, -1, takes the last element: NaT, not matched.
    found, matched = np.append(found, np.datetime64("NaT", "ns")), np.append(matched, False)
    return found[positions], matched[positions]


def _read_distinct(values: pa.Array, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """`_read` of values without nulls."""
    parts = pc.extract_regex(values, pattern)
    read = parts.is_valid().to_numpy(zero_copy_only=False)

    def number(name: str, default: int) -> np.ndarray:
        if name not in {f.name for f in parts.type}:
            return np.full(len(values), default, dtype=np.int64)
        field = pc.utf8_trim_whitespace(pc.struct_field(parts, name))  # " 5": a day
        return pc.fill_null(pc.cast(field, pa.int64()), default).to_numpy()

    year, month, day = number("Y", 1970), number("m", 1), number("d", 1)
    months = ((year - 1970) * 12 + month - 1).astype("datetime64[M]")
    first_day = months.astype("datetime64[D]")
    month_days = ((months + 1).astype("datetime64[D]") - first_day).astype(np.int64)
    clock = number("H", 0) * 3600 + number("M", 0) * 60 + number("S", 0)
    # Second 60 or 61 runs into the next minute, as pandas has it.
    seconds = first_day.astype("datetime64[s]") + ((day - 1) * 86400 + clock)
    valid = read & (day <= month_days) & (seconds >= _FIRST) & (seconds <= _LAST)
    out = np.where(valid, seconds, np.datetime64(0, "s")).astype("datetime64[ns]")
    out[~valid] = np.datetime64("NaT")
    return out, read
