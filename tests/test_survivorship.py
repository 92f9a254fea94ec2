"""Survivorship: rule chains per attribute, the address as one block, consents, lineage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.config.settings import SurvivorshipSettings
from mdm_pipeline.golden_records.survivorship import survive

runner = CliRunner()


def records(rows: list[dict]) -> pd.DataFrame:
    base = {
        "source": "s",
        "record_type": "person",
        "trust": 1,
        "source_updated_at": None,
    }
    frame = pd.DataFrame([{**base, "source_key": f"k{i}", **r} for i, r in enumerate(rows)])
    frame["source_updated_at"] = pd.to_datetime(frame["source_updated_at"])
    return frame


def one_cluster(frame: pd.DataFrame, settings: SurvivorshipSettings | None = None):
    golden, lineage = survive(frame, pd.Series(np.zeros(len(frame), dtype=int)), settings)
    row = golden.iloc[0]
    lin = lineage.set_index("attribute")
    return row, lin


def test_source_priority_then_most_recent() -> None:
    frame = records(
        [
            {"email_norm": "old@x.fr", "trust": 5, "source_updated_at": "2024-01-01"},
            {"email_norm": "new@x.fr", "trust": 5, "source_updated_at": "2025-01-01"},
            {"email_norm": "low@x.fr", "trust": 1, "source_updated_at": "2026-01-01"},
        ]
    )
    row, lin = one_cluster(frame)
    assert row["email"] == "new@x.fr"
    assert (lin.loc["email", "record"], lin.loc["email", "rule"]) == (1, "most_recent")
    row, lin = one_cluster(frame, SurvivorshipSettings(attributes={"email": ["most_recent"]}))
    assert row["email"] == "low@x.fr"
    assert lin.loc["email", "rule"] == "most_recent"


def test_the_deciding_rule_compares_the_records_that_hold_a_value() -> None:
    """A record without the value (more trusted, more recent) stands before the two
    that hold one: the rule that decided between them is read at their own rows."""
    frame = records(
        [
            {"email_norm": None, "trust": 9, "source_updated_at": "2026-01-01"},
            {"email_norm": "a@x.fr", "trust": 5, "source_updated_at": "2024-01-01"},
            {"email_norm": "b@x.fr", "trust": 5, "source_updated_at": "2025-01-01"},
        ]
    )
    row, lin = one_cluster(frame)
    assert row["email"] == "b@x.fr"
    assert (lin.loc["email", "record"], lin.loc["email", "rule"]) == (2, "most_recent")


def test_most_frequent_and_longest() -> None:
    frame = records(
        [
            {"first_name_norm": "JAN", "trust": 9},
            {"first_name_norm": "JEAN"},
            {"first_name_norm": "JEAN"},
            {"last_name_norm": "DUPONT"},
            {"last_name_norm": "DUPONT-MOREL"},
        ]
    )
    settings = SurvivorshipSettings(
        attributes={
            "first_name": ["most_frequent", "source_priority"],
            "last_name": ["longest"],
        }
    )
    row, lin = one_cluster(frame, settings)
    assert (row["first_name"], lin.loc["first_name", "rule"]) == ("JEAN", "most_frequent")
    assert (row["last_name"], lin.loc["last_name", "rule"]) == ("DUPONT-MOREL", "longest")
    # Under the default chain, trust wins over numbers.
    row, lin = one_cluster(frame)
    assert (row["first_name"], lin.loc["first_name", "rule"]) == ("JAN", "source_priority")


def test_most_complete_record_wins_a_tie_on_the_rest() -> None:
    frame = records(
        [
            {"phone_norm": "+33600000001"},
            {"phone_norm": "+33600000002", "email_norm": "a@x.fr", "postcode_norm": "75011"},
        ]
    )
    row, lin = one_cluster(frame)
    assert (row["phone"], lin.loc["phone", "rule"]) == ("+33600000002", "most_complete")


def test_lineage_says_when_one_record_only_had_a_value_or_the_key_decided() -> None:
    frame = records(
        [
            {"siren_norm": "552100554"},
            {"phone_norm": "+33600000001"},
            {"phone_norm": "+33600000002"},
        ]
    )
    _, lin = one_cluster(frame)
    assert lin.loc["siren", "rule"] == "only_candidate"
    # k1 and k2 tie on every rule (same trust, no date, as complete): the key decides.
    assert (lin.loc["phone", "record"], lin.loc["phone", "rule"]) == (1, "source_key")


ADDRESS = {
    "address_lines": "12 RUE X",
    "street_norm": "12 RUE X",
    "postcode_norm": "75011",
    "city_norm": "PARIS",
    "country_norm": "FR",
    "rnvp_line4": "12 RUE X",
    "rnvp_line6": "75011 PARIS",
}


def test_the_address_comes_whole_from_one_record() -> None:
    frame = records(
        [
            # Most recent, but La Poste could not confirm it.
            {
                **ADDRESS,
                "city_norm": "PARIX",
                "address_status": "invalid",
                "source_updated_at": "2026-01-01",
            },
            # Confirmed, older, and without a country: the golden country stays empty,
            # it is not borrowed from the other record.
            {
                **ADDRESS,
                "postcode_norm": "75012",
                "country_norm": None,
                "address_status": "valid",
                "source_updated_at": "2020-01-01",
            },
        ]
    )
    row, lin = one_cluster(frame)
    assert (row["postcode"], row["city"]) == ("75012", "PARIS")
    assert pd.isna(row["country"])
    address_rows = lin.loc[["address_lines", "street", "postcode", "city", "rnvp_line4"]]
    assert set(address_rows["record"]) == {1}
    assert set(address_rows["rule"]) == {"rnvp_valid"}


def test_an_npai_address_loses_to_a_deliverable_one() -> None:
    frame = records(
        [
            {
                **ADDRESS,
                "address_status": "valid",
                "npai_flag": True,
                "source_updated_at": "2026-01-01",
            },
            {
                **ADDRESS,
                "postcode_norm": "75012",
                "address_status": "valid",
                "npai_flag": False,
                "source_updated_at": "2020-01-01",
            },
        ]
    )
    row, lin = one_cluster(frame)
    assert row["postcode"] == "75012"
    assert lin.loc["postcode", "rule"] == "not_npai"


def test_consent_follows_the_most_recent_explicit_choice() -> None:
    frame = records(
        [
            {"consent_email": True, "source_updated_at": "2020-01-01"},
            {"consent_email": False, "source_updated_at": "2024-01-01"},
            {"consent_email": None, "source_updated_at": "2026-01-01"},  # no choice made
        ]
    )
    frame["consent_email"] = frame["consent_email"].astype("boolean")
    row, lin = one_cluster(frame)
    assert row["consent_email"] is False or row["consent_email"] == False  # noqa: E712
    assert (lin.loc["consent_email", "record"], lin.loc["consent_email", "rule"]) == (
        1,
        "most_recent_explicit",
    )


def test_golden_values_do_not_depend_on_row_order() -> None:
    rng = np.random.default_rng(5)
    n = 300
    frame = records(
        [
            {
                "first_name_norm": rng.choice(["JEAN", "JAN", "JEANNE", None]),
                "email_norm": rng.choice(["a@x.fr", "b@x.fr", None]),
                "trust": int(rng.integers(1, 3)),
                "source_updated_at": rng.choice(["2024-01-01", "2025-01-01", None]),
                **ADDRESS,
                "postcode_norm": rng.choice(["75011", "75012"]),
                "address_status": rng.choice(["valid", "invalid"]),
            }
            for _ in range(n)
        ]
    )
    cluster = pd.Series(rng.integers(0, 40, n))
    settings = SurvivorshipSettings(attributes={"first_name": ["most_frequent", "longest"]})
    golden, _ = survive(frame, cluster, settings)
    order = rng.permutation(n)
    shuffled, _ = survive(
        frame.iloc[order].reset_index(drop=True),
        cluster.iloc[order].reset_index(drop=True),
        settings,
    )
    pd.testing.assert_frame_equal(golden, shuffled)


def test_an_unknown_attribute_in_the_rules_is_a_one_line_config_error(samples: Path) -> None:
    cfg = samples / "config.yaml"
    cfg.write_text(cfg.read_text() + "survivorship:\n  attributes:\n    city: [longest]\n")
    result = runner.invoke(app, ["validate-config", str(cfg)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "survivorship.attributes" in lines[0] and "unknown attribute(s) city" in lines[0]


@pytest.mark.parametrize("rule", ["newest", ""])
def test_an_unknown_rule_is_refused(rule: str) -> None:
    with pytest.raises(ValueError, match="default"):
        SurvivorshipSettings(default=[rule])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", None]), st.sampled_from(["x", "é", None])),
        max_size=12,
    )
)
def test_row_codes_number_distinct_rows_in_order_of_first_appearance(rows: list) -> None:
    from mdm_pipeline.golden_records.survivorship import _row_codes

    frame = pd.DataFrame(rows, columns=["street", "city"], dtype=object)
    expected = pd.factorize(pd.Series([str(r) for r in rows], dtype=object))[0]
    assert _row_codes(frame).tolist() == expected.tolist()


def test_row_codes_of_wide_columns_are_numbered_again_before_they_overflow() -> None:
    """Columns of 65,535 distinct values each are digits of 2^16: five of them as one
    64-bit number would drop the first one, and the last row below, which differs
    from the first in that column only, would share its code. They are numbered
    again on the way instead."""
    from mdm_pipeline.golden_records.survivorship import _row_codes

    n = 2**16 - 1
    values = [f"v{i}" for i in range(n)]
    frame = pd.DataFrame({f"c{i}": values for i in range(5)})
    frame.loc[n] = ["v1", "v0", "v0", "v0", "v0"]
    codes = _row_codes(frame)
    assert codes[n] != codes[0]
    assert codes.tolist() == list(range(n + 1))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # cluster
            st.sampled_from([0.0, 1.0, 2.0]),  # a rule's key
            st.sampled_from([0.0, 5.0]),  # the next rule's key
            st.sampled_from(["v", "w", None]),  # the attribute's value
        ),
        min_size=1,
        max_size=30,
    )
)
def test_ranking_once_for_every_attribute_ranks_as_sorting_the_candidates(rows: list) -> None:
    """`_rank` with a chain's ranking of every record (shared by the attributes with
    that chain) finds the winners and deciding rules it finds sorting only the
    candidates (the records holding a value)."""
    from mdm_pipeline.golden_records.survivorship import _rank, _ranking

    cluster = np.array([r[0] for r in rows])
    keys = [
        ("first", np.array([r[1] for r in rows])),
        ("second", np.array([r[2] for r in rows])),
    ]
    values = pd.Series([r[3] for r in rows], dtype=object)
    tiebreak = np.random.default_rng(len(rows)).permutation(len(rows)).astype(np.float64)
    candidates = np.flatnonzero(values.notna().to_numpy())
    codes = pd.factorize(values)[0]
    alone = _rank(candidates, cluster, keys, tiebreak, codes)
    shared = _rank(candidates, cluster, keys, tiebreak, codes, _ranking(cluster, keys, tiebreak))
    for one, other in zip(alone, shared, strict=True):
        assert one.tolist() == other.tolist()
