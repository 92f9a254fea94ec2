"""Survivorship: one golden record per cluster, each value with its lineage.

Each attribute's value comes from the record ranked first by its rule chain
(`SurvivorshipSettings`) among the cluster's records that hold one. Every rule
is a numeric key where higher wins; one `numpy.lexsort` per chain ranks all
clusters at once, and the first row of each cluster wins. The lineage names
the winning record and the rule that decided: the first key on which the
winner beat the runner-up (`only_candidate` when no other record had a value,
`source_key` when every rule tied and the key order decided).

The address is a block (raw lines, street, postcode, town, country, the six
RNVP lines and their status), taken whole from one record, never mixed across
records; consents follow the most recent explicit choice.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mdm_pipeline.config.schema import distinct
from mdm_pipeline.config.settings import VALUE_ATTRIBUTE_NAMES, SurvivorshipSettings

#: Golden attribute -> the record column it is taken from.
VALUE_ATTRIBUTES: dict[str, str] = {
    "civility": "civility_norm",
    "first_name": "first_name_norm",
    "last_name": "last_name_norm",
    "birth_name": "birth_name_norm",
    "birth_date": "birth_date",
    "email": "email_norm",
    "phone": "phone_norm",
    "company_name": "company_name_norm",
    "siren": "siren_norm",
    "siret": "siret_norm",
}
assert tuple(VALUE_ATTRIBUTES) == VALUE_ATTRIBUTE_NAMES
CONSENT_ATTRIBUTES: dict[str, str] = {
    "consent_email": "consent_email",
    "consent_sms": "consent_sms",
    "consent_post": "consent_post",
}
ADDRESS_BLOCK: dict[str, str] = {
    "address_lines": "address_lines",
    "street": "street_norm",
    "postcode": "postcode_norm",
    "city": "city_norm",
    "country": "country_norm",
    **{f"rnvp_line{i}": f"rnvp_line{i}" for i in range(1, 7)},
    "address_status": "address_status",
}
GOLDEN_ATTRIBUTES: tuple[str, ...] = (
    tuple(VALUE_ATTRIBUTES) + tuple(ADDRESS_BLOCK) + tuple(CONSENT_ATTRIBUTES)
)
#: Address statuses that La Poste's referential confirmed (as sent or once corrected).
RNVP_VALID = ("valid", "corrected")


def _record_keys(records: pd.DataFrame) -> dict[str, np.ndarray]:
    """Rules that rank whole records (higher wins), as float arrays."""
    if "source_updated_at" in records:
        updated = pd.to_datetime(records["source_updated_at"], errors="coerce", utc=True)
        # NaT is the smallest int64: an undated record is the least recent.
        recent = updated.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").view(np.int64)
    else:
        recent = np.zeros(len(records), dtype=np.int64)
    filled = [c for c in (*VALUE_ATTRIBUTES.values(), *ADDRESS_BLOCK.values()) if c in records]
    status = records.get("address_status", pd.Series(None, index=records.index))
    npai = records.get("npai_flag", pd.Series(False, index=records.index))
    return {
        "source_priority": pd.to_numeric(records["trust"], errors="coerce").fillna(-1).to_numpy(),
        "most_recent": recent.astype(np.float64),
        "most_complete": records[filled].notna().sum(axis=1).to_numpy(dtype=np.float64),
        "rnvp_valid": status.isin(RNVP_VALID).to_numpy(dtype=np.float64),
        "not_npai": (~npai.fillna(False).astype(bool)).to_numpy(dtype=np.float64),
    }


def _value_keys(values: pd.Series, cluster: np.ndarray, rule: str) -> np.ndarray:
    """Rules that rank a record by its value of one attribute."""
    if rule == "longest":
        return values.astype(str).str.len().to_numpy(dtype=np.float64)
    # most_frequent: how many records of the cluster hold the same value.
    codes, _ = pd.factorize(values)
    frame = pd.DataFrame({"c": cluster, "v": codes})
    return frame.groupby(["c", "v"])["v"].transform("size").to_numpy(dtype=np.float64)


def _row_codes(frame: pd.DataFrame) -> np.ndarray:
    """One code per distinct row of `frame` (missing values equal one another), numbered
    in order of first appearance. Combined column by column from each column's
    factorised codes: no value is turned into text and hashed (5 s of a full run's
    survivorship at 1M records)."""
    codes = np.zeros(len(frame), dtype=np.int64)
    # Codes below `bound`: the columns' codes as digits of one number, numbered again
    # only when the next digit would overflow it (not after every column).
    bound = 1
    for col in frame.columns:
        column, uniques = pd.factorize(frame[col])
        width = len(uniques) + 1
        if bound * width >= 2**63:
            codes, kept = pd.factorize(codes)
            bound = len(kept)
        codes = codes * width + (column + 1)
        bound *= width
    return pd.factorize(codes)[0]


def _ranking(
    cluster: np.ndarray, keys: list[tuple[str, np.ndarray]], tiebreak: np.ndarray
) -> np.ndarray:
    """Every record, by cluster then best first by `keys` (higher wins), then
    `tiebreak`: the order `_rank` sorts its candidates in."""
    return np.lexsort([tiebreak, *reversed([-k for _, k in keys]), cluster])


def _rank(
    rows: np.ndarray,
    cluster: np.ndarray,
    keys: list[tuple[str, np.ndarray]],
    tiebreak: np.ndarray,
    value_codes: np.ndarray,
    ranking: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Among candidate `rows`, the winner per cluster and the rule that decided.

    The deciding rule is the first key on which the winner beats the best
    candidate holding another value (`value_codes`): records that agree with
    the winner do not make a decision. Returns (clusters, winning rows, rules).
    `ranking`, `_ranking` of the same keys over every record, is taken instead of
    sorting the candidates again: the candidates in that order are sorted.
    """
    if not len(rows):
        return cluster[:0], rows, np.array([], dtype=object)
    c = cluster[rows]
    if ranking is None:
        order = _ranking(c, [(name, k[rows]) for name, k in keys], tiebreak[rows])
    else:
        # Each candidate's position among `rows`, read in the ranking's order.
        position = np.full(len(cluster), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        ranked = position[ranking]
        order = ranked[ranked >= 0]
    c_sorted = c[order]
    starts = np.r_[True, c_sorted[1:] != c_sorted[:-1]]
    first = np.flatnonzero(starts)
    group = np.cumsum(starts) - 1
    winners = order[first]
    codes = value_codes[rows][order]
    other = np.flatnonzero(codes != codes[first][group])
    decided = np.full(len(first), "all_agree", dtype=object)
    decided[np.diff(np.r_[first, len(order)]) == 1] = "only_candidate"
    if len(other):
        g = group[other]
        keep = np.r_[True, g[1:] != g[:-1]]
        challenged, runner = g[keep], order[other[keep]]
        # Keys are read at the winners and runners-up only, not over every candidate.
        win, runner = rows[winners[challenged]], rows[runner]
        verdict = np.full(len(challenged), "source_key", dtype=object)
        open_ = np.ones(len(challenged), dtype=bool)
        for name, column in keys:
            differs = open_ & (column[win] != column[runner])
            verdict[differs] = name
            open_ &= ~differs
        decided[challenged] = verdict
    return c_sorted[first], rows[winners], decided


def _lineage(
    clusters: np.ndarray, attribute: str, rows: np.ndarray, rules: np.ndarray
) -> pd.DataFrame:
    return pd.DataFrame(
        {"cluster": clusters, "attribute": attribute, "record": rows, "rule": rules}
    )


def survive(
    records: pd.DataFrame, cluster: pd.Series, settings: SurvivorshipSettings | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Golden values per cluster and the lineage of every value.

    `cluster` is aligned with `records` (one label per record). Returns
    (golden, lineage): golden is indexed by cluster; lineage has one row per
    (cluster, attribute) naming the winning record (positional id) and the rule
    that decided.
    """
    settings = settings or SurvivorshipSettings()
    if not records.index.equals(pd.RangeIndex(len(records))):
        # Positions are what the ranks work with; a copy only when needed (a million
        # records' columns are half a gigabyte of arrays).
        records = records.reset_index(drop=True)
    labels = np.asarray(cluster.to_numpy())
    record_keys = _record_keys(records)
    # Last tie-break: source then key, ascending (so its negated rank sorts first).
    tiebreak = (
        np.lexsort(
            (records["source_key"].astype(str).to_numpy(), records["source"].astype(str).to_numpy())
        )
        .argsort()
        .astype(np.float64)
    )
    index = distinct(labels)
    golden = pd.DataFrame(index=index)
    lineage: list[pd.DataFrame] = []
    # Chains of rules on whole records rank every record the same way whatever the
    # attribute: sorted once each (the default chain is every value attribute's),
    # not once per attribute (a million records, ten times: 1.5 s).
    rankings: dict[tuple[str, ...], np.ndarray] = {}

    def ranking(keys: list[tuple[str, np.ndarray]]) -> np.ndarray | None:
        names = tuple(name for name, _ in keys)
        if not set(names) <= set(record_keys):
            return None  # a rule on the attribute's own values
        if names not in rankings:
            rankings[names] = _ranking(labels, keys, tiebreak)
        return rankings[names]

    for attr, col in VALUE_ATTRIBUTES.items():
        values = records[col] if col in records else pd.Series(None, index=records.index)
        rows = np.flatnonzero(values.notna().to_numpy())
        keys = [
            (rule, record_keys[rule] if rule in record_keys else _value_keys(values, labels, rule))
            for rule in settings.chain(attr)
        ]
        codes = pd.factorize(values)[0]
        clusters, winners, decided = _rank(rows, labels, keys, tiebreak, codes, ranking(keys))
        golden[attr] = values.iloc[winners].set_axis(clusters)
        lineage.append(_lineage(clusters, attr, winners, decided))

    # Consents: the most recent explicit choice (a missing flag is no choice).
    consent_keys = [
        ("most_recent", record_keys["most_recent"]),
        ("source_priority", record_keys["source_priority"]),
    ]
    for attr, col in CONSENT_ATTRIBUTES.items():
        values = records[col] if col in records else pd.Series(pd.NA, index=records.index)
        rows = np.flatnonzero(values.notna().to_numpy())
        codes = pd.factorize(values)[0]
        clusters, winners, decided = _rank(
            rows, labels, consent_keys, tiebreak, codes, ranking(consent_keys)
        )
        golden[attr] = pd.Series(values.to_numpy()[winners], index=clusters).astype("boolean")
        decided = np.where(
            np.isin(decided, ["most_recent", "source_priority", "source_key"]),
            "most_recent_explicit",
            decided,
        )
        lineage.append(_lineage(clusters, attr, winners, decided))

    # The address, whole, from the best record that has one.
    block = {a: c for a, c in ADDRESS_BLOCK.items() if c in records}
    has_address = (
        records[[block[a] for a in ("address_lines", "street", "postcode", "city") if a in block]]
        .notna()
        .any(axis=1)
        .to_numpy()
    )
    rows = np.flatnonzero(has_address)
    keys = [(rule, record_keys[rule]) for rule in settings.address]
    # Two records with the same address block do not compete: the block is the value.
    whole = _row_codes(records[list(block.values())])
    clusters, winners, decided = _rank(rows, labels, keys, tiebreak, whole)
    for attr in ADDRESS_BLOCK:
        col = block.get(attr)
        # Taken in the records' own dtype: Arrow-backed text stays one buffer, not a
        # Python string per golden record.
        values = (
            records[col].iloc[winners].set_axis(clusters)
            if col
            else pd.Series(None, index=clusters, dtype=object)
        )
        golden[attr] = values
        present = values.notna().to_numpy()
        lineage.append(_lineage(clusters[present], attr, winners[present], decided[present]))

    golden["record_type"] = records.groupby(labels)["record_type"].first()
    golden["members"] = pd.Series(labels).value_counts().reindex(golden.index)
    lineage_frame = pd.concat(lineage, ignore_index=True)
    return golden[["record_type", "members", *GOLDEN_ATTRIBUTES]], lineage_frame
