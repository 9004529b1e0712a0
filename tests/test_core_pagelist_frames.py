"""``pagelist_parse_frames``: page lists read straight through a FrameTable.

The pure twin (``pagelist_parse`` with ``read_page = table.read(pa, 4096)``)
is the oracle: on random lists, random corruption (an entry or ``next``
misaligned or in secure memory, a list page unmapped) and random arguments,
both backends give the same pages or the same exception type and message, and
the compiled one equals the compiled callback form.  Also: the fast path of
``nonsecure`` (a tuple or list of int pairs) agrees with every other spelling.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc.errors import AddressError, BadParameters

PAGE = 4096
SECURE = (0x0E000000, 16 * PAGE)
LISTS = (0x42000000, 8 * PAGE)        # where the list pages live
DYNAMIC = (0x50000000, 64 * PAGE)
NONSECURE = (LISTS, DYNAMIC)


def make_table(mod, nlist):
    """A FrameTable of three regions; ``nlist`` list pages mapped from LISTS[0]."""
    table = mod.FrameTable([SECURE, LISTS, DYNAMIC])
    storage = bytearray(8 * PAGE)
    table.attach(7, storage)
    if nlist:
        table.map_range(LISTS[0], nlist, 7, 0)
    return table, storage


def outcome(fn, *args, **kw):
    try:
        result = fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001 - type and message are compared
        return ("err", type(exc).__name__, str(exc))
    return ("ok", result.dtype.str, result.tolist())


def run_all(compiled, pure, blob, nlist, buf_ptr, size, nonsecure, max_pages=1 << 20, messages=True):
    """The outcome of the three forms; all must agree (``nonsecure`` may be a factory)."""
    make = nonsecure if callable(nonsecure) else (lambda: nonsecure)
    results = []
    for mod in (compiled, pure):
        table, storage = make_table(mod, nlist)
        storage[:len(blob)] = blob
        results.append(outcome(mod.pagelist_parse_frames, buf_ptr, size, table, make(), max_pages))
    table, storage = make_table(compiled, nlist)
    storage[:len(blob)] = blob
    results.append(outcome(compiled.pagelist_parse, buf_ptr, size, lambda pa: table.read(pa, PAGE),
                           make(), max_pages))
    if not messages:  # the backends word some argument errors differently (same types)
        results = [r[:2] for r in results]
    assert results[0] == results[1] == results[2], results
    return results[0]


@given(data=st.data())
def test_frames_compiled_equals_pure(compiled, pure, data):
    n = data.draw(st.integers(1, 1200), label="pages")
    offset = data.draw(st.integers(0, PAGE - 1), label="offset")
    size = data.draw(st.integers(max(1, (n - 1) * PAGE - offset + 1), n * PAGE - offset), label="size")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    pages = DYNAMIC[0] + rng.integers(0, 64, n).astype(np.uint64) * PAGE
    blob = bytearray(compiled.pagelist_build(pages, offset, LISTS[0]))
    nlist = len(blob) // PAGE
    fault = data.draw(st.sampled_from(["none", "entry-misaligned", "entry-secure", "next-misaligned",
                                       "next-secure", "unmapped", "size", "limit"]), label="fault")
    where = data.draw(st.integers(0, n - 1), label="where")
    nonsecure = data.draw(st.sampled_from([NONSECURE, list(NONSECURE), None]), label="nonsecure")
    max_pages = 1 << 20
    mapped = nlist
    if fault == "entry-misaligned":
        struct.pack_into("<Q", blob, (where // 511) * PAGE + (where % 511) * 8, int(pages[where]) | 8)
    elif fault == "entry-secure":
        struct.pack_into("<Q", blob, (where // 511) * PAGE + (where % 511) * 8, SECURE[0])
    elif fault in ("next-misaligned", "next-secure") and nlist > 1:
        k = data.draw(st.integers(0, nlist - 2), label="list page")
        bad = LISTS[0] + (k + 1) * PAGE + 16 if fault == "next-misaligned" else SECURE[0]
        struct.pack_into("<Q", blob, k * PAGE + 4088, bad)
    elif fault == "unmapped":
        mapped = data.draw(st.integers(0, nlist - 1), label="mapped list pages")
    elif fault == "size":
        size = data.draw(st.sampled_from([0, -1, 1 << 64, (1 << 64) - 1]), label="bad size")
    elif fault == "limit":
        max_pages = data.draw(st.integers(-1, n - 1), label="max_pages")
    got = run_all(compiled, pure, blob, mapped, LISTS[0] | offset, size, nonsecure, max_pages)
    if fault == "none":
        assert got == ("ok", "<u8", pages.tolist())
    elif fault == "unmapped":
        assert got[:2] == ("err", "AddressError")


def test_frames_reads_through_the_table(core):
    pages = np.array([DYNAMIC[0] + 5 * PAGE, DYNAMIC[0] + 2 * PAGE], dtype=np.uint64)
    table, storage = make_table(core, 1)
    storage[:PAGE] = core.pagelist_build(pages, 0x10, LISTS[0])
    got = core.pagelist_parse_frames(LISTS[0] | 0x10, 2 * PAGE - 0x10, table, NONSECURE)
    assert got.tolist() == pages.tolist()
    # the result is the secure side's copy: scribbling on the list afterwards changes nothing
    storage[:8] = b"\xff" * 8
    assert got.tolist() == pages.tolist()


def test_frames_needs_a_frame_table(core):
    with pytest.raises(BadParameters, match="FrameTable"):
        core.pagelist_parse_frames(LISTS[0], PAGE, lambda pa: bytes(PAGE))


def test_frames_unattached_storage(core):
    table = core.FrameTable([SECURE, LISTS, DYNAMIC])
    table.attach(7, bytearray(PAGE))
    table.map_range(LISTS[0], 1, 7, 0)
    table.detach(7)
    with pytest.raises(AddressError):
        core.pagelist_parse_frames(LISTS[0], PAGE, table)


@pytest.mark.parametrize("spelling", [
    lambda r: tuple(r), lambda r: list(r), lambda r: [list(x) for x in r], lambda r: iter(r),
    lambda r: [(np.uint64(b), np.int64(s)) for b, s in r], lambda r: np.array(r, dtype=np.uint64),
    lambda r: tuple(r) + ((0, 0),), lambda r: ((1, (1 << 64) - 1),) + tuple(r),
])
def test_nonsecure_spellings_agree(compiled, pure, spelling):
    pages = np.array([DYNAMIC[0] + 3 * PAGE], dtype=np.uint64)
    blob = compiled.pagelist_build(pages, 0, LISTS[0])
    got = run_all(compiled, pure, blob, 1, LISTS[0], PAGE, lambda: spelling(NONSECURE))
    assert got == ("ok", "<u8", pages.tolist())


@pytest.mark.parametrize("bad", [
    [(0, -1)], [(-1, 5)], [((1 << 64) - 1, 2)], [(1, (1 << 64))], [1, 2], [(1, 2, 3)],
    [("a", 1)], ((0x42000000, 1.5),), 5,
])
def test_bad_nonsecure_agrees(compiled, pure, bad):
    pages = np.array([DYNAMIC[0]], dtype=np.uint64)
    blob = compiled.pagelist_build(pages, 0, LISTS[0])
    assert run_all(compiled, pure, blob, 1, LISTS[0], PAGE, bad, messages=False) == ("err", "BadParameters")
