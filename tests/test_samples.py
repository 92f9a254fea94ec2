"""The shipped samples and their generator."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd
import pytest

from mdm_pipeline.config.loader import load_settings
from mdm_pipeline.sources import load_source
from mdm_pipeline.sources.synthetic import FILES, generate

from .conftest import SAMPLES

RUN_DATE = pd.Timestamp("2026-11-22")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_samples_are_the_generator_output(tmp_path: Path) -> None:
    generate(tmp_path, 2000)
    for name in [*FILES.values(), "config.yaml"]:
        if name.endswith(".parquet"):  # Parquet metadata names the writer version
            a = pd.read_parquet(tmp_path / name)
            b = pd.read_parquet(SAMPLES / name)
            pd.testing.assert_frame_equal(a, b)
        else:
            assert _digest(tmp_path / name) == _digest(SAMPLES / name), name


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", 500, seed=7)
    generate(tmp_path / "b", 500, seed=7)
    generate(tmp_path / "c", 500, seed=8)
    name = FILES["stores"]
    assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name)
    assert _digest(tmp_path / "a" / name) != _digest(tmp_path / "c" / name)


@pytest.mark.parametrize("source", ["ecommerce", "stores", "callcentre", "b2b"])
def test_rows_read_equal_records_plus_quarantine(source: str) -> None:
    settings = load_settings(SAMPLES / "config.yaml", env={})
    mapped = load_source(settings.source(source), settings, RUN_DATE)
    assert mapped.rows_read > 0
    assert mapped.rows_read == len(mapped.records) + len(mapped.quarantine)
    assert mapped.records["source_key"].is_unique


def test_samples_have_the_promised_conventions() -> None:
    stores = (SAMPLES / FILES["stores"]).read_bytes()
    stores.decode("cp1252")
    with pytest.raises(UnicodeDecodeError):
        stores.decode("utf-8")
    text = stores.decode("cp1252")
    assert text.splitlines()[0].startswith("NUM_CARTE;CIVILITE;")
    assert re.search(r";(PARIS|LYON|MARSEILLE) \d{1,2};", text)  # arrondissement in the town
    assert re.search(r";(PARIS|LYON|MARSEILLE) CEDEX \d\d;", text)
    calls = (SAMPLES / FILES["callcentre"]).read_text(encoding="latin-1")
    assert '"' in calls and "\n7" in calls  # quoted multi-line addresses
    truth = pd.read_csv(SAMPLES / FILES["truth"], dtype=str)
    sizes = truth.groupby("entity_id").size()
    assert (sizes > 1).sum() > 300  # plenty of customers known to several BUs
    npai = pd.read_csv(SAMPLES / FILES["npai"], sep=";", dtype=str)
    assert set(npai["CODE_BU"]) <= {"stores", "ecommerce"} and len(npai) > 10


def test_generator_scales_linearly_in_files(tmp_path: Path) -> None:
    made = generate(tmp_path, 20_000, seed=1)
    assert 19_000 <= sum(made.records.values()) <= 20_200
    truth = pd.read_csv(tmp_path / FILES["truth"], dtype=str)
    assert truth["entity_id"].nunique() == made.entities
