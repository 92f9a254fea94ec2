"""The central store: migrations, dated history, stable golden IDs, events, the run lock.

Every test here runs on SQLite and on PostgreSQL (CI's server; under CI=true a
missing server fails the test rather than skipping it).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.config.schema import text_dtype
from mdm_pipeline.golden_records import audit, connection, store
from mdm_pipeline.golden_records.audit import golden_show
from mdm_pipeline.golden_records.schema import metadata
from mdm_pipeline.golden_records.survivorship import survive

runner = CliRunner()
T1, T2, T3, T4 = (datetime(2026, 11, d, 2, 0) for d in (1, 2, 3, 4))


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite'}"
    else:
        yield request.getfixturevalue("pg_url")


def test_migrations_build_exactly_the_declared_schema(url: str) -> None:
    engine = store.connect(url)
    assert store.schema_revision(engine) == "0011"
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


def test_the_declared_head_is_alembics() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(store.MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == connection.HEAD


def test_a_night_opens_an_upgraded_store_without_loading_alembic(tmp_path: Path) -> None:
    """Alembic is for upgrades: a run and its child processes open a store already at
    the head revision without importing it (a quarter of a second per process)."""
    url = f"sqlite:///{tmp_path / 'mdm.sqlite'}"
    connection.connect(url).dispose()  # created and migrated here
    script = (
        "import sys\n"
        "import mdm_pipeline.golden_records.store_child\n"
        "import mdm_pipeline.golden_records.snapshot_child\n"
        "import mdm_pipeline.pipeline.run\n"
        "from mdm_pipeline.golden_records.connection import connect\n"
        f"connect({url!r}).dispose()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_store_from_before_migrations_is_stamped_and_upgraded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        config = store._alembic_config(conn)
        alembic_command.upgrade(config, "0001")
        conn.execute(sa.text("DROP TABLE alembic_version"))  # as create_all left it
        conn.execute(
            sa.text(
                "INSERT INTO mdm_runs VALUES ('R1', '2026-10-01 02:00:00', NULL, 'succeeded',"
                " 'h', '{}')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO mdm_golden_records VALUES ('G1', 'person', 'active', 1, 'x',"
                " '{}', '{\"email\": \"shop|k1|most_recent|2026-09-30\"}', 'R1', 'R1')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO mdm_source_records VALUES ('shop', 'k1', 'G1', 'person', 2, 'y',"
                " NULL, '{}', 'R1')"
            )
        )
    engine.dispose()
    engine = store.connect(url)
    assert store.schema_revision(engine) == "0011"
    with engine.connect() as conn:
        version = conn.execute(sa.select(store.golden_versions)).mappings().one()
        link = conn.execute(sa.select(store.xref)).mappings().one()
    engine.dispose()
    assert (version["golden_id"], version["version"], version["valid_to"]) == ("G1", 1, None)
    assert version["valid_from"] == datetime(2026, 10, 1, 2, 0)
    assert (link["golden_id"], link["valid_from"]) == ("G1", datetime(2026, 10, 1, 2, 0))
    # The lineage moved to the version row (0007) and is still what `golden show` gives.
    engine = store.connect(url)
    shown = golden_show(engine, "G1")
    assert shown["lineage"]["email"]["source_key"] == "k1"
    # Back to 0006, the current row has its lineage again.
    with engine.begin() as conn:
        alembic_command.downgrade(store._alembic_config(conn), "0006")
        back = conn.execute(sa.text("SELECT lineage FROM mdm_golden_records")).scalar()
    engine.dispose()
    assert "shop|k1|most_recent" in back


def _layout(engine: sa.Engine) -> dict[str, tuple[bool, list[str], list[tuple]]]:
    """Per narrow table: WITHOUT ROWID or not, its indexes, its rows."""
    out = {}
    with engine.connect() as conn:
        for table in ("mdm_match_evidence", "mdm_xref"):
            sql = conn.execute(
                sa.text("SELECT sql FROM sqlite_master WHERE type='table' AND name=:t"),
                {"t": table},
            ).scalar_one()
            indexes = conn.execute(
                sa.text(
                    "SELECT sql FROM sqlite_master WHERE type='index' AND tbl_name=:t "
                    "AND sql IS NOT NULL ORDER BY name"
                ),
                {"t": table},
            ).scalars()
            rows = conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4")).all()
            out[table] = ("WITHOUT ROWID" in sql.upper(), list(indexes), [tuple(r) for r in rows])
    return out


def test_evidence_and_xref_are_without_rowid_on_sqlite_and_migrate_both_ways(
    samples: Path,
) -> None:
    """Migration 0009 rebuilds the two narrow tables keyed by their primary key, keeping
    every row and index; its downgrade gives rowid tables back, the same rows."""
    url = f"sqlite:///{samples / 'mdm.sqlite'}"
    result = runner.invoke(
        app, ["run", "--config", str(samples / "config.yaml")], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 0, result.output
    engine = store.connect(url)
    now = _layout(engine)
    assert all(without for without, _, _ in now.values())
    assert len(now["mdm_match_evidence"][2]) > 100 and len(now["mdm_xref"][2]) > 100
    assert any("ix_mdm_match_evidence_review" in i for i in now["mdm_match_evidence"][1])
    with engine.begin() as conn:
        alembic_command.downgrade(store._alembic_config(conn), "0008")
    before = _layout(engine)
    assert not any(without for without, _, _ in before.values())
    for table, (_, indexes, rows) in now.items():
        assert before[table][1:] == (indexes, rows), table
    engine.dispose()
    engine = store.connect(url)  # upgrades again
    assert _layout(engine) == now
    engine.dispose()


# --- stable golden IDs -----------------------------------------------------------------


def _clusters(groups: list[list[str]]) -> pd.DataFrame:
    rows = [(key, label) for label, keys in enumerate(groups) for key in keys]
    return pd.DataFrame(
        {"source": "s", "source_key": [k for k, _ in rows], "cluster": [c for _, c in rows]}
    )


def _previous(groups: dict[str, list[str]]) -> pd.DataFrame:
    rows = [(key, gid) for gid, keys in groups.items() for key in keys]
    return pd.DataFrame(
        {"source": "s", "source_key": [k for k, _ in rows], "golden_id": [g for _, g in rows]}
    )


def test_a_merge_keeps_the_older_id_and_retires_the_other_into_it() -> None:
    prev = _previous({"GOLD": ["c"], "GNEW": ["a", "b"]})
    created = pd.Series({"GOLD": "R1", "GNEW": "R2"})
    got = store.assign_golden_ids(_clusters([["a", "b", "c"]]), prev, created)
    assert got.gid_of_cluster.tolist() == ["GOLD"]
    assert got.retired.to_dict("records") == [{"golden_id": "GNEW", "survivor_id": "GOLD"}]


def test_a_split_keeps_the_id_for_the_larger_part() -> None:
    prev = _previous({"G1": ["a", "b", "c"]})
    got = store.assign_golden_ids(_clusters([["a"], ["b", "c"]]), prev)
    assert got.gid_of_cluster[1] == "G1"
    assert got.gid_of_cluster[0] not in ("G1",)
    assert got.retired.empty


def test_new_ids_are_opaque_and_never_reused() -> None:
    ids = {store.new_golden_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(re.fullmatch(r"G[0-9A-F]{20}", g) for g in ids)
    # A batch as large as a full run's is distinct too (its random tails are drawn
    # until they are), and a later run's IDs sort after an earlier one's.
    first = store.new_golden_ids(600_000)
    assert len(set(first)) == 600_000
    time.sleep(0.002)
    later = store.new_golden_ids(1_000)
    assert max(first) < min(later)
    assert len({g[:12] for g in first}) == 1  # one time prefix, random tails
    assert not (pd.Series(first).is_monotonic_increasing)


def test_assignment_does_not_depend_on_row_order() -> None:
    prev = _previous({"G1": ["a", "b"], "G2": ["c", "d"], "G3": ["e"]})
    clusters = _clusters([["a", "c"], ["b", "d", "e"]])
    created = pd.Series({"G1": "R1", "G2": "R1", "G3": "R2"})
    first = store.assign_golden_ids(clusters, prev, created)
    shuffled = store.assign_golden_ids(
        clusters.sample(frac=1, random_state=3), prev.sample(frac=1, random_state=4), created
    )
    pd.testing.assert_series_equal(first.gid_of_cluster, shuffled.gid_of_cluster)


def _assigned_by_sorting_texts(
    clusters: pd.DataFrame, previous: pd.DataFrame, created: pd.Series | None
) -> tuple[dict[int, str], list[dict[str, str]]]:
    """The rules of `assign_golden_ids` as it first applied them: pandas sorts of the
    (ID, cluster, count) rows. Returns the kept IDs per cluster and the retired ones."""
    shared = clusters.merge(previous, on=["source", "source_key"], how="inner")
    counts = shared.groupby(["golden_id", "cluster"]).size().rename("n").reset_index()
    home = counts.sort_values(["golden_id", "n", "cluster"], ascending=[True, False, True])
    home = home.drop_duplicates("golden_id")
    age = (created if created is not None else pd.Series(dtype=object)).reindex(home["golden_id"])
    home = home.assign(created=age.fillna("").to_numpy())
    keep = home.sort_values(
        ["cluster", "created", "n", "golden_id"], ascending=[True, True, False, True]
    ).drop_duplicates("cluster")
    assigned = dict(zip(keep["cluster"].astype(int), keep["golden_id"], strict=True))
    away = home[~home["golden_id"].isin(keep["golden_id"])]
    retired = [
        {"golden_id": g, "survivor_id": assigned[int(c)]}
        for g, c in zip(away["golden_id"], away["cluster"], strict=True)
    ]
    return assigned, retired


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(["G1", "G2", "G10", "Gb", None])),
        max_size=30,
    ),
    st.dictionaries(
        st.sampled_from(["G1", "G2", "G10", "Gb"]), st.sampled_from(["R1", "R2"]), max_size=4
    ),
    st.booleans(),
)
def test_assignment_on_integer_codes_follows_the_rules_as_sorting_texts_did(
    records: list, ages: dict, arrow: bool
) -> None:
    """Clusters (0-5) of records, each stored under an ID or new; ties everywhere
    (counts, creating runs, IDs whose text order is not their number's). The IDs
    kept and retired are those the rules give sorted as texts, with the stored IDs
    as Python or as Arrow texts (as a full run reads them)."""
    keys = [f"k{i}" for i in range(len(records))]
    clusters = pd.DataFrame({"source": "s", "source_key": keys, "cluster": [c for c, _ in records]})
    previous = pd.DataFrame(
        {
            "source": "s",
            "source_key": [k for k, (_, g) in zip(keys, records, strict=True) if g],
            "golden_id": [g for _, g in records if g],
        }
    )
    created = pd.Series(ages, dtype=object) if ages else None
    if arrow:
        previous = previous.astype({"golden_id": text_dtype()})
    got = store.assign_golden_ids(clusters, previous, created)
    if not len(previous):
        assert got.retired.empty
        return
    assigned, retired = _assigned_by_sorting_texts(clusters, previous, created)
    kept = {int(c): g for c, g in got.gid_of_cluster.items() if g in set(previous["golden_id"])}
    assert kept == assigned
    assert got.retired.to_dict("records") == retired


_KEY_TEXT = st.text(alphabet="aAbBéÉz0 -:\u00e0\u4e2d", max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["ecom", "stores", "b2b"]), _KEY_TEXT, st.integers(-3, 3)),
        max_size=40,
    )
)
def test_sort_order_is_pandas_stable_sort_in_code_point_order(
    rows: list[tuple[str, str, int]],
) -> None:
    """The Arrow sort that orders every bulk write and temporary key table agrees with
    pandas's stable sort (code point order, as SQLite's BINARY collation), ties kept
    in row order."""
    frame = pd.DataFrame(rows, columns=["source", "source_key", "n"], dtype=object)
    frame["n"] = frame["n"].astype("int64")
    for cols in (["source", "source_key"], ["source_key", "n"], ["n"]):
        expected = frame[cols].reset_index(drop=True).sort_values(cols, kind="stable").index
        assert store.sort_order(frame, cols).tolist() == expected.tolist()


def test_change_events_find_merges_and_splits_and_nothing_else() -> None:
    before = _previous({"G1": ["a", "b"], "G2": ["c"], "G3": ["d", "e", "f"], "G4": ["g", "h"]})
    after = _previous({"G1": ["a", "b", "c"], "G3": ["d", "e"], "G5": ["f"], "G4": ["g", "h"]})
    events = store.change_events(before, after)
    assert events == [
        (
            "merge",
            "G1",
            {
                "before": {"G1": ["s:a", "s:b"], "G2": ["s:c"]},
                "after": {"G1": ["s:a", "s:b", "s:c"]},
            },
        ),
        (
            "split",
            "G3",
            {
                "before": {"G3": ["s:d", "s:e", "s:f"]},
                "after": {"G3": ["s:d", "s:e"], "G5": ["s:f"]},
            },
        ),
    ]
    assert store.change_events(before, before) == []


# --- nights written to the store ---------------------------------------------------------


@pytest.fixture(scope="module")
def six_people() -> pd.DataFrame:
    """Six normalised person records of the samples, keyed a..f."""
    from mdm_pipeline.pipeline.run import Pipeline

    root = Path(__file__).resolve().parent.parent
    records = Pipeline.from_config(root / "data" / "samples" / "config.yaml").normalised_records()
    people = records[records["record_type"] == "person"].head(6).reset_index(drop=True)
    return people.assign(source="s", source_key=list("abcdef"))


PAYLOAD = ["first_name_norm", "last_name_norm", "email_norm", "postcode_norm"]


def _night(
    engine: sa.Engine,
    run_id: str,
    at: datetime,
    people: pd.DataFrame,
    groups: list[list[str]],
    payload: list[str] = PAYLOAD,
) -> tuple[store.WriteResult, dict[str, str]]:
    label = {key: i for i, keys in enumerate(groups) for key in keys}
    records = people[people["source_key"].isin(label)].reset_index(drop=True)
    cluster = pd.Series(records["source_key"].map(label).to_numpy(), index=records.index)
    golden, lineage = survive(records, cluster)
    quarantined = pd.DataFrame(
        {c: [] for c in ("source", "location", "line", "source_key", "reason", "raw")}
    )
    with store.transaction(engine) as conn:
        store.start_run(conn, run_id, "hash", at)
        result, gid = store.write_run(
            conn, run_id, at, records, payload, cluster, golden, lineage, quarantined, ["s"]
        )
    return result, dict(zip(records["source_key"], gid, strict=True))


def _table(engine: sa.Engine, table: sa.Table) -> pd.DataFrame:
    with engine.connect() as conn:
        return store._read(conn, sa.select(table))


def test_history_merges_splits_and_reruns(url: str, six_people: pd.DataFrame) -> None:
    engine = store.connect(url)
    _, n1 = _night(engine, "R1", T1, six_people, [["c"], ["d", "e", "f"]])
    _, n2 = _night(engine, "R2", T2, six_people, [["a", "b"], ["c"], ["d", "e", "f"]])
    g_c, g_ab, g_def = n2["c"], n2["a"], n2["d"]
    assert (n2["c"], n2["d"]) == (n1["c"], n1["d"])
    result, n3 = _night(engine, "R3", T3, six_people, [["a", "b", "c"], ["d", "e"], ["f"]])
    assert (result.merges, result.splits, result.golden_retired) == (1, 1, 1)
    # The merge kept the older ID; the split kept its ID for the larger part.
    assert n3["a"] == n3["b"] == n3["c"] == g_c
    assert n3["d"] == n3["e"] == g_def
    assert n3["f"] not in (g_c, g_ab, g_def)

    golden = _table(engine, store.golden_records).set_index("golden_id")
    assert golden.loc[g_ab, "status"] == "retired"
    assert golden.loc[g_ab, "survivor_id"] == g_c
    versions = _table(engine, store.golden_versions)
    of_def = versions[versions["golden_id"] == g_def].sort_values("version")
    assert of_def["members"].tolist() == [3, 2]
    assert of_def["valid_from"].tolist() == [T1, T3]
    assert of_def["valid_to"].iloc[0] == T3 and pd.isna(of_def["valid_to"].iloc[1])
    # What the golden record looked like on a date: the version valid then.
    on_t2 = of_def[
        (of_def["valid_from"] <= T2) & (of_def["valid_to"].isna() | (of_def["valid_to"] > T2))
    ]
    assert on_t2["members"].tolist() == [3]
    # Unchanged golden records got no new version in R2.
    of_c = versions[versions["golden_id"] == g_c]
    assert of_c["valid_from"].tolist() == [T1, T3]

    xref = _table(engine, store.xref)
    of_a = xref[xref["source_key"] == "a"].sort_values("valid_from")
    assert of_a["golden_id"].tolist() == [g_ab, g_c]
    assert of_a["valid_from"].tolist() == [T2, T3]
    assert of_a["valid_to"].iloc[0] == T3 and pd.isna(of_a["valid_to"].iloc[1])

    ev = _table(engine, store.events).sort_values("kind")
    assert ev["kind"].tolist() == ["merge", "split"]
    assert ev["reason"].tolist() == ["automatic", "automatic"]
    merge = json.loads(ev["detail"].iloc[0])
    assert ev["golden_id"].iloc[0] == g_c
    assert merge["before"] == {g_ab: ["s:a", "s:b"], g_c: ["s:c"]}
    assert merge["after"] == {g_c: ["s:a", "s:b", "s:c"]}
    split = json.loads(ev["detail"].iloc[1])
    assert ev["golden_id"].iloc[1] == g_def
    assert split["after"] == {g_def: ["s:d", "s:e"], n3["f"]: ["s:f"]}

    # A rerun on the same input changes nothing: no version, no link, no event.
    counts = {
        t.name: len(_table(engine, t)) for t in (store.golden_versions, store.xref, store.events)
    }
    result, n4 = _night(engine, "R4", T4, six_people, [["a", "b", "c"], ["d", "e"], ["f"]])
    assert n4 == n3
    assert (result.golden_created, result.golden_updated, result.records_written) == (0, 0, 0)
    assert counts == {
        t.name: len(_table(engine, t)) for t in (store.golden_versions, store.xref, store.events)
    }
    engine.dispose()


def test_a_deleted_record_ends_its_link_and_its_golden_record(
    url: str, six_people: pd.DataFrame
) -> None:
    engine = store.connect(url)
    _, n1 = _night(engine, "R1", T1, six_people, [["a", "b"], ["c"]])
    result, _ = _night(engine, "R2", T2, six_people, [["a"], ["c"]])
    assert result.records_removed == 1
    xref = _table(engine, store.xref)
    of_b = xref[xref["source_key"] == "b"]
    assert of_b["valid_to"].tolist() == [T2]
    history = _table(engine, store.record_history)
    assert history["source_key"].tolist() == ["b"]  # its last payload is kept
    versions = _table(engine, store.golden_versions)
    of_ab = versions[versions["golden_id"] == n1["a"]].sort_values("version")
    assert of_ab["members"].tolist() == [2, 1]  # recomputed without it
    _, _ = _night(engine, "R3", T3, six_people, [["c"]])
    golden = _table(engine, store.golden_records).set_index("golden_id")
    assert golden.loc[n1["a"], "status"] == "retired"
    assert pd.isna(golden.loc[n1["a"], "survivor_id"])  # nothing left to resolve to
    engine.dispose()


def test_a_changed_value_makes_a_version_and_keeps_the_old_payload(
    url: str, six_people: pd.DataFrame
) -> None:
    engine = store.connect(url)
    _night(engine, "R1", T1, six_people, [["a"]])
    moved = six_people.copy()
    moved.loc[moved["source_key"] == "a", "postcode_norm"] = "99999"
    _, _gid = _night(engine, "R2", T2, moved, [["a"]])
    versions = _table(engine, store.golden_versions).sort_values("version")
    assert versions["version"].tolist() == [1, 2]
    assert [json.loads(a)["postcode"] for a in versions["attributes"]] == [
        six_people.loc[0, "postcode_norm"],
        "99999",
    ]
    history = _table(engine, store.record_history)
    assert (
        json.loads(history["payload"].iloc[0])["postcode_norm"]
        == six_people.loc[0, "postcode_norm"]
    )
    assert (history["valid_from"].iloc[0], history["valid_to"].iloc[0]) == (T1, T2)
    assert len(_table(engine, store.xref)) == 1  # still the same golden record
    # Lineage: source, key, deciding rule and the winning record's update date.
    origin = audit._lineage(versions["lineage"].iloc[1])["postcode"]
    source, key, rule, day = (origin[k] for k in ("source", "source_key", "rule", "date"))
    assert (source, key, rule) == ("s", "a", "only_candidate")
    updated = moved.loc[0, "source_updated_at"]
    assert day == ("" if pd.isna(updated) else pd.Timestamp(updated).strftime("%Y-%m-%d"))
    engine.dispose()


def _by_key(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["golden_id", "version"]).reset_index(drop=True)


def test_closed_versions_are_appended_and_never_rewritten(
    url: str, six_people: pd.DataFrame
) -> None:
    """A night closes a version by copying the current row to the golden history: the
    rows earlier nights put there stay as they were, each dated and with the run
    that closed it, and a current version is never in the history."""
    engine = store.connect(url)
    _night(engine, "R1", T1, six_people, [["c"], ["d", "e", "f"]])
    assert _table(engine, store.golden_history).empty  # a first night closes nothing
    _night(engine, "R2", T2, six_people, [["a", "b"], ["c"], ["d", "e", "f"]])
    after_r2 = _by_key(_table(engine, store.golden_history))
    _, n3 = _night(engine, "R3", T3, six_people, [["a", "b", "c"], ["d", "e"], ["f"]])
    after_r3 = _by_key(_table(engine, store.golden_history))
    kept = after_r3.merge(after_r2.astype(after_r3.dtypes), how="inner")
    pd.testing.assert_frame_equal(_by_key(kept), after_r2, check_dtype=False)
    added = after_r3[~after_r3["closed_run"].isin(after_r2["closed_run"])]
    assert (added["closed_run"] == "R3").all() and (added["valid_to"] == T3).all()
    # R3 closed the merged-away record's version (retired) and the split one's (changed),
    # and the survivor's: the three golden records it rewrote.
    golden = _table(engine, store.golden_records).set_index("golden_id")
    retired = golden.index[golden["status"] == "retired"]
    assert len(retired) == 1 and set(retired) <= set(added["golden_id"])
    assert {n3["c"], n3["d"]} <= set(added["golden_id"])
    # The current versions are in the current state, with their lineage, not in history.
    current = golden[golden["status"] == "active"]
    closed = after_r3.set_index(["golden_id", "version"]).index
    assert not closed.isin(list(zip(current.index, current["version"], strict=True))).any()
    assert all(json.loads(text) for text in current["lineage"])
    # The view shows both, as auditors' SQL knows it: one open version per active record.
    versions = _table(engine, store.golden_versions)
    assert len(versions) == len(after_r3) + len(current)
    open_ = versions[versions["valid_to"].isna()].set_index("golden_id")
    assert sorted(open_.index) == sorted(current.index)
    assert (open_["lineage"] == current.loc[open_.index, "lineage"]).all()
    engine.dispose()


def test_golden_history_migrates_both_ways_with_every_version(
    url: str, six_people: pd.DataFrame
) -> None:
    """Down to 0009 the versions are one table again, the current ones open, the
    lineage back in them only; up again, the same versions, the closed ones in the
    history and the current ones' lineage in the current state."""
    engine = store.connect(url)
    _night(engine, "R1", T1, six_people, [["c"], ["d", "e", "f"]])
    _night(engine, "R2", T2, six_people, [["a", "b"], ["c"], ["d", "e", "f"]])
    _night(engine, "R3", T3, six_people, [["a", "b", "c"], ["d", "e"], ["f"]])
    every = _by_key(_table(engine, store.golden_versions))
    history = _by_key(_table(engine, store.golden_history))
    current = _table(engine, store.golden_records)
    with engine.begin() as conn:
        alembic_command.downgrade(store._alembic_config(conn), "0009")
    engine.dispose()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        assert "mdm_golden_versions" in inspector.get_table_names()
        assert "mdm_golden_history" not in inspector.get_table_names()
        columns = {c["name"] for c in inspector.get_columns("mdm_golden_records")}
        assert "lineage" not in columns
        old = _by_key(store._read(conn, sa.select(store.golden_versions)))
    engine.dispose()
    pd.testing.assert_frame_equal(old, every)
    engine = store.connect(url)  # upgrades again
    assert store.schema_revision(engine) == connection.HEAD
    pd.testing.assert_frame_equal(_by_key(_table(engine, store.golden_versions)), every)
    pd.testing.assert_frame_equal(_by_key(_table(engine, store.golden_history)), history)
    pd.testing.assert_frame_equal(
        _table(engine, store.golden_records).sort_values("golden_id").reset_index(drop=True),
        current.sort_values("golden_id").reset_index(drop=True),
    )
    engine.dispose()


def test_a_store_of_full_payloads_migrates_to_sparse_ones_and_the_next_run_changes_nothing(
    url: str, six_people: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until 0011 payloads and golden attributes held their null members, and their
    hashes were those of that text. The migration cuts them and hashes again, so
    that a run on the same records finds nothing changed: no payload archived, no
    golden version closed."""
    from mdm_pipeline.golden_records import jsonrows

    payload = [*PAYLOAD, "siren_norm", "company_name_norm"]  # empty for people
    groups = [["a", "b"], ["c"], ["d", "e", "f"]]
    engine = store.connect(url)
    with monkeypatch.context() as m:  # written as before 0011: every member
        m.setattr(store, "json_rows", lambda frame, sparse=False: jsonrows.json_rows(frame))
        _night(engine, "R1", T1, six_people, [["c"], ["d", "e", "f"]], payload)
        _night(engine, "R2", T2, six_people, groups, payload)
    with engine.begin() as conn:
        alembic_command.downgrade(store._alembic_config(conn), "0010")
    engine.dispose()
    before = _table(sa.create_engine(url), store.source_records).sort_values("source_key")
    assert before["payload"].str.contains('"siren_norm":null').all()

    engine = store.connect(url)  # upgrades
    records = _table(engine, store.source_records).sort_values("source_key")
    golden = _table(engine, store.golden_records)
    for texts, hashes in (
        (records["payload"], records["record_hash"]),
        (golden["attributes"], golden["record_hash"]),
    ):
        assert not texts.str.contains(":null").any()
        assert hashes.tolist() == [
            hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts
        ]
    assert [json.loads(t) for t in records["payload"]] == [
        {k: v for k, v in json.loads(t).items() if v is not None} for t in before["payload"]
    ]
    archived = len(_table(engine, store.record_history)), len(_table(engine, store.golden_history))
    result, _ = _night(engine, "R3", T3, six_people, groups, payload)
    assert (result.golden_created, result.golden_updated, result.records_written) == (0, 0, 0)
    assert result.golden_unchanged == 3
    assert (
        len(_table(engine, store.record_history)),
        len(_table(engine, store.golden_history)),
    ) == archived
    pd.testing.assert_frame_equal(
        _table(engine, store.source_records).sort_values("source_key"), records
    )
    engine.dispose()


# --- the run lock ------------------------------------------------------------------------


def test_a_second_run_on_a_busy_store_refuses(samples: Path) -> None:
    engine = store.connect(f"sqlite:///{samples / 'mdm.sqlite'}")
    with store.run_lock(engine, "R20261122T020000-abcdef"):
        result = runner.invoke(app, ["run", "--config", str(samples / "config.yaml")])
    assert result.exit_code == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: store is busy: run R20261122T020000-abcdef started")
    assert "mdm unlock" in result.stderr
    # Released on the way out: the next run goes through.
    assert runner.invoke(app, ["run", "--config", str(samples / "config.yaml")]).exit_code == 0
    engine.dispose()


def test_a_lock_left_by_a_dead_process_is_taken_over(samples: Path) -> None:
    engine = store.connect(f"sqlite:///{samples / 'mdm.sqlite'}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with engine.begin() as conn:
        conn.execute(
            store.lock.insert().values(
                name="run",
                run_id="Rdead",
                host=store.socket.gethostname(),
                pid=dead.pid,
                started_at=T1,
            )
        )
    assert runner.invoke(app, ["run", "--config", str(samples / "config.yaml")]).exit_code == 0
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.lock)).scalar() == 0
    engine.dispose()


def test_unlock_releases_a_lock_held_elsewhere(samples: Path) -> None:
    engine = store.connect(f"sqlite:///{samples / 'mdm.sqlite'}")
    with engine.begin() as conn:
        conn.execute(
            store.lock.insert().values(
                name="run", run_id="Rother", host="another-host", pid=1, started_at=T1
            )
        )
    cfg = str(samples / "config.yaml")
    assert runner.invoke(app, ["run", "--config", cfg]).exit_code == 3
    freed = runner.invoke(app, ["unlock", "--config", cfg])
    assert freed.exit_code == 0 and "Rother" in freed.stdout
    assert runner.invoke(app, ["run", "--config", cfg]).exit_code == 0
    engine.dispose()


def test_history_tables_stay_empty_of_personal_data_in_events(
    url: str, six_people: pd.DataFrame
) -> None:
    """Events name records by source and key only."""
    engine = store.connect(url)
    _night(engine, "R1", T1, six_people, [["a"], ["b"]])
    _night(engine, "R2", T2, six_people, [["a", "b"]])
    detail = _table(engine, store.events)["detail"].iloc[0]
    for col in PAYLOAD:
        for value in six_people[col].dropna().astype(str):
            assert value not in detail
    assert np.all(_table(engine, store.events)["kind"] == "merge")
    engine.dispose()


# --- the matching model is kept -----------------------------------------------------------


def _run_json(cfg: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["run", "--config", str(cfg), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_model_is_trained_once_then_reused_until_retrain_or_new_settings(
    samples: Path,
) -> None:
    cfg = samples / "config.yaml"
    first = _run_json(cfg)
    assert (first["model_status"], first["model_run"]) == ("trained", first["run_id"])
    second = _run_json(cfg)
    assert (second["model_status"], second["model_run"]) == ("reused", first["run_id"])
    assert second["golden_updated"] == second["golden_created"] == 0
    third = _run_json(cfg, "--retrain")
    assert (third["model_status"], third["model_run"]) == ("trained", third["run_id"])
    # New matching settings: the stored models were trained under others.
    cfg.write_text(cfg.read_text().replace("auto_match: 0.95", "auto_match: 0.96"))
    fourth = _run_json(cfg)
    assert fourth["model_status"] == "trained"
    engine = sa.create_engine(f"sqlite:///{samples / 'mdm.sqlite'}")
    with engine.connect() as conn:
        trained = conn.execute(sa.select(store.models.c.run_id)).scalars().all()
    engine.dispose()
    assert sorted(trained) == sorted([first["run_id"], third["run_id"], fourth["run_id"]])


def test_a_stored_model_scores_exactly_as_the_trained_one(samples: Path) -> None:
    from mdm_pipeline.matching.engine import match, train
    from mdm_pipeline.matching.scoring import Model
    from mdm_pipeline.pipeline.run import Pipeline

    pipeline = Pipeline.from_config(samples / "config.yaml")
    records = pipeline.normalised_records()
    settings = pipeline.settings.matching
    model = train(records, settings)
    before = match(records, settings, model).pairs
    again = Model.from_json(model.to_json())
    assert again.prior_fitted and again.prior == model.prior
    after = match(records, settings, again).pairs
    pd.testing.assert_frame_equal(before, after)
    # Frozen term frequencies: scoring a subset weighs common names as the whole did.
    assert set(again.term_freq) == {c.name for c in settings.comparisons if c.tf_adjust}


def test_row_hashes_are_one_json_object_per_row_whatever_the_values() -> None:
    """Values holding the array's row separator or a Unicode line break do not shift rows."""
    frame = pd.DataFrame(
        {
            "name": ["a},{b", "line\u2028break", "plain", None],
            "n": [1.5, None, 3.0, 4.0],
            "day": pd.to_datetime(["2024-01-02", None, "2023-05-06", "2022-01-01"]),
        }
    )
    digests, lines = store.hash_rows(frame)
    assert [json.loads(line).get("name") for line in lines] == frame["name"].tolist()
    # A row hashes the same alone as among others, and differs from its neighbours.
    for i in range(len(frame)):
        assert store.hash_rows(frame.iloc[[i]])[0].iloc[0] == digests.iloc[i]
    assert digests.nunique() == len(frame)


def test_row_hashes_do_not_depend_on_the_chunks_rows_are_serialised_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frame = pd.DataFrame({"name": ["a},{b", "é", "plain", None, "x"], "n": range(5)})
    whole = store.hash_rows(frame)
    monkeypatch.setattr(store, "HASH_CHUNK_ROWS", 2)
    chunked = store.hash_rows(frame)
    pd.testing.assert_series_equal(whole[0], chunked[0])
    pd.testing.assert_series_equal(whole[1], chunked[1])


def test_lineage_json_escapes_keys_and_leaves_missing_dates_empty() -> None:
    """Source keys are free text from the units: a quote, a backslash or a newline
    must give valid JSON, a missing date an empty date, and a golden record without
    lineage an empty object. Attributes are grouped by record, then rule."""
    records = pd.DataFrame(
        {
            "source": ["shop", "b2b", "shop"],
            "source_key": ['k"1', "a\\b\nc", "x/y é"],
            "source_updated_at": pd.to_datetime(
                ["2026-01-02", None, "2025-12-31T10:00"], format="ISO8601"
            ),
        }
    )
    lineage = pd.DataFrame(
        {
            "cluster": [5, 5, 5, 7, 9, 5, 5],
            "attribute": ["email", "address", "name", "name", "name", "phone", "city"],
            "record": [0, 1, 2, 2, 0, 0, 0],
            "rule": ["most_recent", "trust", "longest", "trust", "trust", "most_recent", "all"],
        }
    )
    out = store._lineage_json(records, lineage, pd.Index([5, 6, 7]))
    assert json.loads(out[5]) == {
        "b2b|a\\b\nc|": {"trust": ["address"]},
        'shop|k"1|2026-01-02': {"all": ["city"], "most_recent": ["email", "phone"]},
        "shop|x/y é|2025-12-31": {"longest": ["name"]},
    }
    # Records in text order, rules and attributes in name order.
    assert list(json.loads(out[5])) == [
        "b2b|a\\b\nc|",
        'shop|k"1|2026-01-02',
        "shop|x/y é|2025-12-31",
    ]
    assert list(json.loads(out[5])['shop|k"1|2026-01-02']) == ["all", "most_recent"]
    assert out[6] == "{}"
    assert json.loads(out[7]) == {"shop|x/y é|2025-12-31": {"trust": ["name"]}}
    assert store._lineage_json(records, lineage.iloc[:0], pd.Index([5])).tolist() == ["{}"]
    # Read back per attribute, as the per-attribute form stores wrote before is.
    per_attribute = {
        "address": "b2b|a\\b\nc|trust|",
        "city": 'shop|k"1|all|2026-01-02',
        "email": 'shop|k"1|most_recent|2026-01-02',
        "name": "shop|x/y é|longest|2025-12-31",
        "phone": 'shop|k"1|most_recent|2026-01-02',
    }
    assert audit._lineage(out[5]) == audit._lineage(json.dumps(per_attribute))
    assert audit._lineage(out[5])["address"] == {
        "source": "b2b",
        "source_key": "a\\b\nc",
        "rule": "trust",
        "date": "",
    }


# --- the SQLite journal -----------------------------------------------------------------

_KILLED_WRITER = """
import os, signal, sys
import sqlalchemy as sa
from mdm_pipeline.golden_records import connection
engine = connection.connect(sys.argv[1])
with engine.connect() as conn:
    conn.exec_driver_sql("PRAGMA cache_size = 10")  # spill changed pages into the file
    conn.exec_driver_sql("BEGIN IMMEDIATE")
    conn.exec_driver_sql("DELETE FROM mdm_source_records")
    conn.exec_driver_sql("UPDATE mdm_golden_records SET members = members + 1")
    print("written", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_in_the_middle_of_writing_leaves_the_store_as_it_was(
    samples: Path, tmp_path: Path
) -> None:
    """Killed (SIGKILL, no Python cleanup) after its changes reached the file: the kept
    journal is hot, and the next opening of the store rolls it back."""
    from mdm_pipeline.pipeline.run import Pipeline

    Pipeline.from_config(samples / "config.yaml").run()
    url = f"sqlite:///{samples / 'mdm.sqlite'}"
    engine = connection.connect(url)
    before = {t: _table(engine, t) for t in (store.source_records, store.golden_records)}
    engine.dispose()
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -9 and "written" in done.stdout, done.stderr
    engine = connection.connect(url)
    for table, frame in before.items():
        pd.testing.assert_frame_equal(_table(engine, table), frame)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    engine.dispose()


def test_the_sqlite_journal_is_kept_between_runs_and_is_not_hot_after_a_commit(
    samples: Path,
) -> None:
    from mdm_pipeline.pipeline.run import Pipeline

    Pipeline.from_config(samples / "config.yaml").run()
    engine = connection.connect(f"sqlite:///{samples / 'mdm.sqlite'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "persist"
        limit = conn.exec_driver_sql("PRAGMA journal_size_limit").scalar()
        assert limit == connection.SQLITE_JOURNAL_LIMIT_BYTES
    engine.dispose()
    journal = samples / "mdm.sqlite-journal"
    # Kept (its blocks are rewritten next night), its header zeroed: nothing to roll back.
    assert journal.exists()
    assert journal.read_bytes()[:28].strip(b"\0") == b""


def test_a_sqlite_transaction_hands_its_dirty_pages_to_the_disk_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store file and its journal are flushed in the background during the
    transaction, not after it; an in-memory store starts no flusher."""
    import os
    import threading
    import time

    flushed: list[str] = []
    done = threading.Event()

    def recorder(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        done.set()

    if sys.platform != "linux":
        pytest.skip("sync_file_range is Linux's")
    monkeypatch.setattr(store, "sync_range", lambda: recorder)
    monkeypatch.setattr(store, "WRITEBACK_SECONDS", 0.01)
    path = tmp_path / "store.sqlite"
    engine = store.connect(f"sqlite:///{path}")
    with store.transaction(engine) as conn:
        conn.execute(store.runs.delete())
        assert done.wait(5)
    during = len(flushed)
    time.sleep(0.05)
    assert len(flushed) == during  # stopped with the transaction
    assert str(path) in flushed and str(path) + "-journal" in flushed
    engine.dispose()
    flushed.clear()
    memory = store.connect("sqlite://")
    with store.transaction(memory) as conn:
        conn.execute(store.runs.delete())
        time.sleep(0.05)
    assert flushed == []


def test_read_gives_what_sqlalchemy_gives_with_its_datetimes_parsed_by_column(
    url: str, six_people: pd.DataFrame
) -> None:
    """The driver-text path of `_read` returns the same frame as SQLAlchemy's own
    result processing: same columns, values and datetimes (NULLs included)."""
    engine = store.connect(url)
    _night(engine, "R1", T1, six_people, [["a", "b"], ["c"], ["d", "e", "f"]])
    query = sa.select(
        store.source_records.c.source,
        store.source_records.c.source_key,
        store.source_records.c.source_line,
        store.source_records.c.valid_from,
        store.golden_records.c.retired_run,
    ).join(
        store.golden_records,
        store.golden_records.c.golden_id == store.source_records.c.golden_id,
    )
    with engine.connect() as conn:
        fast = store._read(conn, query)
        result = conn.execute(query)
        slow = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    engine.dispose()
    assert len(fast) == 6
    assert fast["valid_from"].dtype == "datetime64[ns]"
    assert (fast["valid_from"] == pd.Timestamp(T1)).all()
    pd.testing.assert_frame_equal(fast, slow, check_dtype=False)


def test_stored_state_is_read_by_slices_with_its_texts_in_arrow(
    url: str, six_people: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state a full run compares itself with (cross-reference, golden records,
    evidence) is read by slices of rows, its text columns as Arrow strings: the same
    values as `_read` gives, whatever the slices, and an empty table's columns."""
    engine = store.connect(url)
    _night(engine, "R1", T1, six_people, [["a", "b"], ["c"], ["d", "e", "f"]])
    monkeypatch.setattr(store, "READ_SLICE_ROWS", 4)
    with engine.connect() as conn:
        dated = sa.select(store.source_records.c.source_key, store.source_records.c.valid_from)
        for query in (store._XREF_QUERY, store._GOLDEN_QUERY, store._EVIDENCE_QUERY, dated):
            sliced = store._read_texts(conn, query.order_by(*query.selected_columns))
            whole = store._read(conn, query.order_by(*query.selected_columns))
            texts = [c.key for c in query.selected_columns if isinstance(c.type, sa.String)]
            assert all(sliced[c].dtype == text_dtype() for c in texts)
            pd.testing.assert_frame_equal(sliced, whole, check_dtype=False)
        assert len(store._read_texts(conn, store._XREF_QUERY)) == 6
        empty = store._read_texts(conn, store._XREF_QUERY.where(sa.false()))
    engine.dispose()
    assert list(empty.columns) == ["source", "source_key", "golden_id", "record_hash"]
    assert empty.empty and empty["golden_id"].dtype == text_dtype()


def test_read_scope_gives_each_stored_record_its_golden_record_and_payload_bytes(
    url: str, six_people: pd.DataFrame
) -> None:
    engine = store.connect(url)
    _night(engine, "R1", T1, six_people, [["a", "b"], ["c"], ["d", "e", "f"]])
    keys = six_people[["source", "source_key"]].iloc[[0, 3]]
    with engine.begin() as conn:
        scope = store.read_scope(
            conn, pd.concat([keys, pd.DataFrame({"source": ["crm"], "source_key": ["none"]})])
        )
        golden = store._read(conn, store._GOLDEN_QUERY)
    engine.dispose()
    records = scope.records.sort_values("source_key").reset_index(drop=True)
    assert records[["source", "source_key"]].values.tolist() == keys.astype(str).values.tolist()
    assert all(isinstance(p, bytes) and json.loads(p) for p in records["payload"])
    expected = golden[golden["golden_id"].isin(records["golden_id"])]
    assert sorted(scope.golden["golden_id"]) == sorted(set(records["golden_id"]))
    pd.testing.assert_frame_equal(
        scope.golden.sort_values("golden_id").reset_index(drop=True),
        expected.sort_values("golden_id").reset_index(drop=True)[list(scope.golden.columns)],
        check_dtype=False,
    )


def _indexes(engine: sa.Engine, table: str) -> list[tuple[str, tuple[str, ...], bool]]:
    found = sa.inspect(engine).get_indexes(table)
    return sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in found)


def test_a_bulk_insert_into_an_empty_table_leaves_its_indexes_as_declared(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run's inserts build the secondary indexes after the rows; they end as
    the migrations made them, hold every row, and a failed write leaves them too."""
    monkeypatch.setattr(store, "BULK_INDEX_ROWS", 3)
    engine = store.connect(url)
    table = store.xref
    declared = _indexes(engine, table.name)
    assert declared  # golden_id's index
    rows = pd.DataFrame(
        {
            "source": "crm",
            "source_key": [f"K{i}" for i in range(5)],
            "valid_from": T1,
            "valid_to": None,
            "golden_id": ["G2", "G1", "G2", "G3", "G1"],
            "run_id": "R1",
            "closed_run": None,
        }
    )
    with pytest.raises(RuntimeError), store.transaction(engine) as conn:
        store._insert(conn, table, rows)
        raise RuntimeError("the run fails after the insert")
    assert _indexes(engine, table.name) == declared
    with store.transaction(engine) as conn:
        store._insert(conn, table, rows)
    assert _indexes(engine, table.name) == declared
    with engine.connect() as conn:
        g1 = conn.execute(sa.select(table.c.source_key).where(table.c.golden_id == "G1")).all()
    assert sorted(k for (k,) in g1) == ["K1", "K4"]
    # A later insert into the table, now holding rows, keeps its indexes in place.
    with store.transaction(engine) as conn:
        store._insert(conn, table, rows.assign(valid_from=T2))
    assert _indexes(engine, table.name) == declared
    engine.dispose()


def test_rows_inserted_several_to_a_statement_land_as_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite takes rows a few per INSERT (`_rows_per_statement`), the rest one by one:
    every row lands, and an upsert of a key written twice in one statement, or already
    stored, keeps the later row, as rows one by one would."""
    monkeypatch.setattr(store, "ROWS_PER_STATEMENT", 4)
    engine = store.connect(f"sqlite:///{tmp_path / 'store.sqlite'}")
    table = store.xref

    def rows(keys: list[str], golden: str) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "source": "crm",
                "source_key": keys,
                "valid_from": T1,
                "valid_to": None,
                "golden_id": [f"{golden}{i}" for i in range(len(keys))],
                "run_id": "R1",
                "closed_run": None,
            }
        )

    first = rows([f"K{i:02d}" for i in range(11)], "A")  # two statements of 4, 3 alone
    with store.transaction(engine) as conn:
        assert store._rows_per_statement(conn, len(table.columns)) == 4
        store._insert(conn, table, first)
    # K03 twice among the rows (the later wins), K00-K02 stored already.
    again = rows(["K00", "K03", "K01", "K03", "K02", "K20"], "B")
    with store.transaction(engine) as conn:
        store._insert(conn, table, again, upsert=True)
    with engine.connect() as conn:
        got = dict(conn.execute(sa.select(table.c.source_key, table.c.golden_id)).all())
    assert got == {
        **{f"K{i:02d}": f"A{i}" for i in range(11)},
        "K00": "B0",
        "K01": "B2",
        "K02": "B4",
        "K03": "B3",
        "K20": "B5",
    }
    engine.dispose()


def test_a_first_runs_evidence_is_all_fresh_as_the_general_comparison_finds_it() -> None:
    evidence = pd.DataFrame(
        {
            "left_source": ["a", "a", "b"],
            "left_key": ["1", "2", "3"],
            "right_source": ["b", "b", "b"],
            "right_key": ["9", "8", "7"],
            "rule": "email",
            "weight": [12.5, 3.25, 20.0],
            "probability": [0.99, 0.9, 0.999],
            "band": ["auto_match", "review", "auto_match"],
            "contributions": ['{"email":9.1}', '{"email":1.2}', '{"email":9.1}'],
        }
    )
    columns = list(evidence.columns)
    empty = evidence.iloc[:0]
    first = store.compare_evidence(evidence, empty)
    # The general comparison, against a store holding one other pair that goes.
    other = evidence.iloc[:1].assign(left_key="0")
    general = store.compare_evidence(evidence, other)
    assert first.gone.empty and first.changed.empty and len(general.gone) == 1
    pd.testing.assert_frame_equal(
        first.fresh[columns].sort_values("left_key").reset_index(drop=True),
        general.fresh[columns].sort_values("left_key").reset_index(drop=True),
    )


def test_the_next_chunk_is_prepared_while_this_one_is_written_and_in_order() -> None:
    """Writes come in the parts' order, each after its own preparation and by its own
    phase's write; the next part's preparation runs while a part is written, the
    first of the next phase's while the last of a phase is (the write below waits
    for it, and would time out if the two ran one after the other); never more than
    two parts are prepared and not yet written (what bounds the store stage's
    memory)."""
    import threading

    log: list[tuple[str, int]] = []
    started = {i: threading.Event() for i in range(6)}
    held = {"now": 0, "most": 0}
    lock = threading.Lock()

    def write_b(chunk: int) -> None:
        write(chunk, "b")

    def prepare(i: int) -> int:
        started[i].set()
        with lock:
            held["now"] += 1
            held["most"] = max(held["most"], held["now"])
            log.append(("prepare", i))
        return i * 10

    def write(chunk: int, phase: str = "a") -> None:
        i = chunk // 10
        if i + 1 < 6:
            assert started[i + 1].wait(timeout=10), f"part {i + 1} not prepared during a write"
        with lock:
            held["now"] -= 1
            log.append((f"write {phase}", i))

    store._overlapped(
        [(range(3), prepare, write), ([], prepare, write), (range(3, 6), prepare, write_b)]
    )
    assert [i for kind, i in log if kind.startswith("write")] == list(range(6))
    assert {kind for kind, i in log if i < 3} == {"prepare", "write a"}
    assert {kind for kind, i in log if i >= 3} == {"prepare", "write b"}
    for i in range(6):
        assert log.index(("prepare", i)) < log.index((f"write {'a' if i < 3 else 'b'}", i))
    assert held["most"] <= 2


def test_idle_steps_fill_the_wait_for_a_chunk_and_the_rest_is_left() -> None:
    """While the next part is prepared, `idle` is advanced on the writing thread: the
    preparation below waits for the third step, and would time out if no step were
    taken. Steps stop once the part is ready (each later one takes 5 ms, the part is
    ready in microseconds), the writes keep their order, and the steps left over
    stay with the caller."""
    import threading

    gate = threading.Event()
    taken: list[int] = []

    def steps() -> Iterator[None]:
        for i in range(200):
            taken.append(i)
            if i == 2:
                gate.set()
            elif i > 2:
                time.sleep(0.005)
            yield

    def prepare(i: int) -> int:
        if i == 1:
            assert gate.wait(timeout=10), "no idle step taken while the part was prepared"
        return i

    written: list[int] = []
    idle = steps()
    store._overlapped([(range(3), prepare, written.append)], idle)
    assert written == [0, 1, 2]
    before = len(taken)
    assert 3 <= before < 50
    assert len(list(idle)) == 200 - before


def test_a_run_of_idle_steps_that_ends_leaves_the_writes_to_wait() -> None:
    written: list[int] = []

    def prepare(i: int) -> int:
        time.sleep(0.02)
        return i

    store._overlapped([(range(4), prepare, written.append)], iter([None, None]))
    assert written == [0, 1, 2, 3]


def _pairs(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "left_source": "a",
            "left_key": [f"L{i:03d}" for i in range(n)],
            "right_source": "b",
            "right_key": [f"R{(i * 7) % n:03d}" for i in range(n)],
            "rule": "email",
            "weight": np.linspace(-3.5, 20.25, n),
            "probability": np.linspace(0.01, 0.999, n),
            "band": ["review" if i % 3 else "auto_match" for i in range(n)],
            "contributions": [f'{{"email":{i}.5}}' for i in range(n)],
        }
    )


def _stored_evidence(conn: sa.Connection) -> pd.DataFrame:
    table = store.match_evidence
    query = sa.select(table).order_by(*[table.c[k] for k in store.EVIDENCE_KEYS])
    return pd.DataFrame(conn.execute(query).all(), columns=[c.name for c in table.columns])


def test_evidence_written_in_steps_between_other_writes_is_the_evidence_written_at_once(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`EvidenceWrite`'s steps, taken between another table's inserts in the same
    transaction, store what `write_evidence` stores in one go: every pair, and the
    secondary indexes of a first write built once, after its last slice. The
    evidence is only made at the first step (the run lets the candidate pairs go
    then)."""
    monkeypatch.setattr(store, "EVIDENCE_STEP_ROWS", 3)
    monkeypatch.setattr(store, "BULK_INDEX_ROWS", 5)
    engine = store.connect(url)
    declared = _indexes(engine, store.match_evidence.name)
    first, second = _pairs(11), _pairs(11).iloc[2:9].assign(weight=1.0)
    expected = []
    with pytest.raises(RuntimeError), store.transaction(engine) as conn:
        for night, pairs in enumerate([first, second]):
            # The second night: 7 pairs changed, 4 gone.
            assert store.write_evidence(conn, f"R{night}", pairs) == 11
            expected.append(_stored_evidence(conn))
        raise RuntimeError("roll back: the same writes are made again in steps")
    made: list[int] = []

    def evidence(pairs: pd.DataFrame) -> pd.DataFrame:
        made.append(len(pairs))
        return pairs

    with store.transaction(engine) as conn:
        for night, pairs in enumerate([first, second]):
            write = store.EvidenceWrite(conn, f"R{night}", lambda p=pairs: evidence(p))
            assert made == [11] * night
            steps = write.steps()
            for i, _ in enumerate(steps):
                # Another table's rows between the steps, as the golden records are.
                rows = pd.DataFrame(
                    {
                        "source": "crm",
                        "source_key": f"N{night}-{i}",
                        "valid_from": T1,
                        "valid_to": None,
                        "golden_id": "G1",
                        "run_id": "R1",
                        "closed_run": None,
                    },
                    index=[0],
                )
                store._insert(conn, store.xref, rows)
            assert write.finish() == 11
            pd.testing.assert_frame_equal(_stored_evidence(conn), expected[night])
    assert _indexes(engine, store.match_evidence.name) == declared
    engine.dispose()


def test_an_error_preparing_a_later_part_is_raised_after_the_earlier_writes() -> None:
    """A preparation failing on the worker thread fails the loop with its own error,
    once the parts before it are written and with none after it written."""
    written: list[int] = []

    def prepare(i: int) -> int:
        if i == 3:
            raise RuntimeError("bad chunk")
        return i

    with pytest.raises(RuntimeError, match="bad chunk"):
        store._overlapped([(range(6), prepare, written.append)])
    assert written == [0, 1, 2]
    store._overlapped([(range(0), prepare, written.append)])
    assert written == [0, 1, 2]


@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(st.tuples(st.sampled_from(["web", "b2b"]), st.text("ab1é", max_size=3))),
    stored=st.lists(
        st.tuples(st.sampled_from(["web", "shop"]), st.text("ab1é", max_size=3)), unique=True
    ),
)
def test_each_records_stored_row_is_the_one_a_merge_on_its_key_finds(
    keys: list[tuple[str, str]], stored: list[tuple[str, str]]
) -> None:
    """Looked up in Arrow, each key's row among the stored ones (-1: none) is the row a
    left merge on source and key gives, texts or not."""
    mine = pd.DataFrame(keys, columns=["source", "source_key"], dtype=object)
    held = pd.DataFrame(stored, columns=["source", "source_key"], dtype=object)

    def merged(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
        rows = b.assign(row=np.arange(len(b)))
        return a.merge(rows, on=["source", "source_key"], how="left")["row"].fillna(-1).to_numpy()

    np.testing.assert_array_equal(store._stored_rows(mine, held), merged(mine, held))
    numbered = held.assign(source_key=np.arange(len(held)))  # not texts: merged as before
    np.testing.assert_array_equal(
        store._stored_rows(numbered.iloc[::-1], numbered), merged(numbered.iloc[::-1], numbered)
    )


@given(st.binary(max_size=60), st.integers(min_value=1, max_value=16))
def test_snapshot_rows_cut_bytes_in_numbered_parts_that_join_back(data: bytes, size: int) -> None:
    """The snapshot's and the held parts' rows: each at most the part size, numbered
    from 0, joined in order to the bytes; no bytes make one empty row."""
    original = store.SNAPSHOT_PART_BYTES
    store.SNAPSHOT_PART_BYTES = size
    try:
        rows = store._cut("held.0", data)
    finally:
        store.SNAPSHOT_PART_BYTES = original
    assert [name for name, _, _ in rows] == ["held.0"] * len(rows)
    assert [part for _, part, _ in rows] == list(range(len(rows)))
    assert b"".join(piece for _, _, piece in rows) == data
    assert all(0 < len(piece) <= size for _, _, piece in rows) or rows == [("held.0", 0, b"")]
    assert len(rows) == max(1, -(-len(data) // size))
