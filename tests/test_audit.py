"""Auditors' questions: a golden record now, its history, what it said on a date,
and why two records are together."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.golden_records import audit, store
from mdm_pipeline.golden_records.audit import AuditError
from mdm_pipeline.golden_records.refs import RecordRef

runner = CliRunner()


def _cli(cfg: Path, url: str, *args: str) -> str:
    cut = 2 if args[0] in ("golden", "review") else 1
    result = runner.invoke(
        app, [*args[:cut], "--config", str(cfg), *args[cut:]], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def _two_golden_records(url: str) -> tuple[str, str, str, str]:
    """(record, its golden ID, record, its golden ID) of two person golden records
    with a single member each."""
    engine = sa.create_engine(url)
    rows = pd.read_sql(
        "select s.source, s.source_key, s.golden_id from mdm_source_records s "
        "join mdm_golden_records g on g.golden_id = s.golden_id "
        "where g.members = 1 and g.record_type = 'person' order by s.source, s.source_key limit 2",
        engine,
    )
    engine.dispose()
    a, b = rows.iloc[0], rows.iloc[1]
    return f"{a.source}:{a.source_key}", a.golden_id, f"{b.source}:{b.source_key}", b.golden_id


@pytest.fixture
def merged(samples: Path, tmp_path: Path) -> dict[str, str]:
    """A store after two nights: the second merged two golden records on a steward's word."""
    cfg = samples / "config.yaml"
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _cli(cfg, url, "run")
    a, ga, b, gb = _two_golden_records(url)
    _cli(cfg, url, "review", "merge", a, b, "--author", "A. Martin", "--comment", "same person")
    _cli(cfg, url, "run")
    return {"cfg": str(cfg), "url": url, "a": a, "b": b, "ga": ga, "gb": gb}


def test_a_retired_golden_id_resolves_to_its_survivor(merged: dict[str, str]) -> None:
    engine = store.connect(merged["url"])
    shown = {g: audit.golden_show(engine, merged[g]) for g in ("ga", "gb")}
    engine.dispose()
    survivor = {s["golden_id"] for s in shown.values()}
    assert len(survivor) == 1
    retired = {merged["ga"], merged["gb"]} - survivor
    assert len(retired) == 1
    (old,) = retired
    resolved = shown["ga"] if merged["ga"] == old else shown["gb"]
    assert resolved["resolved_from"] == [old]
    assert {merged["a"], merged["b"]} <= set(resolved["members"])
    # Every attribute names the record it came from, by a rule and a date.
    for name, origin in resolved["lineage"].items():
        assert f"{origin['source']}:{origin['source_key']}" in resolved["members"], name
        assert origin["rule"]


def test_history_shows_versions_the_merge_and_the_decision(merged: dict[str, str]) -> None:
    cfg, url = Path(merged["cfg"]), merged["url"]
    engine = store.connect(url)
    survivor = audit.golden_show(engine, merged["ga"])["golden_id"]
    retired = ({merged["ga"], merged["gb"]} - {survivor}).pop()
    found = audit.golden_history(engine, survivor)
    gone = audit.golden_history(engine, retired)
    engine.dispose()
    whats = [h["what"] for h in found["history"]]
    assert whats.count("version") == 2 and "merge" in whats and "decision" in whats
    merge = next(h for h in found["history"] if h["what"] == "merge")
    assert merge["reason"] == "steward" and set(merge["detail"]["before"]) == {survivor, retired}
    assert [h["what"] for h in gone["history"]][-1] in ("retired", "decision")
    assert any(h["what"] == "retired" and h["survivor_id"] == survivor for h in gone["history"])
    text = _cli(cfg, url, "golden", "history", survivor)
    assert "merge" in text and "A. Martin" in text
    as_json = json.loads(_cli(cfg, url, "golden", "history", survivor, "--json"))
    assert len(as_json["history"]) == len(found["history"])


def test_as_of_gives_the_version_in_force_then(merged: dict[str, str]) -> None:
    cfg, url = Path(merged["cfg"]), merged["url"]
    engine = store.connect(url)
    survivor = audit.golden_show(engine, merged["ga"])["golden_id"]
    versions = pd.read_sql(
        sa.text(
            "select version, valid_from, attributes from mdm_golden_versions "
            "where golden_id = :g order by version"
        ),
        engine,
        params={"g": survivor},
    )
    first_at = pd.Timestamp(versions["valid_from"].iloc[0]).to_pydatetime()
    second_at = pd.Timestamp(versions["valid_from"].iloc[1]).to_pydatetime()
    then = audit.golden_as_of(engine, survivor, second_at - timedelta(microseconds=1))
    now = audit.golden_as_of(engine, survivor, second_at)
    with pytest.raises(AuditError, match="no version in force"):
        audit.golden_as_of(engine, survivor, first_at - timedelta(days=1))
    engine.dispose()
    assert then["version"] == 1 and now["version"] == 2
    assert then["attributes"] == json.loads(versions["attributes"].iloc[0])
    day = f"{second_at:%Y-%m-%d}"
    latest = json.loads(_cli(cfg, url, "golden", "as-of", survivor, "--date", day, "--json"))
    assert latest["version"] == 2
    bad = runner.invoke(
        app,
        ["golden", "as-of", "--config", str(cfg), survivor, "--date", "yesterday"],
        env={"MDM_STORE_URL": url},
    )
    assert bad.exit_code == 2 and "--date 'yesterday'" in bad.stderr


def test_why_names_the_evidence_and_the_decision(merged: dict[str, str]) -> None:
    cfg, url = Path(merged["cfg"]), merged["url"]
    found = json.loads(_cli(cfg, url, "why", merged["a"], merged["b"], "--json"))
    assert found["together"] and found["since"]
    assert [d["kind"] for d in found["decisions"]] == ["must_link"]
    assert found["decisions"][0]["author"] == "A. Martin"
    # Two records an automatic match put together: the pair's own score.
    engine = sa.create_engine(url)
    pair = pd.read_sql(
        "select left_source, left_key, right_source, right_key, rule from mdm_match_evidence "
        "where band = 'auto_match' limit 1",
        engine,
    ).iloc[0]
    engine.dispose()
    left, right = f"{pair.left_source}:{pair.left_key}", f"{pair.right_source}:{pair.right_key}"
    auto = json.loads(_cli(cfg, url, "why", right, left, "--json"))
    assert auto["together"] and auto["evidence"]["rule"] == pair.rule
    assert auto["evidence"]["contributions"]
    text = _cli(cfg, url, "why", left, right)
    assert "together" in text and pair.rule in text
    engine = store.connect(url)
    with pytest.raises(AuditError, match="record stores:nope is not in the store"):
        audit.why(engine, RecordRef("stores", "nope"), RecordRef.parse(left))
    engine.dispose()
