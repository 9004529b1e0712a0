"""Lint and type-check as part of the tests (as uvloop's test_sourcecode does).

ruff (pyflakes, pycodestyle, bugbear; config in pyproject.toml) over the whole
tree, and mypy over the package.  Both are in the ``test`` extra; a run
without them installed fails, it does not skip.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_ruff():
    out = run("ruff", "check", "poolsvc", "tests", "bench", "examples")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy():
    out = run("mypy", "--config-file", "pyproject.toml", "poolsvc")
    assert out.returncode == 0, out.stdout + out.stderr
