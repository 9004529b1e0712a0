"""Tests of the arena kernel of the core: ArenaPages and ArenaRun (docs/core.md).

Owns: (a) random operation sequences (segments added and removed, storage
runs, take/give of dynamic-pool runs, bogus arguments, scribbles over every
run before it is given back) checked against a model of the pages handed out
(handed out zeroed, zeroed when freed, nothing changed by a failing call), on
each backend alone and on the compiled core and the plain-Python reference side
by side (identical results, error types, frame maps, frame tables and storage
bytes); (b) one hand-written case per error and per all-or-nothing promise, on
both backends, among them: the pages of a run of take are refused by free;
a second segment on a storage id that already backs
one is refused (both would hand out the same storage pages).

Concurrency: none; every test builds its own objects.
"""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc.errors import (
    AddressError,
    BadParameters,
    DoubleFree,
    ItemNotFound,
    OutOfMemory,
    PoolsvcError,
)

from bytecheck import assert_bytes

PAGE = 4096
DYN = 0x50000000
NFRAMES = 64


class World:
    """A frame table, a frame allocator and an arena of one backend."""

    def __init__(self, core, nframes=NFRAMES, max_order=4):
        self.core = core
        self.table = core.FrameTable([(0x1000, 16 * PAGE), (DYN, nframes * PAGE)])
        self.frames = core.FrameAllocator(DYN, nframes, max_order)
        self.arena = core.ArenaPages(self.table, self.frames)
        self.buffers: dict[int, bytearray] = {}

    def add(self, label, sid, npages, spare=0):
        buf = bytearray((npages + spare) * PAGE)
        self.table.attach(sid, buf)
        self.buffers[sid] = buf
        self.arena.add(label, sid, npages)

    def state(self):
        a = self.arena
        mapped = []
        for pa in range(DYN, DYN + self.frames.nframes * PAGE, PAGE):
            mapped.append(self.table.lookup(pa) if self.table.is_mapped(pa) else None)
        return (a.pages_total, a.free_pages, a.used_pages, a.empty_segments,
                [id(s) for s in a.segments()], [a.used(s) for s in a.segments()],
                self.frames.used_map().tobytes(), mapped, self.table.mapped_frames,
                {sid: bytes(b) for sid, b in self.buffers.items()})


def run_key(value):
    """A comparable form of a result: ArenaRun as its fields, tuples as lists."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, tuple):
        return ("pair", id(value[0]), value[1])
    return ("run", value.pa, value.npages, id(value.segment), value.index)


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except PoolsvcError as exc:
        return ("err", type(exc))


# ---------------------------------------------------------------------------
# (a) differential
# ---------------------------------------------------------------------------

SCRIBBLE = b"\xa5"


def drive_arenas(data, worlds):
    """Random operations on one or two Worlds, checked against a model of used pages.

    The model (``used[label]``, one byte per storage page) says which pages are
    handed out.  Before every free and give the test scribbles over the pages it
    gives back; the spec then requires them zero, and every run handed out zero.
    With two worlds every step must also give the same result, errors and state on both.
    """
    draw = data.draw
    labels: list[str] = []              # segments ever added (the same objects for every world)
    sid_of: dict[str, int] = {}         # label -> storage id, for segments in the arena
    used: dict[str, bytearray] = {}     # label -> 1 per page handed out
    runs: list[tuple] = []              # one run per world, from take; given back or not
    pairs: list[tuple] = []             # (segment, index, npages) from alloc
    retired: set[int] = set()           # storage ids of segments removed while in use
    count = st.integers(-1, 10) | st.sampled_from([2 ** 70, -(2 ** 70), 1 << 30])
    first = worlds[0]

    def pages(label, index, n):
        buf = first.buffers[sid_of[label]]
        return bytes(buf[index * PAGE:(index + n) * PAGE])

    def scribble(label, index, n):
        """Write over the handed-out pages among ``[index, index + n)`` of ``label``."""
        if label not in used or index < 0:
            return
        for k in range(index, min(index + n, len(used[label]))):
            if used[label][k]:
                for w in worlds:
                    w.buffers[sid_of[label]][k * PAGE:(k + 1) * PAGE] = SCRIBBLE * PAGE

    def step(name, *args, per_world=None):
        before = first.state()
        results = []
        for i, w in enumerate(worlds):
            r = outcome(getattr(w.arena, name), *(per_world[i] if per_world else args))
            results.append(r)
        keys = [(r[0], run_key(r[1]) if r[0] == "ok" else r[1]) for r in results]
        assert all(k == keys[0] for k in keys), f"{name}{args}: {results}"
        rc = results[0]
        if rc[0] == "err" or (rc[1] is None and name in ("alloc", "take")):
            assert first.state() == before, f"{name}{args} changed state"
        if len(worlds) == 2:
            assert worlds[0].state() == worlds[1].state()
        return results

    for _ in range(draw(st.integers(1, 40))):
        op = draw(st.sampled_from(["add", "add", "remove", "alloc", "alloc", "free", "free", "take", "take",
                                   "give", "give", "scribble", "bogus"]))
        if op == "add":
            sid, npages, spare = draw(st.integers(10, 14)), draw(st.integers(1, 12)), draw(st.integers(0, 2))
            if sid in retired:
                continue  # frames of runs on a removed segment may still map this storage
            label = f"seg{len(labels)}"
            labels.append(label)
            for w in worlds:
                if sid not in w.buffers:         # else the storage may be too short
                    w.buffers[sid] = bytearray((npages + spare) * PAGE)
                    w.table.attach(sid, w.buffers[sid])
            if step("add", label, sid, npages)[0][0] == "ok":
                sid_of[label], used[label] = sid, bytearray(npages)
        elif op == "remove" and labels:
            label = draw(st.sampled_from(labels))
            if step("remove", label)[0][0] == "ok":
                if any(used[label]):  # removed with pages handed out: its storage id is never reused
                    retired.add(sid_of[label])
                # the owner drops the storage of a removed segment: it is zero when used again
                for w in worlds:
                    w.buffers[sid_of[label]][:] = bytes(len(w.buffers[sid_of[label]]))
                del sid_of[label], used[label]
        elif op == "alloc":
            n = draw(count)
            rc = step("alloc", n)[0]
            if rc[0] == "ok" and rc[1] is not None:
                label, index = rc[1]
                assert not any(used[label][index:index + n]), "alloc handed out used pages"
                assert_bytes(pages(label, index, n), bytes(n * PAGE), "pages handed out by alloc")
                used[label][index:index + n] = b"\x01" * n
                pairs.append((label, index, n))
        elif op == "free" and (pairs or labels):
            if pairs and draw(st.booleans()):
                label, index, n = draw(st.sampled_from(pairs))
            else:
                label = draw(st.sampled_from(labels)) if labels else "nobody"
                index, n = draw(st.integers(-2, 14)), draw(count)
            scribble(label, index, n)
            rc = step("free", label, index, n)[0]
            if rc[0] == "ok":
                assert all(used[label][index:index + n]), "free accepted pages not handed out"
                used[label][index:index + n] = bytes(n)
                assert_bytes(pages(label, index, n), bytes(n * PAGE), "freed pages")
        elif op == "take":
            n = draw(count)
            results = step("take", n)
            rc = results[0]
            if rc[0] == "ok" and rc[1] is not None:
                run = rc[1]
                assert not any(used[run.segment][run.index:run.index + n]), "take handed out used pages"
                assert_bytes(pages(run.segment, run.index, n), bytes(n * PAGE), "pages handed out by take")
                assert_bytes(first.table.read(run.pa, n * PAGE), bytes(n * PAGE), "a run through its frames")
                used[run.segment][run.index:run.index + n] = b"\x01" * n
                runs.append(tuple(r[1] for r in results))
        elif op == "give" and runs:
            chosen = draw(st.sampled_from(runs))
            run = chosen[0]
            scribble(run.segment, run.index, run.npages)
            rc = step("give", per_world=[(r,) for r in chosen])[0]
            if rc[0] == "ok":
                used[run.segment][run.index:run.index + run.npages] = bytes(run.npages)
                assert_bytes(pages(run.segment, run.index, run.npages), bytes(run.npages * PAGE),
                             "given-back pages")
        elif op == "scribble" and runs:
            # write through the frame table into a live run
            run = draw(st.sampled_from(runs))[0]
            for w in worlds:
                if w.table.is_mapped(run.pa):
                    w.table.write(run.pa, SCRIBBLE * 100)
        elif op == "bogus":
            step("give", "not a run")
            step("free", "nobody", 0, 1)
            if draw(st.booleans()):
                step("alloc", "x")
            else:
                step("take", 1.5)


@given(data=st.data(), nframes=st.integers(1, 64), max_order=st.integers(0, 6))
def test_arena_matches_reference(compiled, pure, data, nframes, max_order):
    drive_arenas(data, [World(compiled, nframes, max_order), World(pure, nframes, max_order)])


@given(data=st.data(), nframes=st.integers(1, 64), max_order=st.integers(0, 6))
def test_arena_against_the_model(core, data, nframes, max_order):
    """Each backend alone against the model: pages handed out zeroed and zeroed when freed."""
    drive_arenas(data, [World(core, nframes, max_order)])


# ---------------------------------------------------------------------------
# (b) hand-written cases, both backends
# ---------------------------------------------------------------------------

def test_take_give_round_trip_zeroes(core):
    w = World(core)
    w.add("a", 1, 8)
    run = w.arena.take(3)
    assert (run.pa, run.npages, run.segment, run.index) == (DYN, 3, "a", 0)
    assert [w.table.lookup(run.pa + k * PAGE) for k in range(3)] == [(1, 0), (1, 1), (1, 2)]
    w.table.write(run.pa + PAGE, b"secret")
    assert w.buffers[1][PAGE:PAGE + 6] == b"secret"
    assert w.arena.used_pages == 3 and w.frames.used_frames == 3
    assert w.arena.give(run) == 1              # the segment emptied: one empty segment
    assert bytes(w.buffers[1]) == bytes(8 * PAGE)
    assert w.table.mapped_frames == 0 and w.frames.used_frames == 0
    with pytest.raises(DoubleFree):
        w.arena.give(run)


def test_free_refuses_the_pages_of_a_taken_run(core):
    """A run of take is freed only by give: its frames still map its pages, so
    freeing them with free would hand out pages a frame still writes to."""
    w = World(core)
    w.add("a", 1, 2)
    run = w.arena.take(1)
    before = (w.arena.used_pages, w.frames.used_frames, w.table.mapped_frames)
    with pytest.raises(BadParameters, match="give the run back"):
        w.arena.free("a", run.index, 1)
    assert (w.arena.used_pages, w.frames.used_frames, w.table.mapped_frames) == before
    assert w.arena.give(run) == 1
    pair = w.arena.alloc(1)
    assert pair is not None and w.arena.free(*pair, 1) == 1  # the page is free for alloc/free again


def test_take_without_room_changes_nothing(core):
    w = World(core)
    assert w.arena.take(1) is None             # no segment at all
    w.add("a", 1, 2)
    assert w.arena.take(3) is None             # no run of 3 pages
    assert w.frames.used_frames == 0 and w.table.mapped_frames == 0
    second = w.arena.take(2)
    assert second is not None and second.pa == DYN


def test_take_checks_frames_first(core):
    w = World(core, nframes=4, max_order=1)
    with pytest.raises(OutOfMemory):           # beyond max_order, though no segment has room
        w.arena.take(4)
    with pytest.raises(BadParameters):
        w.arena.take(0)
    w.add("a", 1, 8)
    w.frames.claim(DYN, 3)
    with pytest.raises(OutOfMemory):
        w.arena.take(2)
    assert w.arena.used_pages == 0 and w.table.mapped_frames == 0


def test_take_refused_mapping_takes_nothing(core):
    w = World(core)
    w.add("a", 1, 8)
    w.table.map_range(DYN, 1, 1, 7)            # the frame is mapped but not allocated
    with pytest.raises(BadParameters):
        w.arena.take(1)
    assert w.arena.used_pages == 0 and w.frames.used_frames == 0
    assert w.table.mapped_frames == 1


def test_first_fit_across_segments_and_spares(core):
    w = World(core)
    w.add("a", 1, 2)
    w.add("b", 2, 4)
    assert w.arena.empty_segments == 2
    r1 = w.arena.take(2)                       # fills a
    r2 = w.arena.take(1)                       # goes to b
    assert (r1.segment, r2.segment, r2.index) == ("a", "b", 0)
    assert w.arena.alloc(3) == ("b", 1)
    assert w.arena.alloc(1) is None
    assert w.arena.give(r1) == 1               # a empty, b not
    assert w.arena.free("b", 1, 3) == 0        # b still holds r2
    assert w.arena.give(r2) == 2               # both empty now
    assert w.arena.pages_total == 6 and w.arena.free_pages == 6


def test_free_errors_change_nothing(core):
    w = World(core)
    w.add("a", 1, 4)
    seg, index = w.arena.alloc(2)
    w.buffers[1][0:3] = b"abc"
    for args, exc in [(("b", 0, 1), ItemNotFound), (("a", 0, 0), BadParameters),
                      (("a", "x", 1), BadParameters), (("a", 3, 2), AddressError),
                      (("a", -1, 1), AddressError), (("a", 1, 2), DoubleFree)]:
        with pytest.raises(exc):
            w.arena.free(*args)
    assert w.arena.used_pages == 2 and w.buffers[1][0:3] == b"abc"
    assert w.arena.free("a", 0, 2) == 1 and w.buffers[1][0:3] == bytes(3)


def test_give_errors(core):
    w = World(core)
    w.add("a", 1, 4)
    run = w.arena.take(1)
    other = core.ArenaPages(w.table, w.frames)
    with pytest.raises(ItemNotFound):          # not this arena's
        other.give(run)
    with pytest.raises(BadParameters):
        w.arena.give((run.pa, 1))
    with pytest.raises(BadParameters):
        core.ArenaRun()
    w.table.detach(1)
    with pytest.raises(AddressError):          # storage detached: nothing changes
        w.arena.give(run)
    assert w.frames.used_frames == 1 and w.table.mapped_frames == 1
    w.table.attach(1, w.buffers[1])
    w.arena.give(run)
    run2 = w.arena.take(1)
    w.arena.remove("a")
    with pytest.raises(ItemNotFound):          # its segment is gone
        w.arena.give(run2)


def test_add_and_remove_errors(core):
    w = World(core)
    with pytest.raises(BadParameters):
        w.arena.add("a", 3, 1)                 # storage 3 not attached
    w.table.attach(3, bytearray(2 * PAGE))
    with pytest.raises(BadParameters):
        w.arena.add("a", 3, 3)                 # too short
    with pytest.raises(BadParameters):
        w.arena.add("a", 70000, 1)
    with pytest.raises(BadParameters):
        w.arena.add("a", 3, 0)
    w.arena.add("a", 3, 2)
    with pytest.raises(BadParameters):
        w.arena.add("a", 3, 2)                 # twice
    with pytest.raises(ItemNotFound):
        w.arena.remove("b")
    with pytest.raises(ItemNotFound):
        w.arena.used("b")
    with pytest.raises(BadParameters):
        core.ArenaPages(w.table, None)
    with pytest.raises(BadParameters):
        core.ArenaPages(None, w.frames)
    w.arena.alloc(1)
    w.arena.remove("a")                        # allowed while it holds pages
    assert w.arena.pages_total == 0 and w.arena.segments() == []


def test_two_segments_on_one_storage_are_refused(core):
    # Both would hand out storage page 0: a run of each mapped onto the same
    # bytes, and giving one back zeroed the other's live data.
    table = core.FrameTable([(DYN, NFRAMES * PAGE)])
    frames = core.FrameAllocator(DYN, NFRAMES)
    arena = core.ArenaPages(table, frames)
    storage = bytearray(8 * PAGE)
    table.attach(3, storage)
    arena.add("a", 3, 4)
    with pytest.raises(BadParameters):
        arena.add("b", 3, 4)
    assert arena.segments() == ["a"] and arena.pages_total == 4
    first = arena.take(4)
    assert first is not None and arena.take(1) is None     # no second copy of the pages
    table.write(first.pa, b"live")
    arena.remove("a")
    arena.add("b", 3, 8)                            # once "a" is gone, the storage is free
    assert arena.segments() == ["b"]
