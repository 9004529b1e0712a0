"""The registration fast path (poolsvc/usermem.py, poolsvc/mapping.py, core.UserPages).

Owns: the promise that a known mapping is used only once confirmed current:
a mapping replaced at the same address by another object (or the same
object at another offset through a fresh mmap) is seen as the new one, never
the stale one; a known mapping is found again without reading
``/proc/self/maps`` (by the exporting mmap, or one ``map_files`` stat for
other exporters); windows of the caller's mappings stay attached while idle
and are reused only for the mapping they were made for; registration by
descriptor goes through the same ledger.  Both backends (the suite's).

Concurrency: none; each test builds its own System.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from multiprocessing import shared_memory

import numpy as np
import pytest

from poolsvc import Config, System, mapping
from sysutil import assert_accounting, assert_idle

PAGE = 4096
SIZE = 16 * PAGE

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FIXED = 0x10


@pytest.fixture
def system():
    with System(Config(dynamic_size=64 << 20, arena_step=1 << 20)) as s:
        yield s
        assert_accounting(s)


@pytest.fixture
def objects():
    """Two shm objects of SIZE bytes, A filled with b"A", B with b"B"."""
    made = [shared_memory.SharedMemory(create=True, size=SIZE) for _ in range(2)]
    for seg, fill in zip(made, b"AB"):
        seg.buf[:] = bytes([fill]) * SIZE
    yield made
    for seg in made:
        seg.close()
        seg.unlink()


def _key(seg):
    st = os.fstat(seg._fd)
    return (st.st_dev, st.st_ino)


def _first_bytes(system, shm, n=4):
    return system.phys.read(int(shm.pages[0]) + shm.offset, n)


def test_object_replaced_at_the_same_address_is_seen(system, objects):
    """Map A, register, release; map B over the same address (MAP_FIXED); the next
    registration there pins B's pages, never A's."""
    a, b = objects
    addr = libc.mmap(None, SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, a._fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        buf = (ctypes.c_char * SIZE).from_address(addr)   # not an mmap: confirmed by map_files
        ctx = system.open_context()
        with ctx.register_user_buf(memoryview(buf)[PAGE:2 * PAGE]) as shm:
            assert _first_bytes(system, shm) == b"AAAA" and shm.backing.key == _key(a)
        got = libc.mmap(addr, SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | MAP_FIXED,
                        b._fd, 0)
        assert got == addr
        with ctx.register_user_buf(memoryview(buf)[PAGE:2 * PAGE]) as shm:
            assert _first_bytes(system, shm) == b"BBBB" and shm.backing.key == _key(b)
            shm.view()[:2] = b"ok"
        assert bytes(b.buf[PAGE:PAGE + 2]) == b"ok" and bytes(a.buf[PAGE:PAGE + 2]) == b"AA"
        ctx.close()
        assert_idle(system)
    finally:
        libc.munmap(addr, SIZE)


def test_mmap_closed_and_another_mapped_is_seen(system, objects):
    """An exporting mmap confirms a known mapping only while it is the same open
    mmap: after it is closed, a new mmap (of another object, or of the same
    object at another offset) at whatever address is resolved afresh."""
    a, b = objects
    ctx = system.open_context()
    first = mmap.mmap(a._fd, SIZE)
    with ctx.register_user_buf(memoryview(first)[:PAGE]) as shm:
        assert _first_bytes(system, shm) == b"AAAA"
    first.close()
    a.buf[2 * PAGE:2 * PAGE + 4] = b"a2a2"
    for fd, offset, expected in ((b._fd, 0, b"BBBB"), (a._fd, 2 * PAGE, b"a2a2")):
        other = mmap.mmap(fd, SIZE - offset, offset=offset)
        with ctx.register_user_buf(memoryview(other)[:PAGE]) as shm:
            assert _first_bytes(system, shm) == expected
        other.close()
    ctx.close()
    assert_idle(system)


def test_known_mapping_needs_no_maps_read(system, objects, monkeypatch):
    """Registrations through known mappings read /proc/self/maps no more: an mmap
    exporter confirms by itself, any other exporter with one map_files stat."""
    a, _ = objects
    ctx = system.open_context()
    ctx.register_user_buf(a.buf[:PAGE]).close()           # known from here on
    arr = np.frombuffer(a.buf, np.uint8)                   # exporter: an ndarray
    ctx.register_user_buf(arr[PAGE:2 * PAGE]).close()
    refreshes = mapping._CACHE.refreshes
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(mapping.os, "stat", lambda p, *args, **kw: stats.append(p) or real_stat(p))
    for _ in range(3):
        ctx.register_user_buf(a.buf[100:3 * PAGE]).close()
    assert stats == []
    for _ in range(3):
        ctx.register_kernel_buf(arr[100:3 * PAGE]).close()
    assert len(stats) == 3 and all(p.startswith("/proc/self/map_files/") for p in stats)
    assert mapping._CACHE.refreshes == refreshes
    del arr
    ctx.close()
    assert_idle(system)


def test_idle_window_is_reused_and_bounded(system, objects):
    """The window of a caller's mapping stays attached when its last registration goes,
    is used again by the next registration through that mapping, and the idle
    ones are bounded."""
    from poolsvc.usermem import _IDLE_WINDOWS

    a, _ = objects
    ctx = system.open_context()
    um = system.usermem
    ctx.register_user_buf(a.buf[:PAGE]).close()
    assert len(um.idle) == 1
    (window,) = um.idle
    with ctx.register_user_buf(a.buf[PAGE:2 * PAGE]) as shm:
        assert not um.idle and system.memory.table.lookup(int(shm.pages[0]))[0] == window.sid
    maps = [mmap.mmap(a._fd, SIZE) for _ in range(_IDLE_WINDOWS + 2)]
    for mm in maps:
        ctx.register_user_buf(memoryview(mm)[:PAGE]).close()
    assert len(um.idle) == _IDLE_WINDOWS
    for mm in maps:
        mm.close()
    ctx.close()
    assert_idle(system)


def test_register_fd_uses_the_same_ledger(system, objects):
    """By descriptor and by buffer, one object's pages share frames; the
    descriptor's mapping is released with its last registration."""
    a, _ = objects
    ctx = system.open_context()
    mapped = system.memory.table.mapped_frames
    by_buf = ctx.register_user_buf(a.buf[:4 * PAGE])
    by_fd = ctx.register_fd(a._fd, 2 * PAGE + 10, PAGE, user=False)
    assert list(by_fd.pages) == list(by_buf.pages[2:4])
    obj = system.usermem.objects[_key(a)]
    assert obj.pages.pinned_pages == 4 and obj.pages.references == 6
    by_fd.close()
    assert len(obj.windows) == 1                          # the fd's own mapping is gone
    by_buf.close()
    assert obj.pages.pinned_pages == 0 and system.memory.table.mapped_frames == mapped
    ctx.close()
    assert_idle(system)
