"""gather / scatter through a FrameTable: round trips and every error case.

Frames are mapped, scattered, into a bytearray storage and an mmap storage;
the expected bytes come from the table's own page-by-page ``read``.  Every
failing call must leave both the flat buffer and the storages untouched.
"""
from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc.errors import AddressError, AlignmentError, BadParameters

PAGE = 4096
BASE = 0x50000000
NFRAMES = 64


def make_table(core, seed=0):
    """A table with 64 frames: even frames -> bytearray storage 1 (shuffled page
    indexes), odd frames -> mmap storage 2; returns (table, storages)."""
    t = core.FrameTable([(BASE, NFRAMES * PAGE)])
    rng = np.random.default_rng(seed)
    ba = bytearray(rng.integers(0, 256, (NFRAMES // 2) * PAGE, dtype=np.uint8).tobytes())
    mm = mmap.mmap(-1, (NFRAMES // 2) * PAGE)
    mm[:] = rng.integers(0, 256, len(mm), dtype=np.uint8).tobytes()
    even = np.arange(0, NFRAMES, 2, dtype=np.uint64) * PAGE + BASE
    odd = np.arange(1, NFRAMES, 2, dtype=np.uint64) * PAGE + BASE
    t.map_pages(even[rng.permutation(len(even))], 1, 0)
    t.map_pages(odd[rng.permutation(len(odd))], 2, 0)
    t.attach(1, ba)
    t.attach(2, mm)
    return t, ba, mm


def expected_bytes(table, pages, offset, size):
    out, done, off = b"", 0, offset
    for pa in pages:
        if done == size:
            break
        chunk = min(PAGE - off, size - done)
        out += table.read(int(pa) + off, chunk)
        done += chunk
        off = 0
    return out


@given(data=st.data())
def test_round_trip(core, data):
    table, ba, mm = make_table(core, data.draw(st.integers(0, 1000), label="seed"))
    n = data.draw(st.integers(1, 12), label="pages")
    frames = data.draw(st.permutations(range(NFRAMES)), label="frames")[:n]
    pages = np.array([BASE + f * PAGE for f in frames], dtype=np.uint64)
    offset = data.draw(st.integers(0, PAGE - 1), label="offset")
    size = data.draw(st.integers(0, n * PAGE - offset), label="size")
    out = bytearray(size + 3)
    assert core.gather(table, pages, offset, size, out) == size
    assert bytes(out[:size]) == expected_bytes(table, pages, offset, size)
    assert out[size:] == b"\0\0\0"
    src = bytes((i * 31 + 7) & 0xFF for i in range(size))
    assert core.scatter(table, pages, offset, size, src) == size
    assert expected_bytes(table, pages, offset, size) == src
    back = np.zeros(size, dtype=np.uint8)
    core.gather(table, pages.tolist(), offset, size, back)
    assert back.tobytes() == src
    table.detach(2)
    mm.close()


def test_compiled_and_pure_agree(compiled, pure):
    tc, bac, mmc = make_table(compiled, 7)
    tp, bap, mmp = make_table(pure, 7)
    pages = [BASE + f * PAGE for f in (5, 2, 3, 40, 41, 63)]
    for offset, size in ((0, 0), (1, 1), (4095, 2), (100, 5 * PAGE), (0, 6 * PAGE)):
        oc, op = bytearray(size), bytearray(size)
        assert compiled.gather(tc, pages, offset, size, oc) == pure.gather(tp, pages, offset, size, op)
        assert oc == op
        src = bytes(range(256)) * (size // 256 + 1)
        compiled.scatter(tc, pages, offset, size, src)
        pure.scatter(tp, pages, offset, size, src)
        assert bac == bap and mmc[:] == mmp[:]
    for t, mm in ((tc, mmc), (tp, mmp)):
        t.detach(2)
        mm.close()


def test_large_scattered_copy(core):
    # above the size where the compiled copy drops the GIL
    table, ba, mm = make_table(core, 3)
    pages = np.array([BASE + f * PAGE for f in np.random.default_rng(1).permutation(NFRAMES)],
                     dtype=np.uint64)
    size = NFRAMES * PAGE - 10
    out = np.empty(size, dtype=np.uint8)
    assert core.gather(table, pages, 10, size, out) == size
    assert out.tobytes() == expected_bytes(table, pages, 10, size)
    src = np.arange(size, dtype=np.uint64).astype(np.uint8)
    assert core.scatter(table, pages, 10, size, src) == size
    assert expected_bytes(table, pages, 10, size) == src.tobytes()
    table.detach(2)
    mm.close()


def _errors(core):
    """(description, call args, expected error) over a fresh table."""
    good = [BASE, BASE + 3 * PAGE]
    return [
        ("offset -1", (good, -1, 10), BadParameters),
        ("offset 4096", (good, 4096, 10), BadParameters),
        ("negative size", (good, 0, -1), BadParameters),
        ("too few pages", (good, 1, 2 * PAGE), BadParameters),
        ("pages not convertible", ([["x"]], 0, 10), BadParameters),
        ("misaligned page", ([BASE, BASE + PAGE + 8], 0, 2 * PAGE), AlignmentError),
        ("page outside every region", ([BASE, 0x10000000], 0, PAGE + 1), AddressError),
        ("page unmapped", ([BASE, BASE + 5 * PAGE], 0, PAGE + 1), AddressError),
        ("storage not attached", ([BASE, BASE + 6 * PAGE], 0, PAGE + 1), AddressError),
        ("storage too short", ([BASE, BASE + 7 * PAGE], 0, PAGE + 1), AddressError),
    ]


def _error_table(core):
    t = core.FrameTable([(BASE, 16 * PAGE), (0x42000000, PAGE)])
    storage = bytearray(b"s" * (4 * PAGE))
    t.map_range(BASE, 4, 1, 0)          # frames 0..3 -> storage 1
    t.map_range(BASE + 6 * PAGE, 1, 9, 0)   # frame 6 -> storage 9, never attached
    t.map_range(BASE + 7 * PAGE, 1, 1, 4)   # frame 7 -> storage 1 page 4: past its end
    t.attach(1, storage)
    return t, storage


@pytest.mark.parametrize("case", range(10))
def test_errors_copy_nothing(core, case):
    t, storage = _error_table(core)
    what, (pages, offset, size), error = _errors(core)[case]
    out = bytearray(b"o" * (3 * PAGE))
    with pytest.raises(error):
        core.gather(t, pages, offset, size, out)
    assert out == b"o" * (3 * PAGE), what
    with pytest.raises(error):
        core.scatter(t, pages, offset, size, b"x" * (3 * PAGE))
    assert storage == b"s" * (4 * PAGE), what


def test_flat_buffer_errors(core):
    t, storage = _error_table(core)
    pages = [BASE, BASE + PAGE]
    with pytest.raises(BadParameters):
        core.gather(t, pages, 0, 100, bytearray(99))          # short out
    with pytest.raises(BadParameters):
        core.gather(t, pages, 0, 100, bytes(100))             # read-only out
    with pytest.raises(BadParameters):
        core.gather(t, pages, 0, 100, object())
    with pytest.raises(BadParameters):
        core.scatter(t, pages, 0, 100, b"x" * 99)             # short src
    with pytest.raises(BadParameters):
        core.gather(t, pages, 0, 10, np.zeros((4, 8), dtype=np.uint8)[:, ::2])   # strided
    assert storage == b"s" * (4 * PAGE)
    # size 0 copies nothing and returns 0; pages needed = ceil((offset + size) / 4096)
    assert core.gather(t, [], 0, 0, bytearray()) == 0
    assert core.scatter(t, [BASE + 5 * PAGE], 123, 0, b"") == 0      # unmapped, untouched
    with pytest.raises(BadParameters):
        core.scatter(t, [], 123, 0, b"")
    # a read-only src is fine for scatter; extra pages are ignored
    assert core.scatter(t, pages + [0x1], 0, 5, b"hello") == 5
    assert storage[:5] == b"hello"
