"""Benchmarks of the System's allocation paths, beside their floors.

Owns: embedded ``alloc_user_buf`` + ``close`` (contiguous frames, storage,
REGISTER_SHM and UNREGISTER_SHM through a real message and page list),
``alloc_priv_buf`` + ``close`` (no registration), ``register_user_buf`` +
``close`` of a POSIX shm buffer, and, in the same run, the floors: the
frame allocator's own ``alloc_contig`` + ``free_contig`` pair, the arena
kernel's ``take`` + ``give`` (frames, storage pages and mapping), and one
REGISTER/UNREGISTER message round trip through the secure world (page array
and contiguous-run forms); the secure side's page-list check of that message
(``pagelist_parse_frames``, list pages read through the frame table), and the
two ends of the message call alone (``SmcDriver`` with a secure world that
does nothing, ``SmcEntry`` on a prepared message), compiled beside the pure
twin.

``benchmark.extra_info["us_per_op"]`` holds the median round divided by the
operations per round.  The pure-Python backend is a separate process
(``POOLSVC_PUREPYTHON=1 python -m pytest bench/test_bench_system.py``): the
backend is chosen once per process.

Concurrency: single-threaded.  Figures from a shared 2-core machine deserve
scepticism: compare within one run.
"""
from __future__ import annotations

import pytest
from benchutil import record_us_per_op

from poolsvc import Config

OPS = 500


@pytest.mark.parametrize("kind", ["alloc_user_buf", "alloc_kernel_buf", "alloc_priv_buf"])
def test_alloc_close(benchmark, system, kind):
    ctx = system.open_context(kind)
    alloc = getattr(ctx, kind)

    def run():
        for _ in range(OPS):
            alloc(4096).close()

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)
    assert ctx.usage()["shms"] == 0
    ctx.close()


def test_register_close(benchmark, system, client):
    ctx = system.open_context("register")
    view = client.buf[100:20000]

    def run():
        for _ in range(OPS):
            ctx.register_user_buf(view).close()

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)
    ctx.close()
    view.release()


def test_floor_frame_allocator_pair(benchmark, system):
    dyn = system.dynamic

    def run():
        for _ in range(OPS):
            dyn.free_contig(dyn.alloc_contig(1), 1)

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)


def test_floor_arena_take_give(benchmark, system):
    """What the dynamic pool does per alloc + free besides the Shm: ``ArenaPages.take``
    (frames + storage pages + mapping) and ``give`` (zero + unmap + free), one page."""
    ctx = system.open_context("arena-floor")
    pages = ctx.arena.pages
    ctx.arena.give(ctx.arena.take(1))  # the first segment exists before the timing

    def run():
        for _ in range(OPS):
            pages.give(pages.take(1))

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)
    assert pages.used_pages == 0
    ctx.close()


def test_floor_register_message_round_trip(benchmark, system):
    """One REGISTER_SHM + UNREGISTER_SHM through the secure world, no allocation around it."""
    import numpy as np

    pages = np.array([system.config.dynamic_base + (100 << 12)], dtype=np.uint64)
    cookie = 0xC0FFEE

    def run():
        for _ in range(OPS):
            system.driver.register(pages, 0, 4096, cookie)
            system.driver.unregister(cookie)

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)
    assert cookie not in system.tee.registered


def test_floor_register_run_round_trip(benchmark, system):
    """The same round trip from a contiguous run (what alloc_*_buf does: no page array)."""
    pa = system.config.dynamic_base + (100 << 12)
    cookie = 0xC0FFEE

    def run():
        for _ in range(OPS):
            system.driver.register_run(pa, 1, 4096, cookie)
            system.driver.unregister(cookie)

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)
    assert cookie not in system.tee.registered


def _smc_world(mod):
    """A frame table, frames and storage for the message-call kernels of ``mod``."""
    cfg = Config()
    table = mod.FrameTable([(cfg.static_base, 16 << 12), (cfg.dynamic_base, 64 << 12)])
    storage = bytearray(32 << 12)
    table.attach(1, storage)
    table.map_range(cfg.static_base, 16, 1, 0)
    frames = mod.FrameAllocator(cfg.dynamic_base, 64)
    msg_pa = frames.alloc_contig(1)
    table.map_range(msg_pa, 1, 1, 16)
    nonsecure = ((cfg.static_base, 16 << 12), (cfg.dynamic_base, 64 << 12))
    entry = mod.SmcEntry(table, nonsecure, (cfg.static_base, 16 << 12), (cfg.dynamic_base, 64 << 12))
    return cfg, table, frames, msg_pa, entry


def _smc_messages(mod):
    """``_smc_world`` plus a one-page list and the REGISTER_SHM and UNREGISTER_SHM
    messages of cookie 0xC0FFEE in place: (table, entry, reg_pa, unreg_pa)."""
    import struct

    import numpy as np

    cfg, table, frames, msg_pa, entry = _smc_world(mod)
    list_pa = cfg.static_base + (2 << 12)
    pages = np.array([cfg.dynamic_base + (5 << 12)], dtype=np.uint64)
    table.write(list_pa, mod.pagelist_build(pages, 0, list_pa))
    reg_pa, unreg_pa = cfg.static_base + (4 << 12), cfg.static_base + (5 << 12)
    arg = struct.Struct("<8I4Q")
    table.write(reg_pa, arg.pack(4, 0, 0, 0, 0, 0, 0, 1, 0x20A, list_pa, 4096, 0xC0FFEE))
    table.write(unreg_pa, arg.pack(5, 0, 0, 0, 0, 0, 0, 1, 0x5, 0, 0, 0xC0FFEE))
    return table, entry, reg_pa, unreg_pa


@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_smc_driver_kernels(benchmark, backend):
    """The driver's end alone: register (one-page list, list frame taken and given back)
    + call1 (UNREGISTER), with a secure world that does nothing."""
    import numpy as np

    from poolsvc import _core, _pure

    mod = _core if backend == "compiled" else _pure
    cfg, table, frames, msg_pa, _ = _smc_world(mod)
    driver = mod.SmcDriver(table, frames, msg_pa, lambda pa: None, 1, 17)
    pages = np.array([cfg.dynamic_base + (5 << 12)], dtype=np.uint64)
    register, call1 = driver.register, driver.call1

    def run():
        for _ in range(OPS):
            register(pages, 0, 4096, 0xC0FFEE)
            call1(5, 5, 0, 0, 0xC0FFEE)

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)
    assert frames.used_frames == 1 and table.mapped_frames == 17


@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_smc_entry_kernels(benchmark, backend):
    """The secure world's end alone: fetch1 + register1 + answer, then fetch1 +
    unregister1 + answer, on messages already in place (one-page list)."""


    from poolsvc import _core, _pure

    mod = _core if backend == "compiled" else _pure
    table, entry, reg_pa, unreg_pa = _smc_messages(mod)
    registered: dict = {}
    rpc_shms: dict = {}

    class Entry:
        inflight = 0

    held = Entry()
    fetch1, register1, unregister1, answer = entry.fetch1, entry.register1, entry.unregister1, entry.answer

    def run():
        for _ in range(OPS):
            fetch1(reg_pa)
            cookie, _, _ = register1(4, registered, rpc_shms)
            registered[cookie] = held
            answer(reg_pa, 0, 3)
            fetch1(unreg_pa)
            del registered[unregister1(registered)]
            answer(unreg_pa, 0, 3)

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)
    assert not registered


@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_smc_entry_call(benchmark, backend):
    """The secure world's end as the driver calls it: the bound entry's ``entry(arg_pa)``
    (fetch, OP-TEE's checks, the cookie table, the answer), REGISTER then UNREGISTER."""
    import struct


    from poolsvc import _core, _pure

    mod = _core if backend == "compiled" else _pure
    table, entry, reg_pa, unreg_pa = _smc_messages(mod)

    class Stats:
        errors: dict = {}

    registered: dict = {}

    def generic(pa):  # pragma: no cover - not reached
        raise AssertionError(f"message at {pa:#x} left the fast path")

    entry.bind(registered, {}, generic, Stats())
    entry.caps = 4

    def run():
        for _ in range(OPS):
            entry(reg_pa)
            entry(unreg_pa)

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)
    assert not registered and not Stats.errors
    assert table.read(reg_pa + 20, 8) == bytes(4) + struct.pack("<I", 3)


@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_parse_frames_one_page(benchmark, backend):
    """The secure side's check of a one-page REGISTER_SHM list, compiled vs the pure twin."""
    import numpy as np

    from poolsvc import _core, _pure

    mod = _core if backend == "compiled" else _pure
    cfg = Config()
    table = mod.FrameTable([(cfg.dynamic_base, 16 << 12)])
    storage = bytearray(16 << 12)
    table.attach(1, storage)
    table.map_range(cfg.dynamic_base, 16, 1, 0)
    pages = np.array([cfg.dynamic_base + (5 << 12)], dtype=np.uint64)
    storage[:4096] = mod.pagelist_build(pages, 0, cfg.dynamic_base)
    nonsecure = ((cfg.static_base, cfg.static_size), (cfg.dynamic_base, 16 << 12))
    parse = mod.pagelist_parse_frames
    base = cfg.dynamic_base

    def run():
        for _ in range(OPS):
            parse(base, 4096, table, nonsecure)

    benchmark(run)
    record_us_per_op(benchmark, OPS, 2)
    assert parse(base, 4096, table, nonsecure).tolist() == pages.tolist()
