"""One test body, two backends: the embedded System and the pool-service daemon.

:func:`exercise` takes a System-like handle (``poolsvc.System(...)`` or
``poolsvc.connect(path)``) and checks the section 9 API on it: the
constructors' flags and ids, lookups and references, isolation between
contexts, zero-copy views, registration of POSIX shm at odd offsets,
sessions with trusted apps, batches, stats and release.  The same function
runs in-process against both backends and, in ``test_service.py``, inside
two client processes against ``poolsvc serve`` at once.
"""
from __future__ import annotations

import gc
import hashlib
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import pytest

from poolsvc import Config, ShmFlags, System, pagelist
from poolsvc.errors import (
    TEE_ERROR_ITEM_NOT_FOUND,
    BadParameters,
    Closed,
    ItemNotFound,
    NotSharedMemory,
    OutOfMemory,
    TeeError,
)
from poolsvc.service.batch import batch
from poolsvc.service.client import connect
from poolsvc.tee.driver import RegisteredMemref, TempMemref, Value
from poolsvc.tee.ta import CopyApp, FillApp, Sha256App

from svcutil import SMALL, DaemonThread


def _used(system: Any) -> int:
    return system.stats()["dynamic"]["used_frames"]


def exercise(system: Any, tag: str = "body", exclusive: bool = True) -> None:
    """The shared body: everything here must hold for System and for connect().

    ``exclusive=False`` when other clients use the same daemon meanwhile: the
    checks on system-wide figures (lowest free id, frames in use) are then
    replaced by checks on this body's own contexts.
    """
    base_used = _used(system)
    base_ids = system.stats()["ids"]
    segs: list[shared_memory.SharedMemory] = []
    try:
        ctx = system.open_context(tag)
        other = system.open_context(tag + "-other")

        # -- the constructors of section 4 ------------------------------------------------
        shm = ctx.alloc_user_buf(5000)
        assert shm.flags == ShmFlags.DYNAMIC | ShmFlags.POOL
        assert shm.id >= 1 and shm.size == 8192 and shm.offset == 0
        assert shm.paddr is not None and shm.paddr % 4096 == 0
        assert list(shm.pages) == [shm.paddr, shm.paddr + 4096]
        assert shm.page_run == (shm.paddr, 2)
        view = shm.view()
        assert bytes(view) == bytes(8192)  # zeroed
        view[:5] = b"hello"
        assert bytes(shm.view()[:5]) == b"hello"
        kbuf = ctx.alloc_kernel_buf(100)
        assert kbuf.id == -1 and kbuf.flags == ShmFlags.DYNAMIC | ShmFlags.POOL
        priv = ctx.alloc_priv_buf(40)
        assert priv.id == -1 and priv.flags == ShmFlags.PRIV | ShmFlags.POOL and priv.paddr % 16 == 0
        assert not priv.registered and shm.registered

        # -- ids: lowest free, references, foreign ids refused ---------------------------------
        more = [ctx.alloc_user_buf(4096) for _ in range(3)]
        ids = [s.id for s in more]
        assert len(set(ids)) == 3
        more[1].close()
        again = ctx.alloc_user_buf(10)
        if exclusive:
            assert ids == sorted(ids) and again.id == ids[1]  # lowest free id
        same = ctx.shm_from_id(shm.id)
        assert same is shm
        shm.close()
        assert not shm.closed and bytes(shm.view()[:5]) == b"hello"
        with pytest.raises(ItemNotFound):
            other.shm_from_id(shm.id)  # another context's id
        with pytest.raises(ItemNotFound):
            ctx.shm_from_id(99999)
        with pytest.raises(ItemNotFound):
            ctx.shm_from_id(-1)
        with pytest.raises(BadParameters):
            ctx.shm_from_id("1")
        for bad in (-1, 1.5, "10", True, None):
            with pytest.raises(BadParameters):
                ctx.alloc_user_buf(bad)
        with pytest.raises(OutOfMemory):     # the pools refuse size 0: ENOMEM
            ctx.alloc_user_buf(0)

        # -- registration of POSIX shm at an odd offset, zero-copy both ways --------------------
        seg = shared_memory.SharedMemory(create=True, size=64 * 1024)
        segs.append(seg)
        start, length = 2 * 4096 + 123, 3 * 4096 + 50
        reg = ctx.register_user_buf(seg.buf[start:start + length])
        assert reg.flags == ShmFlags.USER_MAPPED | ShmFlags.DYNAMIC
        assert reg.id >= 1 and reg.offset == 123 and reg.size == length
        assert len(reg.pages) == pagelist.num_pages(length, 123) == 4
        run = reg.page_run  # registered pages: consecutive or not, as the frames fell
        assert (run is None) == (reg.paddr is None)
        if run is not None:
            assert run == (int(reg.pages[0]), 4) and reg.paddr == run[0] + 123
        seg.buf[start:start + 5] = b"world"
        assert bytes(reg.view()[:5]) == b"world"
        reg.view()[-3:] = b"xyz"
        assert bytes(seg.buf[start + length - 3:start + length]) == b"xyz"
        whole = ctx.register_user_buf(seg.buf[0:8 * 4096])
        part = ctx.register_kernel_buf(np.ndarray((3 * 4096,), np.uint8, seg.buf, 4 * 4096 + 10))
        assert part.id == -1 and part.flags == ShmFlags.DYNAMIC
        assert list(whole.pages[4:8]) == list(part.pages[0:4])  # same pages, same addresses
        if isinstance(system, System):  # the embedded System registers private memory zero-copy
            ctx.register_user_buf(bytearray(8192)).close()
        else:  # a daemon cannot reach it
            with pytest.raises(NotSharedMemory, match="private"):
                ctx.register_user_buf(bytearray(8192))
        with pytest.raises(NotSharedMemory, match="read-only"):
            ctx.register_user_buf(seg.buf.toreadonly())
        with pytest.raises(BadParameters):
            ctx.register_user_buf(seg.buf[0:0])

        # -- sessions with trusted apps ------------------------------------------------------------
        digest = ctx.alloc_kernel_buf(32)
        with ctx.open_session(Sha256App.UUID) as session:
            result = session.invoke(Sha256App.DIGEST, [RegisteredMemref(shm, 0, 5, "in"),
                                                      RegisteredMemref(digest, 0, 32, "out")])
            assert result.ret == 0 and result.sizes[1] == 32
            assert bytes(digest.view()[:32]) == hashlib.sha256(b"hello").digest()
            short = RegisteredMemref(digest, 0, 16, "out")
            with pytest.raises(TeeError) as info:
                session.invoke(Sha256App.DIGEST, [RegisteredMemref(shm, 0, 5, "in"), short])
            assert info.value.result.sizes[1] == 32 and short.size == 32
        with ctx.open_session(FillApp.UUID) as session:
            session.invoke(FillApp.FILL, [RegisteredMemref(reg, 0, 64, "out"), Value(0x41, 1)])
            assert bytes(seg.buf[start:start + 64]) == b"A" * 64  # the TA wrote the client's memory
        with ctx.open_session(CopyApp.UUID) as session:
            src = bytearray(b"private bytes go through a bounce buffer")
            dst = bytearray(len(src))
            out = TempMemref(dst, "out")
            session.invoke(CopyApp.COPY, [TempMemref(src, "in"), out])
            assert dst == src and out.size == len(src)
        with pytest.raises(TeeError) as info:
            ctx.open_session("00000000-0000-0000-0000-000000000001")
        assert info.value.code == TEE_ERROR_ITEM_NOT_FOUND

        # -- batches ---------------------------------------------------------------------------------
        b = batch(ctx)
        for size in (4096, 8192, 1):
            b.alloc_user_buf(size)
        b.alloc_kernel_buf(0)  # fails alone; the others still run
        results = b.run()
        assert [r.size for r in results[:3]] == [4096, 8192, 4096]
        assert isinstance(results[3], OutOfMemory)
        b = batch(ctx)
        for r in results[:3]:
            b.close(r)
        assert b.run() == [None, None, None]

        # -- stats and release ---------------------------------------------------------------------
        stats = system.stats()
        mine = stats["contexts"][ctx.name]
        live = 1 + 2 + 3 + 3 + 1  # shm, kbuf+priv, more (3-1+again), reg/whole/part, digest
        assert mine["shms"] == live, mine
        assert stats["contexts"][other.name]["shms"] == 0
        assert not exclusive or _used(system) > base_used
        ctx.close()
        ctx.close()  # idempotent
        assert shm.closed and reg.closed
        with pytest.raises(Closed):
            ctx.alloc_user_buf(10)
        with pytest.raises(Closed):
            shm.view()
        other.close()
        stats = system.stats()
        assert ctx.name not in stats["contexts"] and other.name not in stats["contexts"]
        if exclusive:
            assert stats["dynamic"]["used_frames"] == base_used and stats["ids"] == base_ids
    finally:
        gc.collect()  # tracebacks of the expected errors hold views of the segments
        for seg in segs:
            try:
                seg.close()
            except BufferError:  # only after a failure above: views still held by its traceback
                pass
            seg.unlink()


def test_shared_body_embedded(tmp_path):
    with System(Config(**SMALL)) as system:
        exercise(system)


def test_shared_body_daemon(tmp_path):
    daemon = DaemonThread(tmp_path / "d.sock")
    try:
        with connect(daemon.path) as client:
            exercise(client)
            assert client.stats()["service"]["requests"]["crashes"] == 0
    finally:
        daemon.stop()


def test_service_shm_len_buf_and_idempotent_close(tmp_path):
    """The service Shm as ``multiprocessing.shared_memory.SharedMemory``: ``len()``,
    ``.buf`` and a ``close()`` that does nothing once the Shm is released."""
    daemon = DaemonThread(tmp_path / "d.sock")
    try:
        with connect(daemon.path) as client:
            ctx = client.open_context()
            shm = ctx.alloc_user_buf(5000)
            assert len(shm) == shm.size == 8192
            shm.buf[:4] = b"abcd"
            assert bytes(shm.view()[:4]) == b"abcd" and len(shm.buf) == shm.size
            same = ctx.shm_from_id(shm.id)
            assert same is shm
            shm.close()  # one reference of two
            assert not shm.closed and bytes(shm.buf[:4]) == b"abcd"
            shm.close()
            assert shm.closed
            shm.close()  # released: nothing more happens
            with shm:
                pass
            assert ctx.usage()["shms"] == 0
            with pytest.raises(Closed):
                shm.view()
            with ctx.alloc_priv_buf(4096) as priv:
                priv.close()  # the with block's close then does nothing
            ctx.flush()
            assert client.stats()["contexts"][ctx.name]["shms"] == 0
            assert ctx.deferred_errors == []
            ctx.close()
            ctx.close()
        client.close()
    finally:
        daemon.stop()
