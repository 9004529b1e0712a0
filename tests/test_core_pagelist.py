"""OP-TEE non-contiguous page lists: build, build_into, parse, segments.

Byte-exact hand-written lists, every rejection of docs/design.md section 6 with its
typed error, build -> parse round trips, and compiled == pure on random input.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc import pagelist
from poolsvc.errors import (
    AlignmentError,
    BadParameters,
    ItemNotFound,
    OutOfMemory,
    SecureMemoryError,
    SizeOverflow,
)

PAGE = 4096
LIST_PA = 0x60000000
U64_MAX = (1 << 64) - 1


def expected_list(pages, list_pa):
    """The list as the spec states it, written out entry by entry."""
    out = b""
    for k in range(0, len(pages), 511):
        chunk = list(pages[k:k + 511])
        own = list_pa + (k // 511) * PAGE
        nxt = own + PAGE if len(chunk) == 511 else 0
        out += struct.pack("<511Q", *(chunk + [0] * (511 - len(chunk)))) + struct.pack("<Q", nxt)
    return out


def scattered(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.permutation(4 * n).astype(np.uint64)[:n] * PAGE + 0x50000000)


def reader(blob, list_pa=LIST_PA):
    def read_page(pa):
        k = pa - list_pa
        if not 0 <= k < len(blob) or k % PAGE:
            raise ItemNotFound(f"no list page at {pa:#x}")
        return blob[k:k + PAGE]
    return read_page


# -- build -------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 510, 511, 512, 1021, 1022, 1023])
def test_build_byte_exact(core, n):
    pages = scattered(n, seed=n)
    blob = core.pagelist_build(pages, 0, LIST_PA)
    assert blob == expected_list(pages.tolist(), LIST_PA)
    assert len(blob) == pagelist.list_pages_needed(n) * PAGE


def test_build_boundaries_by_hand(core):
    # exactly 511 entries: one list page whose next points past its end
    blob = core.pagelist_build(scattered(511), 7, LIST_PA)
    assert len(blob) == PAGE
    assert struct.unpack_from("<Q", blob, 4088)[0] == LIST_PA + PAGE
    # 512: the second page holds one entry and a zero next
    blob = core.pagelist_build(scattered(512), 0, LIST_PA)
    assert len(blob) == 2 * PAGE
    assert struct.unpack_from("<Q", blob, 4088)[0] == LIST_PA + PAGE
    assert struct.unpack_from("<Q", blob, PAGE + 4088)[0] == 0
    assert blob[PAGE + 8:2 * PAGE] == bytes(PAGE - 8)
    # 1022: two full pages, the second's next points past the list
    blob = core.pagelist_build(scattered(1022), 0, LIST_PA)
    assert len(blob) == 2 * PAGE
    assert struct.unpack_from("<Q", blob, PAGE + 4088)[0] == LIST_PA + 2 * PAGE


def test_build_single_page_offset_4095(core):
    blob = core.pagelist_build([0x50007000], 4095, 0x1000)
    assert blob == struct.pack("<Q", 0x50007000) + bytes(PAGE - 8)
    assert pagelist.buf_ptr(0x1000, 4095) == 0x1FFF
    assert core.pagelist_parse(0x1FFF, 1, lambda pa: blob).tolist() == [0x50007000]
    # two bytes from offset 4095 reach into a second page
    assert pagelist.num_pages(2, 4095) == 2


@pytest.mark.parametrize("args, error", [
    (([], 0, LIST_PA), BadParameters),
    (([0x5000], -1, LIST_PA), BadParameters),
    (([0x5000], 4096, LIST_PA), BadParameters),
    (([0x5000], 0, LIST_PA + 8), AlignmentError),
    (([0x5000], 0, -PAGE), BadParameters),
    (([0x5000], 0, 1 << 64), BadParameters),
    (([0x5000], 0, (1 << 64) - PAGE), SizeOverflow),
    (([0x5000, 0x6008], 0, LIST_PA), AlignmentError),
    (([-1], 0, LIST_PA), BadParameters),
    (([[0x5000]], 0, LIST_PA), BadParameters),
    ((["x"], 0, LIST_PA), BadParameters),
])
def test_build_rejects(core, args, error):
    with pytest.raises(error):
        core.pagelist_build(*args)
    with pytest.raises(error):
        core.pagelist_build_into(*args, bytearray(2 * PAGE))


def test_build_misaligned_entry_names_index_and_value(core):
    pages = scattered(700)
    pages[600] += 0x10
    with pytest.raises(AlignmentError, match=r"entry 600 is 0x[0-9a-f]+010\b"):
        core.pagelist_build(pages, 0, LIST_PA)


def test_build_into(core):
    pages = scattered(600)
    out = bytearray(b"\xee" * (3 * PAGE))
    assert core.pagelist_build_into(pages, 1, LIST_PA, out) == 2 * PAGE
    assert bytes(out[:2 * PAGE]) == core.pagelist_build(pages, 1, LIST_PA)
    assert out[2 * PAGE:] == b"\xee" * PAGE
    with pytest.raises(BadParameters):
        core.pagelist_build_into(pages, 0, LIST_PA, bytearray(2 * PAGE - 1))
    with pytest.raises(BadParameters):
        core.pagelist_build_into(pages, 0, LIST_PA, bytes(2 * PAGE))     # read-only
    bad = pages.copy()
    bad[599] |= 1
    before = bytes(out)
    with pytest.raises(AlignmentError):
        core.pagelist_build_into(bad, 0, LIST_PA, out)
    assert bytes(out) == before                                          # nothing written


@given(n=st.integers(1, 1100), seed=st.integers(0, 2**32 - 1),
       list_page=st.integers(0, 2**40))
def test_build_compiled_equals_pure(compiled, pure, n, seed, list_page):
    pages = scattered(n, seed)
    assert (compiled.pagelist_build(pages, 0, list_page * PAGE)
            == pure.pagelist_build(pages, 0, list_page * PAGE))


# -- parse -------------------------------------------------------------------

@given(data=st.data())
def test_round_trip(core, data):
    n = data.draw(st.integers(1, 1100), label="pages")
    offset = data.draw(st.integers(0, PAGE - 1), label="offset")
    size = data.draw(st.integers(max(1, (n - 1) * PAGE - offset + 1), n * PAGE - offset),
                     label="size")
    assert pagelist.num_pages(size, offset) == n
    pages = scattered(n, data.draw(st.integers(0, 2**32 - 1), label="seed"))
    blob = core.pagelist_build(pages, offset, LIST_PA)
    calls = []

    def read_page(pa):
        calls.append(pa)
        return reader(blob)(pa)

    got = core.pagelist_parse(LIST_PA | offset, size, read_page,
                              nonsecure=[(0x50000000, 1 << 30), (LIST_PA, 1 << 20)])
    assert got.dtype == np.uint64 and got.tolist() == pages.tolist()
    assert calls == [LIST_PA + k * PAGE for k in range(pagelist.list_pages_needed(n))]


def test_parse_compiled_equals_pure_with_errors(compiled, pure):
    pages = scattered(1030, 5)
    blob = bytearray(compiled.pagelist_build(pages, 0, LIST_PA))
    for corrupt in (None, 3, 700, 1029):
        b = bytearray(blob)
        if corrupt is not None:
            struct.pack_into("<Q", b, (corrupt // 511) * PAGE + (corrupt % 511) * 8, 0x1234)
        results = []
        for mod in (compiled, pure):
            try:
                results.append(mod.pagelist_parse(LIST_PA, 1030 * PAGE, reader(bytes(b))).tolist())
            except Exception as exc:  # noqa: BLE001
                results.append((type(exc), str(exc)))
        assert results[0] == results[1]


def _blob(n, offset=0):
    return bytearray(pagelist.build(scattered(n), offset, LIST_PA))


def test_parse_rejects_misaligned_entry(core):
    b = _blob(3)
    struct.pack_into("<Q", b, 8, 0x50000010)
    with pytest.raises(AlignmentError, match="entry 1 is 0x50000010"):
        core.pagelist_parse(LIST_PA, 3 * PAGE, reader(bytes(b)))


def test_parse_rejects_misaligned_next(core):
    b = _blob(600)
    struct.pack_into("<Q", b, 4088, LIST_PA + PAGE + 8)
    with pytest.raises(AlignmentError, match="next pointer"):
        core.pagelist_parse(LIST_PA, 600 * PAGE, reader(bytes(b)))


def test_parse_next_pointer_is_followed(core):
    # the second list page lives elsewhere: the walk goes where next says
    b = _blob(600)
    elsewhere = 0x70000000
    struct.pack_into("<Q", b, 4088, elsewhere)
    pages = {LIST_PA: bytes(b[:PAGE]), elsewhere: bytes(b[PAGE:])}
    got = core.pagelist_parse(LIST_PA, 600 * PAGE, pages.__getitem__)
    assert got.tolist() == scattered(600).tolist()


def test_parse_rejects_list_page_in_secure_memory(core):
    b = bytes(_blob(3))
    calls = []
    with pytest.raises(SecureMemoryError, match="list page 0"):
        core.pagelist_parse(0x0E000000, 3 * PAGE, lambda pa: calls.append(pa) or b,
                            nonsecure=[(0x50000000, 1 << 30), (LIST_PA, 1 << 20)])
    assert calls == []                                # never read


def test_parse_rejects_second_list_page_in_secure_memory(core):
    b = _blob(600)
    struct.pack_into("<Q", b, 4088, 0x0E000000)
    with pytest.raises(SecureMemoryError, match="list page 1"):
        core.pagelist_parse(LIST_PA, 600 * PAGE, reader(bytes(b)),
                            nonsecure=[(0x50000000, 1 << 30), (LIST_PA, 1 << 20)])


def test_parse_rejects_entry_in_secure_memory(core):
    b = _blob(3)
    struct.pack_into("<Q", b, 16, 0x0E000000)
    with pytest.raises(SecureMemoryError, match="entry 2"):
        core.pagelist_parse(LIST_PA, 3 * PAGE, reader(bytes(b)),
                            nonsecure=[(0x50000000, 1 << 30), (LIST_PA, PAGE)])
    # a page straddling the end of a non-secure range is outside it too
    b = _blob(1)
    struct.pack_into("<Q", b, 0, 0x50000000 + (1 << 30) - PAGE)
    ok = core.pagelist_parse(LIST_PA, 1, reader(bytes(b)), nonsecure=[(0x50000000, 1 << 30)])
    assert ok.tolist() == [0x50000000 + (1 << 30) - PAGE]
    with pytest.raises(SecureMemoryError):
        core.pagelist_parse(LIST_PA, 1, reader(bytes(b)),
                            nonsecure=[(0x50000000, (1 << 30) - 1), (LIST_PA, PAGE)])


def test_parse_rejects_size_offset_overflow(core):
    with pytest.raises(SizeOverflow):
        core.pagelist_parse(LIST_PA | 1, U64_MAX, reader(b""))
    # offset 0: the largest size is fine as far as overflow goes (then too many pages)
    with pytest.raises(OutOfMemory):
        core.pagelist_parse(LIST_PA, U64_MAX, reader(b""))


def test_parse_num_pages_times_8_cannot_overflow_u64(core):
    # OP-TEE checks num_pages * sizeof(paddr_t) for overflow.  With u64 sizes
    # num_pages <= 2**52, so the product never overflows u64: the largest
    # possible request passes that check and stops at the next one (the page
    # limit), even with the limit lifted.
    num_pages = (U64_MAX + 0 - 1) // PAGE + 1
    assert num_pages * 8 <= U64_MAX
    with pytest.raises(OutOfMemory):
        core.pagelist_parse(LIST_PA, U64_MAX, reader(b""), max_pages=1 << 62)


def test_parse_rejects_zero_pages(core):
    with pytest.raises(BadParameters):
        core.pagelist_parse(LIST_PA, 0, reader(bytes(_blob(1))))
    with pytest.raises(BadParameters):
        core.pagelist_parse(LIST_PA | 5, 0, reader(bytes(_blob(1))))


def test_parse_rejects_too_many_pages(core):
    with pytest.raises(OutOfMemory):
        core.pagelist_parse(LIST_PA, 9 * PAGE, reader(bytes(_blob(9))), max_pages=8)
    assert len(core.pagelist_parse(LIST_PA, 8 * PAGE, reader(bytes(_blob(9))), max_pages=8)) == 8


def test_parse_rejects_short_read(core):
    b = bytes(_blob(3))
    with pytest.raises(BadParameters, match="fewer than 4096"):
        core.pagelist_parse(LIST_PA, 3 * PAGE, lambda pa: b[:PAGE - 1])
    with pytest.raises(BadParameters):
        core.pagelist_parse(LIST_PA, 3 * PAGE, lambda pa: None)
    # a longer buffer is fine (the first 4096 bytes count)
    assert len(core.pagelist_parse(LIST_PA, 3 * PAGE, lambda pa: b + b"xx")) == 3
    # memoryview and numpy results are buffers too
    assert len(core.pagelist_parse(LIST_PA, 3 * PAGE, lambda pa: memoryview(b))) == 3
    assert len(core.pagelist_parse(LIST_PA, 3 * PAGE,
                                   lambda pa: np.frombuffer(b, dtype=np.uint64))) == 3


def test_parse_rejects_non_u64_arguments(core):
    for buf_ptr, size in ((-1, PAGE), (1 << 64, PAGE), (LIST_PA, -1), (LIST_PA, 1 << 64)):
        with pytest.raises(BadParameters):
            core.pagelist_parse(buf_ptr, size, reader(bytes(_blob(1))))


def test_parse_read_page_errors_propagate(core):
    with pytest.raises(ItemNotFound):
        core.pagelist_parse(LIST_PA + PAGE * 100, PAGE, reader(bytes(_blob(1))))


def test_parse_bad_nonsecure(core):
    with pytest.raises(BadParameters):
        core.pagelist_parse(LIST_PA, PAGE, reader(bytes(_blob(1))), nonsecure=[(0, -1)])
    with pytest.raises(BadParameters):
        core.pagelist_parse(LIST_PA, PAGE, reader(bytes(_blob(1))), nonsecure=[1, 2])


@pytest.mark.parametrize("nonsecure, inside", [
    ([(0, 1 << 64)], True),                          # the whole 64-bit space: size 2**64
    ([(1 << 64, 0)], False),                         # empty, based at 2**64
    ([(1 << 64, 0), (0, 1 << 64)], True),
    ([(0, 0), (LIST_PA, 0)], False),                 # empty ranges hold no page
    ([(0, U64_MAX)], True),
    ([(U64_MAX + 1 - PAGE, PAGE), (0, 1 << 40)], True),
])
def test_parse_nonsecure_ranges_at_the_top_of_the_space(core, nonsecure, inside):
    """Ranges reaching 2**64 are valid (base + size <= 2**64); never an OverflowError."""
    blob = bytes(_blob(1))
    if inside:
        assert len(core.pagelist_parse(LIST_PA, PAGE, reader(blob), nonsecure=nonsecure)) == 1
    else:
        with pytest.raises(SecureMemoryError):
            core.pagelist_parse(LIST_PA, PAGE, reader(blob), nonsecure=nonsecure)


def test_parse_check_order(core):
    # size+offset overflow is reported before the zero-size and page-limit checks
    with pytest.raises(SizeOverflow):
        core.pagelist_parse(LIST_PA | 0xFFF, U64_MAX - 0xFFE, reader(b""), max_pages=0)
    # zero pages before the page limit
    with pytest.raises(BadParameters):
        core.pagelist_parse(LIST_PA, 0, reader(b""), max_pages=-1)
    # within a list page: an entry's alignment before its region
    b = _blob(2)
    struct.pack_into("<Q", b, 0, 0x0E000008)
    with pytest.raises(AlignmentError):
        core.pagelist_parse(LIST_PA, 2 * PAGE, reader(bytes(b)), nonsecure=[(LIST_PA, PAGE)])


# -- segments ----------------------------------------------------------------

def test_segments_examples(core):
    frames = [0, 1, 2, 3, 4]
    assert core.pagelist_segments([f * PAGE for f in frames], 2 * PAGE) == [
        (0, 2 * PAGE), (2 * PAGE, 2 * PAGE), (4 * PAGE, PAGE)]
    assert core.pagelist_segments([0, 2 * PAGE, PAGE]) == [(0, PAGE), (2 * PAGE, PAGE), (PAGE, PAGE)]
    assert core.pagelist_segments([f * PAGE for f in frames]) == [(0, 5 * PAGE)]
    assert core.pagelist_segments([]) == []
    assert core.pagelist_segments(np.array([], dtype=np.uint64), 2 * PAGE) == []


def test_segments_max_segment(core):
    pages = [0x50000000 + k * PAGE for k in range(7)]
    # rounded down to whole pages: 3 pages
    assert core.pagelist_segments(pages, 3 * PAGE + PAGE - 1) == [
        (0x50000000, 3 * PAGE), (0x50003000, 3 * PAGE), (0x50006000, PAGE)]
    assert core.pagelist_segments(pages, PAGE) == [(pa, PAGE) for pa in pages]
    for bad in (PAGE - 1, 0, -PAGE):
        with pytest.raises(BadParameters):
            core.pagelist_segments(pages, bad)
    with pytest.raises(AlignmentError):
        core.pagelist_segments([0x1000, 0x2001])


@given(st.lists(st.integers(0, 40), max_size=60), st.one_of(st.none(), st.integers(0, 8 * PAGE)))
def test_segments_compiled_equals_pure(compiled, pure, frames, max_segment):
    pages = [f * PAGE for f in frames]
    try:
        expected = pure.pagelist_segments(pages, max_segment)
    except BadParameters:
        with pytest.raises(BadParameters):
            compiled.pagelist_segments(pages, max_segment)
        return
    assert compiled.pagelist_segments(pages, max_segment) == expected
    assert sum(length for _, length in expected) == PAGE * len(pages)
    # expanding the segments gives the pages back
    assert [pa + k * PAGE for pa, length in expected for k in range(length // PAGE)] == pages


# -- helpers of poolsvc.pagelist ---------------------------------------------

def test_public_helpers():
    assert pagelist.num_pages(1, 0) == 1 and pagelist.num_pages(PAGE, 0) == 1
    assert pagelist.num_pages(PAGE, 1) == 2 and pagelist.num_pages(0, 10) == 0
    assert pagelist.list_pages_needed(0) == 0 and pagelist.list_pages_needed(511) == 1
    assert pagelist.list_pages_needed(512) == 2 and pagelist.list_pages_needed(262144) == 514
    assert pagelist.buf_ptr(LIST_PA, 0x123) == LIST_PA | 0x123
    with pytest.raises(AlignmentError):
        pagelist.buf_ptr(LIST_PA + 1, 0)
    with pytest.raises(BadParameters):
        pagelist.buf_ptr(LIST_PA, 4096)
    with pytest.raises(BadParameters):
        pagelist.num_pages(-1, 0)
    with pytest.raises(BadParameters):
        pagelist.list_pages_needed(-1)
    blob = pagelist.build([0x50000000], 0, LIST_PA)
    out = bytearray(PAGE)
    assert pagelist.build_into([0x50000000], 0, LIST_PA, out) == PAGE and bytes(out) == blob
    assert pagelist.parse(LIST_PA, 10, reader(blob)).tolist() == [0x50000000]
    assert pagelist.segments([0x50000000, 0x50001000]) == [(0x50000000, 2 * PAGE)]
