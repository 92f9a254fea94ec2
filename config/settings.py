"""Pydantic models of one deployment's YAML configuration.

Settings are data: they are validated here, apart from the data they describe.
The check that mapped columns exist in the extracts lives in
`sources.inspect_columns`, run by `mdm validate-config` and at the start of every run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mdm_pipeline.config.schema import RECORD_TYPES

STORE_URL_ENV = "MDM_STORE_URL"

_ALLOWED_DIRECTIVES = set("dmYHMSfzbBIp%")
_DIRECTIVE = re.compile(r"%(.)")


class Strict(BaseModel):
    """Base model: unknown keys are refused, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_date_format(fmt: str, with_time: bool) -> str:
    """Refuse formats that would silently misread dates.

    Two-digit years (`%y`) map 1950 and 2050 to the same text: a birth date
    read with them is wrong half of the time, so they are refused outright.
    """
    if fmt == "ISO8601":
        return fmt
    directives = _DIRECTIVE.findall(fmt)
    bad = [d for d in directives if d not in _ALLOWED_DIRECTIVES]
    if bad:
        hint = " (two-digit years are ambiguous; use %Y)" if "y" in bad else ""
        raise ValueError(f"unknown date format '{fmt}'{hint}")
    has_month = "m" in directives or "b" in directives or "B" in directives
    if not ("Y" in directives and "d" in directives and has_month):
        raise ValueError(f"unknown date format '{fmt}' (needs %Y, a month and %d)")
    if not with_time and ({"H", "M", "S"} & set(directives)):
        raise ValueError(f"unknown date format '{fmt}' (a date field takes no time)")
    return fmt


class FieldSpec(Strict):
    """Where one canonical field comes from in a business unit's extract.

    A bare string in YAML is shorthand for `{column: NAME}`.
    """

    column: str | None = None
    columns: list[str] | None = None
    constant: str | None = None
    values: dict[str, str] | None = Field(
        default=None, description="recode source values (e.g. '1' -> 'M') before use"
    )
    required: bool = False
    on_invalid: Literal["quarantine", "null"] = "quarantine"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"column": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_origin(self) -> FieldSpec:
        given = [k for k in ("column", "columns", "constant") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of column, columns or constant")
        if self.columns is not None and not self.columns:
            raise ValueError("columns must list at least one column")
        return self

    @property
    def source_columns(self) -> list[str]:
        """The extract's columns this field reads (none for a constant)."""
        if self.column is not None:
            return [self.column]
        return list(self.columns or [])


class DateFieldSpec(FieldSpec):
    """A date read with one or more strptime formats, tried in order.

    An impossible date (31/02) becomes null with a quality code by default: one
    bad optional field should not keep a customer out of the consolidation.
    """

    format: str | list[str] = "ISO8601"
    with_time: bool = False
    on_invalid: Literal["quarantine", "null"] = "null"

    @model_validator(mode="after")
    def _formats(self) -> DateFieldSpec:
        for fmt in self.formats:
            _check_date_format(fmt, self.with_time)
        return self

    @property
    def formats(self) -> list[str]:
        """The formats as a list, whatever the YAML gave."""
        return [self.format] if isinstance(self.format, str) else list(self.format)


class DateTimeFieldSpec(DateFieldSpec):
    """A timestamp (e.g. the extract's last-update column)."""

    with_time: bool = True


class BoolFieldSpec(FieldSpec):
    """A consent flag: explicit yes, explicit no, or no choice recorded (empty)."""

    true_values: list[str] = ["1", "true", "t", "yes", "y", "o", "oui", "vrai", "x"]
    false_values: list[str] = ["0", "false", "f", "no", "n", "non", "faux"]


class FullNameSpec(FieldSpec):
    """A single column holding first and last name, split at load time."""

    order: Literal["auto", "first_last", "last_first"] = Field(
        default="auto",
        description="auto: a comma or upper-case surname decides, else the first-name list",
    )


class Mapping(Strict):
    """Canonical field -> origin in the extract. Unknown fields are refused."""

    source_key: FieldSpec
    record_type: FieldSpec | None = None
    full_name: FullNameSpec | None = None
    civility: FieldSpec | None = None
    first_name: FieldSpec | None = None
    last_name: FieldSpec | None = None
    birth_name: FieldSpec | None = None
    birth_date: DateFieldSpec | None = None
    email: FieldSpec | None = None
    phone: FieldSpec | None = None
    address_lines: FieldSpec | None = None
    postcode: FieldSpec | None = None
    city: FieldSpec | None = None
    country: FieldSpec | None = None
    company_name: FieldSpec | None = None
    siren: FieldSpec | None = None
    siret: FieldSpec | None = None
    consent_email: BoolFieldSpec | None = None
    consent_sms: BoolFieldSpec | None = None
    consent_post: BoolFieldSpec | None = None
    source_updated_at: DateTimeFieldSpec | None = None

    def specs(self) -> dict[str, FieldSpec]:
        """The fields this mapping fills, in declaration order."""
        return {
            name: spec
            for name in type(self).model_fields
            if (spec := getattr(self, name)) is not None
        }

    def source_columns(self) -> list[str]:
        """Every extract column the mapping reads, without repeats."""
        seen: dict[str, None] = {}
        for spec in self.specs().values():
            for col in spec.source_columns:
                seen.setdefault(col, None)
        return list(seen)


def _no_password(url: str) -> str:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(f"not a database URL ({exc.__class__.__name__})") from None
    if parsed.password:
        raise ValueError(
            "a password must not be written in the config file; "
            f"set it through the environment ({STORE_URL_ENV} or the source's url_env)"
        )
    return url


class _SourceBase(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)]
    trust: int = Field(default=1, ge=0, le=100, description="higher wins in survivorship")
    record_type: Literal["person", "organisation"] = "person"
    mapping: Mapping


class CsvSource(_SourceBase):
    """A delimited text extract."""

    format: Literal["csv"]
    path: Path
    encoding: Literal["utf-8", "utf-8-sig", "cp1252", "latin-1", "iso-8859-15"] = "utf-8"
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    quotechar: str = Field(default='"', min_length=1, max_length=1)

    @field_validator("encoding", mode="before")
    @classmethod
    def _encoding_alias(cls, value: Any) -> Any:
        aliases = {
            "utf8": "utf-8",
            "windows-1252": "cp1252",
            "latin1": "latin-1",
            "iso-8859-1": "latin-1",
            "utf-8-bom": "utf-8-sig",
        }
        return aliases.get(str(value).lower(), str(value).lower())


class ParquetSource(_SourceBase):
    """A Parquet file."""

    format: Literal["parquet"]
    path: Path


class SqlSource(_SourceBase):
    """A table or query read through SQLAlchemy."""

    format: Literal["sql"]
    url: str | None = None
    url_env: str | None = Field(default=None, description="environment variable holding the URL")
    table: str | None = None
    query: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _no_password(value)

    @model_validator(mode="after")
    def _what(self) -> SqlSource:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url or url_env")
        if (self.table is None) == (self.query is None):
            raise ValueError("give exactly one of table or query")
        return self


Source = Annotated[CsvSource | ParquetSource | SqlSource, Field(discriminator="format")]


class StoreSettings(Strict):
    """The central store. `url` defaults to a SQLite file next to the config."""

    url: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _no_password(value)


class NormalizeSettings(Strict):
    """Settings of the normalisation stage."""

    default_country: str = Field(default="FR", pattern=r"^[A-Z]{2}$")
    phone_region: str = Field(default="FR", pattern=r"^[A-Z]{2}$")


class ExactRule(Strict):
    """Records whose normalised values agree on all these fields are one customer."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    fields: list[str] = Field(min_length=1)
    record_type: Literal["person", "organisation"] | None = None


MATCHABLE_FIELDS = (
    "first_name",
    "last_name",
    "birth_name",
    "birth_date",
    "email",
    "phone",
    "postcode",
    "city",
    "street",
    "company_name",
    "siren",
    "siret",
)


class MatchingSettings(Strict):
    """Settings of the matching stage."""

    exact_rules: list[ExactRule] = Field(default_factory=list)

    @field_validator("exact_rules")
    @classmethod
    def _fields_known(cls, rules: list[ExactRule]) -> list[ExactRule]:
        for rule in rules:
            unknown = [f for f in rule.fields if f not in MATCHABLE_FIELDS]
            if unknown:
                raise ValueError(
                    f"rule '{rule.name}': unknown field {unknown[0]!r} "
                    f"(known: {', '.join(MATCHABLE_FIELDS)})"
                )
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        return rules


class ExportSettings(Strict):
    """Files written back to the business units after each run."""

    enabled: bool = True
    dir: Path = Path("out")


class NpaiReturnFile(Strict):
    """Layout of a La Poste return (PND/NPAI) file."""

    path: Path
    encoding: Literal["utf-8", "utf-8-sig", "cp1252", "latin-1", "iso-8859-15"] = "utf-8"
    delimiter: str = Field(default=";", min_length=1, max_length=1)
    source_column: str
    key_column: str
    date_column: str
    date_format: str = "%d/%m/%Y"
    reason_column: str

    @field_validator("date_format")
    @classmethod
    def _fmt(cls, value: str) -> str:
        return _check_date_format(value, with_time=False)


class Settings(Strict):
    """One deployment: where the store is, what to read, how each stage behaves."""

    version: Literal[1] = 1
    store: StoreSettings = StoreSettings()
    sources: list[Source] = Field(min_length=1)
    normalize: NormalizeSettings = NormalizeSettings()
    matching: MatchingSettings = MatchingSettings()
    export: ExportSettings = ExportSettings()
    npai_returns: list[NpaiReturnFile] = Field(default_factory=list)

    # Set by the loader, not by the YAML file.
    base_dir: Path = Field(default=Path("."), exclude=True)
    config_path: Path | None = Field(default=None, exclude=True)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[Source]) -> list[Source]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique ({', '.join(dupes)} repeated)")
        return sources

    def resolve(self, path: Path) -> Path:
        """A path from the config, relative to the config file's folder."""
        return path if path.is_absolute() else (self.base_dir / path)

    def source(self, name: str) -> Source:
        """The source called `name`."""
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)


assert set(RECORD_TYPES) == {"person", "organisation"}
