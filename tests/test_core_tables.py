"""FrameTable, IdTable and AddressMap: the compiled core against the pure oracle.

Random operation sequences run on both backends side by side; every step must
give the same result or the same exception type, and the invariants of each
table are checked after every step.  Backend-agnostic cases use ``core``.
"""
from __future__ import annotations

import itertools
import mmap

import numpy as np
import pytest
from hypothesis import given, target
from hypothesis import strategies as st

from poolsvc.errors import (
    AddressError,
    AlignmentError,
    BadParameters,
    ItemNotFound,
    OutOfMemory,
)

PAGE = 4096
# two small regions, 16 and 8 frames, with a gap between them
REGIONS = [(0x10000, 16 * PAGE), (0x40000, 8 * PAGE)]
FRAMES = [0x10000 + i * PAGE for i in range(16)] + [0x40000 + i * PAGE for i in range(8)]


def outcome(fn, *args):
    """``("ok", normalised result)`` or ``("err", exception type)``."""
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the type is what we compare
        return ("err", type(exc))
    if isinstance(result, tuple) and result and isinstance(result[0], np.ndarray):
        return ("ok", tuple(r.tolist() for r in result))
    return ("ok", result)


def same(c_obj, p_obj, name, *args):
    rc = outcome(getattr(c_obj, name), *args)
    rp = outcome(getattr(p_obj, name), *args)
    assert rc == rp, (name, args, rc, rp)
    return rc


# -- FrameTable --------------------------------------------------------------

pas = st.one_of(
    st.sampled_from(FRAMES),
    st.sampled_from(FRAMES).map(lambda pa: pa + 0x123),           # misaligned / inside
    st.sampled_from([0, 0x8000, 0x20000, 0x3F000, 0x48000, -PAGE, 1 << 64, (1 << 64) - PAGE]),
)
counts = st.integers(-1, 10)
sids = st.sampled_from([0, 1, 2, 65535, 65536, -1])
firsts = st.sampled_from([0, 3, 100, -1, 1 << 51])
page_arrays = st.lists(st.sampled_from(FRAMES + [0x10001, 0x80000]), min_size=0, max_size=6)

ft_ops = st.one_of(
    st.tuples(st.just("map_range"), pas, counts, sids, firsts),
    st.tuples(st.just("map_pages"), page_arrays, sids, firsts),
    st.tuples(st.just("unmap_range"), pas, counts),
    st.tuples(st.just("unmap_pages"), page_arrays),
    st.tuples(st.just("lookup"), pas),
    st.tuples(st.just("translate"), pas),
    st.tuples(st.just("is_mapped"), pas),
    st.tuples(st.just("region_index"), pas),
    st.tuples(st.just("translate_batch"), st.lists(pas, max_size=5)),
    st.tuples(st.just("attach"), st.sampled_from([0, 1, 2]), st.sampled_from([0, 4, 16, 200])),
    st.tuples(st.just("detach"), st.sampled_from([0, 1, 2, 7])),
    st.tuples(st.just("read"), pas, st.sampled_from([-1, 0, 1, 100, PAGE, 3 * PAGE + 5])),
    st.tuples(st.just("write"), pas, st.sampled_from([0, 1, 100, PAGE, 3 * PAGE + 5])),
)


def check_frame_tables(c_t, p_t):
    assert c_t.mapped_frames == p_t.mapped_frames
    mapped = 0
    for pa in FRAMES:
        assert same(c_t, p_t, "lookup", pa)
        mapped += c_t.is_mapped(pa)
    assert mapped == c_t.mapped_frames
    assert c_t.attached() == p_t.attached()


@given(st.lists(ft_ops, max_size=40))
def test_frame_table_matches_pure(compiled, pure, ops):
    c_t, p_t = compiled.FrameTable(REGIONS), pure.FrameTable(REGIONS)
    for op in ops:
        name, args = op[0], list(op[1:])
        if name == "attach":
            sid, npages = args
            c_buf, p_buf = bytearray(npages * PAGE), bytearray(npages * PAGE)
            assert outcome(c_t.attach, sid, c_buf) == outcome(p_t.attach, sid, p_buf)
        elif name == "write":
            pa, n = args
            data = bytes((i * 7 + n) & 0xFF for i in range(n))
            same(c_t, p_t, "write", pa, data)
        else:
            same(c_t, p_t, name, *args)
        check_frame_tables(c_t, p_t)
    # the bytes seen through both tables agree
    for pa in FRAMES:
        assert outcome(c_t.read, pa, PAGE) == outcome(p_t.read, pa, PAGE)


@pytest.mark.parametrize("regions, error", [
    ([], BadParameters),
    ([(0x1000, 0)], BadParameters),
    ([(0x1000, -PAGE)], BadParameters),
    ([(0x1001, PAGE)], AlignmentError),
    ([(0x1000, PAGE + 1)], AlignmentError),
    ([(0x1000, 2 * PAGE), (0x2000, PAGE)], BadParameters),
    ([(-PAGE, 2 * PAGE)], BadParameters),
    ([((1 << 64) - PAGE, 2 * PAGE)], BadParameters),
    ([(i * 2 * PAGE, PAGE) for i in range(17)], BadParameters),
    ([(0, (1 << 24) * PAGE + PAGE)], BadParameters),
    ([(0x1000,)], BadParameters),
    (["x"], BadParameters),
])
def test_frame_table_bad_regions(core, regions, error):
    with pytest.raises(error):
        core.FrameTable(regions)


def test_frame_table_basics(core):
    t = core.FrameTable(REGIONS)
    assert t.regions == REGIONS
    t.map_range(0x10000, 4, 3, 10)
    t.map_pages(np.array([0x40000 + 7 * PAGE, 0x40000], dtype=np.uint64), 5, 0)
    assert t.mapped_frames == 6
    assert t.lookup(0x11234) == (3, 11)
    assert t.translate(0x11234) == (3, 11 * PAGE + 0x234)
    assert t.translate(0x40000 + 7 * PAGE + 9) == (5, 9)
    sids, offs = t.translate_batch([0x10000, 0x13FFF, 0x40005])
    assert sids.dtype == np.int32 and offs.dtype == np.int64
    assert sids.tolist() == [3, 3, 5] and offs.tolist() == [10 * PAGE, 14 * PAGE - 1, PAGE + 5]
    assert t.region_index(0x40000) == 1 and t.region_index(0x30000) == -1
    assert t.region_index(-1) == -1 and not t.is_mapped(1 << 70)
    with pytest.raises(AddressError, match="0x14000"):
        t.lookup(0x14000)
    with pytest.raises(AddressError):
        t.lookup(-5)
    with pytest.raises(AddressError):
        t.translate_batch([0x10000, 0x30000])
    with pytest.raises(BadParameters, match="already mapped"):
        t.map_range(0x13000, 2, 1, 0)
    assert t.mapped_frames == 6                 # nothing of the failed call stuck
    with pytest.raises(BadParameters, match="twice"):
        t.map_pages([0x15000, 0x16000, 0x15000], 1, 0)
    assert not t.is_mapped(0x15000) and not t.is_mapped(0x16000)
    with pytest.raises(AddressError):
        t.map_range(0x1F000, 2, 1, 0)           # straddles the region's end
    with pytest.raises(AlignmentError):
        t.map_range(0x10010, 1, 1, 0)
    with pytest.raises(AddressError):
        t.unmap_pages([0x10000, 0x10000])       # twice
    with pytest.raises(AddressError):
        t.unmap_range(0x10000, 5)               # fifth frame not mapped
    assert t.mapped_frames == 6 and t.lookup(0x10000) == (3, 10)
    t.unmap_pages([0x10000, 0x40000])
    t.unmap_range(0x11000, 3)
    assert t.mapped_frames == 1


def test_frame_table_storage(core, tmp_path):
    t = core.FrameTable(REGIONS)
    t.map_range(0x10000, 3, 1, 0)
    t.map_range(0x13000, 1, 2, 0)
    backing = bytearray(3 * PAGE)
    t.attach(1, backing)
    with pytest.raises(BadParameters):
        t.attach(2, b"\0" * PAGE)              # read-only
    with pytest.raises(BadParameters):
        t.attach(2, object())
    with pytest.raises(BadParameters):
        t.attach(70000, bytearray(PAGE))
    with open(tmp_path / "st", "wb+") as fh:
        fh.truncate(PAGE)
        mm = mmap.mmap(fh.fileno(), PAGE)
    t.attach(2, mm)
    t.write(0x10FF0, b"a" * 32)                # crosses from frame 0 into frame 1
    assert bytes(backing[PAGE - 16:PAGE + 16]) == b"a" * 32
    assert t.read(0x11000, 16) == b"a" * 16
    t.write(0x13000, memoryview(b"b" * 16))
    assert t.read(0x13000, 16) == b"b" * 16
    assert mm[:4] == b"bbbb"
    assert t.read(0x10000, 0) == b""
    with pytest.raises(AddressError):
        t.read(0x13000, PAGE + 1)              # next frame not mapped
    with pytest.raises(BadParameters):
        t.read(0x10000, -1)
    with pytest.raises(BadParameters):
        t.write(0x10000, "text")
    before = bytes(backing)
    with pytest.raises(AddressError):
        t.write(0x12000, b"z" * (2 * PAGE + 1))    # third frame unmapped: nothing written
    assert bytes(backing) == before and mm[:1] == b"b"
    t.detach(2)
    with pytest.raises(ItemNotFound):
        t.detach(2)
    with pytest.raises(AddressError, match="not attached"):
        t.read(0x13000, 1)
    mm.close()                                  # no export left after detach
    t.attach(1, bytearray(PAGE))               # replaces; storage now too short
    with pytest.raises(AddressError):
        t.read(0x11000, 1)
    assert t.attached() == [1]


# -- IdTable -----------------------------------------------------------------

id_args = st.integers(-2, 12) | st.sampled_from([1 << 40, -(1 << 70), 1 << 70])
ID_OPS = ["alloc", "alloc", "alloc", "free_live", "free_live", "free_live", "remove", "replace", "find",
          "contains"]


def drive_id_tables(data, tables, max_id):
    """Random operations on one or two IdTables, each checked against a dict model.

    Most steps allocate or free a live id (so several ids are free when one is
    handed out); the rest are removes, replaces and lookups of arbitrary ids.  With
    two tables every step must also give the same outcome on both.
    """
    model: dict[int, object] = {}
    most_free = 0                    # most ids free below a live one when an id was handed out
    for _ in range(data.draw(st.integers(1, 80), label="steps")):
        name = data.draw(st.sampled_from(ID_OPS), label="op")
        if name == "free_live":
            if not model:
                continue
            name, args = "remove", (data.draw(st.sampled_from(sorted(model)), label="live id"),)
        elif name == "alloc":
            args = (data.draw(st.sampled_from([None, "a", "b", 0]), label="object"),)
        elif name == "replace":
            args = (data.draw(id_args, label="id"), data.draw(st.sampled_from([None, "c", "d"]), label="object"))
        else:
            args = (data.draw(id_args, label="id"),)
        if name == "contains":
            assert all((args[0] in t) == (args[0] in model) for t in tables)
            continue
        results = [outcome(getattr(t, name), *args) for t in tables]
        rc = results[0]
        assert all(r == rc for r in results), (name, args, results)
        if name == "alloc":
            lowest = next(i for i in itertools.count(1) if i not in model)
            most_free = max(most_free, sum(1 for i in range(1, max(model, default=0)) if i not in model))
            if lowest > max_id:
                assert rc == ("err", OutOfMemory)
            else:
                assert rc == ("ok", lowest), f"alloc gave {rc}; the lowest free id is {lowest}"
                model[lowest] = args[0]
        elif name == "remove" and rc[0] == "ok":
            assert rc[1] == model.pop(args[0])
        elif name == "replace" and rc[0] == "ok":
            assert rc[1] == model[args[0]]
            model[args[0]] = args[1]
        elif name in ("remove", "replace"):
            assert rc == ("err", ItemNotFound) and args[0] not in model
        elif name == "find":
            assert rc == ("ok", model.get(args[0]) if isinstance(args[0], int) else None)
        for t in tables:
            ids = t.ids()
            assert ids == sorted(model) == sorted(set(ids))
            assert len(t) == len(model)
    target(float(most_free), label="free ids below a live one at an alloc")


@given(data=st.data(), max_id=st.sampled_from([1, 3, 8, 2**31 - 1]))
def test_id_table_matches_pure(compiled, pure, data, max_id):
    drive_id_tables(data, [compiled.IdTable(max_id), pure.IdTable(max_id)], max_id)


@given(data=st.data(), max_id=st.sampled_from([3, 8, 2**31 - 1]))
def test_id_table_hands_out_the_lowest_free_id(core, data, max_id):
    """Each backend alone against the model: the spec (lowest free id from 1), not the twin."""
    drive_id_tables(data, [core.IdTable(max_id)], max_id)


def test_id_table_semantics(core):
    t = core.IdTable()
    assert [t.alloc(x) for x in "abcd"] == [1, 2, 3, 4]
    assert t.remove(2) == "b" and t.remove(3) == "c"
    assert t.alloc() == 2                       # reserved
    assert 2 in t and t.find(2) is None and 3 not in t
    assert t.replace(2, "z") is None and t.find(2) == "z"
    assert t.alloc("e") == 3 and t.alloc("f") == 5
    assert t.find(0) is None and t.find(-1) is None and t.find(1 << 80) is None
    assert "x" not in t and None not in t
    with pytest.raises(TypeError):
        t.find("x")
    with pytest.raises(ItemNotFound):
        t.remove(9)
    with pytest.raises(ItemNotFound):
        t.replace(0, "q")
    assert len(t) == 5 and t.ids() == [1, 2, 3, 4, 5]
    small = core.IdTable(max_id=2)
    small.alloc()
    small.alloc()
    with pytest.raises(OutOfMemory):
        small.alloc()
    for bad in (0, -1, 2**31):
        with pytest.raises(BadParameters):
            core.IdTable(max_id=bad)


# -- AddressMap --------------------------------------------------------------

addrs = st.integers(0, 40).map(lambda k: k * 0x100) | st.sampled_from([-1, 1 << 64, (1 << 64) - 1])
am_ops = st.one_of(
    st.tuples(st.just("add"), addrs, addrs, st.integers(-3, 3), st.sampled_from([0, 0x1000, -1])),
    st.tuples(st.just("remove"), addrs),
    st.tuples(st.just("lookup"), addrs),
    st.tuples(st.just("clear")),
)


@given(st.lists(am_ops, max_size=50))
def test_address_map_matches_pure(compiled, pure, ops):
    c_m, p_m = compiled.AddressMap(), pure.AddressMap()
    for op in ops:
        if op[0] == "clear" and len(c_m) > 3:
            continue                                 # keep maps non-trivial
        same(c_m, p_m, op[0], *op[1:])
        ivs = c_m.intervals()
        assert ivs == p_m.intervals() and len(c_m) == len(p_m) == len(ivs)
        for (s0, e0, _, _), (s1, _, _, _) in zip(ivs, ivs[1:]):
            assert s0 < e0 <= s1
        for start, end, key, off in ivs:
            assert c_m.lookup(start) == (key, off)
            assert c_m.lookup(end - 1) == (key, off + end - 1 - start)


def test_address_map_semantics(core):
    m = core.AddressMap()
    m.add(0x7F0000001000, 0x7F0000003000, 4, 0x10000)
    m.add(0x7F0000005000, 0x7F0000006000, 5, 0)
    assert m.lookup(0x7F0000002010) == (4, 0x11010)
    assert m.lookup(0x7F0000003000) is None and m.lookup(0) is None and m.lookup(-4) is None
    with pytest.raises(BadParameters):
        m.add(0x7F0000002000, 0x7F0000004000, 6, 0)   # overlaps
    with pytest.raises(BadParameters):
        m.add(0x9000, 0x9000, 6, 0)                   # empty
    with pytest.raises(ItemNotFound):
        m.remove(0x7F0000001001)
    m.remove(0x7F0000001000)
    assert m.intervals() == [(0x7F0000005000, 0x7F0000006000, 5, 0)] and len(m) == 1
    m.clear()
    assert len(m) == 0 and m.lookup(0x7F0000005000) is None
