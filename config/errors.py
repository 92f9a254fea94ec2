"""Error taxonomy shared by every stage.

Only `cli.py` turns these into exit codes and one-line messages. Messages name
the file, line, column or config key, never a customer's personal data.
"""

from __future__ import annotations


class MdmError(Exception):
    """Base class: a failure the user can act on, reported in one line."""

    exit_code = 1


class ConfigError(MdmError):
    """The configuration is wrong (YAML syntax, unknown key, bad value, missing column)."""

    exit_code = 2

    def __init__(self, messages: list[str] | str) -> None:
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__(self.messages[0] if len(self.messages) == 1 else "\n".join(self.messages))


class SourceError(MdmError):
    """A whole source cannot be read (missing file, undecodable header, broken SQL)."""


class StoreError(MdmError):
    """The central store refused the run (locked, unreachable, schema too new)."""


class DataContractError(MdmError):
    """A frame crossing a stage boundary lacks the columns the next stage needs."""


class StoreLockedError(StoreError):
    """Another run holds the store: it is busy, not broken (exit code 3, so a scheduler
    can retry later rather than page someone)."""

    exit_code = 3
