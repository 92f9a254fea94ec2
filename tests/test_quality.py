"""Code-quality gates that belong to the test suite: lint and the architecture contract."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT


def _tool(name: str) -> list[str]:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed; install the test extra: pip install -e '.[test]'")
    return [exe]


def test_ruff_clean() -> None:
    result = subprocess.run(
        [*_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_only_meet_in_pipeline() -> None:
    """sources/, normalize/, matching/, golden_records/ import only config/ (import-linter)."""
    result = subprocess.run([*_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_print_outside_cli() -> None:
    """The library logs, the CLI renders."""
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("config", "sources", "normalize", "matching", "golden_records", "pipeline")
        for p in (ROOT / folder).rglob("*.py")
        if re.search(r"(?<![\w.])print\(", p.read_text(encoding="utf-8"))
    ]
    assert offenders == []
    assert sys.version_info >= (3, 11)
