"""SmcDriver / SmcEntry (both backends): registration in flight, list pages, lifecycle.

- A list frame at physical address 0 still counts as a registration in flight:
  a nested ``register*`` from the secure world is refused (it would map a
  second frame onto the same scratch page and zero the outer list).
- A full (511-entry) list page written by the driver has ``next = list_pa +
  4096``, as ``pagelist_build`` (the contract) writes it.
- An object made with ``__new__`` (``__init__`` never run) raises instead of
  crashing the interpreter.
- ``__init__`` run again while a registration is in flight (from the secure
  world) is refused (Busy): the list frame stays in the table and allocator it
  came from.
- The driver calling an entry that was never bound raises InternalError.
"""
from __future__ import annotations

import struct
import subprocess
import sys
import pytest

from poolsvc.errors import Busy, InternalError

PAGE = 4096
ARG1 = struct.Struct("<8I4Q")


def _world(mod, base):
    table = mod.FrameTable([(base, 64 * PAGE)])
    storage = bytearray(24 * PAGE)
    table.attach(7, storage)
    frames = mod.FrameAllocator(base, 64)
    return table, storage, frames


def test_list_frame_at_pa_zero_still_refuses_nesting(core):
    table, storage, frames = _world(core, 0)
    frames.alloc_contig(2)
    frames.free_contig(0, 1)            # frame 0 free: the next list frame
    msg_pa = PAGE
    table.map_range(msg_pa, 1, 7, 16)
    seen = []

    def smc(pa):
        if seen:
            return
        seen.append(table.read(0, 8))   # the outer list's first entry, at PA 0
        with pytest.raises(Busy):
            driver.register_run(0x8000, 1, 0, PAGE, 2)
        seen.append(table.read(0, 8))   # still the outer list
        seen.append((frames.used_frames, table.mapped_frames))

    driver = core.SmcDriver(table, frames, msg_pa, smc, 7, 17)
    assert driver.register_run(0x4000, 1, 0, PAGE, 1) == (0, 0)
    assert seen == [struct.pack("<Q", 0x4000)] * 2 + [(2, 2)]
    assert frames.used_frames == 1 and table.mapped_frames == 1
    assert bytes(storage[17 * PAGE:18 * PAGE]) == bytes(PAGE)
    # and the nested path works again once nothing is in flight
    seen.append("done")
    assert driver.register_run(0x4000, 1, 0, PAGE, 1) == (0, 0)


@pytest.mark.parametrize("n", [510, 511])
def test_full_list_page_matches_pagelist_build(core, n):
    table, _, frames = _world(core, 0x50000000)
    msg_pa = frames.alloc_contig(1)
    table.map_range(msg_pa, 1, 7, 16)
    lists = []

    def smc(pa):
        list_pa = ARG1.unpack(table.read(pa, 64))[9] & ~0xFFF
        lists.append((list_pa, table.read(list_pa, PAGE)))

    driver = core.SmcDriver(table, frames, msg_pa, smc, 7, 17)
    pages = [0x50000000 + (8 + i) * PAGE for i in range(n)]
    driver.register_run(pages[0], n, 0, n * PAGE, 1)
    driver.register(pages, 0, n * PAGE, 2)
    for list_pa, data in lists:
        assert data == core.pagelist_build(pages, 0, list_pa)


@pytest.mark.parametrize("call", [
    "SmcEntry.__new__(SmcEntry).answer(0, 0, 0)",
    "SmcEntry.__new__(SmcEntry).fetch1(0)",
    "SmcEntry.__new__(SmcEntry)(0)",
    "SmcDriver.__new__(SmcDriver).call1(0, 0, 0, 0, 0)",
    "SmcDriver.__new__(SmcDriver).unregister(0)",
    "SmcDriver.__new__(SmcDriver).register([0], 0, 1, 0)",
    "SmcDriver.__new__(SmcDriver).register_run(0, 1, 0, 1, 0)",
])
@pytest.mark.parametrize("backend", ["_core", "_pure"])
def test_uninitialised_objects_raise(call, backend):
    if backend == "_core":
        pytest.importorskip("poolsvc._core")
    code = (f"from poolsvc.{backend} import SmcDriver, SmcEntry\n"
            "from poolsvc.errors import InternalError\n"
            f"try:\n    r = {call}\n"
            "except InternalError:\n    print('InternalError')\n"
            "else:\n    print('ok', r)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = "ok -1" if "fetch1" in call else "InternalError"
    assert out.stdout.strip() == expected


def test_reinit_while_in_flight_is_refused(core):
    table, storage, frames = _world(core, 0x50000000)
    msg_pa = frames.alloc_contig(1)
    table.map_range(msg_pa, 1, 7, 16)
    other_table, _, other_frames = _world(core, 0x50000000)
    assert other_frames.alloc_contig(1) == msg_pa
    other_table.map_range(msg_pa, 1, 7, 16)
    errors = []

    def smc(pa):
        try:
            driver.__init__(other_table, other_frames, msg_pa, smc, 7, 18)
        except Busy as exc:
            errors.append(exc)

    driver = core.SmcDriver(table, frames, msg_pa, smc, 7, 17)
    driver.register_run(0x50000000 + 8 * PAGE, 1, 0, PAGE, 1)
    assert len(errors) == 1
    assert (frames.used_frames, table.mapped_frames) == (1, 1)
    assert (other_frames.used_frames, other_table.mapped_frames) == (1, 1)
    # outside a registration __init__ still works
    driver.__init__(other_table, other_frames, msg_pa, lambda pa: None, 7, 18)
    assert driver.register_run(0x50000000 + 8 * PAGE, 1, 0, PAGE, 1) == (0, 0)
    with pytest.raises(InternalError):
        core.SmcEntry.__new__(core.SmcEntry).answer(0, 0, 0)


def test_driver_calling_an_unbound_entry(core):
    """A driver whose secure world is an SmcEntry not bound to a world (or made by
    ``__new__`` alone): InternalError, and the list frame is given back all the same."""
    table, storage, frames = _world(core, 0x50000000)
    msg_pa = frames.alloc_contig(1)
    table.map_range(msg_pa, 1, 7, 16)
    unbound = core.SmcEntry(table, [(0x50000000, 64 * PAGE)], (0, 0), (0x50000000, 64 * PAGE))
    for entry in (unbound, core.SmcEntry.__new__(core.SmcEntry)):
        driver = core.SmcDriver(table, frames, msg_pa, entry, 7, 17)
        with pytest.raises(InternalError, match="not bound"):
            driver.register_run(0x50000000 + 8 * PAGE, 1, 0, PAGE, 1)
        with pytest.raises(InternalError, match="not bound"):
            driver.unregister(1)
        assert (frames.used_frames, table.mapped_frames) == (1, 1)
        assert bytes(storage[17 * PAGE:18 * PAGE]) == bytes(PAGE)
