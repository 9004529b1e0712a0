"""SmcEntry's own consistency, on both backends unless said.

- A refused (re-)initialisation (bad ``nonsecure``) changes nothing: no message
  windows without a frame table, so ``fetch1`` / ``entry(pa)`` on an entry whose
  ``__init__`` failed raise instead of crashing the interpreter (compiled).
- ``entry(arg_pa)`` on an entry whose ``registered`` table is set but which was
  never ``bind``-ed raises InternalError and counts no call.
- UNREGISTER_SHM removes the cookie from the table it checked, also when Python
  code run by the check (the value's ``inflight``) rebinds the table.
"""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from poolsvc.errors import BadParameters, InternalError

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
