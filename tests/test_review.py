"""The steward's review workflow: decisions are kept with their author and honoured
by every later run, full or incremental, until revoked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.golden_records.review import review_backlog
from mdm_pipeline.pipeline.incremental import PAYLOAD_COLUMNS

runner = CliRunner()


def _cli(cfg: Path, url: str, *args: str) -> str:
    result = runner.invoke(
        app, [*args[:2], "--config", str(cfg), *args[2:]], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def _run(cfg: Path, url: str, *extra: str) -> dict:
    result = runner.invoke(
        app, ["run", "--config", str(cfg), "--json", *extra], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _golden(url: str) -> dict[str, str]:
    engine = sa.create_engine(url)
    xref = pd.read_sql("select source, source_key, golden_id from mdm_source_records", engine)
    engine.dispose()
    return dict(zip(xref["source"] + ":" + xref["source_key"], xref["golden_id"], strict=True))


def _auto_pair(url: str) -> tuple[str, str]:
    """Two records an automatic match put together."""
    engine = sa.create_engine(url)
    row = pd.read_sql(
        "select left_source, left_key, right_source, right_key from mdm_match_evidence "
        "where band = 'auto_match' order by probability limit 1",
        engine,
    ).iloc[0]
    engine.dispose()
    return f"{row.left_source}:{row.left_key}", f"{row.right_source}:{row.right_key}"


def test_decisions_hold_in_later_runs_until_revoked(samples: Path, tmp_path: Path) -> None:
    cfg = samples / "config.yaml"
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _run(cfg, url)
    queue = json.loads(_cli(cfg, url, "review", "list", "--kind", "pair", "--json"))
    assert queue and queue == sorted(queue, key=lambda r: (abs(r["probability"] - 0.5), r["item"]))
    first = next(r for r in queue if not r["together"])
    left, right = (
        f"{first['left_source']}:{first['left_key']}",
        f"{first['right_source']}:{first['right_key']}",
    )
    a, b = _auto_pair(url)
    before = _golden(url)
    assert before[left] != before[right] and before[a] == before[b]

    _cli(cfg, url, "review", "accept", first["item"], "--author", "A. Martin", "--comment", "same")
    _cli(cfg, url, "review", "split", a, b, "--author", "B. Durand")
    # Decided pairs leave the queue, and the run report's count follows it.
    pairs_left = json.loads(_cli(cfg, url, "review", "list", "--kind", "pair", "--json"))
    assert first["item"] not in {r["item"] for r in pairs_left}
    engine = sa.create_engine(url)
    assert review_backlog(engine) == len(pairs_left) == len(queue) - 1
    engine.dispose()
    summary = _run(cfg, url)
    after = _golden(url)
    assert after[left] == after[right] and after[a] != after[b]
    assert summary["decisions_honoured"] == 2
    engine = sa.create_engine(url)
    reasons = pd.read_sql("select kind, reason, detail from mdm_events", engine)
    engine.dispose()
    steward = reasons[reasons["reason"] == "steward"]
    assert set(steward["kind"]) == {"merge", "split"}
    assert all(left in d and right in d for d in steward.loc[steward["kind"] == "merge", "detail"])
    # A second night, incremental: still honoured.
    _run(cfg, url, "--incremental")
    assert _golden(url) == after

    decided = json.loads(_cli(cfg, url, "review", "decisions", "--json"))
    assert {(d["kind"], d["author"]) for d in decided} == {
        ("must_link", "A. Martin"),
        ("cannot_link", "B. Durand"),
    }
    split = next(d for d in decided if d["kind"] == "cannot_link")
    _cli(cfg, url, "review", "revoke", str(split["decision_id"]), "--author", "B. Durand")
    _run(cfg, url, "--incremental")
    again = _golden(url)
    assert again[a] == again[b] and again[left] == again[right]
    history = json.loads(_cli(cfg, url, "review", "decisions", "--all", "--json"))
    assert len(history) == 2 and sum(d["revoked_by"] == "B. Durand" for d in history) == 1


def test_an_incremental_run_after_decisions_equals_a_full_run(
    samples: Path, tmp_path: Path
) -> None:
    cfg = samples / "config.yaml"
    a_url, b_path = f"sqlite:///{tmp_path / 'a.sqlite'}", tmp_path / "b.sqlite"
    _run(cfg, a_url)
    queue = json.loads(_cli(cfg, a_url, "review", "list", "--json"))
    for row in queue[:3]:
        _cli(cfg, a_url, "review", "accept", row["item"], "--author", "A. Martin")
    x, y = _auto_pair(a_url)
    _cli(cfg, a_url, "review", "split", x, y, "--author", "A. Martin")
    shutil.copy(tmp_path / "a.sqlite", b_path)
    inc = _run(cfg, a_url, "--incremental")
    _run(cfg, f"sqlite:///{b_path}")
    assert inc["records_changed"] == 0 and inc["records_reclustered"] > 0
    got, want = _golden(a_url), _golden(f"sqlite:///{b_path}")

    # Same partition of records (new golden IDs are random, so compare the groups).
    def groups(g: dict[str, str]) -> set[frozenset[str]]:
        by: dict[str, set[str]] = {}
        for rec, gid in g.items():
            by.setdefault(gid, set()).add(rec)
        return {frozenset(v) for v in by.values()}

    assert groups(got) == groups(want)


def test_show_gives_both_records_and_the_weights(samples: Path, tmp_path: Path) -> None:
    cfg = samples / "config.yaml"
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _run(cfg, url)
    item = json.loads(_cli(cfg, url, "review", "list", "--json"))[0]["item"]
    shown = json.loads(_cli(cfg, url, "review", "show", item, "--json"))
    assert set(shown["left"]["values"]) >= {"last_name", "last_name_norm", "email_norm"}
    # Every field of the payload, those the stored one leaves out (missing) as null.
    for side in ("left", "right"):
        assert list(shown[side]["values"]) == list(PAYLOAD_COLUMNS)
    assert shown["left"]["ref"] != shown["right"]["ref"]
    assert 0 < shown["probability"] < 1 and shown["contributions"]
    # Every comparison's level, computed again from the two stored records.
    assert set(shown["levels"]) <= set(shown["contributions"])
    assert {"first_name", "last_name", "email", "phone"} <= set(shown["levels"])
    assert shown["levels"]["last_name"] not in ("", None)
    if shown["left"]["values"]["last_name_norm"] == shown["right"]["values"]["last_name_norm"]:
        assert shown["levels"]["last_name"].startswith("exact")
    table = _cli(cfg, url, "review", "show", item)
    assert item in table and "weight" in table


def test_a_bad_line_in_a_decisions_file_records_none(samples: Path, tmp_path: Path) -> None:
    cfg = samples / "config.yaml"
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _run(cfg, url)
    queue = json.loads(_cli(cfg, url, "review", "list", "--json"))
    bulk = tmp_path / "decisions.csv"
    bulk.write_text(
        "decision,item,left,right,author,comment\n"
        f"accept,{queue[0]['item']},,,A. Martin,ok\n"
        "maybe,,stores:1,stores:2,A. Martin,\n",
        encoding="utf-8",
    )
    result = runner.invoke(
        app, ["review", "apply", "--config", str(cfg), str(bulk)], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 2
    assert (
        result.stderr.strip().count("\n") == 0 and f"{bulk}:3: column 'decision'" in result.stderr
    )
    assert json.loads(_cli(cfg, url, "review", "decisions", "--json")) == []
    a, b = _auto_pair(url)
    bulk.write_text(
        "decision,item,left,right,author,comment\n"
        f"accept,{queue[0]['item']},,,A. Martin,ok\n"
        f"split,,{a},{b},A. Martin,two people\n",
        encoding="utf-8",
    )
    _cli(cfg, url, "review", "apply", str(bulk))
    decided = json.loads(_cli(cfg, url, "review", "decisions", "--json"))
    assert [d["kind"] for d in decided] == ["must_link", "cannot_link"]
    unknown = runner.invoke(
        app,
        ["review", "merge", "--config", str(cfg), "stores:nope", a, "--author", "A. Martin"],
        env={"MDM_STORE_URL": url},
    )
    assert unknown.exit_code == 2 and "record stores:nope is not in the store" in unknown.stderr


def test_clusters_the_guard_split_are_reviewed_and_a_decision_holds(
    samples: Path, tmp_path: Path
) -> None:
    """With a small size cap the chaining guard splits clusters; they come to the queue
    with their cut links, and accepting one joins them on the next run."""
    cfg = samples / "config.yaml"
    cfg.write_text(cfg.read_text().replace("max_cluster_size: 20", "max_cluster_size: 2"))
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    summary = _run(cfg, url)
    assert summary["clusters_split"] > 0
    split = json.loads(_cli(cfg, url, "review", "list", "--kind", "cluster", "--json"))
    assert split and all(row["kind"] == "cluster" for row in split)
    item = split[0]
    assert len(item["golden_ids"]) >= 2 and item["links"]
    before = _golden(url)
    for link in item["links"]:
        left, right = link.split(" / ")
        assert before[left] != before[right]
    _cli(cfg, url, "review", "accept", item["item"], "--author", "A. Martin")
    decided = json.loads(_cli(cfg, url, "review", "decisions", "--json"))
    assert len(decided) == len(item["links"]) and {d["review_item"] for d in decided} == {
        item["item"]
    }
    _run(cfg, url, "--incremental")
    after = _golden(url)
    for link in item["links"]:
        left, right = link.split(" / ")
        assert after[left] == after[right]
    remaining = json.loads(_cli(cfg, url, "review", "list", "--kind", "cluster", "--json"))
    assert item["item"] not in {row["item"] for row in remaining}
    everything = json.loads(_cli(cfg, url, "review", "list", "--json", "--limit", "1000"))
    assert {row["kind"] for row in everything} == {"pair", "cluster"}
