"""Benchmark configuration.

Run the benchmarks:          python -m pytest bench
Smoke mode (CI, no timing):  python -m pytest bench --benchmark-disable

Single figures on a shared 2-core machine deserve scepticism: compare the
compiled kernel with its pure-Python reference or floor *in the same run*,
and read medians.  Each benchmark records what it measures per operation in
``benchmark.extra_info``; ``python bench/results.py`` renders them into the
results files of ``bench/results/``.
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser):  # pragma: no cover - pytest hook
    group = parser.getgroup("poolsvc")
    group.addoption("--poolsvc-large", action="store_true", default=False,
                    help="also run the large (GiB-scale) benchmark cases")


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    """True when benchmarks run once for correctness only (--benchmark-disable)."""
    return bool(request.config.getoption("benchmark_disable"))


@pytest.fixture(scope="session")
def compiled():
    from poolsvc import _core

    return _core


@pytest.fixture(scope="session")
def pure():
    from poolsvc import _pure

    return _pure


@pytest.fixture(scope="module")
def system():
    """An embedded System with 256 MiB of dynamic RAM, one per benchmark module."""
    from poolsvc import Config, System

    with System(Config(dynamic_size=256 << 20, arena_step=4 << 20)) as s:
        yield s


@pytest.fixture(scope="module")
def client():
    """A caller's 1 MiB POSIX shared-memory object, to register from."""
    from multiprocessing import shared_memory

    seg = shared_memory.SharedMemory(create=True, size=1 << 20)
    yield seg
    seg.close()
    seg.unlink()
