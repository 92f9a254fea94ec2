"""The `mdm` command end to end on the shipped samples."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.golden_records import store
from mdm_pipeline.matching.evaluation import pair_scores

runner = CliRunner()


def _run(config: Path, *extra: str, env: dict | None = None):
    return runner.invoke(app, ["run", "--config", str(config), *extra], env=env)


def _counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        out = {
            t: conn.execute(sa.select(sa.func.count()).select_from(sa.table(t))).scalar_one()
            for t in ("mdm_source_records", "mdm_golden_records", "mdm_quarantine", "mdm_runs")
        }
    engine.dispose()
    return out


def _xref(url: str) -> pd.DataFrame:
    engine = sa.create_engine(url)
    frame = pd.read_sql(
        "select source, source_key, golden_id, updated_run from mdm_source_records", engine
    )
    engine.dispose()
    return frame


def test_run_on_samples_summary_accounting_and_quality(samples: Path) -> None:
    result = _run(samples / "config.yaml", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for s in summary["sources"]:
        assert s["rows_read"] == s["records"] + s["quarantined"]
    url = f"sqlite:///{samples / 'mdm.sqlite'}"
    counts = _counts(url)
    assert counts["mdm_source_records"] == sum(s["records"] for s in summary["sources"])
    assert counts["mdm_quarantine"] == sum(s["quarantined"] for s in summary["sources"])
    assert counts["mdm_golden_records"] == summary["clusters"] == summary["golden_created"]
    # Exact-key matching: precise, recall limited until probabilistic matching lands.
    xref = _xref(url)
    truth = pd.read_csv(samples / "truth.csv", dtype=str)
    both = xref.merge(truth, on=["source", "source_key"], validate="one_to_one")
    assert len(both) == len(xref)
    scores = pair_scores(both["golden_id"], both["entity_id"])
    assert scores.precision >= 0.95 and scores.recall >= 0.65
    # Every BU gets its file back, in its own format, with the golden ID.
    names = sorted(Path(p).name for p in summary["exports"])
    assert names == [
        "b2b_return.parquet",
        "callcentre_return.csv",
        "ecommerce_return.csv",
        "stores_return.csv",
    ]
    back = pd.read_csv(samples / "out" / "stores_return.csv", sep=";", encoding="cp1252", dtype=str)
    assert back.columns[0] == "NUM_CARTE" and "mdm_golden_id" in back.columns
    assert back["mdm_golden_id"].notna().all()


def test_human_summary_table(samples: Path) -> None:
    result = _run(samples / "config.yaml")
    assert result.exit_code == 0, result.output
    for text in (
        "rows read",
        "quarantined",
        "candidate pairs",
        "clusters",
        "golden records created",
        "NPAI flags active",
        "time load",
        "run R",
    ):
        assert text in result.stdout


def test_rerun_on_same_input_changes_nothing(samples: Path) -> None:
    assert _run(samples / "config.yaml").exit_code == 0
    url = f"sqlite:///{samples / 'mdm.sqlite'}"
    before = _xref(url)
    second = _run(samples / "config.yaml", "--json")
    summary = json.loads(second.stdout)
    assert summary["golden_created"] == summary["golden_updated"] == 0
    assert summary["golden_unchanged"] == summary["clusters"]
    after = _xref(url)
    pd.testing.assert_frame_equal(
        before.sort_values(["source", "source_key"]).reset_index(drop=True),
        after.sort_values(["source", "source_key"]).reset_index(drop=True),
    )


def test_a_first_run_failing_in_its_evidence_leaves_an_empty_store(
    samples: Path, monkeypatch, dump_store
) -> None:
    """A first run writes its evidence in steps, between the golden records' writes
    when it can (`EvidenceWrite`): a step that fails, after one slice of pairs is
    in, fails the run and rolls back everything written before it."""
    url = f"sqlite:///{samples / 'mdm.sqlite'}"
    real = store._inserting
    steps = {"evidence": 0}

    def failing_inserting(conn, target, frame, *args, **options):
        for step in real(conn, target, frame, *args, **options):
            if target.name == "mdm_match_evidence":
                steps["evidence"] += 1
                if steps["evidence"] == 2:
                    raise RuntimeError("disk full")
            yield step

    monkeypatch.setattr(store, "EVIDENCE_STEP_ROWS", 2)
    monkeypatch.setattr(store, "_inserting", failing_inserting)
    result = _run(samples / "config.yaml")
    assert result.exit_code == 1
    assert "internal error (RuntimeError" in result.stderr
    assert steps["evidence"] == 2
    after = dump_store(url)
    assert {name: len(frame) for name, frame in after.items() if len(frame)} == {}
    monkeypatch.undo()
    assert _run(samples / "config.yaml").exit_code == 0


@pytest.mark.parametrize(
    "table",
    [
        "mdm_golden_records",
        "mdm_golden_history",
        "mdm_source_records",
        "mdm_xref",
        "mdm_record_history",
    ],
)
def test_failure_mid_write_leaves_store_unchanged(
    samples: Path, monkeypatch, table: str, dump_store
) -> None:
    assert _run(samples / "config.yaml").exit_code == 0
    url = f"sqlite:///{samples / 'mdm.sqlite'}"
    before = dump_store(url)
    # Day 2 changes records (postcodes), so every history table is written to.
    stores = samples / "magasins_fidelite.csv"
    stores.write_bytes(stores.read_bytes().replace(b";75", b";76", 80))

    # Every insert, whole or a step at a time, goes through `_inserting`.
    real = store._inserting
    calls = {"n": 0}

    def failing_inserting(conn, target, frame, *args, **options):
        calls["n"] += 1
        yield from real(conn, target, frame, *args, **options)
        if target.name == table and len(frame):
            raise RuntimeError("disk full")

    monkeypatch.setattr(store, "_inserting", failing_inserting)
    if table in ("mdm_record_history", "mdm_golden_history"):
        # Superseded payloads and versions are copied by the database (INSERT ... SELECT).
        name = "_archive_payloads" if table == "mdm_record_history" else "_archive_versions"
        archive = getattr(store, name)

        def failing_archive(conn, keys, at, run_id):
            calls["n"] += 1
            archive(conn, keys, at, run_id)
            if len(keys):
                raise RuntimeError("disk full")

        monkeypatch.setattr(store, name, failing_archive)
    result = _run(samples / "config.yaml")
    assert result.exit_code == 1
    assert "internal error (RuntimeError" in result.stderr
    assert calls["n"] >= 2  # it failed after other writes, inside the transaction
    after = dump_store(url)
    for name, frame in before.items():
        pd.testing.assert_frame_equal(after[name], frame, obj=name)
    assert not list((samples / "out").glob(".mdm-export-*"))
    # And the lock was released: the next run goes through.
    monkeypatch.undo()
    assert _run(samples / "config.yaml").exit_code == 0


def test_config_error_exit_2_one_line(samples: Path) -> None:
    cfg = samples / "config.yaml"
    cfg.write_text(cfg.read_text().replace('format: "%d/%m/%Y"', 'format: "%d/%m/%y"', 1))
    result = _run(cfg)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: config.yaml: sources[1].mapping.birth_date: "
        "unknown date format '%d/%m/%y' (two-digit years are "
        "ambiguous; use %Y)"
    )


def test_missing_source_file_exit_1(samples: Path) -> None:
    (samples / "centre_appels.csv").unlink()
    result = _run(samples / "config.yaml")
    assert result.exit_code == 1
    assert "centre_appels.csv" in result.stderr and "file not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_validate_config_checks_columns(samples: Path) -> None:
    ok = runner.invoke(app, ["validate-config", str(samples / "config.yaml")])
    assert ok.exit_code == 0 and "OK (4 sources" in ok.stdout
    cfg = samples / "config.yaml"
    cfg.write_text(cfg.read_text().replace("postcode: CP", "postcode: CODE_POSTAL"))
    bad = runner.invoke(app, ["validate-config", str(cfg)])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == (
        "error: config.yaml: sources[1].mapping.postcode: column "
        "'CODE_POSTAL' not found in source 'stores'"
    )


def test_generate_command(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--out", str(tmp_path), "--records", "300"])
    assert result.exit_code == 0 and "records of" in result.stdout
    assert runner.invoke(app, ["validate-config", str(tmp_path / "config.yaml")]).exit_code == 0


def test_usage_error_exit_2() -> None:
    assert runner.invoke(app, ["run"]).exit_code == 2


def test_no_personal_data_in_errors_or_logs(samples: Path, caplog) -> None:
    caplog.set_level("DEBUG")
    result = _run(samples / "config.yaml", "--json")
    assert result.exit_code == 0
    truth_names = pd.read_csv(samples / "ecommerce_clients.csv", dtype=str)["last_name"]
    logged = caplog.text + result.stderr
    assert not any(f" {n} " in logged for n in truth_names.dropna().unique() if len(n) > 3)


@pytest.mark.postgres
def test_run_into_postgres_then_rerun_changes_nothing(samples: Path, pg_url: str) -> None:
    env = {"MDM_STORE_URL": pg_url}
    first = _run(samples / "config.yaml", "--json", env=env)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["store"].startswith("postgresql")
    counts = _counts(pg_url)
    assert counts["mdm_golden_records"] == summary["golden_created"] > 0
    before = _xref(pg_url)
    second = json.loads(_run(samples / "config.yaml", "--json", env=env).stdout)
    assert second["golden_created"] == second["golden_updated"] == 0
    after = _xref(pg_url)
    assert set(map(tuple, before.to_numpy())) == set(map(tuple, after.to_numpy()))
    assert not (samples / "mdm.sqlite").exists()


def test_rnvp_command_cleans_a_standalone_csv(tmp_path: Path) -> None:
    src = tmp_path / "adresses.csv"
    src.write_text(
        "id;nom;adr1;adr2;cp;ville\n"
        "1;Mme Hélène Lefèvre;Apt 12;12 b av. de la République;75011;Paris 11e\n"
        "2;M. Jean Martin;15/17 R. du Gal de Gaulle;;;St Etienne\n"
        "3;=cmd;Lieu-dit Les Vignes;;21410;GISSEY SUR OUCHE\n"
        '4;Bad;"unterminated;x;y;z\n',
        encoding="cp1252",
    )
    out = tmp_path / "propres.csv"
    result = runner.invoke(
        app,
        [
            "rnvp",
            "--in",
            str(src),
            "--out",
            str(out),
            "--address",
            "adr1,adr2",
            "--postcode",
            "cp",
            "--city",
            "ville",
            "--name",
            "nom",
            "--encoding",
            "cp1252",
            "--delimiter",
            ";",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows_read"] == summary["rows_written"] + summary["quarantined"]
    back = pd.read_csv(out, sep=";", encoding="cp1252", dtype=str, keep_default_na=False)
    assert back.columns[:6].tolist() == ["id", "nom", "adr1", "adr2", "cp", "ville"]
    first = back.iloc[0]
    assert [first[f"rnvp_line{i}"] for i in range(1, 7)] == [
        "MME HELENE LEFEVRE",
        "APPARTEMENT 12",
        "",
        "12 BIS AVENUE DE LA REPUBLIQUE",
        "",
        "75011 PARIS",
    ]
    assert first["address_status"] == "valid"
    assert back.iloc[1]["rnvp_line4"] == "15 RUE DU GENERAL DE GAULLE"
    assert back.iloc[1]["address_status"] == "invalid"  # ST ETIENNE has two postcodes
    assert back.iloc[2]["nom"] == "'=cmd"  # formula injection neutralised
    assert back.iloc[2]["rnvp_line5"] == "LIEU DIT LES VIGNES"


def test_rnvp_command_unknown_column_is_exit_2(tmp_path: Path) -> None:
    src = tmp_path / "a.csv"
    src.write_text("a,b\n1,2\n", encoding="utf-8")
    result = runner.invoke(
        app, ["rnvp", "--in", str(src), "--out", str(tmp_path / "o.csv"), "--address", "adresse"]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "column 'adresse' not found" in result.stderr
