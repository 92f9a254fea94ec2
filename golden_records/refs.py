"""How stewards and auditors name a source record (SOURCE:KEY), without the weight
of the store's data libraries: commands that answer one question start fast."""

from __future__ import annotations

from dataclasses import dataclass

from mdm_pipeline.config.errors import MdmError


class ReviewError(MdmError):
    """A decision that cannot be recorded (unknown item or record, nothing to revoke)."""

    exit_code = 2


@dataclass(frozen=True)
class RecordRef:
    """A source record named as the stewards name it: SOURCE:KEY."""

    source: str
    key: str

    @classmethod
    def parse(cls, text: str) -> RecordRef:
        source, sep, key = text.partition(":")
        if not sep or not source or not key:
            raise ReviewError(f"record '{text}': expected SOURCE:KEY")
        return cls(source, key)

    def __str__(self) -> str:
        return f"{self.source}:{self.key}"
