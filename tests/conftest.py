"""Shared fixtures: sample paths, a scratch copy of the samples, the PostgreSQL URL, and
a dump of a store's every table (what a failed run must leave untouched)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from mdm_pipeline.golden_records import store

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
PG_ADMIN_URL = os.environ.get(
    "MDM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """A private copy of data/samples (runs write their store and exports next to it)."""
    dest = tmp_path / "samples"
    shutil.copytree(SAMPLES, dest, ignore=shutil.ignore_patterns("out", "*.sqlite"))
    return dest


@pytest.fixture
def private_tempdir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """This process's temporary folder, for the test, in a folder of its own: a test that
    looks there for what a run left behind must not see the files of another test,
    running beside it on another core (the suite runs on every core)."""
    folder = tmp_path_factory.mktemp("tempdir")
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _pg_available() -> bool:
    try:
        engine = sa.create_engine(PG_ADMIN_URL)
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema on CI's server; fails (not skips) under CI=true."""
    if not _pg_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required under CI but unreachable at {PG_ADMIN_URL}")
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")
    schema = f"mdm_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_ADMIN_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


def _dump(url: str) -> dict[str, pd.DataFrame]:
    engine = sa.create_engine(url)
    out = {}
    with engine.connect() as conn:
        for table in store.metadata.sorted_tables:
            frame = store._read(conn, sa.select(table))
            out[table.name] = frame.sort_values(list(frame.columns)).reset_index(drop=True)
    engine.dispose()
    return out


@pytest.fixture
def dump_store() -> Callable[[str], dict[str, pd.DataFrame]]:
    """Every table of a store, sorted: compare two dumps to show a store unchanged."""
    return _dump
