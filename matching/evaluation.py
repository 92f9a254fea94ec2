"""Pairwise precision, recall and F1 of a clustering against a truth.

Pure functions over label arrays, shared by tests, `mdm evaluate`-style
checks and benchmarks. Pairs are counted from the contingency table, never
enumerated, so they cost O(records).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


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
