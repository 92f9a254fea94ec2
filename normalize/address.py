"""First-cut address handling: find the street line, the postcode and the town.

Lines may arrive in any order (ADR1..ADR4) or as one string holding the whole
address. The full NF Z10-011 restructuring (six lines, abbreviations, La Poste
validation) builds on these parts.
"""

from __future__ import annotations

import pandas as pd

from mdm_pipeline.normalize.text import fold

_POSTCODE_CITY = r"(?:^|\n|,)\s*(\d{5})\s+([^\n,]+?)\s*$"
_STREET = r"^\d+\s*(?:BIS|TER|QUATER|[A-D])?\b.*[A-Z]{2,}"


def split_lines(lines: pd.Series) -> pd.DataFrame:
    """Street line, postcode and town found in the raw address lines.

    Returns the columns `street`, `postcode_in_lines` and `city_in_lines`
    (empty where not found). Commas count as line breaks: the call centre
    types a whole address on one line.
    """
    text = lines.str.replace(",", "\n", regex=False)
    tail = text.str.extract(_POSTCODE_CITY)
    body = text.str.replace(r"\n?\s*\d{5}\s+[^\n]*$", "", regex=True)
    exploded = body.str.split("\n").explode()
    folded = fold(exploded)
    is_street = folded.str.match(_STREET, na=False)
    street = folded.where(is_street).groupby(level=0).first()
    return pd.DataFrame(
        {
            "street": street.reindex(lines.index),
            "postcode_in_lines": tail[0],
            "city_in_lines": tail[1],
        },
        index=lines.index,
    )
