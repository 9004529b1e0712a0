"""Tests of the user-pages kernel of the core: UserPages and buffer_address (docs/core.md).

Owns: (a) a differential test that drives the compiled core and the
plain-Python reference with the same random pin/unpin sequences (several
storages, overlapping ranges, bogus arguments, frames running out) and
requires identical results, error types, ledgers, frame maps and frame
tables, with nothing changed by a failing call; (b) a spec-level oracle: a
plain model of the ledger (a reference count per page) that predicts, for
either backend, which frames a pin takes (the lowest free ones, in page
order), where each is mapped, and which frames an unpin frees; (c) one
hand-written case per error, on both backends.

Concurrency: none; every test builds its own objects.
"""
from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc.errors import AddressError, BadParameters, DoubleFree, OutOfMemory, PoolsvcError

PAGE = 4096
DYN = 0x50000000
NFRAMES = 48
#: storage id -> (pages attached, first object page it holds)
STORAGES = {3: (16, 0), 7: (12, 4), 9: (4, 8)}


class World:
    """A frame table, a frame allocator and one object's UserPages, of one backend."""

    def __init__(self, core, nframes=NFRAMES):
        self.table = core.FrameTable([(0x1000, 16 * PAGE), (DYN, nframes * PAGE)])
        self.frames = core.FrameAllocator(DYN, nframes)
        self.pages = core.UserPages(self.table, self.frames)
        for sid, (npages, _) in STORAGES.items():
            self.table.attach(sid, bytearray(npages * PAGE))

    def state(self):
        mapped = [self.table.lookup(pa) if self.table.is_mapped(pa) else None
                  for pa in range(DYN, DYN + self.frames.nframes * PAGE, PAGE)]
        p = self.pages
        return (p.refs_array().tolist(), p.frames_array().tolist(), p.npages, p.pinned_pages,
                p.references, [p.storage_pages(s) for s in (*STORAGES, 0, -1, 70000)],
                self.frames.used_map().tobytes(), mapped, self.table.mapped_frames)


def outcome(fn, *args):
    try:
        result = fn(*args)
    except PoolsvcError as exc:
        return ("err", type(exc))
    return ("ok", result.tolist() if isinstance(result, np.ndarray) else result)


class Model:
    """The contract as plain data: a reference count and a frame per object page."""

    def __init__(self, nframes):
        self.free = list(range(DYN, DYN + nframes * PAGE, PAGE))
        self.refs: dict[int, int] = {}
        self.frame: dict[int, int] = {}
        self.where: dict[int, tuple[int, int]] = {}   # frame -> (sid, storage page)

    def pin(self, first, n, sid, sfirst):
        span = range(first, first + n)
        fresh = [p for p in span if not self.refs.get(p)]
        if fresh:
            size, _ = STORAGES.get(sid, (0, 0))
            if sid not in STORAGES or first + n - sfirst > size:
                return ("err", AddressError)
            if len(fresh) > len(self.free):
                return ("err", OutOfMemory)
            taken, self.free = self.free[:len(fresh)], self.free[len(fresh):]
            for p, pa in zip(fresh, taken):
                self.frame[p] = pa
                self.where[pa] = (sid, p - sfirst)
        for p in span:
            self.refs[p] = self.refs.get(p, 0) + 1
        return ("ok", [self.frame[p] for p in span])

    def unpin(self, first, n):
        span = range(first, first + n)
        if any(not self.refs.get(p) for p in span):
            return ("err", DoubleFree)
        gone = 0
        for p in span:
            self.refs[p] -= 1
            if not self.refs[p]:
                pa = self.frame.pop(p)
                del self.where[pa]
                self.free = sorted(self.free + [pa])
                gone += 1
        return ("ok", gone)


def check_model(world, model):
    """The world agrees with the model: references, frames, the table, the free frames."""
    refs = world.pages.refs_array()
    for p in range(len(refs)):
        assert refs[p] == model.refs.get(p, 0)
        assert world.pages.frames_array()[p] == model.frame.get(p, 0)
    for pa in range(DYN, DYN + world.frames.nframes * PAGE, PAGE):
        assert world.frames.is_free(pa) == (pa in model.free)
        assert (world.table.lookup(pa) if world.table.is_mapped(pa) else None) == model.where.get(pa)
    assert world.pages.references == sum(model.refs.values())


ops = st.one_of(
    st.tuples(st.just("pin"), st.integers(0, 20), st.integers(1, 10),
              st.sampled_from([*STORAGES, 5]), st.integers(0, 10)),
    st.tuples(st.just("unpin"), st.integers(0, 20), st.integers(1, 10)),
    st.tuples(st.just("bad_pin"), st.sampled_from([-1, 2**30, "x", 1.5]), st.integers(-1, 3)),
)


def _pin_args(op):
    _, first, n, sid, sfirst = op
    return first, n, sid, min(sfirst, first, STORAGES.get(sid, (0, 0))[1] if sfirst % 2 else sfirst)


# ---------------------------------------------------------------------------
# (a) differential, (b) oracle
# ---------------------------------------------------------------------------

@given(seq=st.lists(ops, max_size=40), nframes=st.integers(4, NFRAMES))
def test_user_pages_match_reference_and_model(compiled, pure, seq, nframes):
    worlds = [World(compiled, nframes), World(pure, nframes)]
    model = Model(nframes)
    for op in seq:
        if op[0] == "pin":
            args = _pin_args(op)
            expected = model.pin(*args)
            results = [outcome(w.pages.pin, *args) for w in worlds]
        elif op[0] == "unpin":
            expected = model.unpin(op[1], op[2])
            results = [outcome(w.pages.unpin, op[1], op[2]) for w in worlds]
        else:
            before = [w.state() for w in worlds]
            results = [outcome(w.pages.pin, op[1], op[2], 3, 0) for w in worlds]
            expected = ("err", BadParameters)
            assert [w.state() for w in worlds] == before
        assert results[0] == results[1] == expected, (op, results, expected)
        assert worlds[0].state() == worlds[1].state()
        check_model(worlds[0], model)


# ---------------------------------------------------------------------------
# (c) cases, both backends
# ---------------------------------------------------------------------------

def test_shared_pages_keep_their_frames(core):
    w = World(core)
    outer = w.pages.pin(0, 6, 3, 0)
    inner = w.pages.pin(2, 2, 7, 0)      # pinned already: the same frames, storage 3 kept
    assert inner.tolist() == outer[2:4].tolist()
    assert w.pages.storage_pages(3) == 6 and w.pages.storage_pages(7) == 0
    assert w.pages.unpin(0, 6) == 4        # pages 2 and 3 still held
    assert w.table.lookup(int(inner[0])) == (3, 2)
    assert w.pages.unpin(2, 2) == 2
    assert w.table.mapped_frames == 0 and w.frames.used_frames == 0
    assert w.pages.pinned_pages == 0 and w.pages.references == 0


def test_new_pages_map_relative_to_the_storage(core):
    w = World(core)
    pages = w.pages.pin(5, 3, 7, 4)        # storage 7 holds the object from page 4
    assert [w.table.lookup(int(pa)) for pa in pages] == [(7, 1), (7, 2), (7, 3)]
    assert pages.tolist() == [DYN, DYN + PAGE, DYN + 2 * PAGE]


def test_pin_refusals_change_nothing(core):
    w = World(core, nframes=4)
    w.frames.claim(DYN, 1)
    before = w.state()
    for args, error in [((-1, 1, 3, 0), BadParameters), ((0, 0, 3, 0), BadParameters),
                        ((2**30 - 1, 2, 3, 0), BadParameters), ((0, 1, 65536, 0), BadParameters),
                        ((2, 1, 3, 3), BadParameters), ((0, 1, "3", 0), BadParameters),
                        ((0, 1, 5, 0), AddressError), ((0, 17, 3, 0), AddressError),
                        ((0, 4, 3, 0), OutOfMemory)]:
        with pytest.raises(error):
            w.pages.pin(*args)
        assert w.state() == before


def test_pin_refuses_a_mapped_frame(core):
    w = World(core, nframes=4)
    w.table.map_range(DYN + PAGE, 1, 9, 0)  # a free frame someone mapped: refused, all given back
    before = w.state()
    with pytest.raises(BadParameters, match="already mapped"):
        w.pages.pin(0, 3, 3, 0)
    assert w.state() == before and w.table.mapped_frames == 1


def test_unpin_refusals_change_nothing(core):
    w = World(core)
    w.pages.pin(2, 2, 3, 0)
    before = w.state()
    for args, error in [((0, 1), DoubleFree), ((3, 2), DoubleFree), ((40, 1), DoubleFree),
                        ((2, 0), BadParameters), ((-1, 2), BadParameters)]:
        with pytest.raises(error):
            w.pages.unpin(*args)
        assert w.state() == before


def test_unpin_refuses_a_frame_freed_behind_its_back(core):
    w = World(core)
    pages = w.pages.pin(0, 2, 3, 0)
    w.frames.free_pages(pages[1:])
    before = w.state()
    with pytest.raises(DoubleFree):
        w.pages.unpin(0, 2)
    assert w.state() == before


def test_constructor_checks_its_parts(core):
    t = core.FrameTable([(DYN, PAGE)])
    f = core.FrameAllocator(DYN, 1)
    with pytest.raises(BadParameters):
        core.UserPages(f, f)
    with pytest.raises(BadParameters):
        core.UserPages(t, t)


def test_page_run_start(core):
    assert core.page_run_start(np.array([DYN], np.uint64)) == DYN
    assert core.page_run_start([DYN, DYN + PAGE, DYN + 2 * PAGE]) == DYN
    assert core.page_run_start([DYN, DYN + 2 * PAGE]) is None
    assert core.page_run_start([DYN + PAGE, DYN]) is None
    with pytest.raises(BadParameters):
        core.page_run_start([])


def test_buffer_address(core):
    mm = mmap.mmap(-1, 2 * PAGE)
    view = memoryview(mm)
    base = core.buffer_address(mm)
    assert core.buffer_address(view[100:]) == base + 100
    arr = np.frombuffer(mm, np.uint32)
    assert core.buffer_address(arr[3:]) == base + 12
    data = b"abc"                          # read-only buffers have an address too
    assert core.buffer_address(data) == np.frombuffer(data, np.uint8).__array_interface__["data"][0]
    for bad in (view[::2], object(), b"", 12):
        with pytest.raises(BadParameters):
            core.buffer_address(bad)
    del arr
    view.release()
    mm.close()
