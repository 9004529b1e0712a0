"""Private memory registered zero-copy by the embedded System (issue 15, item 3).

A ``bytearray``, a C-contiguous numpy array and an anonymous mmap are
registered without a copy: the frames the secure world sees are the buffer's
own pages, a trusted app's writes land in the caller's object, and the
registration's export keeps the object from being resized or closed until
it is released.  Read-only (``bytes``) and non-contiguous buffers are refused
with a clear error.  Run on both backends (``POOLSVC_PUREPYTHON``).
"""
from __future__ import annotations

import hashlib
import mmap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolsvc import Config, ShmFlags, System
from poolsvc.constants import PAGE_SIZE
from poolsvc.errors import BadParameters, NotSharedMemory
from poolsvc.tee.driver import RegisteredMemref, TempMemref, Value
from poolsvc.tee.ta import FillApp, Sha256App

from svcutil import SMALL
from sysutil import LeakCheck, assert_accounting, assert_idle


@pytest.fixture
def system():
    leaks = LeakCheck()
    with System(Config(**SMALL)) as s:
        yield s
        assert_accounting(s)
        for ctx in list(s.contexts.values()):
            ctx.close()
        assert_idle(s)
        assert not s.usermem.objects  # a private ledger goes with its last page
    leaks.assert_balanced()


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, np.uint8).__array_interface__["data"][0])


def _buffers() -> dict[str, object]:
    anon = mmap.mmap(-1, 3 * PAGE_SIZE)
    return {
        "bytearray": bytearray(9000),
        "numpy": np.zeros((3, 1000), np.float64),
        "anonymous mmap": anon,
    }


@pytest.mark.parametrize("kind", ["bytearray", "numpy", "anonymous mmap"])
def test_private_memory_is_registered_zero_copy(system, kind: str) -> None:
    obj = _buffers()[kind]
    ctx = system.open_context()
    with memoryview(obj) as mv:  # type: ignore[arg-type]
        flat = mv.cast("B")
        n = flat.nbytes
        flat[:] = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        shm = ctx.register_user_buf(obj)
        assert shm.flags == ShmFlags.USER_MAPPED | ShmFlags.DYNAMIC and shm.id > 0 and shm.registered
        assert shm.size == n and shm.offset == _address(flat) % PAGE_SIZE
        assert len(shm.pages) == (shm.offset + n + PAGE_SIZE - 1) // PAGE_SIZE
        # the frames are the buffer's own pages: a frame-table read sees the bytes, a write lands
        assert system.memory.read(int(shm.pages[0]) + shm.offset, 16) == bytes(flat[:16])
        system.memory.write(int(shm.pages[-1]) + (shm.offset + n - 1) % PAGE_SIZE, b"\xee")
        assert flat[n - 1] == 0xEE
        sha = ctx.open_session(Sha256App.UUID)
        digest = bytearray(32)
        sha.invoke(Sha256App.DIGEST, [RegisteredMemref(shm, 0, None, "in"), TempMemref(digest, "out")])
        assert bytes(digest) == hashlib.sha256(flat).digest()
        fill = ctx.open_session(FillApp.UUID)
        fill.invoke(FillApp.FILL, [RegisteredMemref(shm, 10, 100, "out"), Value(0xAB, 1)])
        assert bytes(flat[10:110]) == b"\xab" * 100 and flat[9] != 0xAB and flat[110] != 0xAB
        flat.release()
        shm.close()
    assert system.dynamic.used_frames == 1  # the message page only
    ctx.close()
    if kind == "anonymous mmap":
        obj.close()  # type: ignore[union-attr]


def test_a_registered_buffer_cannot_be_resized_or_closed(system) -> None:
    ctx = system.open_context()
    data, array, anon = bytearray(5000), np.zeros(5000, np.uint8), mmap.mmap(-1, PAGE_SIZE)
    shms = [ctx.register_user_buf(data), ctx.register_kernel_buf(array), ctx.register_user_buf(anon)]
    with pytest.raises(BufferError):
        data.extend(b"x" * 100_000)
    with pytest.raises(ValueError):
        array.resize(100_000)
    with pytest.raises(BufferError):
        anon.close()
    for shm in shms:
        shm.close()
    data.extend(b"x" * 100_000)  # released: the exports are gone
    array.resize(100_000, refcheck=False)
    anon.close()
    ctx.close()


def test_registrations_of_one_buffer_share_its_frames(system) -> None:
    ctx = system.open_context()
    data = bytearray(4 * PAGE_SIZE)
    whole = ctx.register_user_buf(data)
    again = ctx.register_kernel_buf(data)
    assert list(whole.pages) == list(again.pages)
    used = system.dynamic.used_frames
    whole.close()
    assert system.dynamic.used_frames == used  # `again` still pins every page
    assert system.memory.read(int(again.pages[0]) + again.offset, 4) == bytes(4)
    again.close()
    ctx.close()


def test_read_only_and_non_contiguous_buffers_are_refused(system) -> None:
    ctx = system.open_context()
    with pytest.raises(NotSharedMemory, match="read-only"):
        ctx.register_user_buf(b"immutable bytes")
    with pytest.raises(NotSharedMemory, match="read-only"):
        ctx.register_user_buf(memoryview(bytearray(64)).toreadonly())
    readonly = mmap.mmap(-1, PAGE_SIZE, prot=mmap.PROT_READ)
    with pytest.raises(NotSharedMemory, match="read-only"):
        ctx.register_user_buf(readonly)
    readonly.close()
    with pytest.raises(BadParameters, match="not C-contiguous"):
        ctx.register_user_buf(np.zeros(1000)[::2])
    with pytest.raises(BadParameters, match="not C-contiguous"):
        ctx.register_user_buf(np.zeros((10, 10), order="F"))
    with pytest.raises(BadParameters):
        ctx.register_user_buf(bytearray())
    assert not ctx.shms
    ctx.close()


def test_a_temporary_memref_of_private_memory_is_zero_copy(system) -> None:
    ctx = system.open_context()
    fill = ctx.open_session(FillApp.UUID)
    target = bytearray(3000)
    fill.invoke(FillApp.FILL, [TempMemref(target, "out"), Value(0x5A, 1)])
    assert target == b"\x5a" * 3000
    ctx.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=3 * PAGE_SIZE), start=st.integers(0, PAGE_SIZE),
       second=st.integers(0, 2 * PAGE_SIZE))
def test_registered_private_pages_read_back_through_the_frame_table(system, data: bytes, start: int,
                                                                    second: int) -> None:
    ctx = system.open_context()
    backing = bytearray(start + len(data) + 2 * PAGE_SIZE)
    backing[start:start + len(data)] = data
    view = memoryview(backing)
    shm = ctx.register_kernel_buf(view[start:start + len(data)])
    other = ctx.register_kernel_buf(view[second:second + PAGE_SIZE])  # overlapping or not
    base = _address(view) & ~(PAGE_SIZE - 1)
    mine = {(_address(view) + start) // PAGE_SIZE + i - base // PAGE_SIZE: int(pa)
            for i, pa in enumerate(shm.pages)}
    theirs = {(_address(view) + second) // PAGE_SIZE + i - base // PAGE_SIZE: int(pa)
              for i, pa in enumerate(other.pages)}
    for page in mine.keys() & theirs.keys():  # one exporter: the same page has the same frame
        assert mine[page] == theirs[page]
    out = bytearray()
    pos = shm.offset
    for pa in shm.pages:
        take = min(PAGE_SIZE - pos % PAGE_SIZE, len(data) - len(out))
        out += system.memory.read(int(pa) + pos % PAGE_SIZE, take)
        pos = 0
    assert bytes(out) == data
    other.close()
    shm.close()
    view.release()
    ctx.close()
    assert system.dynamic.used_frames == 1
