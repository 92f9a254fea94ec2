"""Blocking: the candidate pairs, as the union of several rules' pairs.

Each rule groups records that share a key (exact values, phonetic codes,
prefixes) within one record type. Pairs inside each group are generated with
numpy (no loop over groups), unioned across rules without duplicates, and
each pair keeps the first rule that found it. A group larger than the cap is
skipped with a warning naming the rule and the group's size, never its key:
the key is personal data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mdm_pipeline.config.settings import BlockingRule
from mdm_pipeline.matching.keys import Fields, prepare

log = logging.getLogger(__name__)

PAIR_DTYPE = np.int64


@dataclass(frozen=True)
class RuleStats:
    """What one rule contributed."""

    pairs: int  # pairs the rule generated (before the union)
    new_pairs: int  # pairs no earlier rule had found
    skipped_blocks: int
    skipped_records: int
    largest_block: int


@dataclass(frozen=True)
class Candidates:
    """Candidate pairs of positional record ids (left < right) and the rule of each."""

    left: np.ndarray
    right: np.ndarray
    rule: pd.Categorical
    stats: dict[str, RuleStats] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.left)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"left": self.left, "right": self.right, "rule": self.rule})


def block_ids(records: pd.DataFrame | Fields, rule: BlockingRule) -> np.ndarray:
    """A block number per record for one rule; -1 where a key part is missing.

    Key parts are codes (see `Fields`); they are folded into one number per
    record, re-factorised after each part so that the product cannot overflow.
    """
    fields = prepare(records)
    parts = [fields.type_codes] + [fields.key_codes(key) for key in rule.key_parts()]
    present = np.logical_and.reduce([p >= 0 for p in parts])
    if rule.record_type is not None:
        present &= fields.record_type == rule.record_type
    ids = np.full(len(fields), -1, dtype=np.int64)
    rows = np.flatnonzero(present)
    if len(rows):
        acc = np.zeros(len(rows), dtype=np.int64)
        for part in parts:
            values = part[rows].astype(np.int64)
            acc, _ = pd.factorize(acc * (int(values.max()) + 1) + values)
        ids[rows] = acc
    return ids


#: Odd 64-bit multiplier folding key parts into one hash (FNV-1a's prime).
_FOLD = np.uint64(0x100000001B3)


def block_hashes(records: pd.DataFrame | Fields, rule: BlockingRule) -> np.ndarray:
    """A block key per record for one rule as a 64-bit hash of the key's texts (0 where
    a key part is missing): the same block in any set of records, unlike `block_ids`,
    so an incremental run can keep last night's keys and compute only tonight's
    changed records'. Blocks are the same as `block_ids`' (up to a 2^-64 collision)."""
    fields = prepare(records)
    type_text = pd.Series(fields.record_type, dtype=object).astype(str).to_numpy(dtype=object)
    acc = pd.util.hash_array(type_text)
    present = np.ones(len(fields), dtype=bool)
    if rule.record_type is not None:
        present &= fields.record_type == rule.record_type
    with np.errstate(over="ignore"):
        for key in rule.key_parts():
            part = fields.key_hashes(key)
            present &= part != 0
            acc = acc * _FOLD ^ part
    out = (acc | np.uint64(1)).view(np.int64)
    out[~present] = 0
    return out


def pairs_within(ids: np.ndarray, max_block_size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """All pairs of records sharing a block id (ids < 0 never pair).

    Returns (left, right, skipped blocks, skipped records). Records are sorted
    by block; a record at sorted position p in a block ending at e pairs with
    positions p+1 .. e-1, laid out with `np.repeat` and a running offset.
    """
    ids = np.asarray(ids)
    rec = np.flatnonzero(ids >= 0)
    if len(rec) < 2:
        empty = np.array([], dtype=PAIR_DTYPE)
        return empty, empty, 0, 0
    order = rec[np.argsort(ids[rec], kind="stable")]
    block = ids[order]
    starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    sizes = np.diff(np.r_[starts, len(block)])
    too_big = sizes > max_block_size
    keep = np.repeat(~too_big, sizes)
    ends = np.repeat(starts + sizes, sizes)
    pos = np.arange(len(block))
    counts = np.where(keep, ends - pos - 1, 0)
    total = int(counts.sum())
    left_pos = np.repeat(pos, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    right_pos = left_pos + 1 + (np.arange(total) - first)
    a, b = order[left_pos], order[right_pos]
    left, right = np.minimum(a, b).astype(PAIR_DTYPE), np.maximum(a, b).astype(PAIR_DTYPE)
    return left, right, int(too_big.sum()), int(sizes[too_big].sum())


def block_stats(ids: np.ndarray, max_block_size: int) -> tuple[int, int, int, int]:
    """(pairs, skipped blocks, skipped records, largest block) of one rule's block ids,
    without laying out the pairs: what `pairs_within` and `candidate_pairs` report,
    for an engine that forms the pairs elsewhere."""
    present = ids[ids >= 0]
    if not len(present):
        return 0, 0, 0, 0
    sizes = np.bincount(present)
    sizes = sizes[sizes > 0]
    too_big = sizes > max_block_size
    kept = sizes[~too_big].astype(np.int64)
    return (
        int((kept * (kept - 1) // 2).sum()),
        int(too_big.sum()),
        int(sizes[too_big].sum()),
        int(sizes.max()),
    )


def warn_skipped(rule: BlockingRule, max_block_size: int, skipped: int, records: int) -> None:
    """Say which rule lost blocks to the size cap (counts only, no key values)."""
    if skipped:
        log.warning(
            "blocking rule '%s': %d block(s) over %d records skipped (%d records)",
            rule.name,
            skipped,
            max_block_size,
            records,
        )


def candidate_pairs(
    records: pd.DataFrame | Fields, rules: list[BlockingRule], max_block_size: int
) -> Candidates:
    """The union of every rule's pairs; a pair keeps the first rule that found it."""
    records = prepare(records)
    n = len(records)
    lefts, rights, rule_codes = [], [], []
    stats: dict[str, RuleStats] = {}
    blocks: dict[str, tuple[int, int, int, int]] = {}
    for code, rule in enumerate(rules):
        ids = block_ids(records, rule)
        left, right, skipped, skipped_records = pairs_within(ids, max_block_size)
        warn_skipped(rule, max_block_size, skipped, skipped_records)
        present = ids[ids >= 0]
        largest = int(np.bincount(present).max()) if len(present) else 0
        blocks[rule.name] = (len(left), skipped, skipped_records, largest)
        lefts.append(left)
        rights.append(right)
        rule_codes.append(np.full(len(left), code, dtype=np.int16))
    left = np.concatenate(lefts) if lefts else np.array([], dtype=PAIR_DTYPE)
    right = np.concatenate(rights) if rights else np.array([], dtype=PAIR_DTYPE)
    codes = np.concatenate(rule_codes) if rule_codes else np.array([], dtype=np.int16)
    # The union: rules are concatenated in order, so the first occurrence of a pair is the
    # first rule that found it; one hash pass drops the rest.
    first = ~pd.Series(left * max(n, 1) + right).duplicated(keep="first").to_numpy()
    left, right, codes = left[first], right[first], codes[first]
    new_counts = np.bincount(codes, minlength=len(rules))
    for code, rule in enumerate(rules):
        pairs, skipped, skipped_records, largest = blocks[rule.name]
        stats[rule.name] = RuleStats(
            pairs, int(new_counts[code]), skipped, skipped_records, largest
        )
    order = np.lexsort((right, left))
    rule = pd.Categorical.from_codes(codes[order], categories=[r.name for r in rules])
    return Candidates(left[order], right[order], rule, stats)


def true_pairs_kept(candidates: Candidates, entity: np.ndarray) -> tuple[int, int]:
    """(true pairs among the candidates, true pairs in all): blocking's recall ceiling."""
    same = entity[candidates.left] == entity[candidates.right]
    _, sizes = np.unique(entity, return_counts=True)  # noqa: TID251 (return_counts: it sorts)
    return int(same.sum()), int((sizes * (sizes - 1) // 2).sum())
