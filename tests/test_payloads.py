"""Payloads made by a child process while the run matches (golden_records/payloads.py)
are the ones the store makes itself, chunk by chunk, and a failed child leaves them
to the store."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from mdm_pipeline.config.schema import text_dtype
from mdm_pipeline.golden_records import payloads, store
from mdm_pipeline.pipeline.run import Pipeline


def _every_kind(rows: int) -> pd.DataFrame:
    """A column of each kind a payload holds, missing values and escapes included."""
    rng = np.random.default_rng(7)
    words = ["Amélie", 'dit "Mimi"', "a/b", "back\\slash", "tab\tnew\nline", "bell\x07", ""]
    texts = [words[i % len(words)] if i % 5 else None for i in range(rows)]
    return pd.DataFrame(
        {
            "arrow_text": pd.Series(texts, dtype=text_dtype()),
            "object_text": pd.Series([t if i % 3 else np.nan for i, t in enumerate(texts)]),
            "object_mixed": pd.Series([1, "1", 2.5, None, True, "x"] * (rows // 6 + 1))[:rows],
            "flag": rng.integers(0, 2, rows).astype(bool),
            "maybe": pd.array([True, False, None] * (rows // 3 + 1), dtype="boolean")[:rows],
            "born": pd.to_datetime(["1980-02-29", None, "2001-12-31"] * (rows // 3 + 1))[:rows],
            "whole": rng.integers(-5, 5, rows),
            "real": np.where(rng.random(rows) < 0.3, np.nan, rng.random(rows)),
        }
    )


def test_the_childs_chunks_are_the_payloads_made_here() -> None:
    frame = _every_kind(53)
    order = np.random.default_rng(1).permutation(len(frame))
    job = payloads.PayloadJob(frame, list(frame.columns), order, chunk_rows=10)
    folder = job.folder
    made = job.chunks()
    assert made is not None
    for start in range(0, len(frame), 10):
        got = made.get(start)
        assert got is not None
        want = store.hash_rows(frame.iloc[order[start : start + 10]])
        assert list(got[0]) == list(want[0]) and list(got[1]) == list(want[1])
    assert made.get(5) is None  # not the start of a chunk
    job.close()
    assert folder is not None and not Path(folder).exists()


def _payloads(url: str) -> pd.DataFrame:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        frame = store._read(
            conn,
            sa.select(
                store.source_records.c.source,
                store.source_records.c.source_key,
                store.source_records.c.record_hash,
                store.source_records.c.payload,
            ),
        )
    engine.dispose()
    return frame.sort_values(["source", "source_key"]).reset_index(drop=True)


def _run(samples: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MDM_STORE_URL", url)
    Pipeline.from_config(samples / "config.yaml").run()


@pytest.fixture
def baseline(samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pd.DataFrame:
    """The samples' payloads as a run makes them itself."""
    url = f"sqlite:///{tmp_path / 'here.sqlite'}"
    with monkeypatch.context() as here:
        here.setattr(payloads, "MIN_RECORDS", 10**12)
        _run(samples, url, here)
    return _payloads(url)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run's payloads made by a child, by chunks of 37 records (many chunks)."""
    monkeypatch.setattr(payloads, "MIN_RECORDS", 0)
    monkeypatch.setattr(store, "WRITE_CHUNK_ROWS", 37)


@pytest.mark.usefixtures("small_chunks", "private_tempdir")
def test_a_run_takes_the_childs_payloads_and_writes_what_it_would_make(
    samples: Path, tmp_path: Path, baseline: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[int] = []
    get = payloads.Chunks.get

    def counted(self: payloads.Chunks, start: int) -> tuple[pd.Series, pd.Series] | None:
        answer = get(self, start)
        taken.append(start if answer is not None else -1)
        return answer

    monkeypatch.setattr(payloads.Chunks, "get", counted)

    def forbidden(*args: object) -> None:
        raise AssertionError("the store made payloads the child had made")

    monkeypatch.setattr(store, "_payload_hashes", forbidden)
    _run(samples, f"sqlite:///{tmp_path / 'child.sqlite'}", monkeypatch)
    # Every chunk of the records was the child's.
    assert taken == list(range(0, len(baseline), 37))
    pd.testing.assert_frame_equal(_payloads(f"sqlite:///{tmp_path / 'child.sqlite'}"), baseline)
    assert not list(Path(payloads.tempfile.gettempdir()).glob("mdm-payloads-*"))


@pytest.mark.usefixtures("small_chunks")
# A child that exits with an error, and one that exits cleanly with no JSON answer.
@pytest.mark.parametrize("module", ["mdm_pipeline.no_such_module", "this"])
def test_a_failed_child_leaves_the_payloads_to_the_store(
    samples: Path,
    tmp_path: Path,
    baseline: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    module: str,
) -> None:
    monkeypatch.setattr(payloads, "CHILD_MODULE", module)
    url = f"sqlite:///{tmp_path / 'failed.sqlite'}"
    with caplog.at_level(logging.WARNING, logger=payloads.__name__):
        _run(samples, url, monkeypatch)
    assert "made in this one" in caplog.text
    pd.testing.assert_frame_equal(_payloads(url), baseline)


def test_a_child_that_cannot_start_leaves_the_payloads_to_the_store(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_process(*args: object, **kwargs: object) -> None:
        raise OSError("no process to be had")

    monkeypatch.setattr(payloads.subprocess, "Popen", no_process)
    frame = _every_kind(12)
    with caplog.at_level(logging.WARNING, logger=payloads.__name__):
        job = payloads.PayloadJob(frame, list(frame.columns), np.arange(12), chunk_rows=5)
    assert job.folder is None and job.chunks() is None
    assert "could not be made in a child" in caplog.text


def test_chunks_in_another_order_are_not_taken(caplog: pytest.LogCaptureFixture) -> None:
    frame = _every_kind(30)
    order = np.arange(30)
    job = payloads.PayloadJob(frame, list(frame.columns), order, store.WRITE_CHUNK_ROWS)
    with caplog.at_level(logging.WARNING, logger=store.__name__):
        assert store._made_payloads(job, order[::-1].copy()) is None
    assert "not in the write order" in caplog.text
    job.close()
    job = payloads.PayloadJob(frame, list(frame.columns), order, store.WRITE_CHUNK_ROWS)
    assert store._made_payloads(job, order) is not None
    job.close()


def test_a_postgresql_store_takes_what_both_children_make(
    samples: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither child touches the store: a PostgreSQL store's run with both gives what
    its run without them gave (a second run over it changes nothing, return files
    included)."""
    from mdm_pipeline.pipeline import exporting

    with monkeypatch.context() as here:
        here.setattr(payloads, "MIN_RECORDS", 10**12)
        here.setattr(exporting, "MIN_RECORDS", 10**12)
        _run(samples, pg_url, here)
    before = _payloads(pg_url)
    files = {p.name: p.read_bytes() for p in (samples / "out").glob("*_return.*")}
    monkeypatch.setattr(payloads, "MIN_RECORDS", 0)
    monkeypatch.setattr(exporting, "MIN_RECORDS", 0)
    monkeypatch.setattr(store, "WRITE_CHUNK_ROWS", 37)
    monkeypatch.setenv("MDM_STORE_URL", pg_url)
    summary = Pipeline.from_config(samples / "config.yaml").run()
    assert (summary.golden_created, summary.golden_updated, summary.golden_retired) == (0, 0, 0)
    pd.testing.assert_frame_equal(_payloads(pg_url), before)
    assert {p.name: p.read_bytes() for p in (samples / "out").glob("*_return.*")} == files
    assert len(files) == 4
