"""Incremental runs: only what changed is normalised and matched, and the store ends
exactly as a full run with the same model would leave it."""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.config.loader import load_settings
from mdm_pipeline.config.settings import Settings
from mdm_pipeline.golden_records import snapshot_child, store
from mdm_pipeline.golden_records.jsonrows import parse_json_lines
from mdm_pipeline.golden_records.schema import HELD_PREFIX, MATCH_COLUMNS
from mdm_pipeline.matching.engine import match, train
from mdm_pipeline.matching.keys import prepare
from mdm_pipeline.pipeline import exports, loading
from mdm_pipeline.pipeline import incremental as inc
from mdm_pipeline.pipeline import run as run_module
from mdm_pipeline.pipeline.run import Pipeline
from mdm_pipeline.sources.synthetic import generate

runner = CliRunner()
STORES = "magasins_fidelite.csv"


def _run(cfg: Path, url: str, *extra: str) -> dict:
    result = runner.invoke(
        app, ["run", "--config", str(cfg), "--json", "--debug", *extra], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def day2(folder: Path, seed: int) -> dict[str, int]:
    """Tonight's store extract: moved customers, new e-mails, leavers, new duplicates.

    Edited with the csv module: the extract holds deliberately broken rows, which
    are written back as they were (and stay in quarantine).
    """
    path = folder / STORES
    with path.open(encoding="cp1252", newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    header, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    good = [
        i for i, r in enumerate(body) if len(r) == len(header) and r[col["NUM_CARTE"]].isdigit()
    ]
    rng = np.random.default_rng(seed)
    n = len(good)
    moved = rng.choice(good, max(2, n // 20), replace=False)
    for i in moved:
        body[i][col["CP"]], body[i][col["VILLE"]] = "13001", "MARSEILLE"
    mailed = rng.choice(good, max(2, n // 50), replace=False)
    for i in mailed:
        body[i][col["EMAIL"]] = f"nouveau{body[i][col['NUM_CARTE']]}@exemple.fr"
    # New cards for known customers (to be merged), with a typo in the first name.
    twins = []
    for i in rng.choice(good, max(2, n // 50), replace=False):
        twin = list(body[i])
        twin[col["NUM_CARTE"]] = "9" + twin[col["NUM_CARTE"]][1:]
        twin[col["PRENOM"]] = twin[col["PRENOM"]][:-1] + "E"
        twins.append(twin)
    leavers = set(rng.choice(good, max(1, n // 100), replace=False).tolist())
    kept = [r for i, r in enumerate(body) if i not in leavers]
    with path.open("w", encoding="cp1252", newline="") as f:
        csv.writer(f, delimiter=";").writerows([header, *kept, *twins])
    return {"moved": len(moved), "new": len(twins), "deleted": len(leavers)}


def _labels(xref: pd.DataFrame, golden: pd.DataFrame, first_run: str) -> dict[str, str]:
    """Golden ID -> itself if the first run made it, else its members: two stores that
    made the same new golden record gave it different (random) IDs."""
    old_ids = set(golden.loc[golden["created_run"] == first_run, "golden_id"])
    members = xref.assign(m=xref["source"] + ":" + xref["source_key"]).groupby("golden_id")["m"]
    return {g: (g if g in old_ids else "NEW:" + ",".join(sorted(m))) for g, m in members}


def _returned(path: Path, url: str, settings: Settings) -> pd.DataFrame:
    """A return file's rows as the texts it holds, its golden IDs labelled (`_labels`)."""
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        spec = settings.source(path.name.removesuffix("_return.csv"))
        frame = pd.read_csv(
            path, sep=spec.delimiter, encoding=spec.encoding, dtype=str, keep_default_na=False
        )
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        xref = pd.read_sql("select source, source_key, golden_id from mdm_source_records", conn)
        golden = pd.read_sql("select golden_id, created_run from mdm_golden_records", conn)
        first_run = conn.execute(
            sa.text("select run_id from mdm_runs order by started_at limit 1")
        ).scalar()
    engine.dispose()
    label = _labels(xref, golden, first_run)
    return frame.assign(mdm_golden_id=frame["mdm_golden_id"].map(lambda g: label.get(g, g)))


def _state(url: str) -> dict[str, object]:
    """The store's current state with new golden IDs replaced by their members."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        xref = pd.read_sql(
            "select source, source_key, golden_id, record_hash, source_hash "
            "from mdm_source_records",
            conn,
        )
        golden = pd.read_sql(
            "select golden_id, status, members, attributes, survivor_id, created_run "
            "from mdm_golden_records",
            conn,
        )
        evidence = pd.read_sql(
            "select left_source, left_key, right_source, right_key, rule, band, contributions, "
            "run_id, weight from mdm_match_evidence",
            conn,
        )
        # The earliest start, not the smallest ID: two runs can share a second.
        first_run = conn.execute(
            sa.text("select run_id from mdm_runs order by started_at limit 1")
        ).scalar()
    engine.dispose()
    label = _labels(xref, golden, first_run)
    # A pair keeps the run that last changed it: the first run, or a later one.
    evidence["run_id"] = np.where(evidence["run_id"] == first_run, "first", "later")
    active = golden[golden["status"] == "active"]
    return {
        "xref": sorted(
            zip(
                xref["source"],
                xref["source_key"],
                xref["golden_id"].map(label),
                xref["record_hash"],
                # As its source sent it: a record read back keeps the stored one.
                xref["source_hash"],
                strict=True,
            )
        ),
        "golden": sorted(
            zip(
                active["golden_id"].map(label), active["members"], active["attributes"], strict=True
            )
        ),
        "retired": sorted(
            zip(
                golden.loc[golden["status"] == "retired", "golden_id"],
                golden.loc[golden["status"] == "retired", "survivor_id"].map(
                    lambda g: label.get(g, g)
                ),
                strict=True,
            )
        ),
        "evidence": sorted(
            zip(
                *[evidence[c] for c in evidence.columns[:-1]],
                evidence["weight"].round(4),
                strict=True,
            )
        ),
    }


def _snapshot(url: str) -> dict[str, pd.DataFrame]:
    engine = store.connect(url)
    snap = store.read_snapshot(engine)
    engine.dispose()
    assert snap is not None
    return snap[1]


def _by_key(snap: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """A snapshot with records sorted by key and links named by key, lines left out."""
    records = snap["records"]
    name = (records["source"] + ":" + records["source_key"]).to_numpy()
    ends = np.sort(
        np.c_[name[snap["edges"]["left"].to_numpy()], name[snap["edges"]["right"].to_numpy()]]
    )
    edges = snap["edges"].assign(left=ends[:, 0], right=ends[:, 1])
    return {
        "records": records.drop(columns="source_line")
        .sort_values(["source", "source_key"])
        .reset_index(drop=True),
        "edges": edges.sort_values(["left", "right"]).reset_index(drop=True),
    }


def _incremental_equals_full(folder: Path, tmp_path: Path, seed: int) -> dict:
    cfg = folder / "config.yaml"
    a, b = tmp_path / "incremental.sqlite", tmp_path / "full.sqlite"
    first = _run(cfg, f"sqlite:///{a}")
    assert first["model_status"] == "trained"
    # The first night reads back what the full run held of its full extracts, as
    # later nights read what the night before held, not their payloads.
    _held_is_the_payloads(a, load_settings(cfg))
    shutil.copy(a, b)
    edits = day2(folder, seed)
    inc = _run(cfg, f"sqlite:///{a}", "--incremental")
    nightly = tmp_path / "night_out"
    shutil.copytree(folder / "out", nightly)
    full = _run(cfg, f"sqlite:///{b}")
    assert inc["mode"] == "incremental" and full["mode"] == "full"
    _held_is_the_payloads(b, load_settings(cfg))  # a second full run's, not the first's
    assert full["model_status"] == "reused"
    assert inc["records_deleted"] == edits["deleted"]
    assert 0 < inc["records_changed"] < sum(s["records"] for s in inc["sources"]) / 4
    got, want = _state(f"sqlite:///{a}"), _state(f"sqlite:///{b}")
    for part in ("xref", "golden", "retired", "evidence"):
        assert got[part] == want[part], part
    # The night's return files (full extracts, leavers among them) are the full run's.
    settings = load_settings(cfg)
    assert len(inc["exports"]) == len(settings.sources)
    for path in inc["exports"]:
        name = Path(path).name
        pd.testing.assert_frame_equal(
            _returned(nightly / name, f"sqlite:///{a}", settings),
            _returned(folder / "out" / name, f"sqlite:///{b}", settings),
            obj=name,
        )
    # The snapshot the next incremental run starts from is the one a full run leaves.
    got_snap, want_snap = _snapshot(f"sqlite:///{a}"), _snapshot(f"sqlite:///{b}")
    for name in ("records", "edges"):
        pd.testing.assert_frame_equal(got_snap[name], want_snap[name])
    assert inc["merges"] == full["merges"] and inc["splits"] == full["splits"]
    # The new cards joined known customers rather than making golden records of their own.
    xref = pd.read_sql(
        "select source_key, golden_id from mdm_source_records where source = 'stores'",
        sa.create_engine(f"sqlite:///{a}"),
    )
    gid = xref.set_index("source_key")["golden_id"]
    twins = [k for k in gid.index if k.startswith("9")]
    assert twins and any((gid == gid[k]).sum() > 1 for k in twins)
    # What the night left for the next one to read back of its full extracts is what
    # it would read of the payloads.
    _held_is_the_payloads(a, settings)
    # A rerun of the incremental mode on unchanged input changes nothing; it reads the
    # stored rows of its full extracts from the held parts, and returns the same files.
    again = _run(cfg, f"sqlite:///{a}", "--incremental")
    assert again["records_changed"] == again["records_deleted"] == 0
    assert again["golden_created"] == again["golden_updated"] == again["golden_retired"] == 0
    assert _state(f"sqlite:///{a}") == got
    for path in inc["exports"]:
        name = Path(path).name
        pd.testing.assert_frame_equal(
            _returned(folder / "out" / name, f"sqlite:///{a}", settings),
            _returned(nightly / name, f"sqlite:///{a}", settings),
            obj=f"{name}, again",
        )
    _held_is_the_payloads(a, settings)
    return inc


def _held_is_the_payloads(db: Path, settings: Settings) -> None:
    """The held parts in store `db` hold what `store.read_returns` reads of its full
    extracts' sources from their payloads, row for row."""
    whole = [s.name for s in settings.sources if s.delta is None]
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        held = store.read_held(conn, exports.RETURN_FIELDS, whole)
    engine.dispose()
    assert sorted(held) == sorted(whole)
    # The same store without them: read from the payloads.
    bare = db.with_name("without-held.sqlite")
    shutil.copy(db, bare)
    engine = sa.create_engine(f"sqlite:///{bare}")
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM mdm_snapshot WHERE name LIKE 'held.%'"))
    with engine.connect() as conn:
        assert store.read_held(conn, exports.RETURN_FIELDS, whole) == {}
        want, _ = store.read_returns(conn, exports.RETURN_FIELDS, whole=whole)
    engine.dispose()
    # Held parts a later run did not write (it returned no files) are not read, nor
    # are they part of the snapshot.
    later = db.with_name("later-run.sqlite")
    shutil.copy(db, later)
    engine = sa.create_engine(f"sqlite:///{later}")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO mdm_runs (run_id, started_at, finished_at, status, config_hash,"
                " manifest) VALUES ('later', '2999-01-01', '2999-01-01', 'succeeded', '', '{}')"
            )
        )
    with engine.connect() as conn:
        assert store.read_held(conn, exports.RETURN_FIELDS, whole) == {}
    engine.dispose()
    engine = sa.create_engine(f"sqlite:///{db}")
    found = store.snapshot_tables(engine)
    engine.dispose()
    assert found is not None and not any(n.startswith(HELD_PREFIX) for n in found[1])
    assert snapshot_child.HELD_PREFIX == HELD_PREFIX
    _same_rows(held, want)


def _same_rows(held: dict[str, pa.Table], want: pa.Table) -> None:
    """The held parts' rows (`store.read_held`) are `want`'s, read from the payloads."""
    order = [("source", "ascending"), ("source_key", "ascending")]
    got = pa.concat_tables(list(held.values())).sort_by(order)
    want = want.sort_by(order)
    assert got.num_rows == want.num_rows > 0
    for name in want.column_names:
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name


def test_incremental_run_equals_a_full_run_on_the_samples(samples: Path, tmp_path: Path) -> None:
    _incremental_equals_full(samples, tmp_path, seed=1)


def test_incremental_run_equals_a_full_run_on_a_generated_day_2(tmp_path: Path) -> None:
    folder = tmp_path / "gen"
    generate(folder, 6000, seed=7)
    inc = _incremental_equals_full(folder, tmp_path, seed=2)
    assert inc["records_reclustered"] < sum(s["records"] for s in inc["sources"])


def _snapshot_parts(url: str) -> dict[str, bytes]:
    """The stored snapshot's Parquet files by name (parts joined)."""
    engine = sa.create_engine(url)
    snap = store.snapshot.c
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(snap.name, snap.data)
            .where(~snap.name.startswith(HELD_PREFIX))  # not the snapshot (returns' rows)
            .order_by(snap.name, snap.part)
        ).all()
    engine.dispose()
    out: dict[str, bytes] = {}
    for name, data in rows:
        out[name] = out.get(name, b"") + bytes(data)
    return out


@pytest.mark.parametrize("share", [0.0, 10.0])
def test_nights_in_a_row_equal_full_runs_whether_the_snapshot_is_patched_or_rewritten(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: float
) -> None:
    """A night appends its changed records to the snapshot's patch and keeps the base,
    or (patch beyond PATCH_SHARE of the base) writes the snapshot whole: either way,
    night after night, the store and the snapshot are those a full run leaves."""
    monkeypatch.setattr(inc, "PATCH_SHARE", share)
    cfg = samples / "config.yaml"
    a, b = tmp_path / "incremental.sqlite", tmp_path / "full.sqlite"
    _run(cfg, f"sqlite:///{a}")
    for night, seed in enumerate((1, 2, 3)):
        shutil.copy(a, b)
        day2(samples, seed)
        assert _run(cfg, f"sqlite:///{a}", "--incremental")["records_changed"] > 0
        _run(cfg, f"sqlite:///{b}")
        assert _state(f"sqlite:///{a}") == _state(f"sqlite:///{b}"), night
        got_snap, want_snap = _snapshot(f"sqlite:///{a}"), _snapshot(f"sqlite:///{b}")
        for name in ("records", "edges"):
            pd.testing.assert_frame_equal(got_snap[name], want_snap[name], obj=name)
        parts = _snapshot_parts(f"sqlite:///{a}")
        if share:  # the base of the first full run, and every night's changed records
            assert set(parts) == {"records", "patch", "live", "edges"}
            assert len(pd.read_parquet(io.BytesIO(parts["patch"]))) >= (night + 1) * 2
        else:
            assert set(parts) == {"records", "edges"}


def test_incremental_without_a_model_says_to_run_a_full_run_first(
    samples: Path, tmp_path: Path
) -> None:
    result = runner.invoke(
        app,
        ["run", "--config", str(samples / "config.yaml"), "--incremental"],
        env={"MDM_STORE_URL": f"sqlite:///{tmp_path / 'empty.sqlite'}"},
    )
    assert result.exit_code == 1
    assert "run `mdm run` without --incremental first" in result.stderr


@pytest.mark.parametrize("flags", [["--incremental", "--retrain"]])
def test_incremental_and_retrain_do_not_combine(samples: Path, flags: list[str]) -> None:
    result = runner.invoke(app, ["run", "--config", str(samples / "config.yaml"), *flags])
    assert result.exit_code == 2


def _rows(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    with path.open(encoding="cp1252", newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    header = rows[0]
    keyed = {r[0]: r for r in rows[1:] if len(r) == len(header) and r[0].isdigit()}
    return header, keyed


def test_a_delta_extract_gives_the_store_a_full_run_gives(samples: Path, tmp_path: Path) -> None:
    """The unit sends only its changes (upserts and deletions, an OP column)."""
    cfg = samples / "config.yaml"
    a, b = tmp_path / "delta.sqlite", tmp_path / "full.sqlite"
    _run(cfg, f"sqlite:///{a}")
    shutil.copy(a, b)
    header, before = _rows(samples / STORES)
    day2(samples, seed=3)
    _, after = _rows(samples / STORES)
    upserts = [r for k, r in after.items() if before.get(k) != r]
    deletions = [[k] + [""] * (len(header) - 1) for k in before if k not in after]
    with (samples / "magasins_delta.csv").open("w", encoding="cp1252", newline="") as f:
        out = csv.writer(f, delimiter=";")
        out.writerow([*header, "OP"])
        out.writerows([*[[*r, "U"] for r in upserts], *[[*r, "D"] for r in deletions]])
    full = _run(cfg, f"sqlite:///{b}")
    full_files = tmp_path / "full_out"
    shutil.copytree(samples / "out", full_files)
    shutil.rmtree(samples / "out")
    text = cfg.read_text().replace("path: magasins_fidelite.csv", "path: magasins_delta.csv")
    text = text.replace(
        "path: magasins_delta.csv", "path: magasins_delta.csv\n    delta: {operation_column: OP}"
    )
    cfg.write_text(text)
    inc = _run(cfg, f"sqlite:///{a}", "--incremental")
    stores_counts = next(s for s in inc["sources"] if s["name"] == "stores")
    assert stores_counts["rows_read"] == len(upserts) + len(deletions)
    assert inc["records_deleted"] == len(deletions) > 0
    got, want = _state(f"sqlite:///{a}"), _state(f"sqlite:///{b}")
    for part in ("xref", "golden", "retired", "evidence"):
        assert got[part] == want[part], part
    # The snapshot is the one a full run leaves (by key: a delta file's lines are not the
    # full file's).
    got_snap, want_snap = _snapshot(f"sqlite:///{a}"), _snapshot(f"sqlite:///{b}")
    for name in ("records", "edges"):
        pd.testing.assert_frame_equal(_by_key(got_snap)[name], _by_key(want_snap)[name])
    assert (inc["merges"], inc["splits"]) == (full["merges"], full["splits"])
    # Each unit gets tonight's file back: a full extract's is the file a full run writes
    # (the same texts, the Parquet file's schema too; new golden records by members),
    # the delta's holds its upserts, each with what the full run's file says of that key,
    # and its duplicates among all the unit's records.
    assert sorted(Path(p).name for p in inc["exports"]) == sorted(
        p.name for p in full_files.glob("*_return.*")
    )
    settings = load_settings(cfg)
    for name in ("ecommerce_return.csv", "callcentre_return.csv", "b2b_return.parquet"):
        pd.testing.assert_frame_equal(
            _returned(samples / "out" / name, f"sqlite:///{a}", settings),
            _returned(full_files / name, f"sqlite:///{b}", settings),
        )
    assert pq.read_schema(samples / "out" / "b2b_return.parquet").equals(
        pq.read_schema(full_files / "b2b_return.parquet"), check_metadata=True
    )
    got_back = _returned(samples / "out" / "stores_return.csv", f"sqlite:///{a}", settings)
    want_back = _returned(full_files / "stores_return.csv", f"sqlite:///{b}", settings)
    assert got_back["NUM_CARTE"].tolist() == [r[0] for r in upserts]
    added = [c for c in want_back.columns if c.startswith("mdm_")]
    assert "mdm_bu_duplicates" in added and (got_back["mdm_bu_duplicates"] != "").any()
    pd.testing.assert_frame_equal(
        got_back.set_index("NUM_CARTE")[added],
        want_back.set_index("NUM_CARTE").loc[got_back["NUM_CARTE"], added],
    )
    # Once loaded, a delta source cannot be read by a full run (it would delete the rest).
    refused = runner.invoke(
        app, ["run", "--config", str(cfg)], env={"MDM_STORE_URL": f"sqlite:///{a}"}
    )
    assert refused.exit_code == 2
    assert "delivers changes only (delta)" in refused.stderr


def test_a_deletion_without_a_key_is_quarantined_not_lost(samples: Path, tmp_path: Path) -> None:
    from mdm_pipeline.config.loader import load_settings
    from mdm_pipeline.sources import load_source

    header, rows = _rows(samples / STORES)
    first = next(iter(rows.values()))
    with (samples / "magasins_delta.csv").open("w", encoding="cp1252", newline="") as f:
        out = csv.writer(f, delimiter=";")
        out.writerow([*header, "OP"])
        out.writerow([*first, "D"])
        out.writerow(["", *first[1:], "D"])
        out.writerow([*first[:1], *first[1:], "U"])
    cfg = samples / "config.yaml"
    text = cfg.read_text().replace("path: magasins_fidelite.csv", "path: magasins_delta.csv")
    cfg.write_text(
        text.replace(
            "path: magasins_delta.csv",
            "path: magasins_delta.csv\n    delta: {operation_column: OP}",
        )
    )
    settings = load_settings(cfg)
    mapped = load_source(settings.source("stores"), settings, pd.Timestamp("2026-11-22"))
    assert mapped.deleted.tolist() == [first[0]]
    assert len(mapped.records) == 1 and len(mapped.quarantine) == 1
    assert mapped.rows_read == len(mapped.records) + len(mapped.quarantine) + len(mapped.deleted)
    assert "source_key" in mapped.quarantine["reason"].iloc[0]


def _copy_schema(url: str, target: str) -> str:
    """A copy of a PostgreSQL store in a new schema (tables, keys, defaults, rows)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        source = conn.execute(sa.text("select current_schema()")).scalar_one()
        conn.execute(sa.text(f'CREATE SCHEMA "{target}"'))
        for (table,) in conn.execute(
            sa.text("select tablename from pg_tables where schemaname = :s"), {"s": source}
        ):
            conn.execute(
                sa.text(
                    f'CREATE TABLE "{target}"."{table}" (LIKE "{source}"."{table}" INCLUDING ALL)'
                )
            )
            conn.execute(
                sa.text(f'INSERT INTO "{target}"."{table}" SELECT * FROM "{source}"."{table}"')
            )
    engine.dispose()
    return url.split("?")[0] + f"?options=-csearch_path%3D{target}"


def test_incremental_run_equals_a_full_run_on_postgresql(samples: Path, pg_url: str) -> None:
    """The same comparison on CI's PostgreSQL server (COPY writes, dated history)."""
    import uuid

    cfg = samples / "config.yaml"
    assert _run(cfg, pg_url)["model_status"] == "trained"
    # The full run held what the first night reads back of its full extracts: the
    # payloads' fields (read with the held parts deleted, then rolled back).
    whole = [s.name for s in load_settings(cfg).sources if s.delta is None]
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        held = store.read_held(conn, exports.RETURN_FIELDS, whole)
        assert sorted(held) == sorted(whole)
        conn.execute(sa.text("DELETE FROM mdm_snapshot WHERE name LIKE 'held.%'"))
        _same_rows(held, store.read_returns(conn, exports.RETURN_FIELDS, whole=whole)[0])
        conn.rollback()
    engine.dispose()
    other = f"mdm_test_{uuid.uuid4().hex[:10]}"
    full_url = _copy_schema(pg_url, other)
    try:
        day2(samples, seed=1)
        inc = _run(cfg, pg_url, "--incremental")
        nightly = samples.parent / "night_out"
        shutil.copytree(samples / "out", nightly)
        full = _run(cfg, full_url)
        assert full["model_status"] == "reused"
        assert inc["records_changed"] > 0
        got, want = _state(pg_url), _state(full_url)
        for part in ("xref", "golden", "retired", "evidence"):
            assert got[part] == want[part], part
        # The night's return files (read from the store in this process here) too.
        settings = load_settings(cfg)
        assert len(inc["exports"]) == 4
        for path in inc["exports"]:
            name = Path(path).name
            pd.testing.assert_frame_equal(
                _returned(nightly / name, pg_url, settings),
                _returned(samples / "out" / name, full_url, settings),
                obj=name,
            )
        # A second night reads the full extracts' stored rows from the held parts the
        # first left (bytea here), and returns the same files.
        again = _run(cfg, pg_url, "--incremental")
        assert again["records_changed"] == again["golden_updated"] == 0
        for path in inc["exports"]:
            name = Path(path).name
            pd.testing.assert_frame_equal(
                _returned(samples / "out" / name, pg_url, settings),
                _returned(nightly / name, pg_url, settings),
                obj=f"{name}, again",
            )
    finally:
        engine = sa.create_engine(pg_url)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{other}" CASCADE'))
        engine.dispose()


def test_incremental_without_a_snapshot_says_to_run_a_full_run_first(
    samples: Path, tmp_path: Path
) -> None:
    """A store upgraded from a release without snapshots has none until a full run."""
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _run(samples / "config.yaml", url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("delete from mdm_snapshot"))
    engine.dispose()
    result = runner.invoke(
        app,
        ["run", "--config", str(samples / "config.yaml"), "--incremental"],
        env={"MDM_STORE_URL": url},
    )
    assert result.exit_code == 1
    assert "snapshot" in result.stderr and "without --incremental first" in result.stderr


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matching_the_blocks_of_changed_records_gives_the_pairs_of_matching_everyone(
    samples: Path, seed: int
) -> None:
    """The blocks an incremental run matches are taken whole: the same pairs, rules and
    scores as matching every record with only the changed ones asked for."""
    pipeline = Pipeline.from_config(samples / "config.yaml")
    records = pipeline.normalised_records()[list(MATCH_COLUMNS)]
    settings = pipeline.settings.matching
    model = train(prepare(records), settings)
    rng = np.random.default_rng(seed)
    changed = rng.random(len(records)) < 0.05
    old = records.iloc[rng.choice(len(records), 10, replace=False)]
    rules = settings.blocking.rules
    rematch, reach = inc.blocks_to_rematch(
        inc.block_keys(records.reset_index(drop=True), rules),
        inc.block_keys(old.reset_index(drop=True), rules),
        changed,
        settings,
    )
    assert (rematch >= changed).all() and (reach >= rematch).all() and not reach.all()
    everyone = match(records, settings, model, only=rematch).pairs
    part = np.flatnonzero(reach)
    subset = match(records.iloc[part].reset_index(drop=True), settings, model, only=rematch[part])
    got = subset.pairs.assign(
        left=part[subset.pairs["left"].to_numpy()], right=part[subset.pairs["right"].to_numpy()]
    )
    pd.testing.assert_frame_equal(got, everyone)


def _rematch_by_counting(
    now: list[list[int]], old: list[list[int]], changed: list[bool], cap: int
) -> tuple[list[bool], list[bool]]:
    """`blocks_to_rematch` spelled out record by record: every block counted."""
    rematch = list(changed)
    for keys_now, keys_old in zip(now, old, strict=True):
        tonight = Counter(k for k in keys_now if k)
        last = Counter(k for k, c in zip(keys_now, changed, strict=True) if k and not c)
        last.update(k for k in keys_old if k)
        for i, k in enumerate(keys_now):
            if k and (tonight[k] > cap) != (last[k] > cap):
                rematch[i] = True
    reach = list(rematch)
    for keys_now in now:
        hit = {k for k, r in zip(keys_now, rematch, strict=True) if r and k}
        reach = [r or k in hit for r, k in zip(reach, keys_now, strict=True)]
    return rematch, reach


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.lists(st.integers(0, 6), min_size=n, max_size=n), min_size=1, max_size=3),
            st.lists(st.booleans(), min_size=n, max_size=n),
            st.integers(0, 8),
            st.integers(1, 4),
        )
    ),
    st.data(),
)
def test_blocks_to_rematch_counts_as_every_block_would(case: tuple, data: st.DataObject) -> None:
    """Only the blocks changed records joined or left are counted: the same records to
    match again and reach as counting every block (key 0: no key under the rule)."""
    now, changed, n_old, cap = case
    old = [data.draw(st.lists(st.integers(0, 6), min_size=n_old, max_size=n_old)) for _ in now]
    rematch, reach = inc.blocks_to_rematch(
        [np.array(k, dtype=np.int64) for k in now],
        [np.array(k, dtype=np.int64) for k in old],
        np.array(changed, dtype=bool),
        SimpleNamespace(blocking=SimpleNamespace(max_block_size=cap)),  # type: ignore[arg-type]
    )
    want_rematch, want_reach = _rematch_by_counting(now, old, changed, cap)
    assert rematch.tolist() == want_rematch
    assert reach.tolist() == want_reach


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=20, unique=True),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 19), st.integers(0, 2**20)), max_size=300),
)
def test_block_keys_are_found_among_the_moved_blocks_as_a_hash_lookup_finds_them(
    blocks: list[int], draws: list[tuple[int, int, int]]
) -> None:
    """The sieve by top bits finds each key's block as `get_indexer` does: members,
    keys sharing a member's top bits but not its value, no key (0), any other."""
    lookup = pd.Index(np.array(blocks, dtype=np.int64))
    keys = []
    for kind, i, low in draws:
        member = blocks[i % len(blocks)]
        near = (member & ~((1 << 20) - 1)) | low  # the same top bits
        keys.append([member, near, 0, low * 7919 - 2**40][kind])
    keys += blocks * 8  # enough keys for the sieve to be used
    keys_array = np.array(keys, dtype=np.int64)
    want = lookup.get_indexer(keys_array)
    assert inc._positions(lookup, keys_array).tolist() == want.tolist()


def test_a_new_return_for_an_unchanged_record_re_chooses_its_golden_record(
    samples: Path, tmp_path: Path
) -> None:
    """La Poste returns mail for a customer whose record did not change: the record is
    not matched again, but its golden record is chosen again as a full run would."""
    cfg = samples / "config.yaml"
    a, b = tmp_path / "incremental.sqlite", tmp_path / "full.sqlite"
    _run(cfg, f"sqlite:///{a}")
    shutil.copy(a, b)
    returns = samples / "laposte_retours_npai.csv"
    encoding = "utf-8"
    flagged = {line.split(";")[1] for line in returns.read_text(encoding).splitlines()[1:]}
    _, stores = _rows(samples / STORES)
    fresh = sorted(k for k in stores if k not in flagged)[:5]
    with returns.open("a", encoding=encoding) as f:
        for key in fresh:
            f.write(f"stores;{key};03/03/2026;Destinataire inconnu à l'adresse\n")
    inc = _run(cfg, f"sqlite:///{a}", "--incremental")
    full = _run(cfg, f"sqlite:///{b}")
    assert inc["records_changed"] == 0 and inc["npai_flags_new"] == full["npai_flags_new"] == 5
    assert inc["records_reclustered"] >= 5
    got, want = _state(f"sqlite:///{a}"), _state(f"sqlite:///{b}")
    for part in ("xref", "golden", "retired", "evidence"):
        assert got[part] == want[part], part
    got_snap, want_snap = _snapshot(f"sqlite:///{a}"), _snapshot(f"sqlite:///{b}")
    pd.testing.assert_frame_equal(got_snap["records"], want_snap["records"])


def test_a_snapshot_without_block_keys_gives_the_same_incremental_run(
    samples: Path, tmp_path: Path
) -> None:
    """A store whose snapshot predates the kept block keys (or was written under other
    blocking rules) computes every record's keys once: same result, and the next
    snapshot carries them."""
    cfg = samples / "config.yaml"
    a, b = tmp_path / "with.sqlite", tmp_path / "without.sqlite"
    _run(cfg, f"sqlite:///{a}")
    shutil.copy(a, b)
    engine = sa.create_engine(f"sqlite:///{b}")
    with engine.begin() as conn:
        stored = store.read_snapshot(engine)
        assert stored is not None
        records = stored[2]["records"]
        assert any(c.startswith("block_") for c in records.column_names)
        store.write_snapshot(
            conn,
            stored[0],
            {
                "records": records.take(np.arange(len(records)), inc.SNAPSHOT_COLUMNS),
                "edges": stored[1]["edges"],
            },
        )
    engine.dispose()
    day2(samples, seed=5)
    _run(cfg, f"sqlite:///{a}", "--incremental")
    _run(cfg, f"sqlite:///{b}", "--incremental")
    assert _state(f"sqlite:///{a}") == _state(f"sqlite:///{b}")
    engine = sa.create_engine(f"sqlite:///{b}")
    again = store.read_snapshot(engine)
    engine.dispose()
    assert again is not None
    names = [
        inc.block_column(r) for r in Pipeline.from_config(cfg).settings.matching.blocking.rules
    ]
    assert set(names) <= set(again[2]["records"].column_names)


@pytest.mark.parametrize("seed", [1, 2])
def test_match_view_from_the_snapshot_and_the_changed_records_is_the_pandas_view(
    samples: Path, seed: int
) -> None:
    """The matching view an incremental run assembles (unchanged rows taken from the
    snapshot's Arrow table, changed rows from tonight's frame) holds value for value,
    and type for type, the frame a full run matches (Arrow-backed texts, missing as
    missing), for any rows asked, in their order; and the block keys of both agree."""
    records = Pipeline.from_config(samples / "config.yaml").normalised_records()
    view = records[list(MATCH_COLUMNS)].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    changed = rng.random(len(view)) < 0.2
    # The snapshot holds the unchanged records in another order; -1 marks a changed one.
    kept = np.flatnonzero(~changed)
    shuffled = rng.permutation(kept)
    stored = store.StoredRecords.whole(
        pa.Table.from_pandas(view.iloc[shuffled], preserve_index=False)
    )
    stored_pos = np.full(len(view), -1, dtype=np.int64)
    stored_pos[shuffled] = np.arange(len(shuffled))
    changed_rows = view[changed].reset_index(drop=True)
    rows = rng.choice(len(view), len(view) // 3, replace=False)
    got = inc.match_view(stored, changed_rows, stored_pos, rows)
    want = view.iloc[rows].reset_index(drop=True)
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    assert got.dtypes.to_dict() == want.dtypes.to_dict()
    for c in want.columns:
        assert (got[c].isna() == want[c].isna()).all(), c
        here = want[c].notna()
        assert got.loc[here, c].tolist() == want.loc[here, c].tolist(), c
    # A snapshot without block keys: every record keyed from the same view.
    keys_now, keys_old = inc.current_block_keys(
        stored, changed_rows, stored_pos, np.array([0, 3]), settings_rules := _rules(samples)
    )
    expected = inc.block_keys(view, settings_rules)
    for got_keys, want in zip(keys_now, expected, strict=True):
        np.testing.assert_array_equal(got_keys, want)
    old = inc.block_keys(view.iloc[shuffled[[0, 3]]].reset_index(drop=True), settings_rules)
    for got_keys, want in zip(keys_old, old, strict=True):
        np.testing.assert_array_equal(got_keys, want)


def _rules(samples: Path) -> list:
    return Pipeline.from_config(samples / "config.yaml").settings.matching.blocking.rules


def _stored_with_a_day_2(
    samples: Path, tmp_path: Path, dump_store, seed: int
) -> tuple[Path, str, dict[str, pd.DataFrame]]:
    """A full run into a fresh SQLite store, the store's tables as it left them, then a
    day-2 change of the samples: (config, store URL, tables)."""
    cfg = samples / "config.yaml"
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _run(cfg, url)
    before = dump_store(url)
    day2(samples, seed=seed)
    return cfg, url, before


def _fails_leaving_the_store_as_it_was(
    cfg: Path, url: str, before: dict[str, pd.DataFrame], dump_store
) -> None:
    """An incremental run fails with its internal error, and every table is as before."""
    result = runner.invoke(
        app, ["run", "--config", str(cfg), "--incremental"], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 1
    assert "internal error (RuntimeError" in result.stderr
    after = dump_store(url)
    for name, frame in before.items():
        pd.testing.assert_frame_equal(after[name], frame, obj=name)


def test_a_failure_building_the_next_snapshot_leaves_the_store_unchanged(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dump_store
) -> None:
    """The next snapshot is built on a second thread while the store is written: if
    that fails, the run fails with its error and rolls everything back."""
    cfg, url, before = _stored_with_a_day_2(samples, tmp_path, dump_store, seed=4)
    calls = {"n": 0}

    def failing(frames: dict, keep_base: bool = False) -> store.SnapshotParts:
        calls["n"] += 1
        raise RuntimeError("out of memory")

    monkeypatch.setattr(store, "serialise_snapshot", failing)
    _fails_leaving_the_store_as_it_was(cfg, url, before, dump_store)
    assert calls["n"] == 1
    monkeypatch.undo()
    assert _run(cfg, url, "--incremental")["mode"] == "incremental"


@pytest.mark.parametrize(
    "table",
    [
        "mdm_match_evidence",
        "mdm_golden_records",
        "mdm_golden_history",
        "mdm_source_records",
        "mdm_xref",
        "survive",
    ],
)
def test_an_incremental_run_failing_mid_write_or_in_survivorship_leaves_the_store_unchanged(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dump_store, table: str
) -> None:
    """An incremental run's transaction opens before survivorship (which reads the
    stored state inside it) and upserts records on SQLite: a failure while writing
    any table, or in survivorship (on its own thread while the match evidence is
    written), fails the run with its error and rolls back all."""
    cfg, url, before = _stored_with_a_day_2(samples, tmp_path, dump_store, seed=5)
    calls = {"writes": 0, "stored": 0}
    # Every insert, whole or a step at a time, goes through `_inserting`.
    real_inserting, real_survive = store._inserting, run_module.survive
    real_archive = store._archive_versions

    def failing_inserting(conn, target, frame, *args, **options):
        calls["writes"] += 1
        # Rows written to the store's own tables, not to a temporary table of keys.
        calls["stored"] += not target.name.startswith("mdm_tmp") and len(frame) > 0
        yield from real_inserting(conn, target, frame, *args, **options)
        if target.name == table and len(frame):
            raise RuntimeError("disk full")

    def failing_survive(*args, **kwargs):
        raise RuntimeError("bad rule")

    def failing_archive(conn, keys, at, run_id):
        calls["writes"] += 1
        real_archive(conn, keys, at, run_id)
        if len(keys):
            raise RuntimeError("disk full")

    monkeypatch.setattr(store, "_inserting", failing_inserting)
    if table == "mdm_golden_history":  # closed versions are copied by INSERT ... SELECT
        monkeypatch.setattr(store, "_archive_versions", failing_archive)
    if table == "survive":
        monkeypatch.setattr(run_module, "survive", failing_survive)
    _fails_leaving_the_store_as_it_was(cfg, url, before, dump_store)
    if table == "survive":
        # Collected once the match evidence's changes are written: rolled back too.
        assert calls["stored"] >= 1
    else:
        assert calls["writes"] >= 2  # it failed after other writes, inside the transaction
    monkeypatch.undo()
    assert real_survive is run_module.survive
    assert _run(cfg, url, "--incremental")["mode"] == "incremental"


def test_a_night_set_not_to_return_files_leaves_the_previous_ones(
    samples: Path, tmp_path: Path, dump_store
) -> None:
    """`export.incremental: false`: the night writes no file (the full run's stay), and
    the store ends as with them."""
    cfg, url, _ = _stored_with_a_day_2(samples, tmp_path, dump_store, seed=7)
    out = samples / "out"
    previous = {p.name: p.read_bytes() for p in out.glob("*_return.*")}
    other = tmp_path / "other.sqlite"
    shutil.copy(tmp_path / "store.sqlite", other)
    with_files = _run(cfg, f"sqlite:///{other}", "--incremental")
    assert len(with_files["exports"]) == 4
    for path in out.glob("*_return.*"):  # the full run's files back in place
        path.write_bytes(previous[path.name])
    cfg.write_text(cfg.read_text().replace("  dir: out", "  dir: out\n  incremental: false", 1))
    night = _run(cfg, url, "--incremental")
    assert night["exports"] == [] and night["records_changed"] > 0
    assert {p.name: p.read_bytes() for p in out.glob("*_return.*")} == previous
    assert _state(url) == _state(f"sqlite:///{other}")


def test_a_night_failing_on_its_return_files_leaves_store_and_files_as_they_were(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dump_store
) -> None:
    """A night writes its return files after the store's writes, inside the run's
    transaction, into a staging folder: a failure on the last one rolls the store
    back and the previous night's files stay (none half-replaced); the next night
    replaces them all."""
    cfg, url, before = _stored_with_a_day_2(samples, tmp_path, dump_store, seed=6)
    out = samples / "out"
    previous = {p.name: p.read_bytes() for p in out.glob("*_return.*")}
    assert len(previous) == 4
    real_write_back = exports.write_back
    written: list[str] = []

    def failing_write_back(spec, raw, added, out_dir):
        written.append(spec.name)
        if len(written) == 4:
            raise RuntimeError("disk full")
        return real_write_back(spec, raw, added, out_dir)

    monkeypatch.setattr(exports, "write_back", failing_write_back)
    _fails_leaving_the_store_as_it_was(cfg, url, before, dump_store)
    assert len(written) == 4
    assert {p.name: p.read_bytes() for p in out.glob("*_return.*")} == previous
    assert not list(out.parent.glob(".mdm-export-*"))  # the staging folder is gone
    monkeypatch.undo()
    night = _run(cfg, url, "--incremental")
    assert sorted(Path(p).name for p in night["exports"]) == sorted(previous)
    # Tonight's stores file holds tonight's extract (moved customers among them).
    assert (out / "stores_return.csv").read_bytes() != previous["stores_return.csv"]


def test_json_lines_keep_timestamp_looking_text_as_text() -> None:
    """Arrow reads "2026-04-23" as a timestamp: such columns come back as the text the
    payload holds, the others with Arrow's types, missing values as missing."""
    lines = [
        '{"npai_date":"2026-04-23","raw":"2025-08-15T21:00:00","n":1,"name":"Zoé"}',
        '{"npai_date":null,"raw":"2024-01-02T03:04:05","n":2,"name":null}',
    ]
    frame = parse_json_lines("\n".join(lines))
    assert list(frame.columns) == ["npai_date", "raw", "n", "name"]
    assert frame["npai_date"].tolist()[0] == "2026-04-23" and pd.isna(frame["npai_date"][1])
    assert frame["raw"].tolist() == ["2025-08-15T21:00:00", "2024-01-02T03:04:05"]
    assert frame["n"].tolist() == [1, 2] and frame["name"].tolist()[0] == "Zoé"


def test_a_run_collects_garbage_less_often_and_restores_the_collector_after(
    samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    before = gc.get_threshold()
    during: list[tuple[int, int, int]] = []
    pipeline = Pipeline.from_config(samples / "config.yaml")
    pipeline.run(on_event=lambda *_: during.append(gc.get_threshold()))
    assert during and set(during) == {run_module.BATCH_GC_THRESHOLDS}
    assert gc.get_threshold() == before
    # A run failing half-way restores it too.
    seen: list[tuple[int, int, int]] = []

    def failing_survive(*_: object, **__: object) -> None:
        seen.append(gc.get_threshold())
        raise RuntimeError("forced failure in survivorship")

    monkeypatch.setattr(run_module, "survive", failing_survive)
    with pytest.raises(RuntimeError, match="forced failure"):
        pipeline.run()
    assert seen == [run_module.BATCH_GC_THRESHOLDS]
    assert gc.get_threshold() == before


def _stored_payloads(*payloads: str) -> pd.DataFrame:
    """Stored records of source "s", keys "2", "3"... (lines 2, 3...), with these payloads."""
    n = range(2, 2 + len(payloads))
    return pd.DataFrame(
        {
            "source": "s",
            "source_key": [str(i) for i in n],
            "source_line": list(n),
            "payload": payloads,
        }
    )


def test_restored_records_take_tonights_types_and_stack_without_conversion() -> None:
    """Payloads read back get the dtypes of tonight's normalised records (Arrow texts,
    nullable booleans, a column no payload has a value in), so that the two stack
    as they are, with the values pd.concat gives."""
    text = pd.StringDtype("pyarrow", na_value=np.nan)
    tonight = pd.DataFrame(
        {
            "source": ["s"],
            "source_key": ["1"],
            "source_line": [1],
            "first_name_norm": pd.array(["JEAN"], dtype=text),
            "siren_norm": pd.array([None], dtype=text),
            "email_valid": pd.array([True], dtype="boolean"),
            "trust": [2],
        }
    )
    payloads = _stored_payloads(
        '{"first_name_norm": "ÉLISE", "siren_norm": null, "email_valid": null, "trust": 1}',
        '{"first_name_norm": null, "siren_norm": null, "email_valid": false, "trust": 3}',
    )
    restored = inc.records_from_payload(payloads, tonight.dtypes)
    assert restored.dtypes.to_dict() == tonight.dtypes.to_dict()
    stacked = inc.stack([tonight, restored])
    assert stacked.dtypes.to_dict() == tonight.dtypes.to_dict()
    pd.testing.assert_frame_equal(stacked, pd.concat([tonight, restored], ignore_index=True))
    assert stacked["first_name_norm"].tolist()[:2] == ["JEAN", "ÉLISE"]
    assert stacked["email_valid"].tolist() == [True, pd.NA, False]


def test_restored_records_get_back_the_fields_their_payloads_leave_out() -> None:
    """A stored payload leaves out its null members: a field no payload read holds
    comes back empty with tonight's type, as if every payload had held it as null;
    without tonight's types (a steward's pair), every payload field comes back."""
    text = pd.StringDtype("pyarrow", na_value=np.nan)
    tonight = pd.DataFrame(
        {
            "source": ["s"],
            "source_key": ["1"],
            "source_line": [1],
            "first_name_norm": pd.array(["JEAN"], dtype=text),
            "siren_norm": pd.array(["123456789"], dtype=text),
            "email_valid": pd.array([True], dtype="boolean"),
            "npai_flag": [True],
            "trust": [2],
        }
    )
    full = _stored_payloads(
        '{"trust":1,"first_name_norm":"ÉLISE","siren_norm":null,"email_valid":null,'
        '"npai_flag":null}',
        '{"trust":3,"first_name_norm":null,"siren_norm":null,"email_valid":false,"npai_flag":null}',
    )
    sparse = full.assign(
        payload=['{"trust":1,"first_name_norm":"ÉLISE"}', '{"trust":3,"email_valid":false}']
    )
    restored = inc.records_from_payload(sparse, tonight.dtypes)
    expected = inc.records_from_payload(full, tonight.dtypes)
    pd.testing.assert_frame_equal(restored[expected.columns], expected)
    assert restored.dtypes.to_dict() == tonight.dtypes.to_dict()
    assert restored["npai_flag"].tolist() == [False, False]
    every = inc.records_from_payload(sparse)
    assert set(every.columns) == {*inc.KEYS, "source_line", *inc.PAYLOAD_COLUMNS}
    assert every["siren_norm"].isna().all()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["b2b", "stores", "ecommerce", "crm"]),
            # Lines past 2**40 are sorted apart from their rank (see `_line_order`).
            st.integers(min_value=1, max_value=5) | st.sampled_from([2**40, 2**45]),
            st.text(alphabet="aé9Z-\u4e2d", min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=40,
        unique_by=lambda r: (r[0], r[2]),
    )
)
def test_run_order_is_config_order_then_line_then_key(
    rows: list[tuple[str, int, str]],
) -> None:
    """Records come back in a full run's order whatever order they arrive in: sources
    as the config lists them (one it does not list last), then line, then key by
    code point (lines coincide when a delta file's records meet stored ones)."""
    frame = pd.DataFrame(rows, columns=["source", "source_line", "source_key"])
    frame["payload"] = np.arange(len(frame))
    sources = ["stores", "ecommerce", "b2b"]
    ordered = inc.run_order(frame, sources)
    rank = {s: i for i, s in enumerate(sources)}
    expected = sorted(rows, key=lambda r: (rank.get(r[0], 3), r[1], r[2]))
    assert (
        list(zip(ordered["source"], ordered["source_line"], ordered["source_key"], strict=True))
        == expected
    )
    assert sorted(ordered["payload"]) == list(range(len(frame)))


def test_record_keys_join_source_and_key_as_text_whatever_their_types() -> None:
    frame = pd.DataFrame(
        {"source": ["crm", "web", "web", "shop"], "source_key": ["a1", 42, None, "é-7"]}
    )
    # Numbers and gaps take pandas' text (the Python path); texts are joined in Arrow.
    assert list(inc.record_keys(frame)) == ["crm\x1fa1", "web\x1f42", "web\x1fNone", "shop\x1fé-7"]
    texts = frame.iloc[[0, 3]].astype({"source_key": pd.StringDtype("pyarrow")})
    keys = inc.record_keys(texts)
    assert list(keys) == ["crm\x1fa1", "shop\x1fé-7"] and keys.dtype == object
    assert keys.get_indexer(["shop\x1fé-7"]).tolist() == [1]


def test_with_flags_sets_each_records_flag_by_key_in_the_records_order() -> None:
    from mdm_pipeline.pipeline.run import with_flags

    records = pd.DataFrame(
        {
            "source": ["a", "a", "b"],
            "source_key": ["1", "2", "1"],
            "npai_flag": [True, True, True],  # replaced, not kept
            "x": [1, 2, 3],
        },
        index=[10, 11, 12],
    )
    flags = pd.DataFrame(
        {
            "source": ["b", "a"],
            "source_key": ["1", "2"],
            "npai_flag": [True, True],
            "npai_date": ["2026-01-01", "2026-02-01"],
            "npai_reason": ["R1", "R2"],
        }
    )
    out = with_flags(records, flags)
    assert list(out.columns) == [
        "source",
        "source_key",
        "x",
        *("npai_flag", "npai_date", "npai_reason"),
    ]
    assert out.index.equals(pd.RangeIndex(3)) and out["x"].tolist() == [1, 2, 3]
    assert out["npai_flag"].tolist() == [False, True, True]
    assert out["npai_date"].tolist()[1:] == ["2026-02-01", "2026-01-01"]
    assert out["npai_reason"].tolist()[1:] == ["R2", "R1"]
    assert pd.isna(out.loc[0, "npai_date"]) and pd.isna(out.loc[0, "npai_reason"])
    assert not with_flags(records, flags.iloc[:0])["npai_flag"].any()


def test_snapshot_texts_of_few_values_share_one_object_per_value() -> None:
    values = pa.chunked_array([pa.array(["web", "crm", None]), pa.array(["crm", "web"])])
    shared = store._shared_texts(values)
    assert shared.tolist() == ["web", "crm", None, "crm", "web"]
    assert shared[1] is shared[3] and shared[0] is shared[4]


def test_stored_payloads_read_as_bytes_are_written_as_the_same_text() -> None:
    """Payloads read back from SQLite stay UTF-8 bytes until a record is written again:
    the write decodes those (among fresh texts) to the very text that was stored, so
    that the column keeps text, not blobs."""
    stored = '{"last_name_norm":"LEFÈVRE","city_norm":"SAINT-ÉTIENNE"}'
    mixed = np.array([stored.encode(), '{"email_norm":"a@b.fr"}', stored.encode()], dtype=object)
    texts = store._texts(mixed)
    assert texts.tolist() == [stored, '{"email_norm":"a@b.fr"}', stored]
    assert all(type(t) is str for t in texts)
    assert mixed[0] == stored.encode()  # the caller's array is left as it was
    fresh = np.array(['{"a":1}'], dtype=object)
    assert store._texts(fresh) is fresh  # nothing to decode: no copy


def _records_and_partition(url: str) -> tuple[pd.DataFrame, list, list, int]:
    """What a run wrote, whatever its golden IDs: the source records, the records of
    each golden record, the golden records' attributes, lineage, members, version and
    status, and the open cross-references."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        records = pd.read_sql(
            "select source, source_key, golden_id, record_type, source_line, record_hash, "
            "address_hash, payload, source_hash from mdm_source_records",
            conn,
        )
        golden = pd.read_sql(
            "select golden_id, attributes, lineage, members, version, status "
            "from mdm_golden_records",
            conn,
        )
        xref = pd.read_sql("select source, source_key, golden_id from mdm_xref", conn)
    engine.dispose()
    named = records.assign(m=records["source"] + ":" + records["source_key"])
    groups = named.groupby("golden_id")["m"].apply(lambda m: ",".join(sorted(m)))
    partition = sorted(groups)
    described = golden.set_index("golden_id").reindex(groups.index)
    attributes = sorted(described.itertuples(index=False, name=None))
    linked = xref.merge(records[["source", "source_key", "golden_id"]])
    table = records.drop(columns="golden_id").sort_values(["source", "source_key"])
    return table.reset_index(drop=True), partition, attributes, len(linked)


def test_writing_records_by_chunks_writes_what_one_chunk_writes(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full run written 31 records and 31 golden records at a time, handed to the
    driver 13 rows at a time (the indexes rebuilt around all the chunks), stores
    what one chunk stores, and so do a night and a later full run."""
    cfg = samples / "config.yaml"
    whole = f"sqlite:///{tmp_path / 'whole.sqlite'}"
    _run(cfg, whole)
    monkeypatch.setattr(store, "WRITE_CHUNK_ROWS", 31)
    monkeypatch.setattr(store, "INSERT_SLICE_ROWS", 13)
    monkeypatch.setattr(store, "BULK_INDEX_ROWS", 5)
    chunked = f"sqlite:///{tmp_path / 'chunked.sqlite'}"
    _run(cfg, chunked)
    got, want = _records_and_partition(chunked), _records_and_partition(whole)
    pd.testing.assert_frame_equal(got[0], want[0])
    assert got[1:] == want[1:]
    engine = sa.create_engine(chunked)
    indexes = sa.inspect(engine).get_indexes("mdm_source_records")
    engine.dispose()
    assert [i["column_names"] for i in indexes] == [["golden_id"]]
    # A night written by chunks writes what a night in one chunk writes.
    day2(samples, seed=3)
    assert _run(cfg, chunked, "--incremental")["mode"] == "incremental"
    monkeypatch.undo()
    assert _run(cfg, whole, "--incremental")["mode"] == "incremental"
    got, want = _records_and_partition(chunked), _records_and_partition(whole)
    pd.testing.assert_frame_equal(got[0], want[0])
    assert got[1:] == want[1:]
    # And a full run over a store that holds every record already.
    day2(samples, seed=4)
    assert _run(cfg, whole)["mode"] == "full"
    monkeypatch.setattr(store, "WRITE_CHUNK_ROWS", 31)
    assert _run(cfg, chunked)["mode"] == "full"
    got, want = _records_and_partition(chunked), _records_and_partition(whole)
    pd.testing.assert_frame_equal(got[0], want[0])
    assert got[1:] == want[1:]


def test_source_hashes_do_not_depend_on_the_text_dtype(samples: Path) -> None:
    """Stores hold hashes computed when the mapped text columns were Python objects:
    the Arrow-backed columns must hash alike, or the first night after an upgrade
    would find every record changed."""
    from mdm_pipeline.config.schema import text_dtype
    from mdm_pipeline.sources import load_source

    settings = Pipeline.from_config(samples / "config.yaml").settings
    day = pd.Timestamp("2026-11-22")
    records = pd.concat(
        [load_source(s, settings, day).records for s in settings.sources], ignore_index=True
    )
    text = [c for c in records if records[c].dtype == text_dtype()]
    assert len(text) > 20
    as_objects = records.astype(dict.fromkeys(text, object))
    as_objects[text] = as_objects[text].where(as_objects[text].notna(), None)
    assert all(as_objects[c].dtype == "object" for c in text)
    pd.testing.assert_series_equal(
        loading.source_hashes(records), loading.source_hashes(as_objects)
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["shop", "web", "b2b", "é-store"]),
            st.text(alphabet="aZé09-ü€", min_size=1, max_size=4),
        ),
        min_size=2,
        max_size=12,
        unique=True,
    ),
    st.data(),
)
def test_evidence_puts_the_smaller_source_and_key_on_the_left(
    keyed: list[tuple[str, str]], data: st.DataObject
) -> None:
    """Each pair is stored one way round whatever the load order, as Python orders
    (source, key); its contributions stay with it."""
    records = pd.DataFrame(keyed, columns=["source", "source_key"]).astype(
        run_module.schema.text_dtype()
    )
    ends = st.integers(0, len(keyed) - 1)
    pairs = data.draw(st.lists(st.tuples(ends, ends).filter(lambda p: p[0] != p[1]), min_size=1))
    frame = pd.DataFrame(pairs, columns=["left", "right"]).assign(
        band=run_module.AUTO,
        rule="r1",
        weight=1.5,
        probability=0.9,
        w_name=np.arange(len(pairs)) / 8,
    )
    got = run_module._evidence(records, SimpleNamespace(pairs=frame))
    for i, (left, right) in enumerate(pairs):
        low, high = sorted([keyed[left], keyed[right]])
        row = got.iloc[i]
        assert (row["left_source"], row["left_key"]) == low
        assert (row["right_source"], row["right_key"]) == high
        written = pd.DataFrame({"name": [round(i / 8, 3)]}).to_json(orient="records", lines=True)
        assert row["contributions"] == written.strip()


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_a_failure_preparing_a_later_chunk_leaves_the_store_unchanged(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dump_store, mode: str
) -> None:
    """Chunks of records are serialised on a worker thread while the previous chunk is
    written: one failing there, after other chunks went in, fails the run with its
    error and rolls every table back."""
    cfg, url, before = _stored_with_a_day_2(samples, tmp_path, dump_store, seed=6)
    monkeypatch.setattr(store, "WRITE_CHUNK_ROWS", 31)
    calls = {"n": 0}
    real = store._payload_hashes

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("no more memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_payload_hashes", failing)
    extra = ["--incremental"] if mode == "incremental" else []
    result = runner.invoke(app, ["run", "--config", str(cfg), *extra], env={"MDM_STORE_URL": url})
    assert result.exit_code == 1
    assert "internal error (RuntimeError" in result.stderr
    assert calls["n"] == 3
    after = dump_store(url)
    for name, frame in before.items():
        pd.testing.assert_frame_equal(after[name], frame, obj=name)


_KEY_TEXTS = st.text(alphabet="ab1é\x1f ", max_size=3)


@settings(max_examples=150, deadline=None)
@given(
    stored=st.lists(st.tuples(st.sampled_from(["web", "shop", "b2b"]), _KEY_TEXTS), unique=True),
    wanted=st.lists(st.tuples(st.sampled_from(["web", "shop", "crm"]), _KEY_TEXTS)),
)
def test_key_positions_are_what_an_index_of_the_stored_keys_gives(
    stored: list[tuple[str, str]], wanted: list[tuple[str, str]]
) -> None:
    """The snapshot's keys looked up in Arrow give each wanted key (repeated, missing,
    with accents or the separator itself in it) the position a pandas index gives."""
    frame = pd.DataFrame(stored or [("web", "x")], columns=inc.KEYS)
    asked = inc.record_keys(pd.DataFrame(wanted, columns=inc.KEYS, dtype=object))
    got = inc.KeyPositions(frame).get_indexer(asked)
    np.testing.assert_array_equal(got, inc.record_keys(frame).get_indexer(asked))


@settings(max_examples=150, deadline=None)
@given(
    stored=st.lists(st.tuples(st.sampled_from(["web", "shop"]), _KEY_TEXTS), unique=True),
    swap=st.one_of(st.none(), st.tuples(st.integers(0), st.integers(0))),
    other=st.tuples(st.sampled_from(["web", "crm"]), _KEY_TEXTS),
)
def test_key_positions_of_the_stored_keys_in_their_order_or_nearly(
    stored: list[tuple[str, str]], swap: tuple[int, int] | None, other: tuple[str, str]
) -> None:
    """A night on full extracts asks for every stored key in the stored order: the
    positions are those a pandas index gives, and so they are when one key asked
    differs (another key, stored or not) or two trade places."""
    frame = pd.DataFrame(stored or [("web", "x")], columns=inc.KEYS)
    wanted = list(frame.itertuples(index=False, name=None))
    if swap is not None:
        i, j = swap[0] % len(wanted), swap[1] % len(wanted)
        wanted[i], wanted[j] = wanted[j], other if i == j else wanted[i]
    asked = inc.record_keys(pd.DataFrame(wanted, columns=inc.KEYS, dtype=object))
    got = inc.KeyPositions(frame).get_indexer(asked)
    np.testing.assert_array_equal(got, inc.record_keys(frame).get_indexer(asked))


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.tuples(st.sampled_from(["web", "shop"]), _KEY_TEXTS), min_size=1),
    base=st.integers(0),
    order=st.randoms(use_true_random=False),
    wanted=st.lists(st.tuples(st.sampled_from(["web", "crm"]), _KEY_TEXTS)),
)
def test_snapshot_keys_are_the_state_frames_keys(
    rows: list[tuple[str, str]],
    base: int,
    order: random.Random,
    wanted: list[tuple[str, str]],
) -> None:
    """Joined in Arrow from the snapshot's rows (a base, a patch, each record's row
    among them in any order), the keys are those of the frame a night makes of
    them, and look keys up as it does."""
    table = pa.table({"source": [r[0] for r in rows], "source_key": [r[1] for r in rows]})
    at = np.arange(len(rows))
    if base % 2:  # a patched snapshot: a record's row anywhere, some rows superseded
        order.shuffle(at)
        at = at[: max(1, len(at) - base % 3)]
    stored = store.StoredRecords(table, at, base % (len(rows) + 1))
    frame = table.take(pa.array(at)).to_pandas()
    keys = inc.snapshot_keys(stored)
    assert keys is not None and keys.to_pylist() == list(inc.record_keys(frame))
    if len(set(keys.to_pylist())) == len(keys):
        asked = inc.record_keys(pd.DataFrame(wanted + rows[:2], columns=inc.KEYS, dtype=object))
        np.testing.assert_array_equal(
            inc.KeyPositions(frame, keys).get_indexer(asked),
            inc.record_keys(frame).get_indexer(asked),
        )


def test_snapshot_keys_with_a_missing_key_leave_the_frame_to_key() -> None:
    table = pa.table({"source": ["web", None], "source_key": ["1", "2"]})
    assert inc.snapshot_keys(store.StoredRecords.whole(table)) is None


def test_a_key_stored_twice_is_an_error_when_it_is_looked_up() -> None:
    frame = pd.DataFrame({"source": ["web", "web", "web"], "source_key": ["1", "2", "1"]})
    positions = inc.KeyPositions(frame)
    np.testing.assert_array_equal(positions.get_indexer(inc.record_keys(frame.iloc[[1]])), [1])
    with pytest.raises(ValueError, match="twice"):
        positions.get_indexer(inc.record_keys(frame.iloc[[0]]))
    # Every stored key asked for in the stored order, as a night on full extracts asks.
    with pytest.raises(ValueError, match="twice"):
        positions.get_indexer(inc.record_keys(frame))


def test_key_positions_of_keys_that_are_not_all_texts_take_a_pandas_index() -> None:
    frame = pd.DataFrame({"source": ["web", "web", "b2b"], "source_key": [7, 8, 7]})
    asked = inc.record_keys(pd.DataFrame({"source": ["b2b", "web"], "source_key": ["7", "9"]}))
    np.testing.assert_array_equal(inc.KeyPositions(frame).get_indexer(asked), [2, -1])
