"""The snapshot read in a child process (golden_records/snapshot_reader.py) gives what
the store's own read gives, and falls back to it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from mdm_pipeline.cli import app
from mdm_pipeline.golden_records import snapshot_reader, store
from mdm_pipeline.golden_records.snapshot_reader import SnapshotRead
from mdm_pipeline.pipeline import incremental as inc

from .test_incremental import day2

runner = CliRunner()
CONVERT = {"records": inc.RECORD_COLUMNS}


def _run(cfg: Path, url: str, *extra: str) -> None:
    result = runner.invoke(
        app, ["run", "--config", str(cfg), "--json", *extra], env={"MDM_STORE_URL": url}
    )
    assert result.exit_code == 0, result.output


def _assert_same(got: tuple | None, want: tuple | None) -> None:
    assert got is not None and want is not None
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys() and got[2].keys() == want[2].keys()
    for name in want[1]:
        pd.testing.assert_frame_equal(got[1][name], want[1][name], obj=name)
    for name, table in want[2].items():
        if isinstance(table, store.StoredRecords):
            assert got[2][name].rows.equals(table.rows)
            assert (got[2][name].at == table.at).all()
        else:
            assert isinstance(got[2][name], pa.Table) and got[2][name].equals(table)


@pytest.fixture
def night_two(samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store after a full run and an incremental night that patched its snapshot (a
    base, a patch, a live index and the links: every kind of part)."""
    monkeypatch.setattr(inc, "PATCH_SHARE", 10.0)
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    _run(samples / "config.yaml", url)
    day2(samples, 1)
    _run(samples / "config.yaml", url, "--incremental")
    return url


def test_the_child_process_reads_what_the_store_reads(night_two: str) -> None:
    engine = store.connect(night_two)
    want = store.read_snapshot(engine, CONVERT)
    assert want is not None and {"patch", "live"} <= _part_names(engine)
    pending = SnapshotRead(engine)
    folder = pending._folder
    assert pending._child is not None and folder is not None  # a child was started
    got = pending.result(CONVERT)
    _assert_same(got, want)
    assert not Path(folder).exists()  # its files are gone once mapped
    # Without `convert`, every column, as the store's own read.
    _assert_same(SnapshotRead(engine).result(), store.read_snapshot(engine))
    engine.dispose()


def _part_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(store.snapshot.c.name)).scalars())


def test_a_failed_child_falls_back_to_reading_here(
    night_two: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(snapshot_reader, "CHILD_MODULE", "mdm_pipeline.no_such_module")
    engine = store.connect(night_two)
    with caplog.at_level(logging.WARNING, logger=snapshot_reader.__name__):
        got = SnapshotRead(engine).result(CONVERT)
    _assert_same(got, store.read_snapshot(engine, CONVERT))
    assert "read in this one" in caplog.text
    engine.dispose()


def test_a_store_without_the_last_runs_snapshot_has_none(night_two: str, tmp_path: Path) -> None:
    # No snapshot at all: a store with its schema and nothing else.
    empty = store.connect(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    assert SnapshotRead(empty).result(CONVERT) is None
    empty.dispose()
    # A snapshot older than the last successful run: not the answer either.
    engine = store.connect(night_two)
    with engine.begin() as conn:
        conn.execute(sa.update(store.snapshot).values(run_id="an older run"))
    assert store.read_snapshot(engine, CONVERT) is None
    assert SnapshotRead(engine).result(CONVERT) is None
    engine.dispose()


def test_only_a_sqlite_file_is_read_in_a_child(tmp_path: Path) -> None:
    pg = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    assert snapshot_reader._store_file(pg) is None
    assert snapshot_reader._store_file(sa.create_engine("sqlite://")) is None
    assert snapshot_reader._store_file(sa.create_engine(f"sqlite:///{tmp_path}/absent")) is None
    there = tmp_path / "there.sqlite"
    shutil.copy(Path(__file__), there)
    assert snapshot_reader._store_file(sa.create_engine(f"sqlite:///{there}")) == str(there)
