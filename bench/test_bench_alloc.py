"""Benchmarks of the allocators (docs/design.md section 7, "Allocators").

Owns: alloc+free pairs of 1-16 pages from Python at 50% occupancy (a seeded
random live set) on a 262,144-frame FrameAllocator and a 4 MiB
RangeAllocator with page alignment; alloc_scattered(256) + free_pages; and,
in the same run, the floors they are judged against: the pure-Python
reference (the first-fit oracle), a word-scan bitmap written here, the
standard library's ``multiprocessing.heap.Heap`` and a trivial compiled
method call (``FrameAllocator.is_free``).

Every timed function runs a loop of many pairs; ``benchmark.extra_info``
records ``ns_per_op`` (median round / operations per round).  Before timing,
each benchmark checks that its addresses equal the first-fit reference, so
the smoke run (``--benchmark-disable``) is a correctness run too.  The pure
and word-scan loops do fewer pairs to keep the suite quick.

Concurrency: single-threaded; each benchmark owns its allocators.  Figures
from a shared 2-core machine deserve scepticism: compare within one run.
"""
from __future__ import annotations

import random
from multiprocessing.heap import Heap

import numpy as np
import pytest

PAGE = 4096
NFRAMES = 262_144                 # 1 GiB of frames
BASE_PA = 0x8000_0000
POOL_BASE = 0x4000_0000
POOL_SIZE = 4 << 20               # 4 MiB static pool
PAIRS = 10_000                    # compiled loops
PURE_PAIRS = 1_000                # pure-Python / word-scan / heap loops
CHECK_PAIRS = 300                 # address cross-check before timing
SEED = 20240611


def sizes(count: int, seed: int = SEED + 1) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randint(1, 16) for _ in range(count)]


def record(benchmark, ops: int, what: str) -> None:
    """Store ns per operation of the median round in extra_info."""
    benchmark.extra_info["ops_per_round"] = ops
    benchmark.extra_info["op"] = what
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["ns_per_op"] = round(stats.stats.median / ops * 1e9, 1)


# ---------------------------------------------------------------------------
# layouts: a seeded random live set at 50% occupancy
# ---------------------------------------------------------------------------

def half_full_runs(nunits: int, seed: int = SEED) -> list[tuple[int, int]]:
    """(first, length) runs of a pool filled with 1-16-unit allocations
    laid end to end, half of them (at random) freed again."""
    rnd = random.Random(seed)
    runs, pos = [], 0
    while pos < nunits:
        n = min(rnd.randint(1, 16), nunits - pos)
        runs.append((pos, n))
        pos += n
    rnd.shuffle(runs)
    kept, used = [], 0
    for first, n in runs:
        if used + n <= nunits // 2:
            kept.append((first, n))
            used += n
    return sorted(kept)


@pytest.fixture(scope="module")
def frame_runs():
    return half_full_runs(NFRAMES)


def frames_at_half(core, runs):
    fa = core.FrameAllocator(BASE_PA, NFRAMES, max_order=10)
    for first, n in runs:
        fa.claim(BASE_PA + first * PAGE, n)
    return fa


class WordScanFrames:
    """The floor: a plain bitmap of 64-bit words scanned from the start.

    words[i] bit b is frame 64*i + b (1 = used).  alloc(n <= 64) looks at
    each word together with the next (so runs may straddle), finds n free
    bits in a row with the shift-and trick and takes the lowest: exactly a
    first-fit scan, with no index.
    """

    MASK = (1 << 64) - 1

    def __init__(self, used_map: np.ndarray):
        padded = np.ones(-(-len(used_map) // 64) * 64 + 64, dtype=np.uint8)
        padded[:len(used_map)] = used_map
        self.words = [int(w) for w in np.packbits(padded, bitorder="little").view("<u8")]

    def alloc(self, n: int) -> int:
        words, mask = self.words, self.MASK
        for i in range(len(words) - 1):
            w = words[i]
            if w == mask:
                continue
            free = (~w & mask) | ((~words[i + 1] & mask) << 64)
            have = 1
            while have < n:
                step = min(have, n - have)
                free &= free >> step
                have += step
            free &= mask
            if free:
                p = i * 64 + (free & -free).bit_length() - 1
                self._write(p, n, True)
                return BASE_PA + p * PAGE
        raise MemoryError("no run")

    def free(self, pa: int, n: int) -> None:
        self._write((pa - BASE_PA) // PAGE, n, False)

    def _write(self, p: int, n: int, used: bool) -> None:
        bits = ((1 << n) - 1) << (p & 63)
        i = p >> 6
        for k, part in enumerate((bits & self.MASK, bits >> 64)):
            if part:
                self.words[i + k] = self.words[i + k] | part if used else \
                    self.words[i + k] & ~part


def check_same_addresses(allocators, frees, count=CHECK_PAIRS):
    """Each allocator's alloc+free pairs give the same addresses."""
    results = []
    for alloc, free in zip(allocators, frees):
        got = []
        for n in sizes(count, seed=SEED + 7):
            pa = alloc(n)
            free(pa, n)
            got.append(pa)
        results.append(got)
    for got in results[1:]:
        assert got == results[0]


# ---------------------------------------------------------------------------
# FrameAllocator: alloc_contig + free_contig pairs
# ---------------------------------------------------------------------------

@pytest.mark.benchmark(group="frames: alloc_contig+free_contig, 1-16 pages, 50% used")
def test_frames_pair_compiled(benchmark, compiled, pure, frame_runs):
    fa = frames_at_half(compiled, frame_runs)
    ref = frames_at_half(pure, frame_runs)
    check_same_addresses([fa.alloc_contig, ref.alloc_contig],
                         [fa.free_contig, ref.free_contig])
    before = fa.used_map()
    todo = sizes(PAIRS)

    def pairs():
        alloc, free = fa.alloc_contig, fa.free_contig
        for n in todo:
            free(alloc(n), n)

    benchmark(pairs)
    record(benchmark, PAIRS, "alloc_contig+free_contig pair")
    assert np.array_equal(fa.used_map(), before)
    fa._check()


@pytest.mark.benchmark(group="frames: alloc_contig+free_contig, 1-16 pages, 50% used")
def test_frames_pair_pure(benchmark, pure, frame_runs):
    fa = frames_at_half(pure, frame_runs)
    todo = sizes(PURE_PAIRS)

    def pairs():
        alloc, free = fa.alloc_contig, fa.free_contig
        for n in todo:
            free(alloc(n), n)

    benchmark.pedantic(pairs, rounds=5, iterations=1)
    record(benchmark, PURE_PAIRS, "alloc_contig+free_contig pair")


@pytest.mark.benchmark(group="frames: alloc_contig+free_contig, 1-16 pages, 50% used")
def test_frames_pair_word_scan_floor(benchmark, compiled, frame_runs):
    fa = frames_at_half(compiled, frame_runs)
    scan = WordScanFrames(fa.used_map())
    check_same_addresses([fa.alloc_contig, scan.alloc], [fa.free_contig, scan.free])
    todo = sizes(PURE_PAIRS)

    def pairs():
        alloc, free = scan.alloc, scan.free
        for n in todo:
            free(alloc(n), n)

    benchmark.pedantic(pairs, rounds=5, iterations=1)
    record(benchmark, PURE_PAIRS, "word-scan alloc+free pair")


@pytest.fixture(scope="module")
def half_full_heap():
    """multiprocessing.heap.Heap with one 1 GiB arena (sparse), half used."""
    heap = Heap(size=NFRAMES * PAGE)
    rnd = random.Random(SEED)
    blocks, used = [], 0
    while True:
        n = rnd.randint(1, 16)
        if used + n > NFRAMES:
            break
        blocks.append(heap.malloc(n * PAGE))
        used += n
    rnd.shuffle(blocks)
    for block in blocks[: len(blocks) // 2]:
        heap.free(block)
    yield heap
    for block in blocks[len(blocks) // 2:]:
        heap.free(block)


@pytest.mark.benchmark(group="frames: alloc_contig+free_contig, 1-16 pages, 50% used")
def test_frames_pair_multiprocessing_heap_floor(benchmark, half_full_heap):
    heap = half_full_heap
    todo = [n * PAGE for n in sizes(PURE_PAIRS)]

    def pairs():
        malloc, free = heap.malloc, heap.free
        for size in todo:
            free(malloc(size))

    benchmark.pedantic(pairs, rounds=5, iterations=1)
    record(benchmark, PURE_PAIRS, "Heap.malloc+free pair")


@pytest.mark.benchmark(group="call floor")
def test_call_floor_is_free(benchmark, compiled, frame_runs):
    fa = frames_at_half(compiled, frame_runs)
    pa = BASE_PA + 12 * PAGE

    def calls():
        is_free = fa.is_free
        for _ in range(PAIRS):
            is_free(pa)

    benchmark(calls)
    record(benchmark, PAIRS, "FrameAllocator.is_free call")


# ---------------------------------------------------------------------------
# RangeAllocator: 4 MiB pool, page-aligned alloc + free pairs
# ---------------------------------------------------------------------------

def pool_at_half(core, policy="first-fit"):
    ra = core.RangeAllocator(POOL_BASE, POOL_SIZE, 9, policy)
    rnd = random.Random(SEED + 3)
    live = []
    while True:
        try:
            live.append(ra.alloc(rnd.randint(1, 16) * PAGE, PAGE))
        except Exception:          # OutOfMemory: the pool is full
            break
    rnd.shuffle(live)
    for addr in live[: len(live) // 2]:
        ra.free(addr)
    return ra


@pytest.mark.benchmark(group="range: alloc+free, 1-16 pages, page-aligned, 50% used")
@pytest.mark.parametrize("policy", ["first-fit", "best-fit"])
def test_range_pair_compiled(benchmark, compiled, pure, policy):
    ra, ref = pool_at_half(compiled, policy), pool_at_half(pure, policy)
    assert ra.allocations() == ref.allocations()
    check_same_addresses([lambda n: ra.alloc(n * PAGE, PAGE), lambda n: ref.alloc(n * PAGE, PAGE)],
                         [lambda a, n: ra.free(a), lambda a, n: ref.free(a)])
    todo = [n * PAGE for n in sizes(PAIRS)]

    def pairs():
        alloc, free = ra.alloc, ra.free
        for size in todo:
            free(alloc(size, PAGE))

    benchmark(pairs)
    record(benchmark, PAIRS, f"alloc+free pair ({policy})")
    assert ra.allocations() == ref.allocations()


@pytest.mark.benchmark(group="range: alloc+free, 1-16 pages, page-aligned, 50% used")
@pytest.mark.parametrize("policy", ["first-fit", "best-fit"])
def test_range_pair_pure(benchmark, pure, policy):
    ra = pool_at_half(pure, policy)
    todo = [n * PAGE for n in sizes(PURE_PAIRS)]

    def pairs():
        alloc, free = ra.alloc, ra.free
        for size in todo:
            free(alloc(size, PAGE))

    benchmark.pedantic(pairs, rounds=5, iterations=1)
    record(benchmark, PURE_PAIRS, f"alloc+free pair ({policy})")


# ---------------------------------------------------------------------------
# alloc_scattered(256) + free_pages
# ---------------------------------------------------------------------------

SCATTER = 256
SCATTER_ROUNDS = 1_000
PURE_SCATTER_ROUNDS = 20


@pytest.mark.benchmark(group="frames: alloc_scattered(256)+free_pages, 50% used")
def test_scattered_compiled(benchmark, compiled, pure, frame_runs):
    fa = frames_at_half(compiled, frame_runs)
    ref = frames_at_half(pure, frame_runs)
    got, want = fa.alloc_scattered(SCATTER), ref.alloc_scattered(SCATTER)
    assert np.array_equal(got, want)
    fa.free_pages(got[::-1])
    ref.free_pages(want)
    before = fa.used_map()

    def rounds():
        take, give = fa.alloc_scattered, fa.free_pages
        for _ in range(SCATTER_ROUNDS):
            give(take(SCATTER))

    benchmark(rounds)
    record(benchmark, SCATTER_ROUNDS, "alloc_scattered(256)+free_pages")
    assert np.array_equal(fa.used_map(), before)
    fa._check()


@pytest.mark.benchmark(group="frames: alloc_scattered(256)+free_pages, 50% used")
def test_scattered_pure(benchmark, pure, frame_runs):
    fa = frames_at_half(pure, frame_runs)

    def rounds():
        take, give = fa.alloc_scattered, fa.free_pages
        for _ in range(PURE_SCATTER_ROUNDS):
            give(take(SCATTER))

    benchmark.pedantic(rounds, rounds=5, iterations=1)
    record(benchmark, PURE_SCATTER_ROUNDS, "alloc_scattered(256)+free_pages")
