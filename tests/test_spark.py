"""The Spark engine (issue 7): the same pairs, clusters and golden records as the local
engine, in Spark's local mode. Every test here has a time limit: a Spark job that
hangs (a driver out of memory, a worker that cannot start) must fail, not stall CI."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.config.settings import MatchingSettings, SparkSettings
from mdm_pipeline.matching.engine import match, train
from mdm_pipeline.matching.keys import prepare
from mdm_pipeline.matching.scoring import Model
from mdm_pipeline.pipeline.run import Pipeline

runner = CliRunner()

#: Two cores and little memory: what CI machines have.
LOCAL = SparkSettings(master="local[2]", driver_memory="1g", partitions=4)

if importlib.util.find_spec("pyspark") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError('CI runs the Spark tests: pip install -e ".[test]" installs PySpark')
    pytest.skip("PySpark is not installed (the spark extra)", allow_module_level=True)

#: One worker runs them all (the suite runs on every core, `--dist loadgroup`): two
#: JVMs at once on CI's two cores would each take twice as long and twice the memory.
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("spark")]


def _java() -> bool:
    home = os.environ.get("JAVA_HOME")
    return shutil.which("java") is not None or bool(home and Path(home, "bin", "java").exists())


#: Spark needs Java: a machine with only Python and pip skips these tests; CI must
#: run them, so there a missing Java fails them.
needs_java = pytest.mark.skipif(
    not _java() and os.environ.get("CI") != "true", reason="Spark needs Java 17 or later"
)


def _xref(store: Path) -> pd.DataFrame:
    engine = sa.create_engine(f"sqlite:///{store}")
    with engine.connect() as conn:
        xref = pd.read_sql("SELECT source, source_key, golden_id FROM mdm_source_records", conn)
        golden = pd.read_sql(
            "SELECT golden_id, attributes FROM mdm_golden_records WHERE status = 'active'", conn
        )
    engine.dispose()
    return xref.merge(golden, on="golden_id")


def _partition(xref: pd.DataFrame) -> set[frozenset[str]]:
    """The records grouped by golden record, whatever the golden IDs."""
    keys = xref["source"] + ":" + xref["source_key"]
    return {frozenset(group) for group in keys.groupby(xref["golden_id"]).groups.values()}


def _trained(samples: Path) -> tuple[pd.DataFrame, MatchingSettings, Model]:
    """The samples' normalised records, matching settings and a model trained on them."""
    pipeline = Pipeline.from_config(samples / "config.yaml")
    records = pipeline.normalised_records().reset_index(drop=True)
    settings = pipeline.settings.matching
    return records, settings, train(prepare(records), settings)


@needs_java
def test_spark_scores_exactly_the_pairs_of_the_local_engine(samples: Path) -> None:
    from mdm_pipeline.matching.spark import match_spark

    records, settings, model = _trained(samples)
    local = match(prepare(records), settings, copy.deepcopy(model))
    spark = match_spark(records, settings, copy.deepcopy(model), LOCAL)
    assert len(local.pairs) > 1000
    pd.testing.assert_frame_equal(local.pairs, spark.pairs)
    assert local.rule_stats == spark.rule_stats


@needs_java
def test_records_without_a_candidate_pair_give_no_pairs_on_spark(samples: Path) -> None:
    from mdm_pipeline.matching.spark import match_spark

    records, settings, model = _trained(samples)
    few = records.iloc[[0, 5, 9]].reset_index(drop=True)
    local = match(prepare(few), settings, copy.deepcopy(model))
    assert len(local.pairs) == 0
    pd.testing.assert_frame_equal(
        local.pairs, match_spark(few, settings, copy.deepcopy(model), LOCAL).pairs
    )


@needs_java
def test_a_spark_run_gives_the_local_run_golden_records(samples: Path, tmp_path: Path) -> None:
    """A fresh store filled on Spark holds the same clusters and golden records as one
    filled locally; a Spark rerun over the local store keeps every golden ID and
    writes nothing."""
    config = samples / "config.yaml"
    local_store, spark_store = tmp_path / "local.sqlite", tmp_path / "spark.sqlite"
    env = {"MDM_STORE_URL": f"sqlite:///{local_store}"}
    assert runner.invoke(app, ["run", "--config", str(config)], env=env).exit_code == 0
    spark_conf = samples / "spark.yaml"
    spark_conf.write_text(
        config.read_text(encoding="utf-8")
        + "\nengine: spark\nspark:\n  master: local[2]\n  driver_memory: 1g\n  partitions: 4\n",
        encoding="utf-8",
    )
    env_spark = {"MDM_STORE_URL": f"sqlite:///{spark_store}"}
    done = runner.invoke(app, ["run", "--config", str(spark_conf), "--json"], env=env_spark)
    assert done.exit_code == 0, done.output
    local, spark = _xref(local_store), _xref(spark_store)
    assert len(local) == len(spark)
    assert _partition(local) == _partition(spark)
    by_members = {
        frozenset(g["source"] + ":" + g["source_key"]): set(g["attributes"])
        for _, g in local.groupby("golden_id")
    }
    for _, g in spark.groupby("golden_id"):
        assert by_members[frozenset(g["source"] + ":" + g["source_key"])] == set(g["attributes"])

    again = runner.invoke(
        app, ["run", "--config", str(config), "--engine", "spark", "--json"], env=env
    )
    assert again.exit_code == 0, again.output
    assert '"golden_created": 0' in again.output and '"golden_updated": 0' in again.output
    assert (
        _xref(local_store)
        .sort_values(["source", "source_key"])
        .reset_index(drop=True)
        .equals(local.sort_values(["source", "source_key"]).reset_index(drop=True))
    )


def test_without_pyspark_the_run_says_what_to_install(
    samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "pyspark" or m.startswith("pyspark.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyspark", None)
    store = tmp_path / "store.sqlite"
    done = runner.invoke(
        app,
        ["run", "--config", str(samples / "config.yaml"), "--engine", "spark"],
        env={"MDM_STORE_URL": f"sqlite:///{store}"},
    )
    assert done.exit_code == 2
    assert 'pip install "mdm-pipeline[spark]"' in done.output
    assert "Traceback" not in done.output


def test_without_java_the_run_says_what_spark_needs(samples: Path, tmp_path: Path) -> None:
    """A Java that cannot start (here JAVA_HOME pointing nowhere) is one clear line and
    exit code 2, not PySpark's traceback; in a process of its own, since a Spark
    session started by another test would be reused."""
    env = {
        **os.environ,
        "JAVA_HOME": str(tmp_path / "no-java"),
        "MDM_STORE_URL": f"sqlite:///{tmp_path / 'store.sqlite'}",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mdm_pipeline.cli import main; main()",
            "run",
            "--config",
            str(samples / "config.yaml"),
            "--engine",
            "spark",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert 'error: engine "spark": Spark could not start' in done.stderr
    assert "Java 17" in done.stderr and "Traceback" not in done.stderr
