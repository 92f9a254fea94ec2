"""The run report: HTML and JSON after every run, with the change since the last."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from typer.testing import CliRunner

from mdm_pipeline.cli import app

runner = CliRunner()
VOID = {"meta", "br", "img", "input", "link", "hr"}


class _Balance(HTMLParser):
    """Checks that every element is closed in order (what a browser would not repair)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.seen: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.seen.add(tag)
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, (tag, self.open[-3:])
        self.open.pop()


def _run(cfg: Path, url: str, *extra: str) -> dict:
    result = runner.invoke(
        app, ["run", "--config", str(cfg), "--json", *extra], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_each_run_writes_a_report_with_the_change_since_the_last(
    samples: Path, tmp_path: Path
) -> None:
    cfg = samples / "config.yaml"
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    first = _run(cfg, url)
    # Night 2: one unit loses a row.
    extract = samples / "centre_appels.csv"
    lines = extract.read_bytes().splitlines(keepends=True)
    extract.write_bytes(b"".join(lines[:-1]))
    second = _run(cfg, url, "--incremental")
    page = Path(second["report"])
    assert page.exists() and page.with_suffix(".json").exists()
    assert Path(first["report"]).exists() and first["report"] != second["report"]
    data = json.loads(page.with_suffix(".json").read_text(encoding="utf-8"))
    assert data["previous_run"] == first["run_id"]
    assert data["change_since_previous"]["records"] == -1
    assert {
        q["source"]
        for q in json.loads(Path(first["report"]).with_suffix(".json").read_text(encoding="utf-8"))[
            "quality"
        ]
    } == {"ecommerce", "stores", "callcentre", "b2b"}
    first_data = json.loads(Path(first["report"]).with_suffix(".json").read_text(encoding="utf-8"))
    assert sum(first_data["cluster_sizes"].values()) == first["clusters"]
    assert sum(first_data["match_weights"]["counts"]) == first["candidate_pairs"]
    assert sum(r["rows"] for r in first_data["quarantine_reasons"]) == sum(
        s["quarantined"] for s in first["sources"]
    )
    html = Path(first["report"]).read_text(encoding="utf-8")
    checker = _Balance()
    checker.feed(html)
    assert not checker.open and {"svg", "table", "rect"} <= checker.seen
    for section in (
        "Sources",
        "Quarantine reasons",
        "Data quality",
        "Match weights",
        "Cluster sizes",
        "review backlog",
    ):
        assert section in html, section
    # Counts and rates only: no customer's e-mail or phone in the page.
    assert "@" not in html and "+33" not in html

    shown = runner.invoke(app, ["report", "--config", str(cfg)], env={"MDM_STORE_URL": url})
    assert shown.exit_code == 0 and str(page) in shown.stdout.replace("\n", "")
    as_json = runner.invoke(
        app,
        ["report", "--config", str(cfg), first["run_id"], "--json"],
        env={"MDM_STORE_URL": url},
    )
    assert json.loads(as_json.stdout)["run_id"] == first["run_id"]
    missing = runner.invoke(
        app, ["report", "--config", str(cfg), "R0-none"], env={"MDM_STORE_URL": url}
    )
    assert missing.exit_code == 1 and "no report of run R0-none" in missing.stderr


def test_run_ids_sort_by_start_even_within_one_second() -> None:
    """Reports and "the last run" are found by sorting run IDs: two runs started in the
    same second must still sort in order, after IDs of the older second-only form."""
    from datetime import UTC, datetime

    from mdm_pipeline.pipeline.run import new_run_id

    second = datetime(2026, 11, 23, 11, 6, 38, tzinfo=UTC)
    ids = [new_run_id(second.replace(microsecond=us)) for us in (5, 40, 999_999)]
    assert ids == sorted(ids)
    assert ids[0] > "R20261123T110638-ffffff"
    assert all(len(i) <= 40 for i in ids)


def test_quality_counts_each_source_over_its_own_records() -> None:
    """Rates per source, sources in order of first appearance, records interleaved."""
    import pandas as pd

    from mdm_pipeline.pipeline.report import quality

    records = pd.DataFrame(
        {
            "source": ["b", "a", "b", "a", "b"],
            "last_name_norm": ["X", None, "Y", "Z", None],
            "email_norm": ["e", "f", None, None, "g"],
            "email_valid": [True, False, None, None, True],
            "address_status": ["valid", None, "valid", "invalid", "corrected"],
            "npai_flag": [False, True, True, False, False],
        }
    )
    got = quality(records)
    assert [r["source"] for r in got] == ["b", "a"]
    b, a = got
    assert (b["records"], a["records"]) == (3, 2)
    assert b["complete"]["last name"] == 0.6667 and a["complete"]["last name"] == 0.5
    assert b["complete"]["e-mail"] == 0.6667 and a["complete"]["e-mail"] == 0.5
    assert b["email_valid"] == 1.0 and a["email_valid"] == 0.0
    assert b["address_status"] == {"valid": 2, "corrected": 1}
    assert a["address_status"] == {"missing": 1, "invalid": 1}
    assert b["npai_rate"] == 0.3333 and a["npai_rate"] == 0.5


def test_quality_counts_address_statuses_per_source_most_frequent_first() -> None:
    """Counted by code over Arrow texts, as each source's own `value_counts` lists them."""
    import numpy as np
    import pandas as pd

    from mdm_pipeline.pipeline.report import quality

    rng = np.random.default_rng(7)
    n = 500
    source = rng.choice(["stores", "web", "b2b"], n, p=[0.5, 0.3, 0.2])
    status = rng.choice(["valid", "corrected", "invalid", "foreign", None], n)
    records = pd.DataFrame(
        {
            "source": pd.array(source, dtype="string[pyarrow]"),
            "address_status": pd.array(status, dtype="string[pyarrow]"),
        }
    )
    got = {row["source"]: row["address_status"] for row in quality(records)}
    filled = records["address_status"].fillna("missing").astype(str)
    for name in ("stores", "web", "b2b"):
        want = filled[records["source"] == name].value_counts()
        assert got[name] == {k: int(v) for k, v in want.items()}
        assert list(got[name].values()) == sorted(got[name].values(), reverse=True)
