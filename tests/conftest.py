"""Shared test configuration: hypothesis profiles, the CI seed, backend fixtures.

The hypothesis profiles live in tests/profiles.py (loaded on import).  In the
``ci`` profile every run draws one random seed, printed in the report header and
again after the run, so a CI failure replays with
``CI=true python -m pytest --hypothesis-seed=N ...`` (``HYPOTHESIS_SEED=N`` in the
environment does the same).

Concurrency: none; pytest runs the tests of one process in sequence.
"""
from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import core as hypothesis_core

from profiles import PROFILE, SEEDED

# -- the seed of a CI run --------------------------------------------------------------------
def _ci_seed(config: pytest.Config) -> int | None:
    """The run's seed: ``--hypothesis-seed``, else ``HYPOTHESIS_SEED``, else a fresh one (CI only).

    None in the local profiles: hypothesis then draws a seed per test and replays
    the failures its database remembers.
    """
    given = config.getoption("hypothesis_seed", default=None)
    if given is not None:
        return int(given)
    if os.environ.get("HYPOTHESIS_SEED"):
        return int(os.environ["HYPOTHESIS_SEED"])
    if SEEDED:
        return random.SystemRandom().randrange(1 << 32)
    return None


def pytest_configure(config: pytest.Config) -> None:
    seed = _ci_seed(config)
    config.stash[_SEED] = seed
    if seed is not None:
        # what hypothesis's own plugin does for --hypothesis-seed
        hypothesis_core.global_force_seed = seed


_SEED = pytest.StashKey[Any]()


def _seed_line(config: pytest.Config) -> str | None:
    seed = config.stash.get(_SEED, None)
    if seed is None:
        return None
    return (f"hypothesis profile {PROFILE!r}, seed {seed}: replay with "
            f"`CI=true python -m pytest --hypothesis-seed={seed} ...`")


def pytest_report_header(config: pytest.Config) -> str | None:
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    line = _seed_line(config)
    if line is not None:
        terminalreporter.write_line(line)


# -- backends --------------------------------------------------------------------------------
def _compiled():
    try:
        from poolsvc import _core
    except ImportError:  # pragma: no cover
        return None
    return _core


@pytest.fixture(scope="session")
def compiled():
    """The compiled core (poolsvc._core); the test fails if it is not built."""
    core = _compiled()
    if core is None:
        if os.environ.get("POOLSVC_PUREPYTHON"):
            pytest.skip("compiled core not built (pure-Python run)")
        pytest.fail("poolsvc._core is not built: run `pip install -e .`")
    return core


@pytest.fixture(scope="session")
def pure():
    """The plain-Python reference kernels (poolsvc._pure), the oracle."""
    from poolsvc import _pure

    return _pure


@pytest.fixture(scope="session", params=["compiled", "pure"])
def core(request):
    """Each backend in turn, for tests whose body is backend-agnostic."""
    if request.param == "compiled":
        return request.getfixturevalue("compiled")
    return request.getfixturevalue("pure")
