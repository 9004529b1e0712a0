"""Shared test configuration: hypothesis profiles and backend fixtures.

Profiles: ``dev`` (default, 60 examples), ``ci`` (CI=true: 40 examples, no
deadline), ``thorough`` (HYPOTHESIS_PROFILE=thorough: 1000 examples).
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], derandomize=True)
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))


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
