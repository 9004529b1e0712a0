"""Benchmarks of the page-list kernels (docs/design.md section 7, "Page list").

Owns: pagelist_build for a 1 GiB buffer (262,144 scattered pages, 514 list
pages) and a 1 MiB buffer (256 pages), each next to its floor, a numpy copy
of the same list bytes (2 MiB / 4 KiB), and the pure-Python reference;
pagelist_parse and pagelist_segments of the same buffers, compiled and pure.

Targets: 1 GiB build <= 1.25x the copy floor; 1 MiB build <= 1 us; compiled
>= 200x pure.  ``test_build_ratio_*`` time build and floor alternately in
one process and store the median of the per-round ratios in
``extra_info["ratio_median"]``; each other benchmark stores ``us_per_call``.

Smoke mode (``--benchmark-disable``): every benchmark runs once and checks
its result against the pure reference; the pure cases use a 4 MiB buffer
instead of 1 GiB so the run stays quick.

Concurrency: single-threaded.  Figures from a shared 2-core machine deserve
scepticism: compare within one run, read medians.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

PAGE = 4096
LIST_PA = 0x6000_0000
DYN_BASE = 0x5000_0000
GIB_PAGES = 262_144            # 1 GiB buffer
MIB_PAGES = 256                # 1 MiB buffer
SMOKE_PURE_PAGES = 1024        # 4 MiB: the pure reference in smoke mode


def scattered_pages(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(GIB_PAGES * 2)[:n].astype(np.uint64) * PAGE + DYN_BASE


@pytest.fixture(scope="module")
def gib_pages():
    return scattered_pages(GIB_PAGES)


@pytest.fixture(scope="module")
def mib_pages():
    return scattered_pages(MIB_PAGES)


def record(benchmark, what: str, calls: int = 1) -> None:
    """Store what is timed and, when timing ran, microseconds per call."""
    benchmark.extra_info["op"] = what
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["us_per_call"] = round(stats.stats.median / calls * 1e6, 3)


def reader(blob: bytes):
    view = memoryview(blob)

    def read_page(pa: int):
        k = pa - LIST_PA
        return view[k:k + PAGE]
    return read_page


# -- build: 1 GiB ------------------------------------------------------------

@pytest.mark.benchmark(group="pagelist-build-1GiB")
def test_build_1gib_compiled(benchmark, compiled, pure, gib_pages, smoke):
    head = gib_pages[:SMOKE_PURE_PAGES]
    assert compiled.pagelist_build(head, 0, LIST_PA) == pure.pagelist_build(head, 0, LIST_PA)
    blob = benchmark(compiled.pagelist_build, gib_pages, 0, LIST_PA)
    assert len(blob) == 514 * PAGE
    record(benchmark, "pagelist_build, 262144 pages")


@pytest.mark.benchmark(group="pagelist-build-1GiB")
def test_build_1gib_copy_floor(benchmark, compiled, gib_pages):
    listing = np.frombuffer(compiled.pagelist_build(gib_pages, 0, LIST_PA), dtype=np.uint8).copy()
    copy = benchmark(listing.copy)
    assert copy.nbytes == 514 * PAGE
    record(benchmark, "numpy copy of the 2 MiB list")


@pytest.mark.benchmark(group="pagelist-build-1GiB")
def test_build_1gib_pure(benchmark, pure, gib_pages, smoke):
    pages = gib_pages[:SMOKE_PURE_PAGES] if smoke else gib_pages
    benchmark.pedantic(pure.pagelist_build, (pages, 0, LIST_PA), rounds=3, iterations=1)
    record(benchmark, f"pure pagelist_build, {len(pages)} pages")


def _alternate(fn_a, fn_b, rounds: int, inner: int) -> list[float]:
    """Per-round ratios time(fn_a) / time(fn_b), each best of ``inner`` calls."""
    ratios = []
    for _ in range(rounds):
        best_a = best_b = float("inf")
        for _ in range(inner):
            t0 = time.perf_counter()
            fn_a()
            t1 = time.perf_counter()
            fn_b()
            t2 = time.perf_counter()
            best_a, best_b = min(best_a, t1 - t0), min(best_b, t2 - t1)
        ratios.append(best_a / best_b)
    return ratios


@pytest.mark.benchmark(group="pagelist-ratios")
def test_build_ratio_1gib_vs_copy(benchmark, compiled, gib_pages, smoke):
    listing = np.frombuffer(compiled.pagelist_build(gib_pages, 0, LIST_PA), dtype=np.uint8).copy()
    rounds = 1 if smoke else 15
    ratios = benchmark.pedantic(
        _alternate, (lambda: compiled.pagelist_build(gib_pages, 0, LIST_PA), listing.copy,
                     rounds, 20), rounds=1, iterations=1)
    benchmark.extra_info["op"] = "build(1 GiB) / numpy copy(2 MiB), alternating"
    benchmark.extra_info["ratio_median"] = round(statistics.median(ratios), 3)
    benchmark.extra_info["target"] = "<= 1.25"


@pytest.mark.benchmark(group="pagelist-ratios")
def test_build_ratio_compiled_vs_pure(benchmark, compiled, pure, gib_pages, smoke):
    pages = gib_pages[:SMOKE_PURE_PAGES] if smoke else gib_pages[:32768]
    rounds = 1 if smoke else 5
    ratios = benchmark.pedantic(
        _alternate, (lambda: pure.pagelist_build(pages, 0, LIST_PA),
                     lambda: compiled.pagelist_build(pages, 0, LIST_PA), rounds, 2),
        rounds=1, iterations=1)
    benchmark.extra_info["op"] = f"pure / compiled pagelist_build, {len(pages)} pages"
    benchmark.extra_info["ratio_median"] = round(statistics.median(ratios), 1)
    benchmark.extra_info["target"] = ">= 200"


# -- build: 1 MiB ------------------------------------------------------------

@pytest.mark.benchmark(group="pagelist-build-1MiB")
def test_build_1mib_compiled(benchmark, compiled, pure, mib_pages):
    expected = pure.pagelist_build(mib_pages, 0, LIST_PA)
    assert benchmark(compiled.pagelist_build, mib_pages, 0, LIST_PA) == expected
    record(benchmark, "pagelist_build, 256 pages (target <= 1 us)")


@pytest.mark.benchmark(group="pagelist-build-1MiB")
def test_build_1mib_copy_floor(benchmark, compiled, mib_pages):
    listing = np.frombuffer(compiled.pagelist_build(mib_pages, 0, LIST_PA), dtype=np.uint8).copy()
    benchmark(listing.copy)
    record(benchmark, "numpy copy of the 4 KiB list")


@pytest.mark.benchmark(group="pagelist-build-1MiB")
def test_build_1mib_into_compiled(benchmark, compiled, mib_pages):
    out = bytearray(PAGE)
    assert benchmark(compiled.pagelist_build_into, mib_pages, 0, LIST_PA, out) == PAGE
    record(benchmark, "pagelist_build_into, 256 pages")


@pytest.mark.benchmark(group="pagelist-build-1MiB")
def test_build_1mib_pure(benchmark, pure, mib_pages):
    benchmark(pure.pagelist_build, mib_pages, 0, LIST_PA)
    record(benchmark, "pure pagelist_build, 256 pages")


# -- parse -------------------------------------------------------------------

@pytest.mark.benchmark(group="pagelist-parse")
@pytest.mark.parametrize("which", ["compiled", "pure"])
def test_parse(benchmark, compiled, pure, gib_pages, smoke, which):
    core = compiled if which == "compiled" else pure
    pages = gib_pages[:SMOKE_PURE_PAGES] if smoke else gib_pages
    blob = compiled.pagelist_build(pages, 0, LIST_PA)
    nonsecure = [(DYN_BASE, 2 << 30), (LIST_PA, 16 << 20)]
    args = (LIST_PA, len(pages) * PAGE, reader(blob), nonsecure)
    if which == "pure" and not smoke:
        got = benchmark.pedantic(core.pagelist_parse, args, rounds=3, iterations=1)
    else:
        got = benchmark(core.pagelist_parse, *args)
    assert np.array_equal(got, pages)
    record(benchmark, f"{which} pagelist_parse with region checks, {len(pages)} pages")


# -- segments ----------------------------------------------------------------

@pytest.mark.benchmark(group="pagelist-segments")
@pytest.mark.parametrize("which", ["compiled", "pure"])
def test_segments(benchmark, compiled, pure, which):
    # 64 Ki pages in runs of 1..16 consecutive frames
    rng = np.random.default_rng(3)
    runs = rng.integers(1, 17, 8000)
    starts = rng.permutation(1 << 20)[:len(runs)].astype(np.uint64) * 32 * PAGE
    pages = np.concatenate([s + np.arange(r, dtype=np.uint64) * PAGE
                            for s, r in zip(starts, runs)])
    core = compiled if which == "compiled" else pure
    got = benchmark(core.pagelist_segments, pages, 8 * PAGE)
    assert got == pure.pagelist_segments(pages, 8 * PAGE)
    record(benchmark, f"{which} pagelist_segments, {len(pages)} pages, max 8 pages")
