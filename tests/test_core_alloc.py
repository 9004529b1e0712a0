"""Tests of the allocators of the core: RangeAllocator and FrameAllocator.

Owns: (a) differential tests that drive the compiled core (``compiled``) and
the plain-Python reference (``pure``) with the same random operation
sequences and require identical results and error types, checking the
contract's invariants after every step; (b) one hand-written case per error
of docs/core.md, each checking the typed error and that nothing changed;
(c) genalloc / alloc_pages_exact semantics on crafted layouts.  Tests taking
the ``core`` fixture run on both backends.

Concurrency: none; every test builds its own allocators.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc.errors import (
    AddressError,
    AlignmentError,
    BadParameters,
    DoubleFree,
    OutOfMemory,
    PoolsvcError,
)

PAGE = 4096
HUGE = 2 ** 70


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def outcome(fn, *args):
    """("ok", value) or ("err", exception type); arrays become lists."""
    try:
        value = fn(*args)
    except PoolsvcError as exc:
        return ("err", type(exc))
    if isinstance(value, np.ndarray):
        assert value.dtype == np.uint64
        value = value.tolist()
    return ("ok", value)


def frame_state(fa):
    return (fa.used_map().tobytes(), fa.free_frames, fa.used_frames,
            fa.largest_free_run, fa.free_blocks_per_order().tolist())


def range_state(ra):
    return (ra.allocations(), ra.free_bytes, ra.used_bytes, ra.largest_free, ra.count)


class Twin:
    """The same allocator built by both backends, driven in lockstep."""

    def __init__(self, compiled_obj, pure_obj, state):
        self.c = compiled_obj
        self.p = pure_obj
        self.state = state

    def call(self, name, *args):
        before = self.state(self.c)
        rc = outcome(getattr(self.c, name), *args)
        rp = outcome(getattr(self.p, name), *args)
        assert rc == rp, f"{name}{args}: compiled {rc} != pure {rp}"
        if rc[0] == "err":
            assert self.state(self.c) == before, f"{name}{args} changed state on error"
            assert self.state(self.p) == before
        return rc


def check_frames(twin, owned):
    c, p = twin.c, twin.p
    c._check()
    sc, sp = frame_state(c), frame_state(p)
    assert sc == sp
    used_map, free, used, largest, per_order = sc
    assert free + used == c.nframes
    expect = np.zeros(c.nframes, dtype=np.uint8)
    expect[sorted(owned)] = 1
    assert used_map == expect.tobytes()
    assert sum(count << k for k, count in enumerate(per_order)) == free
    assert len(per_order) == c.max_order + 1


def check_range(twin, owned):
    c, p = twin.c, twin.p
    c._check()
    p._check()
    sc, sp = range_state(c), range_state(p)
    assert sc == sp
    allocations, free, used, largest, count = sc
    assert free + used == c.size
    assert used == sum(length for _, length in allocations)
    assert count == len(allocations) == len(owned)
    assert dict(allocations) == owned
    end = c.base
    for start, length in allocations:          # ascending, disjoint, in the pool
        assert start >= end and length > 0
        end = start + length
    assert end <= c.base + c.size
    assert 0 <= largest <= free


# ---------------------------------------------------------------------------
# (a) differential: FrameAllocator
# ---------------------------------------------------------------------------

@given(data=st.data(), base_pfn=st.integers(0, 40),
       nframes=st.integers(1, 200) | st.integers(200, 1500),
       max_order=st.integers(0, 10))
def test_frame_allocator_matches_reference(compiled, pure, data, base_pfn, nframes, max_order):
    base = base_pfn * PAGE
    twin = Twin(compiled.FrameAllocator(base, nframes, max_order),
                pure.FrameAllocator(base, nframes, max_order), frame_state)
    owned: set[int] = set()                    # frame indices handed out or claimed
    draw = data.draw
    any_pa = st.integers(-3, nframes + 3).map(lambda i: base + i * PAGE) | \
        st.integers(-PAGE, base + (nframes + 1) * PAGE) | st.sampled_from([HUGE, -HUGE])
    count = st.integers(-1, 24) | st.integers(25, 200) | st.sampled_from([HUGE, -HUGE])

    for _ in range(draw(st.integers(1, 60))):
        op = draw(st.sampled_from(["alloc_contig", "alloc_contig", "alloc_scattered",
                                   "claim", "free_run", "free_pages", "free_bogus",
                                   "free_pages_bogus", "is_free"]))
        if op == "alloc_contig":
            n = draw(count | st.just((1 << max_order) + 1))
            r = twin.call("alloc_contig", n)
            if r[0] == "ok":
                first = (r[1] - base) // PAGE
                run = set(range(first, first + n))
                assert r[1] % PAGE == 0 and not run & owned and first + n <= nframes
                owned |= run
        elif op == "alloc_scattered":
            n = draw(count)
            r = twin.call("alloc_scattered", n)
            if r[0] == "ok":
                frames = [(pa - base) // PAGE for pa in r[1]]
                assert frames == sorted(set(frames)) and len(frames) == n
                assert not set(frames) & owned
                assert frames == sorted(set(range(nframes)) - owned)[:n]
                owned |= set(frames)
        elif op == "claim":
            pa, n = draw(any_pa), draw(count)
            r = twin.call("claim", pa, n)
            if r[0] == "ok":
                first = (pa - base) // PAGE
                owned |= set(range(first, first + n))
        elif op == "free_run" and owned:
            first = draw(st.sampled_from(sorted(owned)))
            last = first
            while last + 1 in owned and draw(st.booleans()):
                last += 1
            r = twin.call("free_contig", base + first * PAGE, last - first + 1)
            assert r == ("ok", None)
            owned -= set(range(first, last + 1))
        elif op == "free_pages" and owned:
            frames = draw(st.lists(st.sampled_from(sorted(owned)), min_size=1, max_size=30))
            pages = [base + f * PAGE for f in frames]
            as_array = draw(st.booleans())
            r = twin.call("free_pages", np.array(pages, dtype=np.uint64) if as_array else pages)
            if len(set(frames)) == len(frames):
                assert r == ("ok", None)
                owned -= set(frames)
            else:
                assert r == ("err", DoubleFree)
        elif op == "free_bogus":
            pa, n = draw(any_pa), draw(count)
            if twin.call("free_contig", pa, n)[0] == "ok":   # it was owned after all
                first = (pa - base) // PAGE
                assert set(range(first, first + n)) <= owned
                owned -= set(range(first, first + n))
        elif op == "free_pages_bogus":
            in_u64 = st.integers(0, nframes + 3).map(lambda i: base + i * PAGE) | \
                st.integers(0, base + (nframes + 1) * PAGE)
            pages = draw(st.lists(in_u64, max_size=8))
            r = twin.call("free_pages", np.array(pages, dtype=np.uint64))
            if r[0] == "ok":
                owned -= {(pa - base) // PAGE for pa in pages}
        elif op == "is_free":
            pa = draw(any_pa)
            r = twin.call("is_free", pa)
            if r[0] == "ok":
                assert r[1] == ((pa - base) // PAGE not in owned)
        check_frames(twin, owned)


def test_frame_allocator_long_random_run(compiled, pure):
    """A bigger pool (deep tree, runs across many words) for a few thousand ops."""
    rnd = random.Random(20240611)
    base, nframes = 0x8000_0000 + 5 * PAGE, 20_000
    twin = Twin(compiled.FrameAllocator(base, nframes, 10),
                pure.FrameAllocator(base, nframes, 10), lambda fa: None)
    live: list[tuple[int, int]] = []
    for step in range(4000):
        if rnd.random() < 0.55 or not live:
            n = rnd.choice([rnd.randint(1, 16), rnd.randint(1, 16), rnd.randint(17, 700)])
            r = twin.call("alloc_contig", n)
            if r[0] == "ok":
                live.append((r[1], n))
        elif rnd.random() < 0.1:
            r = twin.call("alloc_scattered", rnd.randint(1, 300))
            if r[0] == "ok":
                live.extend((pa, 1) for pa in r[1])
        else:
            pa, n = live.pop(rnd.randrange(len(live)))
            assert twin.call("free_contig", pa, n) == ("ok", None)
        if step % 200 == 0:
            compiled_map = twin.c.used_map()
            assert compiled_map.tobytes() == twin.p.used_map().tobytes()
            assert twin.c.largest_free_run == twin.p.largest_free_run
            assert twin.c.free_blocks_per_order().tolist() == \
                twin.p.free_blocks_per_order().tolist()
            twin.c._check()
    assert twin.c.free_frames == twin.p.free_frames


# ---------------------------------------------------------------------------
# (a) differential: RangeAllocator
# ---------------------------------------------------------------------------

@given(data=st.data(), min_order=st.sampled_from([0, 3, 9, 12]),
       base_chunks=st.integers(0, 64),
       nchunks=st.integers(1, 130) | st.integers(130, 1200),
       policy=st.sampled_from(["first-fit", "best-fit"]))
def test_range_allocator_matches_reference(compiled, pure, data, min_order, base_chunks,
                                           nchunks, policy):
    chunk = 1 << min_order
    base, size = base_chunks * chunk, nchunks * chunk
    twin = Twin(compiled.RangeAllocator(base, size, min_order, policy),
                pure.RangeAllocator(base, size, min_order, policy), range_state)
    owned: dict[int, int] = {}                 # start -> length of live allocations
    freed: list[int] = []
    draw = data.draw
    sizes = st.integers(-2, 24 * chunk) | st.integers(1, 3 * chunk) | \
        st.sampled_from([HUGE, -HUGE, size, size + 1])
    aligns = st.sampled_from([0, 0, 0, 1, 2, 3, chunk, 2 * chunk, 4096, 8192, 64 * chunk,
                              -8, 2 ** 63, 2 ** 64, 2 ** 63 + 1, 6 * chunk])
    addrs = st.integers(base - chunk, base + size + chunk) | st.sampled_from([HUGE, -HUGE])

    for _ in range(draw(st.integers(1, 60))):
        op = draw(st.sampled_from(["alloc", "alloc", "alloc", "free", "free", "free_bogus",
                                   "double_free", "allocation_at"]))
        if op == "alloc":
            n, align = draw(sizes), draw(aligns)
            r = twin.call("alloc", n, align)
            if r[0] == "ok":
                a = max(align, chunk)
                length = -(-n // a) * a
                assert r[1] % a == 0 and base <= r[1] and r[1] + length <= base + size
                owned[r[1]] = length
        elif op == "free" and owned:
            start = draw(st.sampled_from(sorted(owned)))
            length = owned[start]
            how = draw(st.sampled_from(["none", "exact", "short", "wrong"]))
            arg = {"none": None, "exact": length, "short": max(length - chunk + 1, 1),
                   "wrong": length + chunk}[how]
            r = twin.call("free", start, arg)
            if how == "wrong":
                assert r == ("err", BadParameters)
            else:
                assert r == ("ok", length)
                del owned[start]
                freed.append(start)
        elif op == "free_bogus":
            addr = draw(addrs)
            r = twin.call("free", addr)
            if r[0] == "ok":
                assert addr in owned
                del owned[addr]
                freed.append(addr)
        elif op == "double_free" and freed:
            addr = draw(st.sampled_from(freed))
            r = twin.call("free", addr, None)
            if r[0] == "ok":
                del owned[addr]
            else:
                assert r == ("err", DoubleFree)
        elif op == "allocation_at":
            addr = draw(addrs)
            r = twin.call("allocation_at", addr)
            hits = [(s, n) for s, n in owned.items() if s <= addr < s + n]
            assert r == ("ok", hits[0] if hits else None)
        check_range(twin, owned)


# ---------------------------------------------------------------------------
# (b) every error of the contract: typed, and nothing changes
# ---------------------------------------------------------------------------

def expect_error(obj, state, exc_type, name, *args, match=None):
    before = state(obj)
    with pytest.raises(exc_type, match=match) as info:
        getattr(obj, name)(*args)
    assert state(obj) == before
    return info.value


@pytest.mark.parametrize("args, exc", [
    ((0x1000_0100, 1 << 20), AlignmentError),         # base not a chunk multiple
    ((0x1000_0000, 1000), BadParameters),               # size not a chunk multiple
    ((0x1000_0000, 0), BadParameters),
    ((0x1000_0000, -512), BadParameters),
    ((-512, 1 << 20), BadParameters),
    ((0x1000_0000, 1 << 20, -1), BadParameters),
    ((0x1000_0000, 1 << 20, 21), BadParameters),
    ((0x1000_0000, 1 << 20, 9, "worst-fit"), BadParameters),
    ((0x1000_0000, 1 << 20, 9, None), BadParameters),
    ((0x1000_0000, 1.5e6), BadParameters),
    (("0x1000", 1 << 20), BadParameters),
    ((2 ** 63, 1 << 20), BadParameters),
    ((0, HUGE), BadParameters),
])
def test_range_constructor_errors(core, args, exc):
    with pytest.raises(exc):
        core.RangeAllocator(*args)


@pytest.mark.parametrize("args, exc", [
    ((0x1001, 16), AlignmentError),
    ((-4096, 16), BadParameters),
    ((0, 0), BadParameters),
    ((0, -3), BadParameters),
    ((0, 16, -1), BadParameters),
    ((0, 16, 31), BadParameters),
    ((0, 16.0), BadParameters),
    ((2 ** 63 - 4096, 16), BadParameters),
    ((0, HUGE), BadParameters),
])
def test_frame_constructor_errors(core, args, exc):
    with pytest.raises(exc):
        core.FrameAllocator(*args)


@pytest.fixture
def pool(core):
    ra = core.RangeAllocator(0x1000_0000, 64 * 1024, 9)
    ra.alloc(1000)
    ra.alloc(4096, 4096)
    return ra


@pytest.mark.parametrize("args, exc, match", [
    ((512, 3), BadParameters, "power of two"),
    ((512, -4096), BadParameters, "power of two"),
    ((512, 2 ** 64 + 1), BadParameters, "power of two"),
    ((0,), BadParameters, "> 0"),
    ((-1,), BadParameters, "> 0"),
    ((-HUGE,), BadParameters, "> 0"),
    ((1.5,), BadParameters, "int"),
    ((512, "4096"), BadParameters, "int"),
    ((64 * 1024,), OutOfMemory, "free"),
    ((HUGE,), OutOfMemory, None),
    ((512, 2 ** 64), OutOfMemory, None),
    ((512, 1 << 20), OutOfMemory, "0x100000"),
])
def test_range_alloc_errors(pool, args, exc, match):
    expect_error(pool, range_state, exc, "alloc", *args, match=match)


def test_range_out_of_memory_message(pool):
    err = expect_error(pool, range_state, OutOfMemory, "alloc", 60_000, 4096)
    assert "60000" in str(err) and "0x1000" in str(err) and str(pool.free_bytes) in str(err)


@pytest.mark.parametrize("args, exc, match", [
    ((0x0FFF_FE00,), AddressError, "0xffffe00"),          # below the pool
    ((0x1001_0000,), AddressError, "0x10010000"),         # first byte past the end
    ((HUGE,), AddressError, None),
    ((-1,), AddressError, None),
    ((0x1000_0200,), DoubleFree, "0x10000200"),           # inside, not a start
    ((0x1000_0010,), DoubleFree, None),                   # not chunk-aligned
    ((0x1000_4000,), DoubleFree, None),                   # free chunk
    ((0x1000_0000, 512), BadParameters, "0x200"),         # the allocation is 1024
    ((0x1000_0000, 1025), BadParameters, None),
    ((0x1000_0000, 0), BadParameters, None),
    ((0x1000_0000, -1024), BadParameters, None),
    ((0x1000_0000, HUGE), BadParameters, None),
    ((0x1000_0000, "1024"), BadParameters, None),
])
def test_range_free_errors(pool, args, exc, match):
    expect_error(pool, range_state, exc, "free", *args, match=match)


def test_range_double_free(pool):
    assert pool.free(0x1000_0000, 1000) == 1024        # roundup(1000, 512) == 1024
    expect_error(pool, range_state, DoubleFree, "free", 0x1000_0000)


def test_range_allocation_at(pool):
    assert pool.allocation_at(0x1000_0000) == (0x1000_0000, 1024)
    assert pool.allocation_at(0x1000_03FF) == (0x1000_0000, 1024)
    assert pool.allocation_at(0x1000_1FFF) == (0x1000_1000, 4096)
    assert pool.allocation_at(0x1000_0400) is None      # the gap before the aligned one
    assert pool.allocation_at(0x0FFF_FFFF) is None
    assert pool.allocation_at(HUGE) is None
    with pytest.raises(BadParameters):
        pool.allocation_at(1.0)


@pytest.fixture
def frames(core):
    fa = core.FrameAllocator(0x4000_0000, 64, max_order=4)
    fa.claim(0x4000_0000 + 8 * PAGE, 8)               # frames 8..15 used
    return fa


@pytest.mark.parametrize("args, exc, match", [
    ((0,), BadParameters, None),
    ((-5,), BadParameters, None),
    ((-HUGE,), BadParameters, None),
    ((17,), OutOfMemory, "order 4"),                  # above 1 << max_order
    ((HUGE,), OutOfMemory, "order 4"),
    (("3",), BadParameters, None),
])
def test_alloc_contig_errors(frames, args, exc, match):
    expect_error(frames, frame_state, exc, "alloc_contig", *args, match=match)


def test_alloc_contig_no_run(core):
    fa = core.FrameAllocator(0, 40, max_order=5)
    fa.claim(10 * PAGE, 1)
    fa.claim(30 * PAGE, 1)
    expect_error(fa, frame_state, OutOfMemory, "alloc_contig", 20)
    assert fa.alloc_contig(19) == 11 * PAGE


@pytest.mark.parametrize("args, exc", [
    ((0,), BadParameters), ((-1,), BadParameters), ((57,), OutOfMemory),
    ((HUGE,), OutOfMemory), ((None,), BadParameters),
])
def test_alloc_scattered_errors(frames, args, exc):
    expect_error(frames, frame_state, exc, "alloc_scattered", *args)


B = 0x4000_0000


@pytest.mark.parametrize("args, exc, match", [
    ((B + 12 * PAGE, 2), BadParameters, "frame 0x4000c000 already in use"),
    ((B + 6 * PAGE, 4), BadParameters, "frame 0x40008000 already in use"),
    ((B + 0x10, 1), AlignmentError, None),
    ((B - PAGE, 1), AddressError, None),
    ((B + 64 * PAGE, 1), AddressError, None),
    ((B + 60 * PAGE, 5), AddressError, None),          # runs past the end
    ((B, 0), BadParameters, None),
    ((B, HUGE), AddressError, None),
    ((HUGE, 1), AddressError, None),
    ((HUGE + 1, 1), AlignmentError, None),
    ((-PAGE, 1), AddressError, None),
])
def test_claim_errors(frames, args, exc, match):
    expect_error(frames, frame_state, exc, "claim", *args, match=match)


@pytest.mark.parametrize("args, exc, match", [
    ((B + 8 * PAGE + 1, 1), AlignmentError, None),
    ((B - PAGE, 1), AddressError, None),
    ((B + 64 * PAGE, 1), AddressError, None),
    ((B + 15 * PAGE, 2), DoubleFree, "0x40010000"),     # frame 16 is free
    ((B + 4 * PAGE, 6), DoubleFree, "0x40004000"),      # frames 4..7 are free
    ((B + 8 * PAGE, 0), BadParameters, None),
    ((B + 8 * PAGE, -HUGE), BadParameters, None),
    ((B + 8 * PAGE, 1.0), BadParameters, None),
])
def test_free_contig_errors(frames, args, exc, match):
    expect_error(frames, frame_state, exc, "free_contig", *args, match=match)


@pytest.mark.parametrize("pages, exc, match", [
    ([B + 8 * PAGE, B + 9 * PAGE + 8], AlignmentError, "page 1"),
    ([B + 8 * PAGE, B + 64 * PAGE], AddressError, "page 1"),
    ([B + 8 * PAGE, B + 9 * PAGE, B + 8 * PAGE], DoubleFree, "page 2"),   # listed twice
    ([B + 9 * PAGE, B + 3 * PAGE], DoubleFree, "0x40003000"),             # free frame
    ([[B + 8 * PAGE]], BadParameters, None),                                # 2-D
    ([B + 8 * PAGE, -1], BadParameters, None),
    ([B + 8 * PAGE * 1.0], BadParameters, None),
    ([B + 8 * PAGE, HUGE], BadParameters, None),
    ("pages", BadParameters, None),
])
def test_free_pages_errors(frames, pages, exc, match):
    expect_error(frames, frame_state, exc, "free_pages", pages, match=match)


def test_free_pages_all_or_nothing_and_any_order(frames):
    frames.free_pages(np.array([B + 15 * PAGE, B + 8 * PAGE, B + 11 * PAGE], dtype=np.uint64))
    assert frames.used_map()[8:16].tolist() == [0, 1, 1, 0, 1, 1, 1, 0]
    frames.free_pages([])
    frames.free_pages(np.array([B + 9 * PAGE], dtype=np.int64))
    assert frames.used_frames == 4


@pytest.mark.parametrize("pa, exc", [
    (B + 1, AlignmentError), (B - PAGE, AddressError), (B + 64 * PAGE, AddressError),
    (HUGE, AddressError), (-1, AlignmentError), ("B", BadParameters),
])
def test_is_free_errors(frames, pa, exc):
    expect_error(frames, frame_state, exc, "is_free", pa)


def test_is_free(frames):
    assert frames.is_free(B) and frames.is_free(B + 63 * PAGE)
    assert not frames.is_free(B + 8 * PAGE) and not frames.is_free(B + 15 * PAGE)


# ---------------------------------------------------------------------------
# (c) semantics
# ---------------------------------------------------------------------------

def test_genalloc_rounding(core):
    """min_order 9: 512-byte chunks, sizes rounded up to max(align, 512)."""
    ra = core.RangeAllocator(0x1000_0200, 1 << 20)     # base 512- but not 4096-aligned
    assert ra.chunk_size == 512 and ra.min_order == 9 and ra.policy == "first-fit"
    a = ra.alloc(100)
    assert a == 0x1000_0200 and ra.allocation_at(a) == (a, 512) and ra.used_bytes == 512
    b = ra.alloc(5000, align=4096)
    assert b == 0x1000_1000 and b % 4096 == 0
    assert ra.allocation_at(b) == (b, 8192) and ra.used_bytes == 512 + 8192
    c = ra.alloc(512)                          # first fit: the gap below b
    assert c == 0x1000_0400
    assert ra.count == 3 and ra.free_bytes + ra.used_bytes == ra.size
    # free's size is rounded to the chunk only: 5000 -> 5120 is not 8192
    with pytest.raises(BadParameters):
        ra.free(b, 5000)
    assert ra.free(b, 7681) == 8192 and ra.free(a) == 512 and ra.free(c, 1) == 512
    assert ra.used_bytes == 0 and ra.largest_free == ra.size


def test_first_fit_versus_best_fit(core):
    """Holes of 4, 2 and 3 chunks: first fit takes the lowest hole that fits,
    best fit the shortest (ties to the lowest), both at the hole's lowest
    aligned chunk."""
    layouts = {}
    for policy in ("first-fit", "best-fit"):
        ra = core.RangeAllocator(0, 16 * 512, 9, policy)
        blocks = [ra.alloc(512 * n) for n in (4, 1, 2, 1, 3, 1, 2)]
        # chunks: [0..3] 4 | 4 | 5,6 | 7 | 8..10 | 11 | 12,13 | 14,15 free
        for index in (0, 2, 4):
            ra.free(blocks[index])
        # free runs now: 0..3 (4), 5..6 (2), 8..10 (3), 14..15 (2)
        layouts[policy] = [ra.alloc(1024), ra.alloc(1024), ra.alloc(1024)]
    assert layouts["first-fit"] == [0, 1024, 5 * 512]
    assert layouts["best-fit"] == [5 * 512, 14 * 512, 8 * 512]


def test_best_fit_respects_alignment(core):
    ra = core.RangeAllocator(0x200, 32 * 512, 9, "best-fit")
    a = ra.alloc(3 * 512)                   # chunks 0..2 (0x200..0x800)
    b = ra.alloc(512)                       # chunk 3 (0x800)
    ra.alloc(16 * 512)                      # chunks 4..19
    ra.free(a)
    # runs: chunks 0..2 (0x200, 3 chunks) and 20..31 (12 chunks): a 1 KiB
    # aligned allocation fits the short run at 0x400
    assert ra.alloc(1024, 1024) == 0x400
    ra.free(b)
    assert ra.alloc(2048, 2048) == 0x3000   # 4 aligned chunks: only the long run


def test_alloc_contig_is_first_fit_and_max_order(core):
    fa = core.FrameAllocator(0x8000_0000, 4096, max_order=3)
    assert fa.alloc_contig(8) == 0x8000_0000
    with pytest.raises(OutOfMemory, match="order 3"):
        fa.alloc_contig(9)
    fa.claim(0x8000_0000 + 10 * PAGE, 1)
    assert fa.alloc_contig(1) == 0x8000_0000 + 8 * PAGE
    assert fa.alloc_contig(2) == 0x8000_0000 + 11 * PAGE      # frame 9 alone is too short
    assert fa.alloc_contig(1) == 0x8000_0000 + 9 * PAGE
    assert fa.largest_free_run == 4096 - 13


def test_alloc_scattered_takes_lowest_free(core):
    fa = core.FrameAllocator(0, 300, max_order=10)
    fa.claim(0, 3)
    fa.claim(5 * PAGE, 70)
    fa.claim(200 * PAGE, 100)
    pages = fa.alloc_scattered(10)
    assert pages.dtype == np.uint64
    assert (pages // PAGE).tolist() == [3, 4] + list(range(75, 83))
    with pytest.raises(OutOfMemory):
        fa.alloc_scattered(118 + 1)
    rest = fa.alloc_scattered(117)
    assert (rest // PAGE).tolist() == list(range(83, 200))
    assert fa.free_frames == 0 and fa.largest_free_run == 0
    fa.free_pages(pages[::-1])
    assert fa.free_frames == 10


def test_runs_across_words_and_long_runs(core):
    fa = core.FrameAllocator(0, 1000, max_order=10)
    fa.claim(0, 63)
    assert fa.alloc_contig(2) == 63 * PAGE                    # straddles words 0 and 1
    assert fa.alloc_contig(130) == 65 * PAGE
    fa.claim(300 * PAGE, 1)
    assert fa.alloc_contig(200) == 301 * PAGE                 # 195..299 is 105 frames
    assert fa.alloc_contig(105) == 195 * PAGE
    assert fa.largest_free_run == 1000 - 501
    fa.free_contig(65 * PAGE, 130)
    assert fa.largest_free_run == 1000 - 501
    assert fa.alloc_contig(129) == 65 * PAGE


def test_free_blocks_per_order(core):
    fa = core.FrameAllocator(3 * PAGE, 13, max_order=3)       # pfns 3..15, all free
    assert fa.free_blocks_per_order().tolist() == [1, 0, 1, 1]  # 3 | 4-7 | 8-15
    fa2 = core.FrameAllocator(3 * PAGE, 13, max_order=2)
    assert fa2.free_blocks_per_order().tolist() == [1, 0, 3]    # 3 | 4-7 | 8-11 | 12-15
    fa.claim(9 * PAGE, 1)                                       # runs 3..8, 10..15
    counts = fa.free_blocks_per_order()
    assert counts.dtype == np.int64
    assert counts.tolist() == [2, 1, 2, 0]     # 3 | 4-7 | 8 ; 10-11 | 12-15
    assert sum(int(n) << k for k, n in enumerate(counts)) == fa.free_frames == 12


def test_used_map_and_properties(core):
    fa = core.FrameAllocator(0x10_0000, 70, max_order=10)
    fa.claim(0x10_0000 + 64 * PAGE, 3)
    m = fa.used_map()
    assert m.dtype == np.uint8 and m.shape == (70,)
    assert m.tolist() == [0] * 64 + [1] * 3 + [0] * 3
    assert (fa.base_pa, fa.nframes, fa.max_order) == (0x10_0000, 70, 10)
    assert (fa.free_frames, fa.used_frames, fa.largest_free_run) == (67, 3, 64)


def test_whole_pool_and_numpy_ints(core):
    ra = core.RangeAllocator(0, 4096, 12)
    addr = ra.alloc(np.int64(4096), np.uint64(4096))
    assert addr == 0 and ra.free_bytes == 0 and ra.largest_free == 0
    with pytest.raises(OutOfMemory):
        ra.alloc(1)
    assert ra.free(np.uint64(0)) == 4096
    fa = core.FrameAllocator(0, 1, max_order=0)
    assert fa.alloc_contig(np.int32(1)) == 0 and fa.free_frames == 0
    fa.free_contig(np.uint64(0), True)
    assert fa.free_frames == 1
