"""Benchmarks of gather / scatter through the frame table (docs/design.md section 7, "Gather / scatter").

Owns: gather and scatter of 1 MiB and 64 MiB buffers whose pages are
scattered at random over a 64 MiB storage (frame -> storage translation on
every page), next to ``numpy.copyto`` of the same size between two
contiguous arrays (the floor) and the pure-Python reference.  Target: >= 60%
of the copyto bandwidth for 1 MiB and more; ``extra_info["GB_per_s"]``
holds the bandwidth of the median round.

Smoke mode (``--benchmark-disable``): one run each, results checked byte for
byte; the pure reference copies 1 MiB only.

Concurrency: single-threaded (the compiled copy drops the GIL above 256 KiB,
nothing else runs).  Figures from a shared 2-core machine deserve
scepticism: compare within one run, read medians.
"""
from __future__ import annotations

import numpy as np
import pytest

PAGE = 4096
BASE = 0x5000_0000
STORAGE_PAGES = 16384              # 64 MiB of frames and of storage
SIZES = {"1MiB": 1 << 20, "64MiB": 64 << 20}


def record(benchmark, nbytes: int, what: str) -> None:
    benchmark.extra_info["op"] = what
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["GB_per_s"] = round(nbytes / stats.stats.median / 1e9, 2)


def build(core):
    """A table whose 16384 frames map, shuffled, onto one 64 MiB storage."""
    rng = np.random.default_rng(11)
    storage = np.frombuffer(rng.bytes(STORAGE_PAGES * PAGE), dtype=np.uint8).copy()
    table = core.FrameTable([(BASE, STORAGE_PAGES * PAGE)])
    frames = np.arange(STORAGE_PAGES, dtype=np.uint64) * PAGE + BASE
    table.map_pages(frames[rng.permutation(STORAGE_PAGES)], 0, 0)
    table.attach(0, storage)
    return table, storage


@pytest.fixture(scope="module")
def setups(compiled, pure):
    return {"compiled": build(compiled), "pure": build(pure)}


@pytest.fixture(scope="module")
def buffer_pages():
    # the buffer's pages: a random order of every frame (each page a jump)
    rng = np.random.default_rng(12)
    return np.arange(STORAGE_PAGES, dtype=np.uint64)[rng.permutation(STORAGE_PAGES)] * PAGE + BASE


def reference(table_storage, pages, size):
    table, storage = table_storage
    out = bytearray()
    for pa in pages[:size // PAGE]:
        _, off = table.translate(int(pa))
        out += storage[off:off + PAGE].tobytes()
    return bytes(out)


@pytest.mark.parametrize("size_name", ["1MiB", "64MiB"])
@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize("which", ["compiled", "pure"])
def test_copy(benchmark, compiled, pure, setups, buffer_pages, smoke, which, op, size_name):
    size = SIZES[size_name]
    if which == "pure" and size_name == "64MiB" and smoke:
        pytest.skip("the pure reference copies 1 MiB in smoke mode")
    benchmark.group = f"copy-{size_name}"
    core = compiled if which == "compiled" else pure
    table_storage = setups[which]
    table, storage = table_storage
    flat = np.zeros(size, dtype=np.uint8)
    if op == "gather":
        fn = core.gather
    else:
        flat[:] = np.arange(size, dtype=np.uint64).astype(np.uint8)
        fn = core.scatter
    args = (table, buffer_pages, 0, size, flat)
    if which == "pure":
        got = benchmark.pedantic(fn, args, rounds=3, iterations=1)
    else:
        got = benchmark(fn, *args)
    assert got == size
    if op == "gather":
        assert flat.tobytes() == reference(table_storage, buffer_pages, size)
    else:
        assert reference(table_storage, buffer_pages, size) == flat.tobytes()
    record(benchmark, size, f"{which} {op}, {size // PAGE} scattered pages")


@pytest.mark.parametrize("size_name", ["1MiB", "64MiB"])
def test_copyto_floor(benchmark, size_name):
    size = SIZES[size_name]
    benchmark.group = f"copy-{size_name}"
    src = np.frombuffer(np.random.default_rng(13).bytes(size), dtype=np.uint8)
    dst = np.empty_like(src)
    benchmark(np.copyto, dst, src)
    assert np.array_equal(dst, src)
    record(benchmark, size, "numpy.copyto, contiguous")
