"""`make lint` in the test run: ruff and mypy over agent/ and model/.

`make lint` alone was not run by CI, and 47 mypy errors piled up unseen; here a new one fails
`make test`. mypy's cache (.mypy_cache, ignored by git) makes the second run quick.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_ruff_finds_nothing() -> None:
    out = _run("ruff", "check", "agent", "model", "tests")
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy_finds_nothing() -> None:
    out = _run("mypy", "agent", "model")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
