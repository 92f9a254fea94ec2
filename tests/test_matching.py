"""The matching engine: keys, blocking, comparison levels, Fellegi-Sunter, clusters."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.config.schema import distinct
from mdm_pipeline.config.settings import (
    BlockingRule,
    ClusteringSettings,
    Comparison,
    MatchingSettings,
    TrainingSettings,
)
from mdm_pipeline.matching.blocking import (
    block_hashes,
    block_ids,
    block_stats,
    candidate_pairs,
    pairs_within,
)
from mdm_pipeline.matching.clustering import guarded_clusters
from mdm_pipeline.matching.comparisons import NULL, compare, term_frequencies
from mdm_pipeline.matching.engine import AUTO, match, train
from mdm_pipeline.matching.evaluation import bcubed, pair_scores
from mdm_pipeline.matching.keys import phonetic_fr
from mdm_pipeline.matching.scoring import (
    Model,
    check_plausible,
    em,
    em_context_u,
    probability,
    score,
)

runner = CliRunner()
DEFAULTS = MatchingSettings()


def people(rows: list[dict]) -> pd.DataFrame:
    """Normalised records with only the columns matching reads."""
    cols = [
        "first_name_norm",
        "last_name_norm",
        "birth_name_norm",
        "birth_date",
        "email_norm",
        "phone_norm",
        "postcode_norm",
        "city_norm",
        "street_norm",
        "company_name_norm",
        "siren_norm",
        "siret_norm",
        "customer_ref_norm",
    ]
    frame = pd.DataFrame(rows).reindex(columns=["record_type", *cols])
    frame["record_type"] = frame["record_type"].fillna("person")
    frame["birth_date"] = pd.to_datetime(frame["birth_date"])
    return frame.astype({c: object for c in cols if c != "birth_date"})


# --- keys ------------------------------------------------------------------------------


_REFERENCE_CUTS = {
    "email_user": lambda v, n: v.split("@")[0],
    "phone_suffix": lambda v, n: v[-8:],
    "year": lambda v, n: v[:4],
    "prefix": lambda v, n: v.replace(" ", "")[:n] if len(v.replace(" ", "")) >= n else None,
}


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.text(alphabet="ab @É.1", max_size=12), min_size=1, max_size=30),
    transform=st.sampled_from(sorted(_REFERENCE_CUTS)),
    length=st.integers(1, 4),
)
def test_key_cuts_in_arrow_equal_plain_python(
    values: list[str], transform: str, length: int
) -> None:
    """The Arrow kernels cut accented text by characters, as Python does."""
    from mdm_pipeline.matching.keys import _reduce

    got = _reduce(pd.Series(values, dtype=object), transform, length).tolist()
    want = [_REFERENCE_CUTS[transform](v, length) for v in values]
    assert [g or None for g in got] == [w or None for w in want]


def test_block_ids_group_exactly_the_records_sharing_every_key_part(samples: Path) -> None:
    """Folded key codes give one block per distinct tuple of key values, as a groupby would."""
    from mdm_pipeline.matching.blocking import block_ids
    from mdm_pipeline.matching.keys import _TRANSFORMS, prepare
    from mdm_pipeline.pipeline.run import Pipeline

    pipeline = Pipeline.from_config(samples / "config.yaml")
    fields = prepare(pipeline.normalised_records())
    for rule in pipeline.settings.matching.blocking.rules:
        parts = [pd.Series(fields.record_type)]
        for key in rule.key_parts():
            values = fields.values(key.field)
            if key.transform in _TRANSFORMS:
                values = values.map(
                    lambda v, f=_TRANSFORMS[key.transform]: f(v) or None if v else None
                )
            elif key.transform != "exact":
                cut = _REFERENCE_CUTS[key.transform]
                values = values.map(lambda v, c=cut, n=key.length: c(v, n) if v else None)
            parts.append(values)
        frame = pd.concat(parts, axis=1, ignore_index=True)
        if rule.record_type is not None:
            frame[0] = frame[0].where(frame[0] == rule.record_type, None)
        keep = frame.notna().all(axis=1).to_numpy()
        want = np.full(len(frame), -1)
        want[keep] = frame[keep].groupby(list(frame.columns), sort=False).ngroup().to_numpy()
        got = block_ids(fields, rule)
        assert ((got >= 0) == keep).all(), rule.name
        # Same partition of the records: the numbering may differ, the grouping may not.
        assert pd.crosstab(got[keep], want[keep]).astype(bool).sum(axis=1).eq(1).all(), rule.name
        assert len(distinct(got[keep])) == len(distinct(want[keep])), rule.name


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("PHILIPPE", "FILIPE"),
        ("GAUTHIER", "GOTIE"),
        ("LEFEBVRE", "LEFEVRE"),
        ("MARTIN", "MARTAIN"),
        ("DUPOND", "DUPONT"),
        ("LAURENT", "LORENT"),
        ("CATHERINE", "KATHERINE"),
        ("ROUSSEAU", "ROUSSO"),
        ("THOMAS", "TOMAS"),
        ("MICHEL", "MICHELLE"),
        ("JEAN PIERRE", "JEAN-PIERRE"),
    ],
)
def test_french_phonetic_key_brings_spellings_together(a: str, b: str) -> None:
    assert phonetic_fr(a) == phonetic_fr(b)


@pytest.mark.parametrize(("a", "b"), [("MARTIN", "MARTEL"), ("DUPONT", "DUVAL"), ("LEA", "LEON")])
def test_french_phonetic_key_keeps_different_names_apart(a: str, b: str) -> None:
    assert phonetic_fr(a) != phonetic_fr(b)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(alphabet="AEIOUYNMCHGQSZPTDXBVWKRLF aeinuß-É'", max_size=14),
        min_size=1,
        max_size=40,
    )
)
def test_french_phonetic_key_over_arrays_equals_the_one_name_rules(names: list[str]) -> None:
    """Arrow's regular expressions over all the distinct names give each name's code
    as `phonetic_fr` does (look-ahead and back-reference rules, runs at either end,
    texts that leave nothing, non-ASCII names)."""
    from mdm_pipeline.matching.keys import phonetic_fr_codes

    got = phonetic_fr_codes(np.asarray(names, dtype=object)).tolist()
    assert got == [phonetic_fr(n) or None for n in names]


# --- blocking --------------------------------------------------------------------------


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.lists(st.integers(min_value=-1, max_value=6), max_size=40), st.integers(2, 8))
def test_pairs_within_blocks_equal_brute_force(ids: list[int], cap: int) -> None:
    arr = np.array(ids, dtype=np.int64)
    left, right, skipped, _ = pairs_within(arr, cap)
    sizes = pd.Series(arr[arr >= 0]).value_counts()
    expected = {
        (i, j)
        for i in range(len(ids))
        for j in range(i + 1, len(ids))
        if ids[i] >= 0 and ids[i] == ids[j] and sizes[ids[i]] <= cap
    }
    assert set(zip(left.tolist(), right.tolist(), strict=True)) == expected
    assert len(left) == len(expected)  # no duplicates
    assert skipped == int((sizes > cap).sum())


def test_union_of_rules_keeps_first_rule_and_no_duplicates() -> None:
    recs = people(
        [
            {"email_norm": "a@x.fr", "phone_norm": "+33611111111", "last_name_norm": "DUPONT"},
            {"email_norm": "a@x.fr", "phone_norm": "+33611111111", "last_name_norm": "DUPOND"},
            {"email_norm": "b@x.fr", "phone_norm": "+33611111111", "last_name_norm": "DUPONT"},
            {"record_type": "organisation", "phone_norm": "+33611111111"},
        ]
    )
    rules = [
        BlockingRule(name="email", keys=["email"]),
        BlockingRule(name="phone", keys=["phone"]),
        BlockingRule(name="name", keys=[{"field": "last_name", "transform": "phonetic_fr"}]),
    ]
    cands = candidate_pairs(recs, rules, 100)
    got = {(a, b): r for a, b, r in zip(cands.left, cands.right, cands.rule, strict=True)}
    # The organisation never pairs with people, whatever they share.
    assert got == {(0, 1): "email", (0, 2): "phone", (1, 2): "phone"}
    assert cands.stats["name"].pairs == 3 and cands.stats["name"].new_pairs == 0


def test_oversized_block_is_skipped_with_a_warning_naming_the_rule(caplog) -> None:
    recs = people([{"last_name_norm": "MARTIN", "first_name_norm": f"P{i}"} for i in range(6)])
    rules = [BlockingRule(name="surname", keys=["last_name"])]
    with caplog.at_level(logging.WARNING):
        cands = candidate_pairs(recs, rules, max_block_size=5)
    assert len(cands) == 0
    assert "blocking rule 'surname'" in caplog.text and "6 records" in caplog.text
    assert "MARTIN" not in caplog.text  # the key is personal data


# --- comparisons -----------------------------------------------------------------------


def levels_of(a: dict, b: dict, names: list[str]) -> dict[str, int]:
    recs = people([a, b])
    comps = [c for c in DEFAULTS.comparisons if c.name in names]
    vec = compare(recs, np.array([0]), np.array([1]), comps, {})
    return {k: int(v[0]) for k, v in vec.levels.items()}


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ({"first_name_norm": "JEAN"}, {"first_name_norm": "JEAN"}, {"first_name": 0}),
        ({"first_name_norm": "JEAN"}, {}, {"first_name": NULL}),
        (
            {"first_name_norm": "JEAN", "last_name_norm": "DUPONT"},
            {"first_name_norm": "DUPONT", "last_name_norm": "JEAN"},
            {"first_name": 1, "last_name": 2},
        ),
        (
            {"first_name_norm": "JEAN", "last_name_norm": "DUPONT"},
            {"first_name_norm": "DUPONTT", "last_name_norm": "JEAN"},
            {"first_name": 1, "last_name": 2},
        ),
        ({"first_name_norm": "CHRISTOPHE"}, {"first_name_norm": "CHRISTOPHER"}, {"first_name": 2}),
        # Two neighbours swapped are one typo (plain Levenshtein would count two).
        ({"first_name_norm": "ADNRE"}, {"first_name_norm": "ANDRE"}, {"first_name": 2}),
        # Alike, but more than one typo apart: often another member of the family.
        ({"first_name_norm": "ALEXANDRE"}, {"first_name_norm": "ALEXANDRINE"}, {"first_name": 3}),
        ({"first_name_norm": "MARIE"}, {"first_name_norm": "PAUL"}, {"first_name": 5}),
        (
            {"last_name_norm": "MARTIN"},
            {"last_name_norm": "DURAND", "birth_name_norm": "MARTIN"},
            {"last_name": 1},
        ),
        ({"birth_date": "1980-03-12"}, {"birth_date": "1980-03-12"}, {"birth_date": 0}),
        ({"birth_date": "1980-03-12"}, {"birth_date": "1980-12-03"}, {"birth_date": 1}),
        ({"birth_date": "1980-03-12"}, {"birth_date": "1980-03-13"}, {"birth_date": 2}),
        ({"birth_date": "1980-03-12"}, {"birth_date": "1975-07-01"}, {"birth_date": 3}),
        ({"email_norm": "jean.d@orange.fr"}, {"email_norm": "jean.d@free.fr"}, {"email": 1}),
        ({"phone_norm": "+33612345678"}, {"phone_norm": "+33612345678"}, {"phone": 0}),
        ({"phone_norm": "+33612345678"}, {"phone_norm": "+32612345678"}, {"phone": 1}),
        (
            {"postcode_norm": "75011", "street_norm": "12 RUE DE LA PAIX"},
            {"postcode_norm": "75011", "street_norm": "12 RUE DE LA PAIX"},
            {"address": 0},
        ),
        (
            {"postcode_norm": "75011", "street_norm": "12 RUE DE LA PAIX"},
            {"postcode_norm": "75011", "street_norm": "12 RUE DE LA PAIS"},
            {"address": 1},
        ),
        (
            {"postcode_norm": "75011", "street_norm": "12 RUE DE LA PAIX"},
            {"postcode_norm": "75011", "street_norm": "3 BOULEVARD VOLTAIRE"},
            {"address": 2},
        ),
        (
            {"postcode_norm": "75011", "city_norm": "PARIS", "street_norm": "12 RUE X"},
            {"postcode_norm": "75015", "city_norm": "PARIS", "street_norm": "80 AVENUE Y"},
            {"address": 3},
        ),
    ],
)
def test_comparison_levels(a: dict, b: dict, expected: dict[str, int]) -> None:
    assert levels_of(a, b, list(expected)) == expected


def test_distinct_value_pairs_give_the_same_levels_as_pair_by_pair() -> None:
    rng = np.random.default_rng(1)
    names = np.array(["MARTIN", "MARTINE", "MARTIAN", "DURAND", "DURANT", None], dtype=object)
    recs = people([{"first_name_norm": n, "last_name_norm": "X"} for n in rng.choice(names, 60)])
    left = rng.integers(0, 60, 400)
    right = rng.integers(0, 60, 400)
    comp = next(c for c in DEFAULTS.comparisons if c.name == "first_name")
    together = compare(recs, left, right, [comp], {}).levels["first_name"].to_numpy()
    alone = [
        compare(recs, np.array([a]), np.array([b]), [comp], {}).levels["first_name"].iat[0]
        for a, b in zip(left, right, strict=True)
    ]
    assert together.tolist() == alone


# --- scoring ---------------------------------------------------------------------------

TWO = [
    Comparison.model_validate(
        {
            "name": "a",
            "field": "first_name",
            "else_m_prior": 0.2,
            "levels": [{"kind": "exact", "m_prior": 0.8}],
        }
    ),
    Comparison.model_validate(
        {
            "name": "b",
            "field": "last_name",
            "else_m_prior": 0.2,
            "min_m_first_level": 0.5,
            "levels": [{"kind": "exact", "m_prior": 0.8}],
        }
    ),
]


def test_em_recovers_m_and_the_match_share() -> None:
    rng = np.random.default_rng(7)
    n, share = 20_000, 0.3
    is_match = rng.random(n) < share
    m = {"a": 0.9, "b": 0.7}
    u = {"a": 0.05, "b": 0.1}
    levels = pd.DataFrame(
        {
            k: np.where(rng.random(n) < np.where(is_match, m[k], u[k]), 0, 1).astype(np.int8)
            for k in m
        }
    )
    u_arr = {k: np.array([u[k], 1 - u[k]]) for k in u}
    m0 = {k: np.array([0.6, 0.4]) for k in m}
    learnt, prior, _ = em(levels, m0, u_arr, TrainingSettings(blocks=DEFAULTS.training.blocks))
    assert prior == pytest.approx(share, abs=0.02)
    for k in m:
        assert learnt[k][0] == pytest.approx(m[k], abs=0.03)


def test_em_with_m_held_recovers_the_u_of_a_household_context() -> None:
    # Pairs that share a landline: 60% one person, the rest one household, whose
    # members share a surname far more often than strangers, a first name far less.
    rng = np.random.default_rng(11)
    n, share = 30_000, 0.6
    is_match = rng.random(n) < share
    m = {"first": 0.9, "last": 0.85}
    u_ctx = {"first": 0.02, "last": 0.7}
    levels = pd.DataFrame(
        {
            k: np.where(rng.random(n) < np.where(is_match, m[k], u_ctx[k]), 0, 1).astype(np.int8)
            for k in m
        }
    )
    m_arr = {k: np.array([m[k], 1 - m[k]]) for k in m}
    strangers = {"first": np.array([0.01, 0.99]), "last": np.array([0.03, 0.97])}
    settings = TrainingSettings(blocks=DEFAULTS.training.blocks)
    learnt, prior, _ = em_context_u(levels, m_arr, strangers, settings)
    assert prior == pytest.approx(share, abs=0.02)
    for k in m:
        assert learnt[k][0] == pytest.approx(u_ctx[k], abs=0.03)


def test_a_shared_phone_changes_what_names_weigh() -> None:
    comps = [c for c in DEFAULTS.comparisons if c.name in ("first_name", "last_name", "phone")]
    comps = [c.model_copy(update={"tf_adjust": False}) for c in comps]
    recs = people(
        [
            {"first_name_norm": "JEAN", "last_name_norm": "DURAND", "phone_norm": "+33140000000"},
            {"first_name_norm": "ANNE", "last_name_norm": "DURAND", "phone_norm": "+33140000000"},
            {"first_name_norm": "JEAN", "last_name_norm": "DURAND", "phone_norm": "+33612000000"},
            {"first_name_norm": "ANNE", "last_name_norm": "DURAND", "phone_norm": "+33699000000"},
        ]
    )
    m = {c.name: np.full(len(c.levels) + 1, 0.01) for c in comps}
    u = {c.name: np.full(len(c.levels) + 1, 0.01) for c in comps}
    for name, first in (("first_name", 0.9), ("last_name", 0.85), ("phone", 0.6)):
        m[name][0], m[name][-1] = first, 1 - first - 0.01 * (len(m[name]) - 2)
    for name, first in (("first_name", 0.01), ("last_name", 0.02), ("phone", 1e-5)):
        u[name][0], u[name][-1] = first, 1 - first - 0.01 * (len(u[name]) - 2)
    in_household = {k: v.copy() for k, v in u.items() if k != "phone"}
    in_household["last_name"][[0, -1]] = [0.7, 0.3 - 0.01 * (len(u["last_name"]) - 2)]
    model = Model(m=m, u=u, prior=1e-5, u_context={"phone": in_household})
    model.context_share = {"phone": 0.5}
    # (0, 1) share the landline, (2, 3) do not; both pairs share the surname only.
    vec = compare(recs, np.array([0, 2]), np.array([1, 3]), comps, {})
    weight, contrib = score(vec, model, comps)
    household, strangers = contrib["last_name"]
    assert 0 < household < strangers  # a shared surname is common in one household
    prior_w = np.log2(1e-5 / (1 - 1e-5))
    assert weight == pytest.approx(prior_w + contrib.sum(axis=1).to_numpy(), abs=1e-3)
    # In the phone's context the odds start from the share of matches among those pairs.
    assert contrib["phone"][0] == pytest.approx(0 - prior_w, abs=1e-3)


def test_a_context_of_duplicates_only_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    # Every pair that shares an address is one person (FEBRL looks like this): there are
    # no household non-matches to learn from, and EM would split the duplicates in two.
    rng = np.random.default_rng(3)
    rows = []
    for i in range(400):
        person = {
            "first_name_norm": f"F{i}",
            "last_name_norm": f"L{i % 97}",
            "birth_date": f"19{50 + i % 50}-0{1 + i % 9}-1{i % 10}",
            "postcode_norm": f"75{i % 20:03d}",
            "street_norm": f"{i} RUE {i % 13}",
        }
        rows += [person, {**person, "first_name_norm": f"F{i}X" if rng.random() < 0.2 else f"F{i}"}]
    with caplog.at_level(logging.WARNING):
        model = train(people(rows), DEFAULTS)
    assert "address" not in model.u_context
    assert any("context 'address' refused" in w for w in model.warnings)
    assert any("context 'address' refused" in r.message for r in caplog.records)


def test_implausible_training_falls_back_to_priors() -> None:
    u = {"a": np.array([0.01, 0.99]), "b": np.array([0.02, 0.98])}
    # A degenerate solution: "matches" that agree on b less often than chance, and rarely.
    bad = check_plausible(TWO, {"a": np.array([0.9, 0.1]), "b": np.array([0.01, 0.99])}, u)
    assert set(bad) == {"b"} and "count against a match" in bad["b"]
    weak = check_plausible(TWO, {"a": np.array([0.9, 0.1]), "b": np.array([0.3, 0.7])}, u)
    assert set(weak) == {"b"} and "at least 50%" in weak["b"]


def test_common_values_weigh_less_than_rare_ones() -> None:
    recs = people(
        [{"first_name_norm": "X", "last_name_norm": "MARTIN"} for _ in range(20)]
        + [{"first_name_norm": "X", "last_name_norm": "ZOBEL"} for _ in range(2)]
        + [{"first_name_norm": "X", "last_name_norm": f"NAME{i}"} for i in range(78)]
    )
    comp = next(c for c in DEFAULTS.comparisons if c.name == "last_name")
    comp = comp.model_copy(update={"group": None})
    vec = compare(
        recs, np.array([0, 20]), np.array([1, 21]), [comp], term_frequencies(recs, [comp])
    )
    model = Model(
        m={"last_name": np.array([0.8, 0.04, 0.03, 0.06, 0.04, 0.03])},
        u={"last_name": np.array([0.01, 0.001, 0.001, 0.01, 0.01, 0.967])},
    )
    _, contrib = score(vec, model, [comp])
    martin, zobel = contrib["last_name"]
    assert zobel > martin > 0


def test_contributions_add_up_to_the_weight(samples: Path) -> None:
    result = runner.invoke(app, ["run", "--config", str(samples / "config.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    manifest_prior = None
    engine = sa.create_engine(f"sqlite:///{samples / 'mdm.sqlite'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("select weight, contributions from mdm_match_evidence"))
        evidence = rows.fetchall()
        manifest = json.loads(conn.execute(sa.text("select manifest from mdm_runs")).scalar_one())
    engine.dispose()
    manifest_prior = manifest["model"]["prior"]
    assert evidence
    prior_w = np.log2(manifest_prior / (1 - manifest_prior))
    for weight, contributions in evidence[:200]:
        parts = json.loads(contributions)
        assert weight == pytest.approx(prior_w + sum(parts.values()), abs=0.01)
        assert {"first_name", "birth_date", "address", "contact_overlap"} <= set(parts)
        # Rounded to a thousandth as written, not a float32's 6.5130000114.
        assert all(round(v, 3) == v for v in parts.values())
        assert all(len(str(v).partition(".")[2]) <= 3 for v in parts.values()), contributions


def test_bands_follow_the_configured_thresholds() -> None:
    weights = np.array([-20.0, 2.5, 10.0])
    prob = probability(weights)
    assert prob[0] < 0.8 <= prob[1] < 0.99 <= prob[2]


# --- clustering ------------------------------------------------------------------------


def edges(rows: list[tuple[int, int, float]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["left", "right", "probability"])
    frame["weight"] = np.log2(frame["probability"] / (1 - frame["probability"]))
    return frame


def test_a_weak_single_link_between_two_groups_is_cut() -> None:
    # {0,1} and {2,3} strongly linked inside, joined by one weak link 1-2.
    e = edges([(0, 1, 0.999999), (2, 3, 0.999999), (1, 2, 0.995)])
    labels, report = guarded_clusters(4, e, ClusteringSettings(strong_link=0.9999))
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert report.bridges_cut == 1


def test_a_weak_link_to_a_single_record_is_kept() -> None:
    e = edges([(0, 1, 0.999999), (1, 2, 0.995)])
    labels, report = guarded_clusters(3, e, ClusteringSettings(strong_link=0.9999))
    assert len(set(labels)) == 1 and report.bridges_cut == 0


def test_an_oversized_chain_is_split_on_its_weakest_links() -> None:
    # A chain of 12 records; links 3-4 and 7-8 are the weakest.
    probs = [0.99999] * 11
    probs[3], probs[7] = 0.991, 0.992
    e = edges([(i, i + 1, p) for i, p in enumerate(probs)])
    # No link is weak here (strong_link below them all): the size guard alone acts.
    labels, report = guarded_clusters(
        12, e, ClusteringSettings(max_cluster_size=4, strong_link=0.99)
    )
    sizes = np.bincount(labels)
    assert sizes.max() <= 4
    assert labels[3] != labels[4] and labels[7] != labels[8]
    assert report.split_oversize == 1 and report.split_clusters == [12]


def test_cannot_link_splits_and_must_link_joins() -> None:
    e = edges([(0, 1, 0.9999999), (1, 2, 0.995)])
    cannot = pd.DataFrame({"left": [0], "right": [2]})
    must = pd.DataFrame({"left": [3], "right": [4]})
    labels, report = guarded_clusters(
        5, e, ClusteringSettings(), must_link=must, cannot_link=cannot
    )
    assert labels[0] == labels[1] != labels[2]
    assert labels[3] == labels[4]
    assert report.split_cannot_link == 1


# --- evaluation and end to end ---------------------------------------------------------


def test_pairwise_and_bcubed_on_a_known_clustering() -> None:
    pred = pd.Series(["a", "a", "a", "b", "c"])
    true = pd.Series(["x", "x", "y", "y", "z"])
    pairs = pair_scores(pred, true)
    assert (pairs.true_positives, pairs.predicted_pairs, pairs.true_pairs) == (1, 3, 2)
    b3 = bcubed(pred, true)
    # precision per record: 2/3, 2/3, 1/3, 1, 1; recall: 1, 1, 1/2, 1/2, 1
    assert b3.precision == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 + 1) / 5)
    assert b3.recall == pytest.approx((1 + 1 + 0.5 + 0.5 + 1) / 5)


def test_engine_on_the_samples_is_precise_and_does_not_chain(samples: Path) -> None:
    from mdm_pipeline.pipeline.run import Pipeline

    pipeline = Pipeline.from_config(samples / "config.yaml")
    records = pipeline.normalised_records()
    model = train(records, pipeline.settings.matching)
    assert not model.warnings
    assert set(model.m_source.values()) <= {"em", "prior"}
    result = match(records, pipeline.settings.matching, model)
    auto = result.pairs[result.pairs["band"] == AUTO]
    labels, report = guarded_clusters(len(records), auto, pipeline.settings.matching.clustering)
    truth = pd.read_csv(samples / "truth.csv", dtype=str)
    entity = records[["source", "source_key"]].merge(truth, how="left")["entity_id"]
    scores = pair_scores(pd.Series(labels), entity)
    assert scores.precision >= 0.98 and scores.recall >= 0.9
    assert report.largest <= 2 * entity.value_counts().max()


def test_steward_labels_set_m_to_what_confirmed_matches_show(samples: Path) -> None:
    """Confirmed pairs replace EM: m of a level is the share of labelled matches at it."""
    from mdm_pipeline.pipeline.run import Pipeline

    pipeline = Pipeline.from_config(samples / "config.yaml")
    records = pipeline.normalised_records()
    settings = pipeline.settings.matching
    truth = pd.read_csv(samples / "truth.csv", dtype=str)
    entity = records[["source", "source_key"]].merge(truth, how="left")["entity_id"].to_numpy()
    cands = candidate_pairs(records, settings.blocking.rules, settings.blocking.max_block_size)
    is_match = entity[cands.left] == entity[cands.right]
    model = train(records, settings, labelled=(cands.left, cands.right, is_match))
    # The samples have no customer numbers: with nothing to learn from, its m stays.
    assert {k for k, v in model.m_source.items() if v != "labels"} == {"customer_ref"}
    dates = pd.to_datetime(records["birth_date"]).to_numpy()
    left, right = cands.left[is_match], cands.right[is_match]
    known = ~pd.isna(dates[left]) & ~pd.isna(dates[right])
    same = (dates[left] == dates[right])[known]
    n_levels = len(next(c for c in settings.comparisons if c.name == "birth_date").levels) + 1
    # Half a pair of smoothing per level, as for every distribution the model learns.
    expected = (same.sum() + 0.5) / (len(same) + 0.5 * n_levels)
    assert model.m["birth_date"][0] == pytest.approx(expected, rel=1e-6)
    assert 0.5 < expected < 1  # the samples carry birth-date typos among duplicates


def test_block_stats_and_evaluate_commands(samples: Path) -> None:
    cfg, truth = str(samples / "config.yaml"), str(samples / "truth.csv")
    stats = runner.invoke(app, ["block-stats", "-c", cfg, "--truth", truth, "--json"])
    assert stats.exit_code == 0, stats.output
    figures = json.loads(stats.stdout)
    assert figures["true_pairs_kept"] / figures["true_pairs"] > 0.95
    assert sum(r["new_pairs"] for r in figures["rules"].values()) == figures["candidate_pairs"]
    assert runner.invoke(app, ["run", "-c", cfg]).exit_code == 0
    ev = runner.invoke(app, ["evaluate", "-c", cfg, "--truth", truth, "--json"])
    assert ev.exit_code == 0, ev.output
    result = json.loads(ev.stdout)
    assert result["records_evaluated"] == result["records_in_store"]
    assert result["pair_precision"] >= 0.98 and result["bcubed_recall"] >= 0.9


def test_evaluate_with_a_bad_truth_file_is_one_line(samples: Path) -> None:
    bad = samples / "bad_truth.csv"
    bad.write_text("who,what\n1,2\n", encoding="utf-8")
    result = runner.invoke(
        app, ["evaluate", "-c", str(samples / "config.yaml"), "--truth", str(bad)]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: bad_truth.csv: missing column(s) entity_id, source, source_key "
        "(expected source, source_key, entity_id)"
    ]


def test_comparison_is_a_pure_function_of_one_partition(samples: Path) -> None:
    """Partitioned by a block key, each partition's pairs compare as they do on the whole."""
    from mdm_pipeline.matching.blocking import block_ids, pairs_within
    from mdm_pipeline.matching.keys import prepare
    from mdm_pipeline.pipeline.run import Pipeline

    pipeline = Pipeline.from_config(samples / "config.yaml")
    normalised = pipeline.normalised_records()
    records = prepare(normalised)
    comps = pipeline.settings.matching.comparisons
    rule = pipeline.settings.matching.blocking.rules[2]  # birth date + last name
    ids = block_ids(records, rule)
    left, right, _, _ = pairs_within(ids, 500)
    tf = term_frequencies(records, comps)
    whole = compare(records, left, right, comps, tf).levels
    partition = ids % 2  # every record of a block lands in the same partition
    for part in (0, 1):
        members = np.flatnonzero((partition == part) & (ids >= 0))
        local = np.full(len(records), -1)
        local[members] = np.arange(len(members))
        sel = np.flatnonzero(partition[left] == part)
        got = compare(
            normalised.iloc[members].reset_index(drop=True),
            local[left[sel]],
            local[right[sel]],
            comps,
            tf,
        ).levels
        pd.testing.assert_frame_equal(got, whole.iloc[sel].reset_index(drop=True))


def test_a_key_part_hashes_its_reduced_text_whether_blocking_ran_before_or_not(
    samples: Path,
) -> None:
    """Each record's key part is the 64-bit hash of its reduced text (its lowest bit
    set), 0 where it has none: what the snapshots of earlier runs hold. Asked on
    fresh fields, after the blocking codes (the transform already run) or a second
    time (the hashes kept), it is the same."""
    from mdm_pipeline.matching.keys import _reduce, prepare
    from mdm_pipeline.pipeline.run import Pipeline

    pipeline = Pipeline.from_config(samples / "config.yaml")
    records = pipeline.normalised_records().reset_index(drop=True)
    warm = prepare(records)
    for rule in pipeline.settings.matching.blocking.rules:
        for key in rule.key_parts():
            values = prepare(records).values(key.field)
            if key.transform != "exact":
                values = _reduce(values, key.transform, key.length)
            present = values.notna().to_numpy()
            expected = np.zeros(len(values), dtype=np.uint64)
            expected[present] = pd.util.hash_array(
                values[present].astype(str).to_numpy(dtype=object)
            ) | np.uint64(1)
            assert present.any(), key
            assert (prepare(records).key_hashes(key) == expected).all(), key
            warm.key_codes(key)
            assert (warm.key_hashes(key) == expected).all(), key
            assert (warm.key_hashes(key) == expected).all(), key


def test_block_hashes_form_the_blocks_of_block_ids_in_any_subset(samples: Path) -> None:
    """Hashed block keys (kept by incremental runs) group records exactly as the codes
    of a full run, and a record's key does not depend on the other records."""
    from mdm_pipeline.pipeline.run import Pipeline

    pipeline = Pipeline.from_config(samples / "config.yaml")
    records = pipeline.normalised_records().reset_index(drop=True)
    half = records.iloc[::2].reset_index(drop=True)
    cap = pipeline.settings.matching.blocking.max_block_size
    for rule in pipeline.settings.matching.blocking.rules:
        ids, hashes = block_ids(records, rule), block_hashes(records, rule)
        assert ((ids < 0) == (hashes == 0)).all(), rule.name
        present = ids >= 0
        both = pd.DataFrame({"id": ids[present], "hash": hashes[present]})
        assert both.groupby("id")["hash"].nunique().max() == 1, rule.name
        assert both.groupby("hash")["id"].nunique().max() == 1, rule.name
        assert (block_hashes(half, rule) == hashes[::2]).all(), rule.name
        left, _, skipped, skipped_records = pairs_within(ids, cap)
        assert block_stats(ids, cap)[:3] == (len(left), skipped, skipped_records)
