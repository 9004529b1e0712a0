"""Benchmarks of the lookup tables (docs/design.md section 7, "Lookups").

Owns: per-call cost from Python of FrameTable.lookup / translate,
IdTable.find and AddressMap.lookup (target <= 100 ns per call, tuple
creation included), FrameTable.translate_batch (target: memory speed), each
compiled next to its pure-Python reference.

Each timed function drives ``CALLS`` calls through ``deque(map(fn, args),
maxlen=0)``, the cheapest Python loop, and stores the median round divided by
the calls in ``extra_info["ns_per_call"]``; the ``call-floor`` case times the
same loop over a builtin (``abs``) to show what the loop itself costs.  In
smoke mode (``--benchmark-disable``) each runs once and its results are
checked against the pure reference.

Concurrency: single-threaded.  Figures from a shared 2-core machine deserve
scepticism: compare within one run, read medians.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest

PAGE = 4096
REGIONS = [(0x0E00_0000, 16 << 20), (0x4200_0000, 4 << 20), (0x5000_0000, 1 << 30)]
DYN_BASE, DYN_PAGES = 0x5000_0000, 262_144
CALLS = 20_000
PURE_CALLS = 2_000


def record(benchmark, calls: int, what: str) -> None:
    benchmark.extra_info["op"] = what
    benchmark.extra_info["calls_per_round"] = calls
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["ns_per_call"] = round(stats.stats.median / calls * 1e9, 1)


def drive(fn, args) -> None:
    deque(map(fn, args), maxlen=0)


def frame_table(core):
    t = core.FrameTable(REGIONS)
    # the dynamic region mapped in 4 storages, scattered page indexes
    rng = np.random.default_rng(5)
    frames = (rng.permutation(DYN_PAGES).astype(np.uint64) * PAGE + DYN_BASE)
    quarter = DYN_PAGES // 4
    for sid in range(4):
        t.map_pages(frames[sid * quarter:(sid + 1) * quarter], sid, 0)
    return t


@pytest.fixture(scope="module")
def tables(compiled, pure):
    return {"compiled": frame_table(compiled), "pure": frame_table(pure)}


@pytest.fixture(scope="module")
def addresses():
    rng = np.random.default_rng(6)
    return [int(x) for x in rng.integers(DYN_BASE, DYN_BASE + (1 << 30), CALLS)]


@pytest.mark.benchmark(group="lookup-call-floor")
def test_call_floor(benchmark, addresses):
    benchmark(drive, abs, addresses)
    record(benchmark, CALLS, "abs(int): the loop's own cost per call")


@pytest.mark.benchmark(group="frame-table-lookup")
@pytest.mark.parametrize("which", ["compiled", "pure"])
@pytest.mark.parametrize("method", ["lookup", "translate"])
def test_frame_table(benchmark, tables, addresses, which, method):
    args = addresses if which == "compiled" else addresses[:PURE_CALLS]
    fn = getattr(tables[which], method)
    assert [fn(a) for a in args[:200]] == [getattr(tables["pure"], method)(a) for a in args[:200]]
    benchmark(drive, fn, args)
    record(benchmark, len(args), f"{which} FrameTable.{method}")


@pytest.mark.benchmark(group="frame-table-batch")
@pytest.mark.parametrize("which", ["compiled", "pure"])
def test_translate_batch(benchmark, tables, addresses, which):
    pas = np.array(addresses if which == "compiled" else addresses[:PURE_CALLS], dtype=np.uint64)
    sids, offs = benchmark(tables[which].translate_batch, pas)
    ref_sids, ref_offs = tables["pure"].translate_batch(pas[:200])
    assert np.array_equal(sids[:200], ref_sids) and np.array_equal(offs[:200], ref_offs)
    record(benchmark, len(pas), f"{which} FrameTable.translate_batch ({len(pas)} addresses)")
    if "ns_per_call" in benchmark.extra_info:
        # bytes touched per address: 8 in, 4 + 8 out, 4 + 8 of table
        benchmark.extra_info["GB_per_s_in_out"] = round(20 / benchmark.extra_info["ns_per_call"], 2)


@pytest.mark.benchmark(group="id-table-find")
@pytest.mark.parametrize("which", ["compiled", "pure"])
def test_id_table_find(benchmark, compiled, pure, which):
    core = compiled if which == "compiled" else pure
    table = core.IdTable()
    objs = [object() for _ in range(4096)]
    for obj in objs:
        table.alloc(obj)
    for i in range(1, 4097, 3):
        table.remove(i)                      # holes: free ids are found as None
    rng = np.random.default_rng(7)
    ids = [int(i) for i in rng.integers(-5, 4200, CALLS if which == "compiled" else PURE_CALLS)]
    assert [table.find(i) for i in ids[:500]] == [
        None if i < 1 or i > 4096 or (i - 1) % 3 == 0 else objs[i - 1] for i in ids[:500]]
    benchmark(drive, table.find, ids)
    record(benchmark, len(ids), f"{which} IdTable.find")


@pytest.mark.benchmark(group="address-map-lookup")
@pytest.mark.parametrize("which", ["compiled", "pure"])
def test_address_map_lookup(benchmark, compiled, pure, which):
    core = compiled if which == "compiled" else pure
    amap = core.AddressMap()
    # 200 mappings as /proc/self/maps might list them, with gaps
    base = 0x7F00_0000_0000
    for k in range(200):
        amap.add(base + k * 0x200000, base + k * 0x200000 + 0x100000, k, k * 0x100000)
    rng = np.random.default_rng(8)
    addrs = [int(a) for a in rng.integers(base, base + 200 * 0x200000,
                                          CALLS if which == "compiled" else PURE_CALLS)]
    ref = pure.AddressMap()
    for start, end, key, off in amap.intervals():
        ref.add(start, end, key, off)
    assert [amap.lookup(a) for a in addrs[:500]] == [ref.lookup(a) for a in addrs[:500]]
    benchmark(drive, amap.lookup, addrs)
    record(benchmark, len(addrs), f"{which} AddressMap.lookup (200 intervals)")
