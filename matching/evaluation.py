"""Pairwise precision, recall and F1 of a clustering against a truth.

Pure functions over label arrays, shared by tests, `mdm evaluate`-style
checks and benchmarks. Pairs are counted from the contingency table, never
enumerated, so they cost O(records).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mdm_pipeline.config.errors import SourceError


@dataclass(frozen=True)
class PairScores:
    """Pair-level quality of a clustering."""

    true_positives: int
    predicted_pairs: int
    true_pairs: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.predicted_pairs if self.predicted_pairs else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.true_pairs if self.true_pairs else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _pairs(sizes: np.ndarray) -> int:
    return int((sizes * (sizes - 1) // 2).sum())


def pair_scores(predicted: pd.Series, truth: pd.Series) -> PairScores:
    """Compare two labelings of the same records (aligned Series, no missing values)."""
    frame = pd.DataFrame({"p": predicted.to_numpy(), "t": truth.to_numpy()})
    both = frame.groupby(["p", "t"]).size().to_numpy()
    return PairScores(
        true_positives=_pairs(both),
        predicted_pairs=_pairs(frame.groupby("p").size().to_numpy()),
        true_pairs=_pairs(frame.groupby("t").size().to_numpy()),
    )


@dataclass(frozen=True)
class BCubed:
    """Record-level quality: how much of each record's cluster is right, and complete."""

    precision: float
    recall: float

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def bcubed(predicted: pd.Series, truth: pd.Series) -> BCubed:
    """B-cubed precision and recall, from the contingency table (no per-record loop).

    A record in predicted cluster p and true entity t scores n(p,t)/n(p) for
    precision and n(p,t)/n(t) for recall; summed per (p, t) cell that is
    n(p,t)^2 / n(p) and n(p,t)^2 / n(t).
    """
    n = len(predicted)
    if n == 0:
        return BCubed(1.0, 1.0)
    frame = pd.DataFrame({"p": predicted.to_numpy(), "t": truth.to_numpy()})
    cells = frame.groupby(["p", "t"]).size().rename("n").reset_index()
    cells["np"] = cells["p"].map(frame.groupby("p").size())
    cells["nt"] = cells["t"].map(frame.groupby("t").size())
    sq = cells["n"].astype(float) ** 2
    return BCubed(float((sq / cells["np"]).sum() / n), float((sq / cells["nt"]).sum() / n))


def read_truth(path: str | Path) -> pd.DataFrame:
    """A truth file: CSV with source, source_key, entity_id (all read as text)."""
    try:
        truth = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{Path(path).name}: cannot read the truth file ({exc})") from None
    missing = {"source", "source_key", "entity_id"} - set(truth.columns)
    if missing:
        raise SourceError(
            f"{Path(path).name}: missing column(s) {', '.join(sorted(missing))} "
            "(expected source, source_key, entity_id)"
        )
    return truth[["source", "source_key", "entity_id"]]
