"""Exact-key matching: records agreeing on every field of a rule are linked.

This is the first, deterministic matcher; probabilistic scoring builds on the
same currency: a frame of pairs (left, right, match_key). Within one key group
records are chained left to right (k-1 edges for k records), which gives the
same connected components as all k(k-1)/2 pairs at linear cost; the number of
pairs the rule implies is still reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mdm_pipeline.config.settings import ExactRule

PAIR_COLUMNS = ("left", "right", "match_key")


@dataclass(frozen=True)
class ExactLinks:
    """Edges found by the rules and how many candidate pairs each rule implied."""

    edges: pd.DataFrame  # PAIR_COLUMNS: positional record ids, left < right
    pairs_per_rule: dict[str, int]


def _field_column(field: str) -> str:
    return "birth_date" if field == "birth_date" else f"{field}_norm"


def exact_links(records: pd.DataFrame, rules: list[ExactRule]) -> ExactLinks:
    """Link records by each rule; an edge keeps the first rule that found it."""
    frames = []
    per_rule: dict[str, int] = {}
    ids = np.arange(len(records))
    for rule in rules:
        cols = [_field_column(f) for f in rule.fields]
        sel = records[cols].notna().all(axis=1).to_numpy()
        if rule.record_type is not None:
            sel &= (records["record_type"] == rule.record_type).to_numpy()
        sub = records.loc[sel, cols].copy()
        sub["__id"] = ids[sel]
        group = sub.groupby(cols, sort=False, dropna=True).ngroup().to_numpy()
        order = np.lexsort((sub["__id"].to_numpy(), group))
        g_sorted = group[order]
        id_sorted = sub["__id"].to_numpy()[order]
        same = g_sorted[1:] == g_sorted[:-1]
        sizes = np.bincount(group) if len(group) else np.array([], dtype=np.int64)
        per_rule[rule.name] = int((sizes * (sizes - 1) // 2).sum())
        frames.append(
            pd.DataFrame(
                {"left": id_sorted[:-1][same], "right": id_sorted[1:][same], "match_key": rule.name}
            )
        )
    edges = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(
            {c: pd.Series(dtype="int64") for c in PAIR_COLUMNS[:2]}
            | {"match_key": pd.Series(dtype=object)}
        )
    )
    edges = edges.drop_duplicates(["left", "right"], keep="first").reset_index(drop=True)
    return ExactLinks(edges, per_rule)
