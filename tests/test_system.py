"""The kernel-semantics layer: System, Context, Shm (docs/design.md sections 4 and 9)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from multiprocessing import shared_memory

import numpy as np
import pytest

import poolsvc
from poolsvc import Config, ShmFlags, System, pagelist
from poolsvc.errors import (
    BadParameters,
    Closed,
    ConfigError,
    ItemNotFound,
    NotSharedMemory,
    OutOfMemory,
    PoolsvcError,
)

from sysutil import LeakCheck, assert_accounting, assert_idle, shm_leftovers

MiB = 1 << 20
SMALL = dict(dynamic_size=64 * MiB, arena_step=1 * MiB)


@pytest.fixture
def leaks():
    check = LeakCheck()
    yield check
    check.assert_balanced()


@pytest.fixture(params=["dynamic", "static"])
def system(request, leaks):
    cfg = Config(**SMALL, dynamic_shm=request.param == "dynamic")
    with System(cfg) as s:
        yield s
        assert_accounting(s)


@pytest.fixture
def dyn_system(leaks):
    with System(Config(**SMALL)) as s:
        yield s
        assert_accounting(s)


@pytest.fixture
def shmem():
    made = []

    def make(size):
        seg = shared_memory.SharedMemory(create=True, size=size)
        made.append(seg)
        return seg

    yield make
    for seg in made:
        seg.close()
        seg.unlink()


# -- the table of section 4 --------------------------------------------------------------
def test_alloc_user_buf_flags_and_id(system):
    ctx = system.open_context()
    shm = ctx.alloc_user_buf(5000)
    expected = ShmFlags.DYNAMIC | ShmFlags.POOL
    if system.pool == "static":
        expected &= ~ShmFlags.DYNAMIC  # the static pool clears DYNAMIC
    assert shm.flags == expected
    assert shm.id == 1
    assert shm.size == 8192 and shm.offset == 0
    assert shm.paddr is not None and shm.paddr % 4096 == 0
    assert list(shm.pages) == [shm.paddr, shm.paddr + 4096]
    assert bytes(shm.view()) == bytes(8192)  # zeroed
    if system.pool == "dynamic":
        assert shm.registered and shm.cookie in system.tee.registered
        reg = system.tee.registered[shm.cookie]
        assert list(reg.pages) == list(shm.pages)
    else:
        assert system.config.static_base <= shm.paddr < system.config.static_base + system.config.static_size
    assert_accounting(system)
    shm.close()
    assert_accounting(system)
    ctx.close()
    assert_idle(system)


def test_alloc_kernel_buf_has_no_id(system):
    ctx = system.open_context()
    shm = ctx.alloc_kernel_buf(100)
    assert shm.id == -1
    assert shm.flags & ShmFlags.POOL
    assert shm.paddr % 4096 == 0
    assert len(system.ids) == 0
    ctx.close()
    assert_idle(system)


def test_alloc_priv_buf(system):
    ctx = system.open_context()
    shm = ctx.alloc_priv_buf(40)
    assert shm.flags == ShmFlags.PRIV | ShmFlags.POOL
    assert shm.id == -1 and not shm.registered
    assert shm.paddr % 16 == 0
    if system.pool == "static":
        assert shm.size == 512  # genalloc granule, min_alloc_order 9
    assert shm.cookie not in system.tee.registered
    ctx.close()
    assert_idle(system)


def test_register_user_buf_odd_offset(dyn_system, shmem):
    seg = shmem(64 * 1024)
    ctx = dyn_system.open_context()
    start, length = 4096 * 2 + 123, 3 * 4096 + 50
    shm = ctx.register_user_buf(seg.buf[start:start + length])
    assert shm.flags == ShmFlags.USER_MAPPED | ShmFlags.DYNAMIC
    assert shm.id == 1
    assert shm.offset == 123
    assert shm.size == length
    assert len(shm.pages) == pagelist.num_pages(length, 123) == 4
    assert all(int(p) % 4096 == 0 for p in shm.pages)
    reg = dyn_system.tee.registered[shm.cookie]
    assert list(reg.pages) == list(shm.pages) and reg.offset == 123
    assert reg.size == 4 * 4096 - 123
    # zero-copy, both directions
    seg.buf[start:start + 5] = b"hello"
    assert bytes(shm.view()[:5]) == b"hello"
    shm.view()[-3:] = b"xyz"
    assert bytes(seg.buf[start + length - 3:start + length]) == b"xyz"
    # the physical address space sees the same bytes
    assert dyn_system.phys.read(int(shm.pages[0]) + 123, 5) == b"hello"
    dyn_system.phys.write(int(shm.pages[1]), b"PHYS")
    first_page_room = 4096 - 123
    assert bytes(seg.buf[start + first_page_room:start + first_page_room + 4]) == b"PHYS"
    shm.close()
    ctx.close()
    assert_idle(dyn_system)


def test_register_kernel_buf_no_id_and_numpy_view(dyn_system, shmem):
    seg = shmem(32 * 1024)
    arr = np.ndarray((1000,), dtype=np.uint32, buffer=seg.buf, offset=4)
    ctx = dyn_system.open_context()
    shm = ctx.register_kernel_buf(arr)
    assert shm.flags == ShmFlags.DYNAMIC and shm.id == -1
    assert shm.offset == 4 and shm.size == 4000
    arr[:] = np.arange(1000)
    assert np.array_equal(np.frombuffer(shm.view(), dtype=np.uint32), np.arange(1000))
    shm.close()
    ctx.close()
    del arr


def test_same_pages_same_addresses(dyn_system, shmem):
    seg = shmem(16 * 4096)
    ctx = dyn_system.open_context()
    a = ctx.register_user_buf(seg.buf[0:8 * 4096])
    b = ctx.register_kernel_buf(seg.buf[4 * 4096 + 10:12 * 4096])
    assert list(a.pages[4:8]) == list(b.pages[0:4])
    used = dyn_system.dynamic.used_frames
    a.close()
    # b still holds pages 4..11: frames of pages 0..3 were returned, 4..7 kept
    assert dyn_system.dynamic.used_frames == used - 4
    assert dyn_system.phys.read(int(b.pages[0]) + 10, 1) == bytes(seg.buf[4 * 4096 + 10:4 * 4096 + 11])
    b.close()
    ctx.close()
    assert_idle(dyn_system)


def test_register_refuses_readonly_and_empty(dyn_system, shmem):
    # private memory is registered zero-copy: tests/test_register_private.py
    ctx = dyn_system.open_context()
    with pytest.raises(NotSharedMemory, match="read-only"):
        ctx.register_user_buf(b"immutable")
    seg = shmem(8192)
    with pytest.raises(NotSharedMemory, match="read-only"):
        ctx.register_user_buf(seg.buf.toreadonly())
    with pytest.raises(BadParameters):
        ctx.register_user_buf(seg.buf[0:0])
    with pytest.raises(BadParameters):
        ctx.register_user_buf(12345)
    assert_accounting(dyn_system)
    ctx.close()
    assert_idle(dyn_system)


def test_register_without_dynamic_shm_is_refused(leaks, shmem):
    """The kernel does not look at REG_MEM: REGISTER_SHM is sent, the secure world
    (no CFG_CORE_DYN_SHM) refuses it with EBADCMD, and the ioctl fails with -EINVAL."""
    from poolsvc.tee.msg import SMC_RETURN_EBADCMD

    with System(Config(**SMALL, dynamic_shm=False)) as system:
        ctx = system.open_context()
        seg = shmem(8192)
        calls = system.tee.stats.calls
        with pytest.raises(BadParameters, match=f"EINVAL.*SMC level \\({SMC_RETURN_EBADCMD:#x}\\)"):
            ctx.register_user_buf(seg.buf)
        assert system.tee.stats.calls == calls + 1  # the message was sent
        with pytest.raises(BadParameters):
            ctx.register_kernel_buf(seg.buf)
        assert len(system.ids) == 0 and not system.tee.registered
        assert_accounting(system)


# -- capabilities ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dynamic,reserved", [(True, True), (True, False), (False, True), (False, False)])
def test_capability_matrix(leaks, dynamic, reserved):
    cfg = dict(SMALL, dynamic_shm=dynamic, reserved_shm=reserved)
    if not dynamic and not reserved:
        with pytest.raises(ConfigError, match="no shared memory"):
            Config(**cfg)
        return
    with System(Config(**cfg)) as system:
        assert system.pool == ("dynamic" if dynamic else "static")
        assert bool(system.config.gen_caps & poolsvc.constants.GenCaps.REG_MEM) == dynamic
        ctx = system.open_context()
        shm = ctx.alloc_user_buf(4096)
        in_static = system.config.static_base <= shm.paddr < system.config.static_base + system.config.static_size
        assert in_static == (not dynamic)
        assert bool(shm.flags & ShmFlags.DYNAMIC) == dynamic
        assert (system.static is None) == (not reserved)
        ctx.close()


# -- ids and lookups ----------------------------------------------------------------------------------
def test_id_reuse_lowest_free(system):
    ctx = system.open_context()
    shms = [ctx.alloc_user_buf(4096) for _ in range(4)]
    assert [s.id for s in shms] == [1, 2, 3, 4]
    shms[1].close()
    shms[2].close()
    assert ctx.alloc_user_buf(10).id == 2
    assert ctx.alloc_user_buf(10).id == 3
    assert ctx.alloc_user_buf(10).id == 5
    ctx.close()
    assert_idle(system)


def test_shm_from_id_takes_a_reference_and_checks_owner(system):
    a, b = system.open_context("a"), system.open_context("b")
    shm = a.alloc_user_buf(4096)
    with pytest.raises(ItemNotFound):
        b.shm_from_id(shm.id)
    with pytest.raises(ItemNotFound):
        a.shm_from_id(99)
    with pytest.raises(ItemNotFound):
        a.shm_from_id(0)
    kbuf = a.alloc_kernel_buf(10)
    with pytest.raises(ItemNotFound):
        a.shm_from_id(-1)
    same = a.shm_from_id(shm.id)
    assert same is shm
    shm.close()  # one reference left
    assert not shm.closed and len(system.ids) == 1
    same.close()
    assert shm.closed and len(system.ids) == 0
    shm.close()  # a released Shm: nothing more to drop (like SharedMemory.close())
    assert len(system.ids) == 0
    with pytest.raises(Closed):
        shm.view()
    with pytest.raises(ItemNotFound):
        a.shm_from_id(1)
    kbuf.close()
    a.close()
    b.close()
    assert_idle(system)


def test_reserved_id_is_not_found(system):
    ctx = system.open_context()
    rid = system.ids.alloc(None)  # what an allocation in progress holds
    with pytest.raises(ItemNotFound):
        ctx.shm_from_id(rid)
    system.ids.remove(rid)
    ctx.close()


# -- lifetimes ----------------------------------------------------------------------------------------
def test_context_close_releases_everything(system, shmem):
    ctx = system.open_context()
    for size in (1, 4096, 10000):
        ctx.alloc_user_buf(size)
        ctx.alloc_kernel_buf(size)
        ctx.alloc_priv_buf(size)
    held = ctx.alloc_user_buf(4096)
    ctx.shm_from_id(held.id)  # two references
    if system.pool == "dynamic":
        seg = shmem(8 * 4096)
        ctx.register_user_buf(seg.buf[1:5000])
    assert_accounting(system)
    ctx.close()
    ctx.close()  # idempotent
    assert held.closed
    assert_idle(system)
    with pytest.raises(Closed):
        ctx.alloc_user_buf(10)
    with pytest.raises(Closed):
        ctx.shm_from_id(1)


def test_view_is_released_with_the_shm(system):
    ctx = system.open_context()
    shm = ctx.alloc_user_buf(4096)
    view = shm.view()
    view[:3] = b"abc"
    shm.close()
    with pytest.raises(ValueError):
        view[0]
    again = ctx.alloc_user_buf(4096)
    assert bytes(again.view()[:3]) == b"\0\0\0"  # zeroed before reuse
    ctx.close()


def test_system_close_then_use(leaks):
    system = System(Config(**SMALL))
    ctx = system.open_context()
    shm = ctx.alloc_user_buf(100)
    system.close()
    system.close()
    assert shm.closed
    with pytest.raises(Closed):
        system.open_context()
    with pytest.raises(Closed):
        ctx.alloc_user_buf(100)


# -- bad input and exhaustion -----------------------------------------------------------------------
@pytest.mark.parametrize("size,error", [(0, OutOfMemory), (-1, BadParameters), (1.5, BadParameters),
                                        ("10", BadParameters), (True, BadParameters), (None, BadParameters)])
def test_bad_sizes(system, size, error):
    """Size 0 is ENOMEM, as the kernel's pools refuse it; the rest are EINVAL."""
    ctx = system.open_context()
    with pytest.raises(error):
        ctx.alloc_user_buf(size)
    assert len(system.ids) == 0
    ctx.close()
    assert_idle(system)


def test_exhaustion_is_typed_and_exact(system):
    ctx = system.open_context()
    held = []
    with pytest.raises(OutOfMemory):
        while True:
            held.append(ctx.alloc_user_buf(64 * 4096))
            assert_accounting(system)
    assert_accounting(system)
    ids_before = len(system.ids)
    with pytest.raises(OutOfMemory):
        ctx.alloc_user_buf(64 * 4096)
    assert len(system.ids) == ids_before
    for shm in held[::2]:
        shm.close()
        assert_accounting(system)
    ctx.alloc_user_buf(64 * 4096).close()
    ctx.close()
    assert_idle(system)


def test_contiguous_limit_is_max_order(dyn_system):
    ctx = dyn_system.open_context()
    with pytest.raises(OutOfMemory, match="order"):
        ctx.alloc_user_buf((1 << 10) * 4096 + 1)
    assert len(dyn_system.ids) == 0
    ctx.alloc_user_buf((1 << 10) * 4096).close()
    ctx.close()


def test_stats_shape(system):
    ctx = system.open_context("worker")
    ctx.alloc_user_buf(8192)
    stats = system.stats()
    assert stats["contexts"]["worker"]["shms"] == 1
    assert stats["contexts"]["worker"]["bytes"] == 8192
    blocks = stats["dynamic"]["free_blocks_per_order"]
    assert sum(c << k for k, c in enumerate(blocks)) == stats["dynamic"]["free_frames"]
    assert 0.0 <= stats["dynamic"]["unusable_index"][-1] <= 1.0
    ctx.close()


def test_all_errors_are_poolsvc_errors():
    for name in dir(poolsvc.errors):
        obj = getattr(poolsvc.errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, PoolsvcError)


# -- crash hygiene -----------------------------------------------------------------------------------
def test_sigkill_leaves_nothing_in_dev_shm(tmp_path):
    before = shm_leftovers()
    script = textwrap.dedent("""
        import sys, time
        from multiprocessing import shared_memory
        import poolsvc
        s = poolsvc.System(poolsvc.Config(dynamic_size=64 << 20, arena_step=1 << 20))
        ctx = s.open_context()
        shms = [ctx.alloc_user_buf(100000) for _ in range(20)]
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert shm_leftovers() == before


def test_interpreter_exit_leaves_nothing():
    before = shm_leftovers()
    script = "import poolsvc; s = poolsvc.System(); c = s.open_context(); c.alloc_user_buf(1 << 20)"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert shm_leftovers() == before


def test_registration_around_an_existing_one(dyn_system, shmem):
    """New frames for pages on both sides of an already registered range (two runs)."""
    seg = shmem(8 * 4096)
    seg.buf[:] = bytes(range(256)) * 128
    ctx = dyn_system.open_context()
    inner = ctx.register_kernel_buf(seg.buf[2 * 4096:4 * 4096])
    outer = ctx.register_kernel_buf(seg.buf[0:6 * 4096])
    assert list(outer.pages[2:4]) == list(inner.pages)
    assert len(set(outer.pages.tolist())) == 6
    for i, pa in enumerate(outer.pages.tolist()):
        assert dyn_system.phys.read(pa, 4096) == bytes(seg.buf[i * 4096:(i + 1) * 4096])
    inner.close()
    for i, pa in enumerate(outer.pages.tolist()):
        assert dyn_system.phys.read(pa, 16) == bytes(seg.buf[i * 4096:i * 4096 + 16])
    outer.close()
    ctx.close()
    assert_idle(dyn_system)


def _ledger(system):
    """Per backing object: (pages referenced, references, live windows) of the user-memory registry."""
    return {key: (int((obj.refs > 0).sum()), int(obj.refs.sum()), len(obj.windows))
            for key, obj in system.usermem.objects.items()}


def test_register_fd_shares_frames_with_register_by_buffer(dyn_system, shmem):
    """Registration by descriptor (the pool service's path) names the object by fstat and
    shares frames with a registration of the same pages through this process's mapping."""
    seg = shmem(8 * 4096)
    seg.buf[:] = bytes(range(256)) * 128
    fd = os.open(f"/dev/shm/{seg.name.lstrip('/')}", os.O_RDWR)
    try:
        ctx = dyn_system.open_context()
        window = seg.buf[4096 + 100:3 * 4096]
        by_buf = ctx.register_kernel_buf(window)
        by_fd = ctx.register_fd(fd, 4096 + 100, 2 * 4096 - 100, user=True)
        assert by_fd.flags == ShmFlags.USER_MAPPED | ShmFlags.DYNAMIC and by_fd.id == 1
        assert by_fd.offset == 100 and by_fd.size == 2 * 4096 - 100
        assert list(by_fd.pages) == list(by_buf.pages)            # one object, one ledger
        key = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        assert _ledger(dyn_system) == {key: (2, 4, 1)}
        assert bytes(by_fd.view()[:8]) == bytes(seg.buf[4096 + 100:4096 + 108])
        by_fd.view()[:3] = b"abc"
        assert bytes(seg.buf[4096 + 100:4096 + 103]) == b"abc"
        wide = ctx.register_fd(fd, 0, 8 * 4096, user=False)       # new frames around them
        assert list(wide.pages[1:3]) == list(by_buf.pages) and wide.id == -1
        assert _ledger(dyn_system)[key][:2] == (8, 12)
        by_buf.close()
        window.release()
        by_fd.close()
        assert _ledger(dyn_system)[key][:2] == (8, 8)
        assert dyn_system.phys.read(int(wide.pages[1]) + 100, 3) == b"abc"
        wide.close()
        assert _ledger(dyn_system) == {key: (0, 0, 0)}
        ctx.close()
        assert_idle(dyn_system)
    finally:
        os.close(fd)


def test_register_fd_refusals(dyn_system, shmem, tmp_path):
    seg = shmem(2 * 4096)
    fd = os.open(f"/dev/shm/{seg.name.lstrip('/')}", os.O_RDWR)
    rfd = os.open(f"/dev/shm/{seg.name.lstrip('/')}", os.O_RDONLY)
    r, w = os.pipe()
    try:
        ctx = dyn_system.open_context()
        with pytest.raises(BadParameters, match="beyond"):
            ctx.register_fd(fd, 4096, 4097)
        with pytest.raises(BadParameters, match="empty"):
            ctx.register_fd(fd, 0, 0)
        with pytest.raises(BadParameters, match="file offset"):
            ctx.register_fd(fd, -1, 10)
        with pytest.raises(NotSharedMemory, match="not a shared-memory object"):
            ctx.register_fd(r, 0, 10)
        with pytest.raises(NotSharedMemory, match="writable"):
            ctx.register_fd(rfd, 0, 10)
        assert not ctx.shms and not dyn_system.ids
        ctx.close()
        assert_idle(dyn_system)
    finally:
        for x in (fd, rfd, r, w):
            os.close(x)


def test_register_fd_without_dynamic_shm_is_refused(leaks, shmem):
    seg = shmem(4096)
    fd = os.open(f"/dev/shm/{seg.name.lstrip('/')}", os.O_RDWR)
    try:
        with System(Config(**SMALL, dynamic_shm=False)) as system:
            with pytest.raises(BadParameters, match="EINVAL"):
                system.open_context().register_fd(fd, 0, 10)
    finally:
        os.close(fd)


# -- the dynamic pool's all-or-nothing path (core.ArenaPages.take / give) ------------------
def _snapshot(system):
    stats = system.stats()
    del stats["pid"]
    ctx_arenas = {ctx.name: (ctx.arena.used_pages, ctx.arena.pages_total, len(ctx.arena.segments))
                  for ctx in system.contexts.values()}
    return stats, ctx_arenas, system.dynamic.used_map().tobytes()


def test_refused_registration_frees_everything(dyn_system, monkeypatch):
    from poolsvc.errors import TeeError

    ctx = dyn_system.open_context("c")
    keep = ctx.alloc_user_buf(4096)
    before = _snapshot(dyn_system)

    def refuse(*args):
        raise TeeError("refused", 0xFFFF000C, 4)

    monkeypatch.setattr(dyn_system.pools, "register_run", refuse)  # the driver call the pool makes
    for alloc in (ctx.alloc_user_buf, ctx.alloc_kernel_buf):
        with pytest.raises(TeeError):
            alloc(3 * 4096)
        assert _snapshot(dyn_system) == before
        assert_accounting(dyn_system)
    monkeypatch.undo()
    shm = ctx.alloc_user_buf(3 * 4096)
    assert shm.id == 2 and bytes(shm.view()) == bytes(3 * 4096)
    shm.close()
    keep.close()
    ctx.close()
    assert_idle(dyn_system)


def test_refused_storage_frees_id_and_frames(dyn_system, monkeypatch):
    from poolsvc.storage import Storage

    ctx = dyn_system.open_context("c")
    held = [ctx.alloc_user_buf(128 * 4096) for _ in range(2)]  # the 1 MiB segment is full
    before = _snapshot(dyn_system)

    def refuse(*args, **kwargs):
        raise OutOfMemory("no storage")

    monkeypatch.setattr(Storage, "create", refuse)
    with pytest.raises(OutOfMemory, match="no storage"):
        ctx.alloc_user_buf(4096)
    assert _snapshot(dyn_system) == before
    assert_accounting(dyn_system)
    monkeypatch.undo()
    for shm in held:
        shm.close()
    ctx.close()
    assert_idle(dyn_system)


def test_frames_exhausted_before_the_arena_grows(leaks):
    with System(Config(dynamic_size=1 * MiB, arena_step=1 * MiB)) as s:
        ctx = s.open_context("c")
        free = s.dynamic.free_frames
        with pytest.raises(OutOfMemory):
            ctx.alloc_priv_buf((free + 1) * 4096)
        assert ctx.arena.pages_total == 0  # nothing created for a request the frames refuse
        assert_accounting(s)


def test_freed_pages_are_zeroed_and_spares_kept(dyn_system):
    ctx = dyn_system.open_context("c")
    a = ctx.alloc_priv_buf(200 * 4096)
    b = ctx.alloc_priv_buf(200 * 4096)      # does not fit beside a: a second segment
    assert len(ctx.arena.segments) == 2
    pa = a.paddr
    a.view()[:5] = b"dirty"
    a.close()
    assert len(ctx.arena.segments) == 2     # an empty segment is kept as the spare
    again = ctx.alloc_priv_buf(4096)
    assert again.paddr == pa and bytes(again.view()[:5]) == bytes(5)
    again.close()
    b.close()                               # a second empty segment goes back to the OS
    assert len(ctx.arena.segments) == 1 and ctx.arena.used_pages == 0
    ctx.close()
    assert_idle(dyn_system)


def test_kernel_pages_whose_mapping_is_refused_leak_nothing():
    """Driver.alloc_kernel_pages: a frame the table still maps (a bug elsewhere) makes the
    mapping fail; the frames and the kernel arena's pages go back."""
    with poolsvc.System(poolsvc.Config(dynamic_size=16 << 20, arena_step=1 << 20)) as system:
        table, frames, arena = system.memory.table, system.dynamic, system.kernel_arena
        pa = frames.alloc_contig(1)
        frames.free_contig(pa, 1)  # the frame the next allocation takes
        table.map_range(pa, 1, arena.segments[0].sid, 0)
        used = (frames.used_frames, arena.used_pages, table.mapped_frames)
        with pytest.raises(BadParameters, match="already mapped"):
            system.driver.alloc_kernel_pages(1)
        assert (frames.used_frames, arena.used_pages, table.mapped_frames) == used
        table.unmap_range(pa, 1)
        pages = system.driver.alloc_kernel_pages(1)  # and the next one works
        system.driver.free_kernel_pages(pages)
