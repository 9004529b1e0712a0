"""Benchmarks of the System's allocation paths, beside their floors.

Owns: embedded ``alloc_user_buf`` + ``close`` (contiguous frames, storage,
REGISTER_SHM and UNREGISTER_SHM through a real message and page list),
``alloc_priv_buf`` + ``close`` (no registration), ``register_user_buf`` +
``close`` of a POSIX shm buffer, and, in the same run, the floors: the
frame allocator's own ``alloc_contig`` + ``free_contig`` pair and one
REGISTER/UNREGISTER message round trip through the secure world; and the
secure side's page-list check of that message (``pagelist_parse_frames``,
list pages read through the frame table), compiled beside the pure twin.

``benchmark.extra_info["us_per_op"]`` holds the median round divided by the
operations per round.  The pure-Python backend is a separate process
(``POOLSVC_PUREPYTHON=1 python -m pytest bench/test_bench_system.py``): the
backend is chosen once per process.

Concurrency: single-threaded.  Figures from a shared 2-core machine deserve
scepticism: compare within one run.
"""
from __future__ import annotations

from multiprocessing import shared_memory

import pytest

from poolsvc import Config, System

OPS = 500


def record(benchmark, ops: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["us_per_op"] = round(stats.stats.median / ops * 1e6, 2)


@pytest.fixture(scope="module")
def system():
    with System(Config(dynamic_size=256 << 20, arena_step=4 << 20)) as s:
        yield s


@pytest.fixture(scope="module")
def client():
    seg = shared_memory.SharedMemory(create=True, size=1 << 20)
    yield seg
    seg.close()
    seg.unlink()


@pytest.mark.parametrize("kind", ["alloc_user_buf", "alloc_kernel_buf", "alloc_priv_buf"])
def test_alloc_close(benchmark, system, kind):
    ctx = system.open_context(kind)
    alloc = getattr(ctx, kind)

    def run():
        for _ in range(OPS):
            alloc(4096).close()

    benchmark(run)
    record(benchmark, OPS)
    assert ctx.usage()["shms"] == 0
    ctx.close()


def test_register_close(benchmark, system, client):
    ctx = system.open_context("register")
    view = client.buf[100:20000]

    def run():
        for _ in range(OPS):
            ctx.register_user_buf(view).close()

    benchmark(run)
    record(benchmark, OPS)
    ctx.close()
    view.release()


def test_floor_frame_allocator_pair(benchmark, system):
    dyn = system.dynamic

    def run():
        for _ in range(OPS):
            dyn.free_contig(dyn.alloc_contig(1), 1)

    benchmark(run)
    record(benchmark, OPS)


def test_floor_register_message_round_trip(benchmark, system):
    """One REGISTER_SHM + UNREGISTER_SHM through the secure world, no allocation around it."""
    import numpy as np

    pages = np.array([system.config.dynamic_base + (100 << 12)], dtype=np.uint64)
    cookie = 0xC0FFEE

    def run():
        for _ in range(OPS):
            system._tee_register(pages, 0, 4096, cookie)
            system._tee_unregister(cookie)

    benchmark(run)
    record(benchmark, OPS)
    assert cookie not in system.tee.registered


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
    record(benchmark, OPS)
    assert parse(base, 4096, table, nonsecure).tolist() == pages.tolist()
