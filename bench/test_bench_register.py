"""Benchmarks of registration (``register_user_buf`` + ``close``) beside allocation.

Owns: the figures of the registration fast path (docs/core.md, UserPages):
embedded System, ``register_user_buf`` + ``close`` of a POSIX shm buffer of
4 KiB and 1 MiB beside ``alloc_user_buf`` + ``close`` of the same sizes, and
the frame allocator's ``alloc_scattered`` + ``free_pages`` of 1 and 256
frames; and the kernel alone (``UserPages.pin`` + ``unpin`` of 1 and 256
pages), compiled beside its pure twin.

``test_register_ratios`` measures the six System cases in one run,
interleaved round by round, each round about as long as the others, so that
the load of a shared machine falls on all of them alike, and records in ``extra_info`` the medians (us per operation)
and the ratios:

- ``ratio_4k`` = register 4 KiB / alloc 4 KiB,
- ``ratio_1m`` = register 1 MiB / alloc 1 MiB,
- ``ratio_per_page`` = registration's cost per page / ``alloc_scattered``'s,
  each the slope between 1 and 256 pages: ``(t(256) - t(1)) / 255``.

The other tests record ``us_per_op`` (median round / operations per round).
The pure-Python backend is a separate process
(``POOLSVC_PUREPYTHON=1 python -m pytest bench/test_bench_register.py``).

Concurrency: single-threaded.  Figures from a shared 2-core machine deserve
scepticism: compare within one run.
"""
from __future__ import annotations

import statistics
import time

import pytest
from benchutil import record_us_per_op


PAGE = 4096
MIB = 1 << 20
OPS = 200
ROUNDS = 200
#: the length of one round of test_register_ratios, in microseconds
ROUND_US = 400


def _cases(system, client):
    """name -> (one operation, operations per round)."""
    ctx = system.open_context("register-bench")
    small, whole = client.buf[:PAGE], client.buf[:MIB]
    dyn = system.dynamic

    def reg(view):
        return lambda: ctx.register_user_buf(view).close()

    def alloc(size):
        return lambda: ctx.alloc_user_buf(size).close()

    def scattered(n):
        return lambda: dyn.free_pages(dyn.alloc_scattered(n))

    cases = {
        "register_4k": (reg(small), OPS), "alloc_4k": (alloc(PAGE), OPS),
        "register_1m": (reg(whole), OPS // 10), "alloc_1m": (alloc(MIB), OPS // 10),
        "scattered_1": (scattered(1), OPS), "scattered_256": (scattered(256), OPS),
    }
    return ctx, (small, whole), cases


def _calibrate(op, target_us: float) -> int:
    """Operations per round so that a round lasts about ``target_us`` (best of 5 tries)."""
    best = min(_time(op, 5) for _ in range(5))
    return max(1, int(target_us / best))


def _time(op, ops: int) -> float:
    t0 = time.perf_counter()
    for _ in range(ops):
        op()
    return (time.perf_counter() - t0) / ops * 1e6


def test_register_ratios(benchmark, system, client, smoke):
    ctx, views, cases = _cases(system, client)
    # rounds of equal length, so that preemption on a loaded machine hits every case alike
    ops = {name: 1 if smoke else _calibrate(op, ROUND_US) for name, (op, _) in cases.items()}
    rounds = 1 if smoke else ROUNDS
    times: dict[str, list[float]] = {name: [] for name in cases}

    def run():
        for _ in range(rounds):
            for name, (op, _) in cases.items():
                times[name].append(_time(op, ops[name]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    med = {name: statistics.median(v) for name, v in times.items()}
    reg_page = (med["register_1m"] - med["register_4k"]) / 255
    scat_page = (med["scattered_256"] - med["scattered_1"]) / 255
    info = benchmark.extra_info
    info.update({f"us_{name}": round(v, 3) for name, v in med.items()})
    info["ratio_4k"] = round(med["register_4k"] / med["alloc_4k"], 2)
    info["ratio_1m"] = round(med["register_1m"] / med["alloc_1m"], 2)
    info["us_per_page_register"] = round(reg_page, 4)
    info["us_per_page_scattered"] = round(scat_page, 4)
    info["ratio_per_page"] = round(reg_page / scat_page, 2) if scat_page > 0 else None
    assert ctx.usage()["shms"] == 0
    ctx.close()
    for view in views:
        view.release()


@pytest.mark.parametrize("size", [PAGE, MIB], ids=["4k", "1m"])
@pytest.mark.parametrize("kind", ["register", "alloc"])
def test_close(benchmark, system, client, kind, size):
    ctx = system.open_context(f"{kind}-{size}")
    view = client.buf[:size]
    ops = OPS if size == PAGE else OPS // 10
    if kind == "register":
        def one():
            ctx.register_user_buf(view).close()
    else:
        def one():
            ctx.alloc_user_buf(size).close()

    def run():
        for _ in range(ops):
            one()

    benchmark(run)
    record_us_per_op(benchmark, ops)
    ctx.close()
    view.release()


@pytest.mark.parametrize("npages", [1, 256])
@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_user_pages_pin_unpin(benchmark, request, backend, npages):
    """The kernel alone: ``pin`` + ``unpin`` of ``npages`` pages of one storage."""
    mod = request.getfixturevalue(backend)
    base = 0x80000000
    table = mod.FrameTable([(base, 1024 * PAGE)])
    frames = mod.FrameAllocator(base, 1024)
    table.attach(1, bytearray(256 * PAGE))
    pages = mod.UserPages(table, frames)
    ops = OPS if backend == "compiled" else max(1, OPS // (10 * npages ** 0.5))
    ops = int(ops)

    def run():
        for _ in range(ops):
            pages.pin(0, npages, 1, 0)
            pages.unpin(0, npages)

    benchmark(run)
    record_us_per_op(benchmark, ops)
    assert table.mapped_frames == 0 and frames.used_frames == 0
