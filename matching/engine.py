"""The matching stage end to end: train, block, compare, score, band.

`train` learns a model from the night's records (u from random pairs, m by EM
on training blocks, with the safeguards of `scoring`); `match` scores every
candidate pair and puts it in a decision band. Both take normalised records
with positional ids (row i is record i).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mdm_pipeline.config.settings import BlockingRule, Comparison, MatchingSettings
from mdm_pipeline.matching.blocking import (
    Candidates,
    RuleStats,
    block_ids,
    candidate_pairs,
    pairs_within,
)
from mdm_pipeline.matching.comparisons import NULL, compare, term_frequencies
from mdm_pipeline.matching.keys import Fields, prepare
from mdm_pipeline.matching.scoring import (
    Evidence,
    Model,
    check_plausible,
    em,
    em_context_u,
    estimate_u,
    evidence,
    fit_prior,
    m_from_labels,
    priors,
    probability,
    weigh,
)

log = logging.getLogger(__name__)

AUTO, REVIEW, NON_MATCH = "auto_match", "review", "non_match"

#: Confirmed matches carrying a field needed before they, not EM, set that field's m.
MIN_LABELLED_PAIRS = 20


@dataclass(frozen=True)
class MatchResult:
    """Scored candidate pairs and how they were found."""

    #: left, right (positional ids), rule, weight, probability, band, then one
    #: weight column per comparison (its contribution to the pair's weight).
    pairs: pd.DataFrame
    model: Model
    rule_stats: dict[str, RuleStats]


def _random_pairs(records: Fields, size: int, rng: np.random.Generator) -> tuple:
    """Random pairs of distinct records of the same type (almost all non-matches)."""
    n = len(records)
    if n < 2:
        empty = np.array([], dtype=np.int64)
        return empty, empty
    kind = records.type_codes
    total = n * (n - 1) // 2
    want = int(min(size, total))
    i = rng.integers(0, n, int(want * 1.5) + 10)
    j = rng.integers(0, n, len(i))
    ok = (i != j) & (kind[i] == kind[j])
    return np.minimum(i, j)[ok][:want], np.maximum(i, j)[ok][:want]


def _key_fields(rule: BlockingRule) -> set[str]:
    fields = {k.field for k in rule.key_parts()}
    return fields | ({"address"} if fields & {"postcode", "street", "city"} else set())


def _comparison_fields(comp: Comparison) -> set[str]:
    # A crosswise level (last name against first name) does not make the comparison
    # about the other field; a level on another field (same postcode) does.
    fields = {comp.field} | {lv.other for lv in comp.levels if lv.kind == "same_field"}
    return fields | ({"postcode", "street"} if "address" in fields else set())


def _keep_unseen_levels(
    comp: Comparison, m: np.ndarray, prior: np.ndarray, used: set[str]
) -> np.ndarray:
    """A block keyed on a level's other field cannot show that level (swapped first and
    last names never share a last-name block): such levels keep their prior m."""
    fixed = np.array([lv.other in used for lv in comp.levels] + [False])
    if not fixed.any():
        return m
    out = m.copy()
    out[fixed] = prior[fixed]
    free = ~fixed
    out[free] = m[free] / m[free].sum() * (1 - prior[fixed].sum())
    return out


def train(
    records: pd.DataFrame | Fields,
    settings: MatchingSettings,
    labelled: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> Model:
    """Learn m and u from the records; `labelled` (left, right, is_match) are steward decisions."""
    records = prepare(records)
    training = settings.training
    comps = settings.comparisons
    rng = np.random.default_rng(training.seed)
    tf = term_frequencies(records, comps)
    floor = training.probability_floor

    # A hundred random pairs per record estimate u well; more only costs time.
    sample = min(training.u_sample_pairs, max(10_000, 100 * len(records)))
    left, right = _random_pairs(records, sample, rng)
    u = estimate_u(compare(records, left, right, comps, {}), comps, training.u_floor)
    m_prior = priors(comps)
    model = Model(m={k: v.copy() for k, v in m_prior.items()}, u=u, term_freq=tf)

    sums = {c.name: np.zeros_like(m_prior[c.name]) for c in comps}
    mass = {c.name: 0.0 for c in comps}
    for rule in training.blocks:
        ids = block_ids(records, rule)
        bl, br, _, _ = pairs_within(ids, settings.blocking.max_block_size)
        if len(bl) > training.max_pairs_per_block:
            pick = rng.choice(len(bl), training.max_pairs_per_block, replace=False)
            bl, br = bl[pick], br[pick]
        if len(bl) == 0:
            continue
        used = _key_fields(rule)
        active = [c for c in comps if not _comparison_fields(c) & used]
        vectors = compare(records, bl, br, active, tf)
        m_block, share, iterations = em(vectors.levels, m_prior, u, training)
        model.training[rule.name] = (len(bl), round(share, 6), iterations)
        for c in active:
            # A block where the field is always missing says nothing of its m.
            seen = int((vectors.levels[c.name].to_numpy() != NULL).sum())
            m_block[c.name] = _keep_unseen_levels(c, m_block[c.name], m_prior[c.name], used)
            sums[c.name] += m_block[c.name] * share * seen
            mass[c.name] += share * seen
    for c in comps:
        if mass[c.name] > 0:
            model.m[c.name] = sums[c.name] / mass[c.name]
            model.m_source[c.name] = "em"
        else:
            model.m_source[c.name] = "prior"

    if labelled is not None and labelled[2].any():
        ll, lr, is_match = labelled
        vectors = compare(records, ll, lr, comps, tf)
        from_labels = m_from_labels(vectors, is_match, comps, floor)
        for c in comps:
            # A field the confirmed matches hardly ever carry says nothing: keep its m.
            seen = int((vectors.levels[c.name].to_numpy()[is_match] != NULL).sum())
            if seen >= MIN_LABELLED_PAIRS:
                model.m[c.name] = from_labels[c.name]
                model.m_source[c.name] = "labels"

    for name, reason in check_plausible(comps, model.m, model.u).items():
        message = f"training refused for comparison '{name}': {reason}; using its priors"
        log.warning(message)
        model.warnings.append(message)
        model.m[name] = m_prior[name].copy()
        model.m_source[name] = "prior"
    _learn_context_u(records, settings, model, tf, rng)
    return model


def _learn_context_u(
    records: Fields,
    settings: MatchingSettings,
    model: Model,
    tf: dict[str, pd.Series],
    rng: np.random.Generator,
) -> None:
    """Each grouped comparison's context: pairs that agree exactly on it.

    The pairs are those of a block on its field (same e-mail, same phone, same
    address): mostly one person or one household. EM with m held learns the
    share of matches among them and the u of every other comparison.
    """
    training = settings.training
    comps = settings.comparisons
    for c in comps:
        if c.group is None:
            continue
        rule = BlockingRule(name=f"context_{c.name}", keys=[c.field])
        left, right, _, _ = pairs_within(block_ids(records, rule), settings.blocking.max_block_size)
        if len(left) < 100:  # too few pairs to learn from: this context is not used
            continue
        if len(left) > training.max_pairs_per_block:
            pick = rng.choice(len(left), training.max_pairs_per_block, replace=False)
            left, right = left[pick], right[pick]
        others = [o for o in comps if o.name != c.name]
        vectors = compare(records, left, right, others, tf)
        u_ctx, share, iterations = em_context_u(vectors.levels, model.m, model.u, training)
        model.training[f"context_{c.name}"] = (len(left), round(share, 6), iterations)
        # Guard against the degenerate split: where the context holds almost only
        # matches, EM can cut them in two and call one half "non-matches", which then
        # agree on everything. Non-matches of a household do not share a birth date:
        # a strong identifier must still count for a match within the context.
        weak = [
            o.name
            for o in others
            if o.min_m_first_level is not None
            and (vectors.levels[o.name].to_numpy() != NULL).any()
            and model.m[o.name][0] < 2 * u_ctx[o.name][0]
        ]
        if weak:
            message = (
                f"context '{c.name}' refused: within it, agreement on '{weak[0]}' would "
                f"hardly count (m={model.m[weak[0]][0]:.3f}, u={u_ctx[weak[0]][0]:.3f}); "
                f"pairs agreeing on '{c.name}' are scored without a context"
            )
            log.warning(message)
            model.warnings.append(message)
            continue
        model.u_context[c.name] = u_ctx
        model.context_share[c.name] = share


def match(
    records: pd.DataFrame | Fields,
    settings: MatchingSettings,
    model: Model,
    only: np.ndarray | None = None,
) -> MatchResult:
    """Score every candidate pair; the model's prior is fitted to the candidates.

    With `only` (a mask over records), just the pairs that involve one of those
    records are scored: blocks are still formed over all records, so the pairs
    and their blocking rule are exactly those a run over everything would score.
    """
    records = prepare(records)
    comps = settings.comparisons
    cands = candidate_pairs(records, settings.blocking.rules, settings.blocking.max_block_size)
    if only is not None:
        keep = only[cands.left] | only[cands.right]
        cands = Candidates(cands.left[keep], cands.right[keep], cands.rule[keep], cands.stats)
    tf = model.term_freq or term_frequencies(records, comps)
    vectors = compare(records, cands.left, cands.right, comps, tf)
    ev = evidence(vectors, model, comps)
    return scored(records.type_codes, cands, ev, settings, model)


def scored(
    type_codes: np.ndarray,
    cands: Candidates,
    ev: Evidence,
    settings: MatchingSettings,
    model: Model,
) -> MatchResult:
    """Weights, probabilities and bands of candidate pairs from their evidence.

    Shared by the local engine and the Spark one (which computes the evidence on
    its executors): the prior is fitted here, over every candidate at once.
    """
    if len(cands) and not model.prior_fitted:
        # The prior is that of a random pair of records of the same type, fitted by EM
        # with m and u held: pairs that no rule proposed count as non-matches. A prior
        # over candidates only would let blocks full of namesakes vouch for themselves.
        kinds = np.bincount(type_codes).astype(np.float64)
        free = ~ev.in_context
        known = float(probability(ev.context_odds[~free] + ev.ratio[~free]).sum())
        model.prior = fit_prior(ev.ratio[free], float((kinds * (kinds - 1) / 2).sum()), known)
        model.prior_fitted = True
    weight, contrib = weigh(ev, model.prior)
    prob = probability(weight)
    bands = settings.bands
    band = np.select(
        [prob >= bands.auto_match, prob >= bands.review], [AUTO, REVIEW], default=NON_MATCH
    )
    pairs = pd.DataFrame(
        {
            "left": cands.left,
            "right": cands.right,
            "rule": cands.rule,
            "weight": weight.astype(np.float32),
            "probability": prob,
            "band": pd.Categorical(band, categories=[AUTO, REVIEW, NON_MATCH]),
        }
    )
    contrib.columns = [f"w_{c}" for c in contrib.columns]
    pairs = pd.concat([pairs, contrib], axis=1)
    return MatchResult(pairs, model, cands.stats)
