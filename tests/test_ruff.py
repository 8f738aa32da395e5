"""The tree is lint-clean and formatted: `ruff check` (pycodestyle, pyflakes, import sorting) and
`ruff format --check`, configured in pyproject.toml, on the whole repository. Two tests, so that a
formatting drift and a lint error show up separately. After a merge: `ruff check --fix . && ruff format .`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason='ruff not installed: pip install -e ".[test]"'
)


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check_is_clean():
    proc = _ruff("check", "--output-format", "concise", ".")
    assert proc.returncode == 0, f"ruff check (fix most with `ruff check --fix .`):\n{proc.stdout[-4000:]}{proc.stderr}"


def test_ruff_format_is_clean():
    proc = _ruff("format", "--check", ".")
    assert proc.returncode == 0, f"ruff format --check (run `ruff format .`):\n{proc.stdout[-4000:]}{proc.stderr}"
