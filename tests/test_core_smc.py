"""``SmcDriver`` / ``SmcEntry``: both ends of the one-parameter message call.

The pure twin (``poolsvc/_pure/smc.py``) is the oracle: in both modes of the
entry (``strict`` and OP-TEE's), the same random messages (at random
addresses, with random list pages, cookies, attrs and capabilities) and the
same random driver calls (pages, offsets, secure-world answers, a secure
world that raises) give the same results or the same
exception type and message, the same bytes in memory and the same frame and
mapping counts on both backends.  Also: the list frame is zeroed, unmapped
and freed on every path, and a nested registration is refused.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc.errors import AddressError, BadParameters, Busy, InternalError, OutOfMemory

PAGE = 4096
SECURE = (0x0E000000, 16 * PAGE)
STATIC = (0x42000000, 16 * PAGE)        # mapped to storage pages 0..15
DYNAMIC = (0x50000000, 64 * PAGE)       # frames from a FrameAllocator
NONSECURE = (STATIC, DYNAMIC)
SID, MSG_PAGE, SCRATCH, NPAGES = 7, 16, 17, 24
ARG1 = struct.Struct("<8I4Q")
REG_ATTR, UNREG_ATTR = 0x20A, 0x5


class World:
    """A frame table, frames, storage, a message page and both ends, on one backend."""

    def __init__(self, mod, nframes=64):
        self.mod = mod
        self.table = mod.FrameTable([SECURE, STATIC, (DYNAMIC[0], nframes * PAGE)])
        self.storage = bytearray(NPAGES * PAGE)
        self.table.attach(SID, self.storage)
        self.table.map_range(STATIC[0], 16, SID, 0)
        self.frames = mod.FrameAllocator(DYNAMIC[0], nframes)
        self.msg_pa = self.frames.alloc_contig(1)
        self.table.map_range(self.msg_pa, 1, SID, MSG_PAGE)
        self.entry = mod.SmcEntry(self.table, NONSECURE, STATIC, (DYNAMIC[0], nframes * PAGE))
        self.seen: list[tuple[bytes, bytes | None]] = []
        self.answer = (0, 3)
        self.fail: Exception | None = None
        self.driver = mod.SmcDriver(self.table, self.frames, self.msg_pa, self.smc, SID, SCRATCH)

    def smc(self, pa):
        """A secure world that records the message (and its list page) and answers."""
        assert pa == self.msg_pa
        msg = self.table.read(pa, 64)
        words = ARG1.unpack(msg)
        lst = None
        if words[8] == REG_ATTR and self.table.is_mapped(words[9] & ~0xFFF):
            lst = self.table.read(words[9] & ~0xFFF, PAGE)
        self.seen.append((msg, lst))
        if self.fail is not None:
            raise self.fail
        self.table.write(pa + 20, struct.pack("<II", *self.answer))

    def state(self):
        return (bytes(self.storage), self.frames.used_frames, self.table.mapped_frames, self.seen)


def outcome(fn, *args):
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - type and message are compared
        return ("err", type(exc).__name__, str(exc))
    if isinstance(result, tuple):
        return ("ok", tuple(r.tolist() if isinstance(r, np.ndarray) else r for r in result))
    return ("ok", result)


class Entry:  # a registered object: what unregister1 looks at
    def __init__(self, inflight):
        self.inflight = inflight


GOOD_PAGES = [DYNAMIC[0] + k * PAGE for k in range(8, 64, 5)]
pages_st = st.one_of(
    st.lists(st.sampled_from(GOOD_PAGES), min_size=1, max_size=8),        # mostly valid lists
    st.lists(st.sampled_from(GOOD_PAGES + [STATIC[0] + PAGE, SECURE[0], DYNAMIC[0] + 8, 0]),
             min_size=0, max_size=8))


def weighted(good, *bad):
    """Mostly ``good``, sometimes one of ``bad``."""
    return st.sampled_from([good] * (2 * len(bad) + 2) + list(bad))


@given(data=st.data())
def test_entry_compiled_equals_pure(compiled, pure, data):
    worlds = [World(compiled), World(pure)]
    where = data.draw(weighted("msg", "static", "static-straddle", "static-misaligned",
                               "dynamic-unaligned", "secure", "outside", "unmapped",
                               "negative", "float"), label="where")
    cmd = data.draw(st.sampled_from([4, 5, 4, 5, 4, 5, 0, 1, 99]), label="cmd")
    num = data.draw(weighted(1, 0, 2), label="num_params")
    attr = data.draw(weighted(REG_ATTR if cmd == 4 else UNREG_ATTR, REG_ATTR, UNREG_ATTR,
                              0x20B, 0xA, 0), label="attr")
    entries = data.draw(pages_st, label="entries")
    offset = data.draw(st.sampled_from([0, 0x10, 0xFFF]), label="offset")
    good_size = max(1, len(entries) * PAGE - offset)
    size = data.draw(weighted(good_size, 0, 1, PAGE, (1 << 64) - 1, good_size + PAGE),
                     label="size")
    list_at = data.draw(weighted("static", "unmapped", "secure", "misaligned"), label="list")
    cookie = data.draw(weighted(0x13, 0x10, 0x11, 0x12, (1 << 64) - 1), label="cookie")
    caps = data.draw(weighted(4, 0, 5, 1 << 70), label="caps")
    strict = data.draw(st.booleans(), label="strict")
    registered = {0x10: Entry(0), 0x11: Entry(2)}
    rpc_shms = {0x12: object()}
    list_pa = {"static": STATIC[0] + 3 * PAGE, "unmapped": DYNAMIC[0] + 40 * PAGE,
               "secure": SECURE[0], "misaligned": STATIC[0] + 3 * PAGE + 8}[list_at]
    results = []
    for w in worlds:
        w.entry.strict = strict
        blob = bytearray(PAGE)
        for i, pa in enumerate(entries):
            struct.pack_into("<Q", blob, 8 * i, pa)
        w.storage[3 * PAGE:4 * PAGE] = blob
        arg_pa = {"msg": w.msg_pa, "static": STATIC[0] + 5 * PAGE + 64,
                  "static-straddle": STATIC[0] + 6 * PAGE - 32, "static-misaligned": STATIC[0] + 4,
                  "dynamic-unaligned": w.msg_pa + 64, "secure": SECURE[0], "outside": 0x1000,
                  "unmapped": DYNAMIC[0] + 50 * PAGE, "negative": -PAGE,
                  "float": float(w.msg_pa)}[where]
        msg = ARG1.pack(cmd, 1, 2, 3, 4, 5, 6, num, attr, list_pa | offset, size, cookie)
        if isinstance(arg_pa, int) and where != "unmapped" and arg_pa >= 0:
            if where not in ("secure", "outside"):
                w.table.write(arg_pa, msg)
        got = [outcome(w.entry.fetch1, arg_pa)]
        if got[0][0] == "ok" and got[0][1] >= 0:
            if got[0][1] == 4:
                got.append(outcome(w.entry.register1, caps, registered, rpc_shms))
            else:
                got.append(outcome(w.entry.unregister1, registered))
            got.append(outcome(w.entry.answer, arg_pa, 0xFFFF0006, 3))
            # a fetch is consumed: checking again is an internal error
            got.append(outcome(w.entry.unregister1, registered))
        results.append((got, bytes(w.storage)))
    assert results[0] == results[1]


@given(data=st.data())
def test_driver_compiled_equals_pure(compiled, pure, data):
    nframes = data.draw(st.sampled_from([64, 2]), label="frames")  # 2: the list frame may run out
    worlds = [World(compiled, nframes), World(pure, nframes)]
    if nframes == 2:
        for w in worlds:
            w.frames.alloc_contig(1)
    calls = data.draw(st.lists(st.tuples(
        st.sampled_from(["register", "register_run", "call1", "unregister"]),
        pages_st,
        weighted(0, 0x10, 0xFFF, 4096, -1),
        weighted(PAGE, 0, (1 << 64) - 1, 1 << 64, -1),
        weighted(0x10, (1 << 64) - 1, -1, "x"),
        st.sampled_from([(0, 3), (0xFFFF0006, 3), (0xFFFF000C, 4)]),
        weighted(None, OutOfMemory("inside"), KeyError("bug")),
    ), min_size=1, max_size=6), label="calls")
    for kind, entries, offset, size, cookie, answer, fail in calls:
        results = []
        for w in worlds:
            w.answer, w.fail = answer, fail
            if kind == "register":
                r = outcome(w.driver.register, np.array(entries, dtype=np.uint64), offset, size, cookie)
            elif kind == "register_run":
                first = entries[0] if entries else DYNAMIC[0] + 7
                r = outcome(w.driver.register_run, first, len(entries), offset, size, cookie)
            elif kind == "unregister":
                r = outcome(w.driver.unregister, cookie)
            else:
                r = outcome(w.driver.call1, 5, UNREG_ATTR, 0, size, cookie)
            results.append((r, w.state()))
            # between calls: no list frame taken, the scratch page zero
            assert w.storage[SCRATCH * PAGE:(SCRATCH + 1) * PAGE] == bytes(PAGE)
            assert w.frames.used_frames == 1 + (nframes == 2)
            assert w.table.mapped_frames == 17
        assert results[0] == results[1]


def test_driver_list_and_message(core):
    w = World(core)
    pages = np.array([DYNAMIC[0] + 9 * PAGE, DYNAMIC[0] + 4 * PAGE], dtype=np.uint64)
    assert w.driver.last_seconds == 0.0
    assert w.driver.register(pages, 0x20, 2 * PAGE - 0x20, 0xC0FFEE) == (0, 3)
    assert 0.0 < w.driver.last_seconds < 1.0
    (msg, lst), = w.seen
    list_pa = DYNAMIC[0] + 1 * PAGE                     # the lowest free frame
    assert ARG1.unpack(msg) == (4, 0, 0, 0, 0, 0, 0, 1, REG_ATTR, list_pa | 0x20, 2 * PAGE - 0x20,
                                0xC0FFEE)
    assert lst == core.pagelist_build(pages, 0x20, list_pa)
    assert w.driver.register_run(DYNAMIC[0] + 10 * PAGE, 3, 0, 3 * PAGE, 1) == (0, 3)
    assert w.seen[1][1] == core.pagelist_build([DYNAMIC[0] + k * PAGE for k in (10, 11, 12)], 0,
                                               list_pa)
    assert w.frames.used_frames == 1 and w.table.mapped_frames == 17
    assert w.storage[SCRATCH * PAGE:(SCRATCH + 1) * PAGE] == bytes(PAGE)
    w.answer = (0xFFFF0008, 4)
    assert w.driver.call1(5, UNREG_ATTR, 0, 0, 7) == (0xFFFF0008, 4)
    assert w.driver.unregister(7) == (0xFFFF0008, 4)
    assert w.seen[-1][0] == w.seen[-2][0] == ARG1.pack(5, 0, 0, 0, 0, 0, 0, 1, UNREG_ATTR, 0, 0, 7)
    assert w.driver.msg_pa == w.msg_pa and w.driver.has_list_page


def test_driver_nested_registration_is_busy(core):
    w = World(core)
    inner = []

    def smc(pa):
        inner.append(outcome(driver.register, [DYNAMIC[0] + 5 * PAGE], 0, PAGE, 2))
        w.table.write(pa + 20, bytes(8))

    driver = core.SmcDriver(w.table, w.frames, w.msg_pa, smc, SID, SCRATCH)
    assert driver.register([DYNAMIC[0] + 5 * PAGE], 0, PAGE, 1) == (0, 0)
    assert inner[0][:2] == ("err", "Busy")
    assert w.frames.used_frames == 1 and w.table.mapped_frames == 17
    # the secure world raising: the frame is still given back, the page zeroed
    w.fail = Busy("x")
    with pytest.raises(Busy):
        w.driver.register([DYNAMIC[0] + 5 * PAGE], 0, PAGE, 1)
    assert w.frames.used_frames == 1 and w.table.mapped_frames == 17
    assert w.storage[SCRATCH * PAGE:(SCRATCH + 1) * PAGE] == bytes(PAGE)


def test_driver_without_list_page_and_bad_arguments(core):
    w = World(core)
    bare = core.SmcDriver(w.table, w.frames, w.msg_pa, w.smc)
    assert not bare.has_list_page
    with pytest.raises(BadParameters, match="scratch"):
        bare.register([DYNAMIC[0]], 0, PAGE, 1)
    assert bare.call1(5, UNREG_ATTR, 0, 0, 1) == (0, 3)
    for args in [(object(), w.frames, w.msg_pa, w.smc), (w.table, object(), w.msg_pa, w.smc),
                 (w.table, w.frames, w.msg_pa, 5), (w.table, w.frames, w.msg_pa + 4, w.smc),
                 (w.table, w.frames, -8, w.smc), (w.table, w.frames, w.msg_pa, w.smc, 70000),
                 (w.table, w.frames, w.msg_pa, w.smc, SID, -1)]:
        with pytest.raises(BadParameters):
            core.SmcDriver(*args)
    for args in [(object(), NONSECURE, STATIC, DYNAMIC), (w.table, None, STATIC, DYNAMIC),
                 (w.table, NONSECURE, (1, 2, 3), DYNAMIC), (w.table, NONSECURE, STATIC, (1 << 64, 1))]:
        with pytest.raises(BadParameters):
            core.SmcEntry(*args)
    with pytest.raises(BadParameters):
        w.driver.register(np.zeros(512, dtype=np.uint64), 0, PAGE, 1)
    with pytest.raises(BadParameters):
        w.driver.register_run(DYNAMIC[0], 512, 0, PAGE, 1)
    with pytest.raises(BadParameters):
        w.driver.register_run((1 << 64) - PAGE, 2, 0, PAGE, 1)
    with pytest.raises(BadParameters):
        w.driver.call1(1 << 32, 0, 0, 0, 0)
    with pytest.raises(BadParameters):
        w.entry.answer(w.msg_pa, 1 << 32, 0)
    with pytest.raises(InternalError):
        w.entry.register1(4, {}, {})
    assert w.frames.used_frames == 1 and w.table.mapped_frames == 17


def test_entry_message_page_unmapped(core):
    w = World(core)
    w.table.unmap_range(w.msg_pa, 1)
    with pytest.raises(AddressError):
        w.entry.fetch1(w.msg_pa)
    assert w.entry.fetch1(w.msg_pa + 8) == -1       # not where messages are accepted


# -- the bound entry: call_with_arg in one call ----------------------------------------------------
class Done:
    """An RPC server stand-in: counts ``call_done`` and may raise from it."""

    def __init__(self, fail=None):
        self.n = 0
        self.fail = fail

    def call_done(self):
        self.n += 1
        if self.fail is not None:
            raise self.fail


class Stats:
    def __init__(self):
        self.errors = {}


def registered_type(mod):
    """The backend's RegisteredShm (``poolsvc._pure`` keeps it in its ``smc`` module)."""
    return mod.smc.RegisteredShm if hasattr(mod, "smc") else mod.RegisteredShm


class BoundWorld(World):
    """A World whose entry is bound to a secure world's state, with a driver that
    calls the entry (``via="entry"``: the entry itself, the compiled driver then
    serves it in C; ``via="python"``: a Python function around it)."""

    def __init__(self, mod, via="entry", strict=True):
        super().__init__(mod)
        reg = registered_type(mod)
        self.registered = {0x10: reg(0x10, np.array([DYNAMIC[0] + 8 * PAGE], dtype=np.uint64), 0, PAGE),
                           0x11: reg(0x11, np.array([DYNAMIC[0] + 9 * PAGE], dtype=np.uint64), 0x10,
                                     PAGE - 0x10, 2)}
        self.rpc_shms = {0x12: object()}
        self.generic_log = []
        self.generic_fail = None
        self.stats = Stats()
        self.dones = []
        self.entry.bind(self.registered, self.rpc_shms, self.generic, self.stats)
        self.entry.caps = 4
        self.entry.strict = strict
        smc = self.entry if via == "entry" else (lambda pa: self.entry(pa))
        self.bdriver = mod.SmcDriver(self.table, self.frames, self.msg_pa, smc, SID, SCRATCH)

    def generic(self, pa):
        self.generic_log.append(pa)
        if self.generic_fail is not None:
            raise self.generic_fail

    def bound_state(self):
        assert self.entry.registered is self.registered and self.entry.rpc_shms is self.rpc_shms
        return (bytes(self.storage), self.frames.used_frames, self.table.mapped_frames,
                {c: (type(r).__name__, r.cookie, [int(p) for p in r.pages], r.offset, r.size, r.inflight)
                 for c, r in self.registered.items()},
                sorted(self.rpc_shms), self.entry.calls, dict(self.stats.errors), list(self.generic_log),
                [d.n for d in self.dones], self.entry.caps, self.entry.strict,
                {c: [(r.cookie, [int(p) for p in r.pages], r.offset, r.size) for r in older]
                 for c, older in self.entry.shadowed.items()})

    @staticmethod
    def objects(state):
        """Registered objects of a bound_state, the shadowed ones included."""
        return len(state[3]) + sum(len(older) for older in state[-1].values())


msg_step = st.tuples(
    st.just("msg"),
    weighted("msg", "static", "static-straddle", "static-misaligned", "dynamic-unaligned",
             "secure", "unmapped", "negative", "float"),
    st.sampled_from([4, 5, 4, 5, 4, 5, 1, 99]),
    weighted(1, 0, 2),
    st.sampled_from(["right", "right", "right", REG_ATTR, UNREG_ATTR, 0x20B, 0]),
    pages_st,
    st.sampled_from([0, 0x10, 0xFFF]),
    st.sampled_from(["good", "good", 0, 1, PAGE, (1 << 64) - 1]),
    weighted("static", "unmapped", "secure", "misaligned"),
    st.sampled_from([0x13, 0x14, 0x10, 0x11, 0x12, (1 << 64) - 1]),
)
other_step = st.one_of(
    st.tuples(st.just("caps"), st.sampled_from([4, 0, 5, 1 << 70])),
    st.tuples(st.just("rpc"), st.sampled_from([None, "done", "plain", "raises"])),
    st.tuples(st.just("generic_fail"), st.booleans()),
    st.tuples(st.just("inflight"), st.sampled_from([0x10, 0x11, 0x13]), st.sampled_from([0, 1])),
    st.tuples(st.just("driver"), st.sampled_from(["register_run", "unregister"]),
              st.sampled_from([0x13, 0x14, 0x10, 0x12]), st.integers(1, 3)),
)


def bound_step(w, step):
    """Apply one step to a BoundWorld; the outcome (result or exception type and message)."""
    kind = step[0]
    if kind == "caps":
        w.entry.caps = step[1]
        return None
    if kind == "rpc":
        rpc = {None: None, "plain": object(), "done": Done(), "raises": Done(OutOfMemory("rpc"))}[step[1]]
        if isinstance(rpc, Done):
            w.dones.append(rpc)
        w.entry.rpc = rpc
        return None
    if kind == "generic_fail":
        w.generic_fail = KeyError("generic") if step[1] else None
        return None
    if kind == "inflight":
        if step[1] in w.registered:
            w.registered[step[1]].inflight = step[2]
        return None
    if kind == "driver":
        _, call, cookie, n = step
        if call == "register_run":
            return outcome(w.bdriver.register_run, DYNAMIC[0] + 20 * PAGE, n, 0, n * PAGE, cookie)
        return outcome(w.bdriver.unregister, cookie)
    _, where, cmd, num, attr, entries, offset, size, list_at, cookie = step
    if attr == "right":
        attr = REG_ATTR if cmd == 4 else UNREG_ATTR
    if size == "good":
        size = max(1, len(entries) * PAGE - offset)
    list_pa = {"static": STATIC[0] + 3 * PAGE, "unmapped": DYNAMIC[0] + 40 * PAGE,
               "secure": SECURE[0], "misaligned": STATIC[0] + 3 * PAGE + 8}[list_at]
    blob = bytearray(PAGE)
    for i, pa in enumerate(entries):
        struct.pack_into("<Q", blob, 8 * i, pa)
    w.storage[3 * PAGE:4 * PAGE] = blob
    arg_pa = {"msg": w.msg_pa, "static": STATIC[0] + 5 * PAGE + 64,
              "static-straddle": STATIC[0] + 6 * PAGE - 32, "static-misaligned": STATIC[0] + 4,
              "dynamic-unaligned": w.msg_pa + 64, "secure": SECURE[0],
              "unmapped": DYNAMIC[0] + 50 * PAGE, "negative": -PAGE, "float": float(w.msg_pa)}[where]
    if where not in ("unmapped", "negative", "float", "secure"):
        w.table.write(arg_pa, ARG1.pack(cmd, 1, 2, 3, 4, 5, 6, num, attr, list_pa | offset, size, cookie))
    before = w.bound_state()
    result = outcome(w.entry, arg_pa)
    after = w.bound_state()
    # the accounting, exactly: a message the entry serves counts once and, if refused,
    # once under its code with the cookie table unchanged; anything else is the
    # generic path's (nothing counted here); an unreadable message changes nothing
    calls, errors, generic = before[5], before[6], before[7]
    if after[7] != generic:
        assert after[7] == generic + [arg_pa] and after[5] == calls and after[6] == errors
        assert after[3] == before[3]
    elif result[0] == "err" and result[1] == "AddressError":
        assert after[3:8] == before[3:8]
    elif result[0] == "err":    # call_done raised: counted, applied, neither answered nor refused
        assert result[1:] == ("OutOfMemory", "rpc")
        assert after[5] == calls + 1 and after[6] == errors
        assert ARG1.unpack(w.table.read(arg_pa, 64))[5:7] == (5, 6)
    else:
        assert after[5] == calls + 1
        ret = struct.unpack("<I", w.table.read(arg_pa + 20, 4))[0]
        if ret == 0:
            assert after[6] == errors
            assert w.objects(after) == w.objects(before) + (1 if cmd == 4 else -1)
        else:
            assert after[6] == {**errors, ret: errors.get(ret, 0) + 1}
            assert after[3] == before[3] and after[-1] == before[-1]
        # only ret and ret_origin (strict) are written: the rest as the normal world left it
        words = ARG1.unpack(w.table.read(arg_pa, 64))
        assert words[:5] + words[7:] == (cmd, 1, 2, 3, 4, num, attr, list_pa | offset, size, cookie)
        if not w.entry.strict:
            assert words[6] == 6
    return result


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "optee"])
@given(steps=st.lists(st.one_of(msg_step, msg_step, other_step), min_size=1, max_size=10))
def test_bound_entry_compiled_equals_pure(compiled, pure, strict, steps):
    """``entry(arg_pa)`` (call_with_arg) on random messages, capabilities, RPC servers,
    busy cookies and driver calls, in both modes (``strict``; OP-TEE's: shadowed
    cookies, no attr check on UNREGISTER_SHM, ``ret_origin`` unwritten): the compiled
    entry called from Python, the compiled driver calling it in C, the same behind a
    Python function, and the pure twin agree on every outcome, every byte, the cookie
    table and its shadowed registrations, the counters and the hooks."""
    worlds = [BoundWorld(compiled, strict=strict), BoundWorld(compiled, via="python", strict=strict),
              BoundWorld(pure, strict=strict)]
    for step in steps:
        results = [(bound_step(w, step), w.bound_state()) for w in worlds]
        assert results[0] == results[1] == results[2], step
        for w in worlds:     # between calls: no list frame taken, the scratch page zero
            assert w.storage[SCRATCH * PAGE:(SCRATCH + 1) * PAGE] == bytes(PAGE)
            assert w.frames.used_frames == 1 and w.table.mapped_frames == 17


def test_bound_entry_register_unregister(core):
    w = BoundWorld(core)
    reg = registered_type(core)
    done = Done()
    w.entry.rpc = done
    assert w.bdriver.register_run(DYNAMIC[0] + 20 * PAGE, 2, 0x10, 2 * PAGE - 0x10, 0x13) == (0, 3)
    shm = w.registered[0x13]
    assert type(shm) is reg and (shm.cookie, shm.offset, shm.size, shm.inflight) == (0x13, 0x10, 2 * PAGE - 0x10, 0)
    assert shm.pages.dtype == np.uint64 and shm.pages.tolist() == [DYNAMIC[0] + 20 * PAGE, DYNAMIC[0] + 21 * PAGE]
    assert repr(shm).startswith("RegisteredShm(cookie=19, pages=array(")
    assert w.bdriver.register_run(DYNAMIC[0] + 20 * PAGE, 1, 0, PAGE, 0x13) == (0xFFFF0006, 3)  # in use
    shm.inflight = 1
    assert w.bdriver.unregister(0x13) == (0xFFFF000D, 3)        # BUSY: stays registered
    shm.inflight = 0
    assert w.bdriver.unregister(0x13) == (0, 3) and 0x13 not in w.registered
    w.entry.caps = 0
    assert w.bdriver.register_run(DYNAMIC[0] + 20 * PAGE, 1, 0, PAGE, 0x14) == (0xFFFF000A, 3)
    assert (w.entry.calls, w.stats.errors, done.n) == (5, {0xFFFF0006: 1, 0xFFFF000D: 1, 0xFFFF000A: 1}, 5)
    # another command: the generic path, nothing counted here
    assert w.bdriver.call1(1, 0, 0, 0, 0) == (0, 0) and w.generic_log == [w.msg_pa]
    assert w.entry.calls == 5 and done.n == 5
    # a call_done that raises: the cookie table is updated, the message not answered
    done.fail = OutOfMemory("rpc")
    w.entry.caps = 4
    with pytest.raises(OutOfMemory, match="rpc"):
        w.bdriver.register_run(DYNAMIC[0] + 20 * PAGE, 1, 0, PAGE, 0x15)
    assert 0x15 in w.registered and w.entry.calls == 6
    assert w.frames.used_frames == 1 and w.table.mapped_frames == 17


def test_bound_entry_properties_and_errors(core):
    w = World(core)
    with pytest.raises(InternalError, match="not bound"):
        w.entry(w.msg_pa)
    assert (w.entry.registered, w.entry.rpc_shms, w.entry.rpc, w.entry.caps, w.entry.calls) == \
        (None, None, None, 0, 0)
    with pytest.raises(BadParameters):
        w.entry.bind({}, {}, 5, Stats())
    for bad in (None, [], type("D", (dict,), {})()):
        with pytest.raises(TypeError):
            w.entry.bind(bad, {}, print, Stats())
        with pytest.raises(TypeError):
            w.entry.registered = bad
        with pytest.raises(TypeError):
            w.entry.rpc_shms = bad
        with pytest.raises(TypeError):
            w.entry.shadowed = bad
    assert (w.entry.strict, w.entry.shadowed) == (True, {})    # strict at first
    w.entry.strict = 0
    assert w.entry.strict is False
    for bad in (-1, 1 << 63, "3", 2.0):
        with pytest.raises(BadParameters):
            w.entry.calls = bad
    w.entry.calls = 7
    w.entry.caps = 1 << 70 | 4
    assert (w.entry.calls, w.entry.caps) == (7, 1 << 70 | 4)
    # an entry made by __new__ alone and bound: no window, so everything is generic
    bare = core.SmcEntry.__new__(core.SmcEntry)
    assert (bare.strict, bare.shadowed) == (True, {})
    seen = []
    bare.bind({}, {}, seen.append, Stats())
    bare(w.msg_pa)
    assert seen == [w.msg_pa]
