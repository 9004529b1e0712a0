"""Hypothesis profiles of the test suite, loaded on import (tests/conftest.py imports it).

Chosen by ``HYPOTHESIS_PROFILE``, else ``ci`` when ``CI`` is set, else ``dev``:

``dev``       100 examples, random seed, the example database in ``.hypothesis/``
              kept between local runs (a failure found once is replayed first).
``ci``        100 examples, no database, one random seed per run (tests/conftest.py
              draws and prints it).
``thorough``  1000 examples, random seed, database kept.
``mutation``  ``ci`` without shrinking: tests/mutation/run.py only needs to know that
              a test fails, not the smallest example.

Tests whose single example is costly (state machines, fuzzers) take a share of the
profile's count with :func:`examples` rather than a fixed number.
"""
from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings

_COMMON: dict[str, Any] = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                               print_blob=True)
settings.register_profile("dev", max_examples=100, **_COMMON)
settings.register_profile("ci", max_examples=100, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.register_profile("mutation", max_examples=100, database=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
settings.load_profile(PROFILE)
#: True when each run draws its own seed (tests/conftest.py prints it): no database then.
SEEDED = PROFILE in ("ci", "mutation")


def examples(fraction: float, at_least: int = 10) -> int:
    """``max_examples`` for a test whose examples are costly: a share of the profile's."""
    return max(at_least, int(settings.default.max_examples * fraction))
