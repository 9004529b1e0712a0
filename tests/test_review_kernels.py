"""Review findings on the kernels of ext/wire.pyx, ext/arena.pyx and ext/smc.pyx
(both backends unless said): each test failed before its fix.

- ``SmcEntry.__init__`` set the message windows before checking ``nonsecure``:
  a refused (re-)initialisation left the entry half changed, and one made by
  ``__new__`` then had windows but no frame table, so ``fetch1`` / ``entry(pa)``
  crashed the interpreter (compiled) or raised AttributeError (pure).
- ``entry(arg_pa)`` took "bound" from the ``registered`` table alone: an entry
  whose ``registered`` was set but which was never ``bind``-ed counted the call
  and failed with TypeError (compiled) or AssertionError (pure), not
  InternalError.
- The compiled ``entry(arg_pa)`` read ``registered`` again after the checks of
  an UNREGISTER_SHM: when Python code run by the check (the value's
  ``inflight``) rebound the table, it deleted the cookie from the new table
  (KeyError, no answer, the cookie left registered) where the pure twin
  removes it from the table it checked.
- ``run_batch`` / ``split_frames``: the pure twin accepted what the compiled one
  refuses (float limits, a ``max_output`` that is not an int, handlers that are
  not a dict) and checked ``counts`` before the limits.
- ``ArenaPages.add`` took a second segment on a storage id already backing one:
  both then handed out the same storage pages (two live runs on the same
  bytes; giving one back zeroed the other's data).
"""
from __future__ import annotations

import collections
import struct
import subprocess
import sys

import pytest

from poolsvc.errors import BadParameters, InternalError, PoolsvcError

PAGE = 4096
ARG1 = struct.Struct("<8I4Q")
STATIC = (0x42000000, 16 * PAGE)
DYNAMIC = (0x50000000, 64 * PAGE)
REG_ATTR, UNREG_ATTR = 0x20A, 0x5


class _Stats:
    def __init__(self):
        self.errors = {}


class _World:
    """A frame table with mapped storage, a message page and a one-page list."""

    def __init__(self, core):
        self.table = core.FrameTable([STATIC, DYNAMIC])
        self.storage = bytearray(24 * PAGE)
        self.table.attach(7, self.storage)
        self.frames = core.FrameAllocator(DYNAMIC[0], 64)
        self.msg_pa = self.frames.alloc_contig(1)
        self.table.map_range(self.msg_pa, 1, 7, 16)
        self.list_pa = self.frames.alloc_contig(1)
        self.table.map_range(self.list_pa, 1, 7, 17)
        self.page = self.frames.alloc_contig(1)
        self.table.write(self.list_pa, struct.pack("<Q", self.page))

    def post(self, cmd, attr, a, b, c):
        self.table.write(self.msg_pa, ARG1.pack(cmd, 0, 0, 0, 0, 0, 0, 1, attr, a, b, c))

    def answer(self):
        return struct.unpack("<II", self.table.read(self.msg_pa + 20, 8))


# ---------------------------------------------------------------------------
# SmcEntry
# ---------------------------------------------------------------------------

def test_refused_reinit_of_an_entry_changes_nothing(core):
    w = _World(core)
    entry = core.SmcEntry(w.table, [STATIC, DYNAMIC], STATIC, (0, 0))
    w.post(4, REG_ATTR, w.list_pa, 100, 1)
    assert entry.fetch1(w.msg_pa) == -1             # dynamic RAM is not a window
    with pytest.raises(BadParameters):
        entry.__init__(w.table, "not ranges", STATIC, DYNAMIC)
    assert entry.fetch1(w.msg_pa) == -1             # still not: nothing changed
    with pytest.raises(BadParameters):
        entry.__init__(w.table, [STATIC, DYNAMIC], STATIC, "not a window")
    assert entry.fetch1(w.msg_pa) == -1
    entry.__init__(w.table, [STATIC, DYNAMIC], STATIC, DYNAMIC)
    assert entry.fetch1(w.msg_pa) == 4


@pytest.mark.parametrize("backend", ["_core", "_pure"])
def test_entry_whose_init_failed_does_not_crash(backend):
    if backend == "_core":
        pytest.importorskip("poolsvc._core")
    # in a child: before the fix the compiled entry read through a NULL table
    code = (f"from poolsvc.{backend} import SmcEntry, FrameTable\n"
            "from poolsvc.errors import BadParameters\n"
            "e = SmcEntry.__new__(SmcEntry)\n"
            "try:\n"
            "    e.__init__(FrameTable([(0, 1 << 20)]), 'bad', (0, 1 << 20), (0, 1 << 20))\n"
            "except BadParameters:\n"
            "    pass\n"
            "seen = []\n"
            "class S:\n"
            "    errors = {}\n"
            "e.bind({}, {}, seen.append, S())\n"
            "print(e.fetch1(0x1000), e(0x1000), seen, e.calls)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "-1 None [4096] 0"


def test_entry_with_a_table_but_not_bound_raises_internal_error(core):
    w = _World(core)
    entry = core.SmcEntry(w.table, [STATIC, DYNAMIC], STATIC, DYNAMIC)
    entry.registered = {}                           # a setter, not bind()
    entry.caps = 1 << 2
    w.post(4, REG_ATTR, w.list_pa, 100, 1)
    with pytest.raises(InternalError):
        entry(w.msg_pa)
    w.post(1, 0, 0, 0, 0)                           # for the generic path
    with pytest.raises(InternalError):
        entry(w.msg_pa)
    assert entry.calls == 0 and entry.registered == {}
    assert w.answer() == (0, 0)


def test_unregister_removes_the_cookie_from_the_table_it_checked(core):
    w = _World(core)
    entry = core.SmcEntry(w.table, [STATIC, DYNAMIC], STATIC, DYNAMIC)

    class Registered:
        @property
        def inflight(self):                         # Python code inside the checks
            entry.registered = {}
            return 0

    checked = {9: Registered(), 10: Registered()}
    stats = _Stats()
    entry.bind(checked, {}, lambda pa: None, stats)
    w.post(5, UNREG_ATTR, 0, 0, 9)
    entry(w.msg_pa)
    assert w.answer() == (0, 3)
    assert sorted(checked) == [10] and entry.registered == {}
    assert entry.calls == 1 and stats.errors == {}


# ---------------------------------------------------------------------------
# run_batch / split_frames: argument checks, compiled vs pure
# ---------------------------------------------------------------------------

def _frame(msg_type, body=b""):
    return struct.pack("<IHH", len(body), msg_type, 0) + body


_BODY = _frame(1, b"ab") + _frame(2, b"cde")
_HANDLERS = {1: lambda conn, body: body, 2: lambda conn, body: body[::-1]}


def _refuse(conn, msg_type, unbatchable):
    return b"refused"


def _on_error(conn, msg_type, exc):
    return b"error"


@pytest.mark.parametrize("args", [
    (_BODY, 10.0, 100, _HANDLERS, 1000, {}),                 # float limit
    (_BODY, 10, 100.0, _HANDLERS, 1000, {}),                 # float max_frame
    (b"", 10, 100, _HANDLERS, None, {}),                     # max_output None, nothing to run
    (_BODY, 10, 100, _HANDLERS, 3.5, {}),                    # float max_output
    (_BODY, 10, 100, collections.OrderedDict(_HANDLERS), 1000, {}),
    (b"", 10, 100, None, 1000, {}),
    (_BODY, -1, 100, _HANDLERS, 1000, []),                   # the limit is checked first
    (_BODY, True, 100, _HANDLERS, 1000, {}),                 # bool: an int
])
def test_run_batch_argument_checks_agree(compiled, pure, args):
    body, limit, max_frame, handlers, max_output, counts = args

    def outcome(mod):
        try:
            return ("ok", mod.run_batch(body, limit, max_frame, handlers, None, _refuse, _on_error,
                                        max_output, counts))
        except (PoolsvcError, TypeError) as exc:
            return ("err", type(exc).__name__, str(exc)
                    if isinstance(exc, PoolsvcError) else "")

    assert outcome(compiled) == outcome(pure)


@pytest.mark.parametrize("limit, max_frame", [(10.0, 100), (10, 100.0), ("1", 100), (True, 100),
                                               (2 ** 70, 2 ** 70), (-(2 ** 70), 100)])
def test_split_frames_argument_checks_agree(compiled, pure, limit, max_frame):
    def outcome(mod):
        try:
            return ("ok", mod.split_frames(_BODY, limit, max_frame))
        except (PoolsvcError, TypeError) as exc:
            return ("err", type(exc).__name__)

    assert outcome(compiled) == outcome(pure)


# ---------------------------------------------------------------------------
# ArenaPages
# ---------------------------------------------------------------------------

def test_two_segments_on_one_storage_are_refused(core):
    # Both would hand out storage page 0: a run of each mapped onto the same
    # bytes, and giving one back zeroed the other's live data.
    table = core.FrameTable([DYNAMIC])
    frames = core.FrameAllocator(DYNAMIC[0], 64)
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
