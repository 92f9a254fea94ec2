"""What a steward sees of a pair beyond the stored score: the comparison level each
field reached, computed again from the two stored records with tonight's settings
(the stored evidence keeps weights, not levels)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mdm_pipeline.config.settings import ComparisonLevel, MatchingSettings
from mdm_pipeline.matching.comparisons import NULL, compare
from mdm_pipeline.pipeline.incremental import PAYLOAD_COLUMNS, records_from_payload


def _label(level: ComparisonLevel) -> str:
    if level.threshold is not None:
        return (
            f"{level.kind} ≥ {level.threshold:g}"
            if level.kind
            in (
                "jaro_winkler",
                "token_set",
                "swapped",
            )
            else f"{level.kind} ≤ {level.threshold:g}"
        )
    if level.other:
        return f"{level.kind} ({level.other})"
    return level.kind


def every_field(values: dict) -> dict:
    """A stored payload's values with the fields it leaves out (its missing ones) back
    as None: a steward's view lists the same fields for every record."""
    return {**{name: values.get(name) for name in PAYLOAD_COLUMNS}, **values}


def pair_levels(settings: MatchingSettings, left: dict, right: dict) -> dict[str, str]:
    """Comparison name -> the level the pair reached ("missing" when a side has no
    value, "none" when no level held). `left`/`right` are stored records as
    `golden_records.review.show_pair` returns them (ref and stored payload values)."""
    rows = pd.DataFrame(
        {
            "source": [side["ref"].split(":", 1)[0] for side in (left, right)],
            "source_key": [side["ref"].split(":", 1)[1] for side in (left, right)],
            "source_line": [0, 0],
            "payload": [pd.Series(side["values"]).to_json() for side in (left, right)],
        }
    )
    records = records_from_payload(rows)
    vectors = compare(records, np.array([0]), np.array([1]), settings.comparisons, {})
    out = {}
    for comp in settings.comparisons:
        code = int(vectors.levels[comp.name].iloc[0])
        if code == NULL:
            out[comp.name] = "missing"
        elif code >= len(comp.levels):
            out[comp.name] = "none"
        else:
            out[comp.name] = _label(comp.levels[code])
    return out
