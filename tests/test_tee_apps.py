"""Trusted apps through the driver: byte-exact round trips, SHA-256 against hashlib, RPC memory.

Property tests cover random sizes and offsets, every way a buffer reaches an
app (allocated Shm, registered Shm, temporary memref of shared memory,
temporary memref of private memory via a bounce buffer, hand-made NONCONTIG
lists of permuted pages), and both pools (Config(dynamic_shm=False) uses the
reserved static pool).
"""
from __future__ import annotations

import hashlib
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolsvc import Config, System
from poolsvc.constants import ATTR_NONCONTIG, PAGE_SIZE, Attr, MsgCmd, Origin
from poolsvc.errors import TEE_ERROR_SHORT_BUFFER, TeeError
from poolsvc.tee.driver import RegisteredMemref, TempMemref, Value
from poolsvc.tee.msg import MsgParam
from poolsvc.tee.ta import (
    TEE_ERROR_TARGET_DEAD,
    CopyApp,
    FillApp,
    ParamType,
    Sha256App,
    StorageApp,
    TrustedApp,
)

from sysutil import LeakCheck, assert_accounting
from teeutil import SMALL, open_raw, raw, snapshot, write_list

PROPS = settings(deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture
def leaks():
    check = LeakCheck()
    yield check
    check.assert_balanced()


@pytest.fixture(params=["dynamic", "static"])
def system(request, leaks):
    with System(Config(**SMALL, dynamic_shm=request.param == "dynamic")) as s:
        yield s
        assert s.tee.temp_live == 0
        assert_accounting(s)


@pytest.fixture
def segment():
    seg = shared_memory.SharedMemory(create=True, size=2 << 20)
    yield seg
    seg.close()
    seg.unlink()


def fragment(ctx, n=64):
    """Leave one-page holes in dynamic RAM so that registrations get scattered frames."""
    bufs = [ctx.alloc_kernel_buf(PAGE_SIZE) for _ in range(n)]
    for b in bufs[::2]:
        b.close()
    return bufs[1::2]


class Buffers:
    """Makes a buffer holding given bytes, reachable one of several ways."""

    def __init__(self, system, ctx, seg):
        self.system, self.ctx, self.seg = system, ctx, seg
        self.cleanup = []
        self.seg_pos = 0

    def _seg_slice(self, n, offset):
        start = (self.seg_pos + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE + offset
        self.seg_pos = start + n
        assert self.seg_pos <= self.seg.size
        view = self.seg.buf[start:start + n]
        self.cleanup.append(view.release)
        return view

    def make(self, kind, data, offset, direction):
        """(param, read_back) for a buffer holding ``data``."""
        n = len(data)
        if kind == "alloc":
            shm = self.ctx.alloc_user_buf(offset + n)
            self.cleanup.append(shm.close)
            shm.view()[offset:offset + n] = data
            return RegisteredMemref(shm, offset, n, direction), lambda: bytes(shm.view()[offset:offset + n])
        if kind == "registered":
            view = self._seg_slice(n, offset)
            view[:] = data
            shm = self.ctx.register_user_buf(view)
            self.cleanup.append(shm.close)
            return RegisteredMemref(shm, 0, None, direction), lambda: bytes(view)
        if kind == "temp_shm":
            view = self._seg_slice(n, offset)
            view[:] = data
            return TempMemref(view, direction), lambda: bytes(view)
        buf = bytearray(data)  # private memory: bounce buffer
        return TempMemref(buf, direction), lambda: bytes(buf)

    def close(self):
        for fn in reversed(self.cleanup):
            fn()
        self.cleanup.clear()
        self.seg_pos = 0


def kinds(system):
    base = ["alloc", "temp_private"]
    return base + ["registered", "temp_shm"] if system.config.dynamic_shm else base


@pytest.mark.parametrize("pool", ["dynamic", "static"])
def test_roundtrip_sha_copy_fill(pool, leaks, segment):
    with System(Config(**SMALL, dynamic_shm=pool == "dynamic")) as system:
        ctx = system.open_context("props")
        keep = fragment(ctx) if pool == "dynamic" else []
        sha = ctx.open_session(Sha256App.UUID)
        copy = ctx.open_session(CopyApp.UUID)
        fill = ctx.open_session(FillApp.UUID)
        bufs = Buffers(system, ctx, segment)

        @PROPS
        @given(data=st.binary(min_size=1, max_size=3 * PAGE_SIZE + 100) | st.integers(1, 300_000).map(
                   lambda n: np.random.default_rng(n).bytes(n)),
               offset=st.integers(0, PAGE_SIZE - 1), out_offset=st.integers(0, PAGE_SIZE - 1),
               kind=st.sampled_from(kinds(system)), out_kind=st.sampled_from(kinds(system)),
               pattern=st.integers(0, 0xFFFFFFFF), plen=st.integers(1, 4))
        def check(data, offset, out_offset, kind, out_kind, pattern, plen):
            try:
                src, _ = bufs.make(kind, data, offset, "in")
                digest = bytearray(32)
                sha.invoke(Sha256App.DIGEST, [src, TempMemref(digest, "out")])
                assert bytes(digest) == hashlib.sha256(data).digest()
                dst, read_dst = bufs.make(out_kind, bytes(len(data)), out_offset, "out")
                result = copy.invoke(CopyApp.COPY, [src, dst])
                assert result.sizes == [None, len(data)]
                assert read_dst() == data
                result = fill.invoke(FillApp.FILL, [dst, Value(pattern, plen)])
                unit = pattern.to_bytes(4, "little")[:plen]
                assert read_dst() == (unit * (len(data) // plen + 1))[:len(data)]
            finally:
                bufs.close()
                assert system.tee.temp_live == 0
                assert_accounting(system)

        check()
        for s in (sha, copy, fill):
            s.close()
        for b in keep:
            b.close()
        ctx.close()


def test_scattered_noncontig_through_gather_scatter(leaks):
    """Hand-made page lists of permuted pages: many storage spans, copied in C."""
    with System(Config(**SMALL)) as system:
        ctx = system.open_context()
        pool_in = ctx.alloc_user_buf(80 * PAGE_SIZE)
        pool_out = ctx.alloc_user_buf(80 * PAGE_SIZE)
        lists = ctx.alloc_user_buf(2 * PAGE_SIZE)
        rng = np.random.default_rng(7)
        pool_in.view()[:] = rng.bytes(pool_in.size)
        sha = open_raw(system, Sha256App.UUID)
        copy = open_raw(system, CopyApp.UUID)

        @PROPS
        @given(seed=st.integers(0, 2**32 - 1), offset=st.integers(0, PAGE_SIZE - 1),
               size=st.integers(1, 70 * PAGE_SIZE))
        def check(seed, offset, size):
            r = np.random.default_rng(seed)
            npages = (offset + size + PAGE_SIZE - 1) // PAGE_SIZE
            pin = r.permutation(80)[:npages]
            pout = r.permutation(80)[:npages]
            src_pages = [int(pool_in.pages[i]) for i in pin]
            dst_pages = [int(pool_out.pages[i]) for i in pout]
            view = pool_in.view()
            expected = b"".join(bytes(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in pin)
            expected = expected[offset:offset + size]
            in_list = write_list(lists, src_pages, page=0)
            out_list = write_list(lists, dst_pages, page=1)
            before = snapshot(system)
            src = MsgParam(Attr.TMEM_INPUT | ATTR_NONCONTIG, in_list | offset, size, 0)
            reply = raw(system, MsgCmd.INVOKE_COMMAND,
                        [src, MsgParam(Attr.TMEM_OUTPUT, system.config.static_base, 32, 0)], session=sha)
            assert reply.ret == 0
            assert system.phys.read(system.config.static_base, 32) == hashlib.sha256(expected).digest()
            dst = MsgParam(Attr.TMEM_OUTPUT | ATTR_NONCONTIG, out_list | offset, size, 0)
            reply = raw(system, MsgCmd.INVOKE_COMMAND, [src, dst], session=copy)
            assert reply.ret == 0 and reply.params[1].b == size
            out = pool_out.view()
            got = b"".join(bytes(out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in pout)[offset:offset + size]
            assert got == expected
            assert snapshot(system) == before

        check()
        for sid in (sha, copy):
            raw(system, MsgCmd.CLOSE_SESSION, [], session=sid)
        ctx.close()


def test_copy_short_buffer_reports_needed_size(system):
    ctx = system.open_context()
    with ctx.open_session(CopyApp.UUID) as copy:
        src = bytearray(b"x" * 5000)
        dst = bytearray(100)
        with pytest.raises(TeeError) as info:
            copy.invoke(CopyApp.COPY, [TempMemref(src, "in"), TempMemref(dst, "out")])
        assert info.value.code == TEE_ERROR_SHORT_BUFFER
        assert info.value.origin == Origin.TRUSTED_APP
        assert info.value.result.sizes[1] == 5000
        assert bytes(dst) == bytes(100)  # nothing written
    ctx.close()


def test_storage_app_keeps_state_in_rpc_memory(system):
    replies = []
    ctx = system.open_context()
    store = ctx.open_session(StorageApp.UUID, [Value(3 * PAGE_SIZE + 1)])
    handle = system.tee.rpc.handle

    def spy(msg):
        handle(msg)
        replies.append(msg.params[0])

    system.tee.rpc.handle = spy
    blob = np.random.default_rng(1).bytes(9000)
    store.invoke(StorageApp.WRITE, [Value(10), TempMemref(blob, "in")])
    out = bytearray(9000)
    store.invoke(StorageApp.READ, [Value(10), TempMemref(out, "out")])
    assert bytes(out) == blob
    assert store.invoke(StorageApp.INFO, [Value(direction="out")]).values[0] == (3 * PAGE_SIZE + 1, 9010)
    rpc_ctx = system.tee.rpc.ctx
    assert rpc_ctx.usage()["shms"] == 1 and len(system.tee.rpc_shms) == 1
    with pytest.raises(TeeError):
        store.invoke(StorageApp.WRITE, [Value(3 * PAGE_SIZE), TempMemref(blob, "in")])
    store.close()
    assert rpc_ctx.usage()["shms"] == 0 and not system.tee.rpc_shms
    # the SHM_FREE of close went through the RPC server
    assert replies and replies[-1].attr == Attr.VALUE_INPUT
    system.tee.rpc.handle = handle
    ctx.close()


def test_rpc_alloc_answer_formats(system):
    seen = []
    rpc_server = None

    class Grab(TrustedApp):
        def open_session(self, params):
            self.mem = self.env.rpc_alloc(10_000, 1)  # KERNEL

    key = system.tee.install(Grab, uuid.uuid4())
    ctx = system.open_context()
    sess = ctx.open_session(StorageApp.UUID)  # creates the RPC server
    rpc_server = system.tee.rpc
    handle = rpc_server.handle
    rpc_server.handle = lambda msg: (handle(msg), seen.append(msg.params[0]))
    grab = ctx.open_session(key)
    alloc = seen[-1]
    if system.pool == "dynamic":
        assert alloc.attr == Attr.TMEM_OUTPUT | ATTR_NONCONTIG
    else:
        assert alloc.attr == Attr.TMEM_OUTPUT
        base, size = system.config.static_base, system.config.static_size
        assert base <= alloc.a < base + size
    assert alloc.b >= 10_000
    grab.close()
    sess.close()
    rpc_server.handle = handle
    ctx.close()


def test_storage_sessions_survive_system_close_order(leaks):
    """Contexts made after the RPC context still free their RPC memory safely."""
    with System(Config(**SMALL)) as system:
        a = system.open_context("a")
        a.open_session(StorageApp.UUID)
        b = system.open_context("b")   # made after tee-rpc
        sb = b.open_session(StorageApp.UUID)
        sb.invoke(StorageApp.WRITE, [Value(0), TempMemref(b"persist", "in")])
        assert len(system.tee.rpc_shms) == 2
    # closing the System freed everything (LeakCheck) without touching freed memory


class _Zero(TrustedApp):
    """Test app: writes through a direct view of a (physically scattered) buffer."""

    def invoke(self, func, params):
        m = params[0]
        view = m.view()
        assert view is not None and not m.readonly  # one storage span: no copy
        view[:4] = b"ZERO"
        params[1].a = m.nspans
        if func == 1:
            raise ZeroDivisionError("panic")


def test_zero_copy_view_of_scattered_registration(leaks, segment):
    with System(Config(**SMALL)) as system:
        ctx = system.open_context()
        keep = fragment(ctx)
        view = segment.buf[123:123 + 5 * PAGE_SIZE]
        shm = ctx.register_user_buf(view)
        assert shm.paddr is None  # physically scattered
        key = system.tee.install(_Zero, uuid.uuid4())
        sess = ctx.open_session(key)
        out = Value(direction="out")
        sess.invoke(0, [shm, out])
        assert bytes(view[:4]) == b"ZERO" and out.a == 1
        with pytest.raises(TeeError) as info:
            sess.invoke(1, [shm, Value(direction="out")])
        assert info.value.code == TEE_ERROR_TARGET_DEAD
        with pytest.raises(TeeError) as info:
            sess.invoke(0, [shm, Value(direction="out")])  # the session is dead
        assert info.value.code == TEE_ERROR_TARGET_DEAD
        sess.close()
        shm.close()
        view.release()
        for b in keep:
            b.close()
        ctx.close()


def test_open_session_failure_is_origin_trusted_app(system):
    ctx = system.open_context()
    with pytest.raises(TeeError) as info:
        ctx.open_session(StorageApp.UUID, [Value(0)])  # size 0 refused by the app
    assert info.value.origin == Origin.TRUSTED_APP
    assert not system.tee.sessions and not ctx.sessions
    with pytest.raises(TeeError) as info:
        ctx.open_session(uuid.uuid4())
    assert info.value.code == 0xFFFF0008 and info.value.origin == Origin.TEE
    ctx.close()


def test_input_memref_is_read_only(system):
    class Writer(TrustedApp):
        def invoke(self, func, params):
            params[0].write(b"no")

    key = system.tee.install(Writer, uuid.uuid4())
    ctx = system.open_context()
    with ctx.open_session(key) as sess:
        buf = bytearray(b"keep")
        with pytest.raises(TeeError) as info:
            sess.invoke(0, [TempMemref(buf, "in")])
        assert info.value.code == 0xFFFF000F and bytes(buf) == b"keep"
    ctx.close()


def test_param_types_seen_by_app(system):
    seen = []

    class Probe(TrustedApp):
        def invoke(self, func, params):
            seen.append([None if p is None else p.type for p in params])

    key = system.tee.install(Probe, uuid.uuid4())
    ctx = system.open_context()
    shm = ctx.alloc_user_buf(100)
    with ctx.open_session(key) as sess:
        sess.invoke(0, [Value(1, 2), None, RegisteredMemref(shm, 0, 10, "out"), TempMemref(None, "inout", 8)])
    assert seen == [[ParamType.VALUE_INPUT, None, ParamType.MEMREF_OUTPUT, ParamType.MEMREF_INOUT]]
    ctx.close()
