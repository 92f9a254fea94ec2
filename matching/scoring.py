"""Fellegi-Sunter scoring with parameters learnt without labels, and guarded.

- u (how often non-matches agree at each level) comes from random record
  pairs, which are almost all non-matches. It is fixed during training.
- m (how often true matches agree) is learnt by EM on training blocks where
  matches are dense (same birth date and name, same e-mail...). A
  comparison's m is learnt only in blocks that do not use its field, and
  every m and u is bounded away from 0 and 1.
- Guards against the degenerate solution, where EM settles on a class of
  namesakes instead of true matches: a comparison whose agreement would count
  against a match (m < u at its first level), or a strong identifier whose
  learnt m falls below its configured floor (e.g. birth date), falls back to
  the configured priors, with a warning.
- Exact agreement on common values counts less: with term-frequency
  adjustment, the u of an exact agreement is the share of records holding that
  value (MARTIN is weak evidence, ZOBEL strong).

The match weight of a pair is log2 of the prior odds plus the sum of its
per-comparison weights log2(m/u); each term is kept so it can be shown later.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mdm_pipeline.config.settings import Comparison, TrainingSettings
from mdm_pipeline.matching.comparisons import NULL, ComparisonVectors

log = logging.getLogger(__name__)


@dataclass
class Model:
    """Fellegi-Sunter parameters: per comparison, m and u per level (the last is 'else')."""

    m: dict[str, np.ndarray]
    u: dict[str, np.ndarray]
    #: Share of candidate pairs that are matches (the prior), set by `fit_prior`.
    prior: float = 0.5
    #: Where each comparison's m came from ('em', 'prior', 'labels').
    m_source: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: Training blocks: name -> (pairs used, estimated share of matches, iterations).
    training: dict[str, tuple[int, float, int]] = field(default_factory=dict)
    #: context comparison -> other comparison -> u among the non-matches that agree
    #: exactly on the context comparison (people of one household, see `evidence`).
    u_context: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    #: context comparison -> share of matches among the pairs that agree on it.
    context_share: dict[str, float] = field(default_factory=dict)
    #: comparison -> share of records holding each value, frozen at training so that
    #: a reused model weighs MARTIN the same every night.
    term_freq: dict[str, pd.Series] = field(default_factory=dict)
    #: Whether `prior` has been fitted (a reused model keeps its prior).
    prior_fitted: bool = False

    def weights(self, name: str) -> np.ndarray:
        """log2(m/u) per level of one comparison."""
        return np.log2(self.m[name] / self.u[name])

    def as_dict(self) -> dict[str, object]:
        """A JSON-able form, stored with each run so that scores can be explained later."""
        return {
            "prior": self.prior,
            "m": {k: v.round(6).tolist() for k, v in self.m.items()},
            "u": {k: v.round(8).tolist() for k, v in self.u.items()},
            "m_source": self.m_source,
            "warnings": self.warnings,
            "training": {k: list(v) for k, v in self.training.items()},
            "u_context": {
                g: {k: v.round(8).tolist() for k, v in us.items()}
                for g, us in self.u_context.items()
            },
            "context_share": self.context_share,
        }

    def to_json(self) -> str:
        """Every parameter at full precision: a stored model scores exactly as it did."""
        return json.dumps(
            {
                **self.as_dict(),
                "m": {k: v.tolist() for k, v in self.m.items()},
                "u": {k: v.tolist() for k, v in self.u.items()},
                "u_context": {
                    g: {k: v.tolist() for k, v in us.items()} for g, us in self.u_context.items()
                },
                "term_freq": {k: v.to_dict() for k, v in self.term_freq.items()},
                "prior_fitted": self.prior_fitted,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Model:
        data = json.loads(text)
        return cls(
            m={k: np.array(v) for k, v in data["m"].items()},
            u={k: np.array(v) for k, v in data["u"].items()},
            prior=float(data["prior"]),
            m_source=dict(data["m_source"]),
            warnings=list(data["warnings"]),
            training={k: (int(v[0]), float(v[1]), int(v[2])) for k, v in data["training"].items()},
            u_context={
                g: {k: np.array(v) for k, v in us.items()} for g, us in data["u_context"].items()
            },
            context_share={k: float(v) for k, v in data["context_share"].items()},
            term_freq={
                k: pd.Series(v, dtype=np.float64) for k, v in data.get("term_freq", {}).items()
            },
            prior_fitted=bool(data.get("prior_fitted", True)),
        )


def priors(comparisons: list[Comparison]) -> dict[str, np.ndarray]:
    """The configured m of each level, 'else' last."""
    return {
        c.name: np.array([lv.m_prior for lv in c.levels] + [c.else_m_prior]) for c in comparisons
    }


def _distribution(levels: np.ndarray, n_levels: int, floor: float) -> np.ndarray:
    """Share of non-null pairs at each level (levels 0..n_levels), bounded by `floor`."""
    valid = levels[levels != NULL].astype(np.int64)
    counts = np.bincount(valid, minlength=n_levels + 1).astype(np.float64)
    # Half a pair of smoothing: a level never seen in the sample is rare, not impossible.
    dist = (counts + 0.5) / (counts.sum() + 0.5 * len(counts))
    return _bound(dist, floor)


def _bound(p: np.ndarray, floor: float) -> np.ndarray:
    p = np.clip(p, floor, 1 - floor)
    return p / p.sum()


def estimate_u(
    vectors: ComparisonVectors, comparisons: list[Comparison], floor: float
) -> dict[str, np.ndarray]:
    """u per level from the comparison vectors of random record pairs."""
    return {
        c.name: _distribution(vectors.levels[c.name].to_numpy(), len(c.levels), floor)
        for c in comparisons
    }


def m_from_labels(
    vectors: ComparisonVectors, is_match: np.ndarray, comparisons: list[Comparison], floor: float
) -> dict[str, np.ndarray]:
    """m per level from pairs a steward confirmed as matches."""
    return {
        c.name: _distribution(vectors.levels[c.name].to_numpy()[is_match], len(c.levels), floor)
        for c in comparisons
    }


def _patterns(levels: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Distinct comparison patterns and how many pairs show each: EM works on these."""
    counts = levels.value_counts(sort=False)
    return np.array(counts.index.to_list(), dtype=np.int64).reshape(len(counts), -1), (
        counts.to_numpy(dtype=np.float64)
    )


def _log_likelihood(patterns: np.ndarray, probs: list[np.ndarray]) -> np.ndarray:
    ll = np.zeros(len(patterns))
    for k, p in enumerate(probs):
        lv = patterns[:, k]
        ll += np.where(lv == NULL, 0.0, np.log(p[np.maximum(lv, 0)]))
    return ll


def _m_step(
    patterns: np.ndarray,
    weight: np.ndarray,
    names: list[str],
    probs: dict[str, np.ndarray],
    floor: float,
) -> float:
    """One M step, in place: m from the expected matches, or u from the non-matches.

    Returns the largest change, for the convergence test.
    """
    change = 0.0
    for k, name in enumerate(names):
        lv = patterns[:, k]
        ok = lv != NULL
        mass = np.bincount(lv[ok], weights=weight[ok], minlength=len(probs[name]))
        if mass.sum() > 0:
            new = _bound(mass / mass.sum(), floor)
            change = max(change, float(np.abs(new - probs[name]).max()))
            probs[name] = new
    return change


def em(
    levels: pd.DataFrame,
    m0: dict[str, np.ndarray],
    u: dict[str, np.ndarray],
    settings: TrainingSettings,
    prior0: float = 0.3,
    update_m: bool = True,
    total_pairs: float | None = None,
) -> tuple[dict[str, np.ndarray], float, int]:
    """Expectation-maximisation of m (and the match share) with u fixed.

    Runs on distinct comparison patterns weighted by their counts, so its cost
    does not depend on the number of pairs. Returns (m, match share, iterations).
    With `total_pairs`, the share is taken over that many pairs, the ones not
    shown counting as non-matches: the prior of a random pair, not of a block.
    """
    names = list(levels.columns)
    patterns, counts = _patterns(levels)
    m = {k: m0[k].copy() for k in names}
    ll_u = _log_likelihood(patterns, [u[k] for k in names])
    prior = prior0
    iterations = 0
    for _ in range(settings.max_iterations):
        iterations += 1
        ll_m = _log_likelihood(patterns, [m[k] for k in names])
        logit = np.log(prior / (1 - prior)) + ll_m - ll_u
        p = 1 / (1 + np.exp(-np.clip(logit, -700, 700)))
        weight = counts * p
        denominator = counts.sum() if total_pairs is None else total_pairs
        new_prior = float(np.clip(weight.sum() / denominator, 1e-12, 1 - 1e-9))
        change = abs(new_prior - prior)
        if update_m:
            change = max(change, _m_step(patterns, weight, names, m, settings.probability_floor))
        prior = new_prior
        if change < settings.tolerance * (prior if total_pairs is not None else 1):
            break
    return m, prior, iterations


def em_context_u(
    levels: pd.DataFrame,
    m: dict[str, np.ndarray],
    u0: dict[str, np.ndarray],
    settings: TrainingSettings,
) -> tuple[dict[str, np.ndarray], float, int]:
    """EM of u (and the match share) with m fixed: u within a context, such as pairs of
    records that share a phone or an address.

    Random pairs tell how often strangers agree; people of one household are not
    strangers (they share a surname far more often, a first name far less). m does
    not depend on the context, so it is held, and only u is learnt.
    """
    names = list(levels.columns)
    patterns, counts = _patterns(levels)
    u = {k: u0[k].copy() for k in names}
    ll_m = _log_likelihood(patterns, [m[k] for k in names])
    prior = 0.5
    iterations = 0
    for _ in range(settings.max_iterations):
        iterations += 1
        ll_u = _log_likelihood(patterns, [u[k] for k in names])
        logit = np.log(prior / (1 - prior)) + ll_m - ll_u
        p = 1 / (1 + np.exp(-np.clip(logit, -700, 700)))
        new_prior = float(np.clip((counts * p).sum() / counts.sum(), 1e-9, 1 - 1e-9))
        change = abs(new_prior - prior)
        non_match = counts * (1 - p)
        change = max(change, _m_step(patterns, non_match, names, u, settings.probability_floor))
        prior = new_prior
        if change < settings.tolerance:
            break
    return u, prior, iterations


def check_plausible(
    comparisons: list[Comparison], m: dict[str, np.ndarray], u: dict[str, np.ndarray]
) -> dict[str, str]:
    """Comparisons whose learnt m cannot describe true matches, with the reason."""
    bad = {}
    for c in comparisons:
        if m[c.name][0] <= u[c.name][0]:
            bad[c.name] = (
                f"agreement on '{c.name}' would count against a match "
                f"(m={m[c.name][0]:.3f} <= u={u[c.name][0]:.3f})"
            )
        elif c.min_m_first_level is not None and m[c.name][0] < c.min_m_first_level:
            bad[c.name] = (
                f"only {m[c.name][0]:.0%} of matches would agree on '{c.name}' "
                f"(at least {c.min_m_first_level:.0%} expected)"
            )
    return bad


def _group_members(comparisons: list[Comparison]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for c in comparisons:
        if c.group is not None:
            groups.setdefault(c.group, []).append(c.name)
    return groups


@dataclass
class Evidence:
    """What the comparison vectors say, before the prior is known."""

    #: log2 likelihood ratio of each pair; for pairs in a context, of the comparisons
    #: outside the context's own.
    ratio: np.ndarray
    #: log2 odds of a match given the context the pair is in (NaN: in none).
    context_odds: np.ndarray
    #: The context of each pair as an index into `context_names` (-1: in none); codes
    #: rather than names because millions of pairs are tested against them.
    context_code: np.ndarray
    context_names: tuple[str, ...]
    contributions: pd.DataFrame

    @property
    def in_context(self) -> np.ndarray:
        return self.context_code >= 0


def evidence(vectors: ComparisonVectors, model: Model, comparisons: list[Comparison]) -> Evidence:
    """Per-comparison weights of each pair.

    A pair that agrees exactly on a comparison of a group (the first in the
    group's order: same e-mail, else same phone, else same address) is in that
    comparison's context. There, the odds of a match are the share of matches
    among all pairs that agree on it (learnt by EM), and every other comparison
    is weighed against the non-matches of that context: people who share a
    landline share a surname far more often than strangers, a first name far less.
    """
    n_pairs = len(vectors.levels)
    names = [n for ns in _group_members(comparisons).values() for n in ns if n in model.u_context]
    code = np.full(n_pairs, -1, dtype=np.int8)
    context_odds = np.full(n_pairs, np.nan)
    for k, name in enumerate(names):
        share = model.context_share[name]
        take = (vectors.levels[name].to_numpy() == 0) & (code < 0)
        code[take] = k
        context_odds[take] = np.log2(share / (1 - share))
    outside = code < 0
    contrib = {}
    for c in comparisons:
        lv = vectors.levels[c.name].to_numpy()
        valid = lv != NULL
        at = np.maximum(lv, 0)
        part = np.where(valid, model.weights(c.name)[at], 0.0)
        tf = vectors.term_freq.get(c.name)
        if tf is not None:
            # The u of an exact agreement on this value is the value's own frequency
            # (among strangers: within a household, how common a name is tells little).
            has = ~np.isnan(tf) & outside
            floor = model.u[c.name].min()
            part[has] = np.log2(model.m[c.name][0] / np.maximum(tf[has], floor))
        for k, ctx in enumerate(names):
            here = code == k
            if ctx == c.name:
                part[here] = 0.0
            elif c.name in model.u_context[ctx] and here.any():
                w_ctx = np.log2(model.m[c.name] / model.u_context[ctx][c.name])
                part[here & valid] = w_ctx[at[here & valid]]
        contrib[c.name] = part.astype(np.float32)
    frame = pd.DataFrame(contrib)
    # Outside any context, only the strongest agreement of a group counts: the others'
    # positive weights are taken back in one explicit column.
    for group, members in _group_members(comparisons).items():
        positive = np.clip(np.column_stack([contrib[m] for m in members]), 0, None)
        overlap = np.where(outside, positive.max(axis=1) - positive.sum(axis=1), 0.0)
        frame[f"{group}_overlap"] = overlap.astype(np.float32)
    ratio = frame.to_numpy(dtype=np.float64).sum(axis=1)
    return Evidence(ratio, context_odds, code, tuple(names), frame)


def score(
    vectors: ComparisonVectors, model: Model, comparisons: list[Comparison]
) -> tuple[np.ndarray, pd.DataFrame]:
    """(match weight per pair, per-comparison weight contributions) under the model's prior.

    The contributions add up to the weight minus log2 of the prior odds; for a pair
    in a context, the context comparison's own column carries the context's odds
    against the prior.
    """
    ev = evidence(vectors, model, comparisons)
    return weigh(ev, model.prior)


def weigh(ev: Evidence, prior: float) -> tuple[np.ndarray, pd.DataFrame]:
    """Weights and contributions of `ev` once the prior is known."""
    prior_w = float(np.log2(prior / (1 - prior)))
    frame = ev.contributions.copy()
    in_ctx = ev.in_context
    for k, name in enumerate(ev.context_names):
        here = ev.context_code == k
        column = frame[name].to_numpy(copy=True)
        column[here] = (ev.context_odds[here] - prior_w).astype(np.float32)
        frame[name] = column
    weight = np.where(in_ctx, ev.context_odds + ev.ratio, prior_w + ev.ratio)
    return weight, frame


def fit_prior(
    evidence: np.ndarray, total_pairs: float, known_matches: float = 0.0, iterations: int = 100
) -> float:
    """The share of matches among all `total_pairs` pairs, by EM on the candidates' evidence.

    Pairs outside the candidates count as non-matches. `evidence` is each
    candidate's log2 likelihood ratio (its weight without prior); `known_matches`
    the expected matches among pairs whose probability does not depend on the
    prior (pairs in a context).
    """
    prior = max(len(evidence) / total_pairs * 0.1, 1e-12)
    for _ in range(iterations):
        p = probability(evidence + np.log2(prior / (1 - prior)))
        new = float(np.clip((p.sum() + known_matches) / total_pairs, 1e-12, 0.5))
        if abs(new - prior) <= 1e-6 * prior:
            return new
        prior = new
    return prior


def probability(weight: np.ndarray) -> np.ndarray:
    """Match probability from a match weight (log2 odds)."""
    return 1 / (1 + np.exp2(-np.clip(weight, -1000, 1000)))
