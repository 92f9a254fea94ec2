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
    customer_ref: FieldSpec | None = None
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


class DeltaSettings(Strict):
    """An extract that holds only what changed: each row is an upsert or a deletion."""

    operation_column: str = Field(min_length=1)
    #: Values of that column that mean "deleted" (compared without case or blanks).
    delete_values: list[str] = Field(default_factory=lambda: ["D"], min_length=1)


class _SourceBase(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=40)]
    trust: int = Field(default=1, ge=0, le=100, description="higher wins in survivorship")
    record_type: Literal["person", "organisation"] = "person"
    mapping: Mapping
    #: Set when the unit delivers changes only (see DeltaSettings); such a source is
    #: loaded whole once (the first run), then nightly with `mdm run --incremental`.
    delta: DeltaSettings | None = None


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
    "customer_ref",
    "address",
)

KeyTransform = Literal[
    "exact", "soundex", "metaphone", "nysiis", "phonetic_fr", "prefix", "year", "email_user"
]
_RULE_NAME = r"^[a-z][a-z0-9_]*$"


def _known_field(field: str) -> str:
    if field not in MATCHABLE_FIELDS:
        raise ValueError(f"unknown field {field!r} (known: {', '.join(MATCHABLE_FIELDS)})")
    return field


class BlockingKey(Strict):
    """One part of a blocking key: a field, possibly reduced (phonetic code, prefix...)."""

    field: str
    transform: KeyTransform = "exact"
    length: Annotated[int, Field(ge=1, le=20)] | None = None

    _field = field_validator("field")(_known_field)

    @model_validator(mode="after")
    def _length_for_prefix(self) -> BlockingKey:
        if (self.transform == "prefix") != (self.length is not None):
            raise ValueError("'length' goes with transform 'prefix', and only with it")
        return self


class BlockingRule(Strict):
    """Records sharing every key part (and their record type) are compared."""

    name: Annotated[str, Field(pattern=_RULE_NAME)]
    keys: list[str | BlockingKey] = Field(min_length=1)
    record_type: Literal["person", "organisation"] | None = None

    @field_validator("keys")
    @classmethod
    def _parse_keys(cls, keys: list[str | BlockingKey]) -> list[str | BlockingKey]:
        for key in keys:
            if isinstance(key, str):
                _known_field(key)
        return keys

    def key_parts(self) -> list[BlockingKey]:
        """The keys with plain field names read as exact keys."""
        return [BlockingKey(field=k) if isinstance(k, str) else k for k in self.keys]


class BlockingSettings(Strict):
    """Candidate pairs: the union of the rules' pairs, each pair keeping its first rule."""

    rules: list[BlockingRule] = Field(min_length=1)
    #: A block with more records than this is skipped (with a warning naming the rule):
    #: a key shared by thousands of records identifies nobody.
    max_block_size: Annotated[int, Field(ge=2)] = 500

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[BlockingRule]) -> list[BlockingRule]:
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        return rules


LevelKind = Literal[
    "exact",
    "jaro_winkler",
    "levenshtein",
    "damerau_levenshtein",
    "token_set",
    "date_swap",
    "date_one_digit",
    "email_user",
    "phone_suffix",
    "exact_other",
    "swapped",
    "same_field",
]


class ComparisonLevel(Strict):
    """One agreement level; levels are tried in order and the first that holds wins."""

    kind: LevelKind
    #: Similarity in [0, 1] for jaro_winkler and token_set (and optionally swapped, to
    #: allow a typo in swapped names); edit distance for levenshtein and
    #: damerau_levenshtein (which counts two neighbours swapped as one typo: ADNRE).
    threshold: float | None = None
    #: For exact_other: the field compared crosswise, either way round (last name against
    #: birth name); for swapped: both ways round (first and last names swapped); for
    #: same_field: another field both records must agree on (postcode, city).
    other: str | None = None
    #: m probability used before training, and if training is refused.
    m_prior: Annotated[float, Field(gt=0, lt=1)]

    @model_validator(mode="after")
    def _threshold(self) -> ComparisonLevel:
        needs = self.kind in ("jaro_winkler", "levenshtein", "damerau_levenshtein", "token_set")
        if needs and self.threshold is None:
            raise ValueError(f"level '{self.kind}' needs a threshold")
        if not needs and self.kind != "swapped" and self.threshold is not None:
            raise ValueError(f"level '{self.kind}' takes no threshold")
        similarity = ("jaro_winkler", "token_set", "swapped")
        if self.kind in similarity and self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError("similarity thresholds are between 0 and 1")
        if (self.kind in ("exact_other", "swapped", "same_field")) != (self.other is not None):
            raise ValueError("'other' goes with levels exact_other, swapped and same_field only")
        if self.other is not None:
            _known_field(self.other)
        return self


class Comparison(Strict):
    """How one field of two records is compared: ordered levels, then 'else'."""

    name: Annotated[str, Field(pattern=_RULE_NAME)]
    field: str
    levels: list[ComparisonLevel] = Field(min_length=1)
    #: m of the 'else' level (no level holds) before training.
    else_m_prior: Annotated[float, Field(gt=0, lt=1)]
    #: Weight exact agreement by how rare the value is (MARTIN counts less than ZOBEL).
    tf_adjust: bool = False
    #: A strong identifier: if training says fewer true matches than this agree on the
    #: first level, the model is implausible and the priors are used instead.
    min_m_first_level: Annotated[float, Field(ge=0, lt=1)] | None = None
    #: Comparisons of one group measure one underlying fact (where a household lives and
    #: how to reach it: address, shared e-mail, landline). Among different people of one
    #: household they agree together, so only the strongest agreement of a group counts;
    #: disagreements still all count.
    group: Annotated[str, Field(pattern=_RULE_NAME)] | None = None

    _field = field_validator("field")(_known_field)

    @model_validator(mode="after")
    def _priors_sum(self) -> Comparison:
        total = sum(lv.m_prior for lv in self.levels) + self.else_m_prior
        if abs(total - 1) > 1e-6:
            raise ValueError(f"m priors of comparison '{self.name}' sum to {total:.4f}, not 1")
        return self


class TrainingSettings(Strict):
    """Unsupervised estimation of the Fellegi-Sunter parameters."""

    #: Blocks in which matches are dense; EM runs on each, and a comparison's m comes
    #: from the blocks that do not use its field.
    blocks: list[BlockingRule] = Field(min_length=1)
    u_sample_pairs: Annotated[int, Field(ge=1000)] = 1_000_000
    max_iterations: Annotated[int, Field(ge=1, le=1000)] = 100
    tolerance: Annotated[float, Field(gt=0)] = 1e-5
    #: Bounds on every m, so no level can veto or force a match on its own.
    probability_floor: Annotated[float, Field(gt=0, lt=0.1)] = 1e-4
    #: Bound on u: agreement is never taken as rarer than this among non-matches.
    u_floor: Annotated[float, Field(gt=0, lt=0.1)] = 1e-7
    #: Pairs sampled per training block at most (EM converges long before).
    max_pairs_per_block: Annotated[int, Field(ge=1000)] = 2_000_000
    seed: int = 20261122


class BandSettings(Strict):
    """Decision bands on the match probability of a pair."""

    auto_match: Annotated[float, Field(gt=0, lt=1)] = 0.95
    review: Annotated[float, Field(gt=0, lt=1)] = 0.50

    @model_validator(mode="after")
    def _ordered(self) -> BandSettings:
        if self.review >= self.auto_match:
            raise ValueError("review must be below auto_match")
        return self


class ClusteringSettings(Strict):
    """Guards against chaining when clusters are formed from auto-matches."""

    #: A cluster above this many records is split on its weakest links.
    max_cluster_size: Annotated[int, Field(ge=2)] = 20
    #: Links below this probability are 'weak': a weak link that alone holds two groups
    #: of records together (a bridge between groups of two or more) is cut.
    strong_link: Annotated[float, Field(gt=0, lt=1)] = 0.9999


class MatchingSettings(Strict):
    """Settings of the matching stage: blocking, comparisons, training, bands, clusters."""

    blocking: BlockingSettings = Field(default_factory=lambda: default_blocking())
    comparisons: list[Comparison] = Field(default_factory=lambda: default_comparisons())
    training: TrainingSettings = Field(default_factory=lambda: default_training())
    bands: BandSettings = BandSettings()
    clustering: ClusteringSettings = ClusteringSettings()

    @field_validator("comparisons")
    @classmethod
    def _unique(cls, comparisons: list[Comparison]) -> list[Comparison]:
        names = [c.name for c in comparisons]
        if len(set(names)) != len(names):
            raise ValueError("comparison names must be unique")
        if not comparisons:
            raise ValueError("at least one comparison is needed")
        return comparisons


def default_blocking() -> BlockingSettings:
    """The shipped blocking rules for French customer data."""
    return BlockingSettings.model_validate(_DEFAULT_MODEL["blocking"])


def default_comparisons() -> list[Comparison]:
    """The shipped comparisons and their priors."""
    return [Comparison.model_validate(c) for c in _DEFAULT_MODEL["comparisons"]]


def default_training() -> TrainingSettings:
    """The shipped training blocks (dense in matches: same birth date and name, same e-mail)."""
    return TrainingSettings.model_validate(_DEFAULT_MODEL["training"])


def _lv(kind: str, m: float, **kw: Any) -> dict[str, Any]:
    return {"kind": kind, "m_prior": m, **kw}


_DEFAULT_MODEL: dict[str, Any] = {
    "blocking": {
        "rules": [
            {"name": "customer_ref", "keys": ["customer_ref"]},
            {"name": "email", "keys": ["email"]},
            {"name": "phone", "keys": ["phone"]},
            {
                "name": "birth_date_last_name",
                "keys": ["birth_date", {"field": "last_name", "transform": "phonetic_fr"}],
            },
            {
                "name": "birth_date_first_name",
                "keys": ["birth_date", {"field": "first_name", "transform": "phonetic_fr"}],
            },
            {
                "name": "postcode_names",
                "keys": [
                    "postcode",
                    {"field": "last_name", "transform": "phonetic_fr"},
                    {"field": "first_name", "transform": "phonetic_fr"},
                ],
            },
            {
                # Both names mistyped, or a new surname on marriage: the person's
                # birth date and where they live still meet.
                "name": "birth_date_postcode",
                "keys": ["birth_date", "postcode"],
            },
            {
                "name": "street_first_name",
                "keys": [
                    "street",
                    "postcode",
                    {"field": "first_name", "transform": "prefix", "length": 1},
                ],
            },
            {"name": "siren", "keys": ["siren"], "record_type": "organisation"},
            {
                "name": "company_postcode",
                "keys": [{"field": "company_name", "transform": "prefix", "length": 6}, "postcode"],
                "record_type": "organisation",
            },
        ]
    },
    "comparisons": [
        {
            "name": "first_name",
            "field": "first_name",
            "tf_adjust": True,
            "else_m_prior": 0.05,
            "levels": [
                _lv("exact", 0.83),
                _lv("swapped", 0.03, other="last_name", threshold=0.9),
                # One typo (GERARD, GRERARD) tells more than a mere likeness (ADELE,
                # ADELAIDE), which is often another member of the family.
                _lv("damerau_levenshtein", 0.04, threshold=1),
                _lv("jaro_winkler", 0.02, threshold=0.92),
                _lv("jaro_winkler", 0.03, threshold=0.8),
            ],
        },
        {
            "name": "last_name",
            "field": "last_name",
            "tf_adjust": True,
            "else_m_prior": 0.06,
            "levels": [
                _lv("exact", 0.77),
                _lv("exact_other", 0.04, other="birth_name"),  # married and maiden names
                _lv("swapped", 0.03, other="first_name", threshold=0.9),
                _lv("damerau_levenshtein", 0.04, threshold=1),
                _lv("jaro_winkler", 0.03, threshold=0.92),
                _lv("jaro_winkler", 0.03, threshold=0.8),
            ],
        },
        {
            "name": "birth_date",
            "field": "birth_date",
            "min_m_first_level": 0.5,
            "else_m_prior": 0.04,
            "levels": [_lv("exact", 0.9), _lv("date_swap", 0.03), _lv("date_one_digit", 0.03)],
        },
        {
            "name": "email",
            "field": "email",
            "group": "contact",
            "min_m_first_level": 0.3,
            "else_m_prior": 0.35,
            "levels": [
                _lv("exact", 0.55),
                _lv("email_user", 0.05),
                _lv("jaro_winkler", 0.05, threshold=0.9),
            ],
        },
        {
            "name": "phone",
            "field": "phone",
            "group": "contact",
            "else_m_prior": 0.4,
            "levels": [_lv("exact", 0.55), _lv("phone_suffix", 0.05)],
        },
        {
            # One comparison for the whole address: street, postcode and town agree
            # together far more often than independent fields would, so they are
            # levels of one comparison, never three comparisons added up.
            "name": "address",
            "field": "address",
            "group": "contact",
            "else_m_prior": 0.08,
            "levels": [
                _lv("exact", 0.6),
                _lv("jaro_winkler", 0.12, threshold=0.9),
                _lv("same_field", 0.15, other="postcode"),
                _lv("same_field", 0.05, other="city"),
            ],
        },
        {
            # A customer number the units share (loyalty card, account number): one
            # digit mistyped still points at the same customer far more often than not.
            "name": "customer_ref",
            "field": "customer_ref",
            "else_m_prior": 0.1,
            "levels": [_lv("exact", 0.85), _lv("levenshtein", 0.05, threshold=1)],
        },
        {
            "name": "company_name",
            "field": "company_name",
            "else_m_prior": 0.05,
            "levels": [_lv("exact", 0.8), _lv("token_set", 0.15, threshold=0.9)],
        },
        {"name": "siren", "field": "siren", "else_m_prior": 0.05, "levels": [_lv("exact", 0.95)]},
    ],
    "training": {
        # Each block holds one person-level identifier fixed (birth date, first name):
        # blocks on contact data alone (a shared e-mail or landline) are full of people
        # of one household, and EM would learn a household, not a person.
        "blocks": [
            {
                "name": "train_birth_date_last_name",
                "keys": ["birth_date", {"field": "last_name", "transform": "phonetic_fr"}],
            },
            {
                "name": "train_email_first_name",
                "keys": ["email", {"field": "first_name", "transform": "phonetic_fr"}],
            },
            {
                "name": "train_phone_first_name",
                "keys": ["phone", {"field": "first_name", "transform": "phonetic_fr"}],
            },
        ]
    },
}


class ExportSettings(Strict):
    """Files written back to the business units after each run."""

    enabled: bool = True
    dir: Path = Path("out")
    #: Whether an incremental night writes them too. It returns every row of a full
    #: extract, most of them read back from the store: with full extracts of a
    #: million records that is every stored record (docs/benchmarks.md, session 34),
    #: which a unit may rather take from a full run or `mdm export bu`.
    incremental: bool = True


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


SurvivorshipRule = Literal[
    "source_priority", "most_recent", "most_complete", "most_frequent", "longest"
]
AddressRule = Literal["rnvp_valid", "not_npai", "source_priority", "most_recent", "most_complete"]
#: Golden attributes chosen value by value (the address and consents are chosen as blocks).
VALUE_ATTRIBUTE_NAMES = (
    "civility",
    "first_name",
    "last_name",
    "birth_name",
    "birth_date",
    "email",
    "phone",
    "company_name",
    "siren",
    "siret",
)


class SurvivorshipSettings(Strict):
    """Which record's value a golden record takes, attribute by attribute.

    Each list is a chain: the first rule ranks the candidate records, the next
    breaks its ties, and so on; source then key break the last ties so the
    result never depends on row order. `source_priority` is the sources'
    `trust`; `most_recent` their `source_updated_at`; `most_complete` the
    number of filled fields of the record; `most_frequent` the value most
    records of the cluster hold; `longest` the longest value. The address
    (lines, street, postcode, town, country, RNVP lines) is taken whole from one
    record, ranked by `address`; consents follow the most recent explicit choice.
    """

    default: list[SurvivorshipRule] = Field(
        default_factory=lambda: ["source_priority", "most_recent", "most_complete"], min_length=1
    )
    attributes: dict[str, list[SurvivorshipRule]] = Field(default_factory=dict)
    address: list[AddressRule] = Field(
        default_factory=lambda: ["rnvp_valid", "not_npai", "most_recent", "source_priority"],
        min_length=1,
    )

    @field_validator("attributes")
    @classmethod
    def _known_attributes(
        cls, value: dict[str, list[SurvivorshipRule]]
    ) -> dict[str, list[SurvivorshipRule]]:
        unknown = sorted(set(value) - set(VALUE_ATTRIBUTE_NAMES))
        if unknown:
            raise ValueError(
                f"unknown attribute(s) {', '.join(unknown)} (rules can be set for "
                f"{', '.join(VALUE_ATTRIBUTE_NAMES)}; the address and consents are chosen whole)"
            )
        if any(not rules for rules in value.values()):
            raise ValueError("an attribute's rule list cannot be empty")
        return value

    def chain(self, attribute: str) -> list[str]:
        return list(self.attributes.get(attribute, self.default))


class SparkSettings(Strict):
    """Where and how the matching stage runs when `engine: spark`.

    The driver (the `mdm run` process) keeps the records, trains the model and
    clusters; Spark forms the candidate pairs and compares them. `work_dir` is
    where the records' matching view and the scored pairs are exchanged as
    Parquet: on a cluster it must be a path both the driver and the executors
    can read and write (HDFS, S3, a shared volume); by default a temporary
    folder, which only local mode can share.
    """

    master: str = "local[*]"
    app_name: str = "mdm-pipeline"
    #: Shuffle partitions for the block keys and the pairs; default: 4 per core.
    partitions: int | None = Field(default=None, ge=1)
    driver_memory: str = "4g"
    #: Pairs per Arrow batch handed to the comparison code on the executors.
    batch_pairs: int = Field(default=200_000, ge=1_000)
    work_dir: str | None = None
    #: Any other Spark setting, passed as it is (spark.executor.memory, ...).
    conf: dict[str, str] = Field(default_factory=dict)


class Settings(Strict):
    """One deployment: where the store is, what to read, how each stage behaves."""

    version: Literal[1] = 1
    store: StoreSettings = StoreSettings()
    sources: list[Source] = Field(min_length=1)
    normalize: NormalizeSettings = NormalizeSettings()
    matching: MatchingSettings = MatchingSettings()
    export: ExportSettings = ExportSettings()
    survivorship: SurvivorshipSettings = SurvivorshipSettings()
    npai_returns: list[NpaiReturnFile] = Field(default_factory=list)
    #: Where the matching stage runs: in this process, or on Apache Spark (an extra:
    #: pip install "mdm-pipeline[spark]"). Both give the same pairs and clusters.
    engine: Literal["local", "spark"] = "local"
    spark: SparkSettings = SparkSettings()

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
