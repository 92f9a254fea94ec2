"""Configuration: unknown keys refused, one line per mistake naming file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mdm_pipeline.config.errors import ConfigError
from mdm_pipeline.config.loader import load_settings, store_url
from mdm_pipeline.config.settings import STORE_URL_ENV

from .conftest import SAMPLES


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _sample_data() -> dict:
    return yaml.safe_load((SAMPLES / "config.yaml").read_text(encoding="utf-8"))


def _error(tmp_path: Path, data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, data), env={})
    return info.value.messages


def test_sample_config_loads_with_default_sqlite_store_next_to_it() -> None:
    settings = load_settings(SAMPLES / "config.yaml", env={})
    assert [s.name for s in settings.sources] == ["ecommerce", "stores", "callcentre", "b2b"]
    assert store_url(settings) == f"sqlite:///{(SAMPLES / 'mdm.sqlite').as_posix()}"


def test_environment_overrides_store_url() -> None:
    settings = load_settings(SAMPLES / "config.yaml", env={STORE_URL_ENV: "sqlite:///x.db"})
    assert store_url(settings) == "sqlite:///x.db"


def test_two_digit_year_refused_with_file_and_key_path(tmp_path: Path) -> None:
    data = _sample_data()
    data["sources"][2]["mapping"]["birth_date"]["format"] = "%d/%m/%y"
    messages = _error(tmp_path, data)
    assert messages[0].startswith(
        "config.yaml: sources[2].mapping.birth_date: unknown date format '%d/%m/%y'"
    )


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["sources"][0]["mapping"].update(birthdate="x"),
            "config.yaml: sources[0].mapping.birthdate: unknown key",
        ),
        (lambda d: d.update(matchng={}), "config.yaml: matchng: unknown key"),
        (lambda d: d["sources"][1].update(encoding="ebcdic"), "config.yaml: sources[1].encoding:"),
        (
            lambda d: d["sources"][1].update(format="xlsx"),
            "config.yaml: sources[1]: format must be one of csv, parquet, sql",
        ),
        (
            lambda d: d["sources"][0]["mapping"].pop("source_key"),
            "config.yaml: sources[0].mapping.source_key: required key is missing",
        ),
        (
            lambda d: d.update(store={"url": "postgresql://mdm:secret@db/mdm"}),
            "config.yaml: store.url: a password must not be written in the config file",
        ),
        (
            lambda d: d["sources"][0]["mapping"].update(email={"column": "a", "constant": "b"}),
            "config.yaml: sources[0].mapping.email: give exactly one of column, columns "
            "or constant",
        ),
        (
            lambda d: d["matching"]["blocking"]["rules"][0].update(keys=["shoe_size"]),
            "config.yaml: matching.blocking.rules[0].keys: unknown field 'shoe_size'",
        ),
        (
            lambda d: d["matching"]["bands"].update(review=0.995),
            "config.yaml: matching.bands: review must be below auto_match",
        ),
        (
            lambda d: d["sources"].append(dict(d["sources"][0])),
            "config.yaml: sources: source names must be unique (ecommerce repeated)",
        ),
    ],
)
def test_mistakes_name_file_and_key_path(tmp_path: Path, mutate, expected: str) -> None:
    data = _sample_data()
    mutate(data)
    messages = _error(tmp_path, data)
    assert any(m.startswith(expected) for m in messages), messages
    assert all("\n" not in m for m in messages)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("version: 1\nsources:\n  - name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.messages[0].startswith("config.yaml: line ")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "nope.yaml", env={})
