"""Return files written by a child process while the store is written
(pipeline/exporting.py) are the files the run writes itself, and a failed child
leaves them to the run."""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from mdm_pipeline.config.settings import CsvSource, ParquetSource
from mdm_pipeline.golden_records import store
from mdm_pipeline.golden_records.schema import HELD_PREFIX
from mdm_pipeline.pipeline import exporting
from mdm_pipeline.pipeline.exports import RETURN_FIELDS
from mdm_pipeline.pipeline.run import Pipeline
from mdm_pipeline.sources import writers


def _run(samples: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MDM_STORE_URL", f"sqlite:///{samples / 'store.sqlite'}")
    Pipeline.from_config(samples / "config.yaml").run()


def _files(samples: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((samples / "out").glob("*_return.*"))}


def _held(samples: Path) -> dict[str, list[dict]]:
    """What the next night reads back of each full extract's records: the held part
    the last run wrote, its rows in key order."""
    settings = Pipeline.from_config(samples / "config.yaml").settings
    whole = [s.name for s in settings.sources if s.delta is None]
    engine = store.connect(f"sqlite:///{samples / 'store.sqlite'}")
    try:
        with engine.connect() as conn:
            held = store.read_held(conn, RETURN_FIELDS, whole)
    finally:
        engine.dispose()
    return {name: t.sort_by("source_key").to_pylist() for name, t in held.items()}


@pytest.fixture
def written_here(samples: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """The samples' return files as the run writes them itself (its store kept: a
    second run gives every record the same golden ID)."""
    with monkeypatch.context() as here:
        here.setattr(exporting, "MIN_RECORDS", 10**12)
        _run(samples, here)
    return _files(samples)


@pytest.fixture
def held_here(samples: Path, written_here: dict[str, bytes]) -> dict[str, list[dict]]:
    """The held part the run made itself, with `written_here`'s files."""
    held = _held(samples)
    assert len(held) == 4 and all(held.values())
    return held


@pytest.fixture
def any_run_exports_in_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporting, "MIN_RECORDS", 0)


#: Each test looks for the job folders a run leaves in its own temporary folder.
pytestmark = pytest.mark.usefixtures("private_tempdir")


def _leftovers() -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob("mdm-export-*"))


@pytest.mark.usefixtures("any_run_exports_in_a_child")
def test_the_childs_return_files_are_the_runs_own(
    samples: Path,
    written_here: dict[str, bytes],
    held_here: dict[str, list[dict]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(*args: object) -> list[Path]:
        raise AssertionError("the run wrote the files the child was to write")

    # The child is another process: only a write in this one is forbidden.
    monkeypatch.setattr(exporting, "export_from", forbidden)
    before = _leftovers()
    _run(samples, monkeypatch)
    assert _files(samples) == written_here
    assert _held(samples) == held_here  # the next night's held part, made by the child
    assert len(written_here) == 4 and all(written_here.values())
    assert _leftovers() == before  # the job's inputs are gone


@pytest.mark.usefixtures("any_run_exports_in_a_child")
# A child that exits with an error, and one that exits cleanly with no JSON answer.
@pytest.mark.parametrize("module", ["mdm_pipeline.no_such_module", "this"])
def test_a_failed_child_leaves_the_files_to_the_run(
    samples: Path,
    written_here: dict[str, bytes],
    held_here: dict[str, list[dict]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    module: str,
) -> None:
    monkeypatch.setattr(exporting, "CHILD_MODULE", module)
    for path in (samples / "out").glob("*_return.*"):
        path.unlink()
    with caplog.at_level(logging.WARNING, logger=exporting.__name__):
        _run(samples, monkeypatch)
    assert "written here" in caplog.text
    assert _files(samples) == written_here
    assert _held(samples) == held_here


@pytest.mark.usefixtures("any_run_exports_in_a_child")
def test_a_child_that_cannot_start_leaves_the_files_to_the_run(
    samples: Path,
    written_here: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_process(*args: object, **kwargs: object) -> None:
        raise OSError("no process to be had")

    monkeypatch.setattr(exporting.subprocess, "Popen", no_process)
    with caplog.at_level(logging.WARNING, logger=exporting.__name__):
        _run(samples, monkeypatch)
    assert "could not be written by a child" in caplog.text
    assert _files(samples) == written_here


@pytest.mark.usefixtures("any_run_exports_in_a_child")
def test_a_run_that_fails_while_the_child_writes_leaves_the_files_as_they_were(
    samples: Path, written_here: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("the store failed")

    monkeypatch.setattr(store, "write_snapshot", broken)
    before = _leftovers()
    with pytest.raises(RuntimeError, match="the store failed"):
        _run(samples, monkeypatch)
    assert _files(samples) == written_here
    assert _leftovers() == before


def test_golden_ids_that_are_not_the_records_are_refused(tmp_path: Path) -> None:
    raw = pd.DataFrame({"id": ["a", "b"]})
    part = pd.DataFrame({"source_key": ["a", "b"]})
    spec = CsvSource(format="csv", name="one", path=Path("one.csv"), mapping={"source_key": "id"})
    exporting.write_inputs(tmp_path, [spec], [raw], [part])
    exporting.write_golden_ids(tmp_path, np.array(["G1", "G2", "G3"], dtype=object))
    with pytest.raises(ValueError, match="not the records'"):
        exporting.export_from(tmp_path, tmp_path / "out", 1)


def test_return_files_written_by_pieces_are_the_files_written_whole(
    samples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child writes each source a piece at a time; here in this process (a child
    that fails), with pieces of 11 rows, which the writer renders in chunks of 37."""
    monkeypatch.setattr(writers, "CSV_CHUNK_ROWS", 37)
    monkeypatch.setattr(exporting, "CSV_CHUNK_ROWS", 37)
    monkeypatch.setattr(exporting, "PIECE_ROWS", 11)
    with monkeypatch.context() as here:
        here.setattr(exporting, "MIN_RECORDS", 10**12)
        _run(samples, here)
    whole, held = _files(samples), _held(samples)
    monkeypatch.setattr(exporting, "MIN_RECORDS", 0)
    monkeypatch.setattr(exporting, "CHILD_MODULE", "mdm_pipeline.no_such_module")
    loaded: list[str] = []
    load = exporting._load

    def counted(path: Path) -> object:
        loaded.append(path.name)
        return load(path)

    monkeypatch.setattr(exporting, "_load", counted)
    _run(samples, monkeypatch)
    assert "0.5.pickle" in loaded  # the first source came in six pieces at least
    assert _files(samples) == whole
    assert _held(samples) == held and all(held.values())  # held a piece at a time


def test_a_source_with_columns_rendered_by_chunks_is_cut_in_the_writers_chunks() -> None:
    spec = CsvSource(format="csv", name="one", path=Path("one.csv"), mapping={"source_key": "id"})
    part = pd.DataFrame(
        {"source_key": ["a", "b"]} | {c: ["x", None] for c in exporting.RETURN_COLUMNS}
    ).drop(columns="golden_id")
    texts = pd.DataFrame({"id": ["a", "b"], "n": [1, 2]})
    assert exporting.piece_rows(spec, texts, part) == exporting.PIECE_ROWS
    dated = texts.assign(born=pd.to_datetime(["2001-02-03 00:00", "2001-02-04 10:00"]))
    assert exporting.piece_rows(spec, dated, part) == writers.CSV_CHUNK_ROWS == 100_000
    parquet = ParquetSource(
        format="parquet", name="two", path=Path("two.parquet"), mapping={"source_key": "id"}
    )
    assert exporting.piece_rows(parquet, texts, part) == 2
    # A return column the records lack is a column of missing numbers: by chunks too.
    assert exporting.piece_rows(spec, texts, part.drop(columns="city_norm")) == 100_000


def test_a_full_run_whose_nights_return_no_files_holds_nothing_for_them(
    samples: Path, held_here: dict[str, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export.incremental: false`: no night reads a held part, and the one an earlier
    run left is removed, not kept beside the store's records."""
    cfg = samples / "config.yaml"
    cfg.write_text(cfg.read_text().replace("  dir: out", "  dir: out\n  incremental: false", 1))
    _run(samples, monkeypatch)
    assert _held(samples) == {}
    engine = store.connect(f"sqlite:///{samples / 'store.sqlite'}")
    try:
        with engine.connect() as conn:
            names = conn.execute(sa.select(store.snapshot.c.name)).scalars().all()
    finally:
        engine.dispose()
    assert names and not any(n.startswith(HELD_PREFIX) for n in names)


@pytest.mark.usefixtures("any_run_exports_in_a_child")
def test_a_held_part_that_was_not_made_leaves_the_night_to_the_payloads(
    samples: Path,
    written_here: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The files are written (here: the child fails) but the held part never gets its
    name: the run still succeeds with its files, and holds nothing for the next night,
    which then reads the stored payloads."""
    monkeypatch.setattr(exporting, "CHILD_MODULE", "mdm_pipeline.no_such_module")
    export_from = exporting.export_from

    def losing_the_held_part(folder: Path, *args: object) -> list[Path]:
        paths = export_from(folder, *args)  # type: ignore[arg-type]
        (folder / exporting.HELD_FILE).unlink()
        return paths

    monkeypatch.setattr(exporting, "export_from", losing_the_held_part)
    with caplog.at_level(logging.WARNING, logger=exporting.__name__):
        _run(samples, monkeypatch)
    assert "held part made with the return files is missing" in caplog.text
    assert _files(samples) == written_here
    assert _held(samples) == {}


def test_a_held_part_holds_only_its_own_sources_records() -> None:
    """A delta extract's records handed to the part (the run hands it every source's)
    are not held: the night reads those by key, and a part of a source it does not
    list would only cost memory and room."""
    sink = io.BytesIO()
    part = exporting.HeldPart(sink, ["full"])
    records = pd.DataFrame({"source_key": ["1", "2"], "golden_id": ["G1", "G2"]})
    part.add("delta", records)
    part.add("full", records)
    part.close()
    table = pq.read_table(io.BytesIO(sink.getvalue()))
    assert table.column("source").to_pylist() == ["full", "full"]
    assert table.column("source_key").to_pylist() == ["1", "2"]
    assert table.column("golden_id").to_pylist() == ["G1", "G2"]
