"""Load a YAML configuration into `Settings`, with one-line errors.

Every error names the file and the key path (`sources[2].mapping.birth_date`)
so that a steward can fix it without reading a traceback.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mdm_pipeline.config.errors import ConfigError
from mdm_pipeline.config.settings import STORE_URL_ENV, Settings


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"csv", "parquet", "sql"} and out.startswith("sources["):
            continue  # discriminator tag pydantic inserts; not a key the user wrote
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(err: dict[str, Any]) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "union_tag_invalid":
        msg = "format must be one of csv, parquet, sql"
    return msg


def format_validation_error(file_label: str, exc: ValidationError) -> list[str]:
    """One line per problem: `file: key.path: message`."""
    return [f"{file_label}: {_key_path(e['loc'])}: {_message(e)}" for e in exc.errors()]


def load_settings(path: str | Path, env: dict[str, str] | None = None) -> Settings:
    """Read, validate and resolve a configuration file.

    `env` defaults to `os.environ`; `MDM_STORE_URL` there overrides the store
    URL, so that passwords never need to be written in the file.
    """
    env = dict(os.environ) if env is None else env
    path = Path(path)
    label = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc.__class__.__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{label}: {where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: (top level): expected a mapping of settings")
    base_dir = path.resolve().parent
    try:
        settings = Settings.model_validate({**data, "base_dir": base_dir, "config_path": path})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(label, exc)) from None
    override = env.get(STORE_URL_ENV)
    if override:
        settings = settings.model_copy(
            update={"store": settings.store.model_copy(update={"url": override})}
        )
    return settings


def store_url(settings: Settings) -> str:
    """The store URL in force: the environment's, the file's, or the default SQLite file."""
    if settings.store.url:
        return settings.store.url
    return f"sqlite:///{(settings.base_dir / 'mdm.sqlite').as_posix()}"


def matching_hash(settings: Settings) -> str:
    """A fingerprint of the matching settings: a stored model is reused only under them."""
    payload = settings.matching.model_dump_json().encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def config_hash(settings: Settings) -> str:
    """A fingerprint of the effective settings, recorded in every run manifest."""
    payload = settings.model_dump_json(exclude={"store"}).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
