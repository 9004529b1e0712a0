"""Batch framing and arena kernels, each compiled next to its pure-Python twin (one run).

Owns the speed-up ratios of the kernels the pool service's batched path added:
``split_frames`` / ``run_batch`` (ext/wire.pyx, the daemon's BATCH loop and
both sides' frame splitting) and ``ArenaPages.take`` / ``give``
(ext/arena.pyx, the dynamic pool's per-allocation work).  Per-frame or
per-pair medians go in ``extra_info["ns_per_op"]``; ``bench/results/wire.md``
has the figures (``python bench/results.py --family wire``).  In smoke mode
(``--benchmark-disable``) each runs once and its result is checked against
the other backend.

Concurrency: single-threaded.  Figures from a shared 2-core machine deserve
scepticism: compare the two backends within one run, read medians.
"""
from __future__ import annotations

import struct

import pytest

#: Frames per batch body: the pool service's benchmark batch.
FRAMES = 256
HEADER = struct.Struct("<IHH")
#: A BATCH body of ALLOC requests (type 5, a 16-byte body), as the client sends it.
ALLOC_BODY = b"".join(HEADER.pack(16, 5, 0) + struct.pack("<QQ", 2, 4096) for _ in range(FRAMES))
#: A descriptor-sized reply, what the daemon's ALLOC handler returns.
DESC = bytes(96)
PAGE = 4096


def record(benchmark, ops: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["ns_per_op"] = round(stats.stats.median / ops * 1e9, 1)
    benchmark.extra_info["ops_per_call"] = ops


@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_split_frames(benchmark, compiled, pure, backend):
    """The frames of a 256-request BATCH body (every header checked), per frame."""
    mod = compiled if backend == "compiled" else pure
    frames = benchmark(mod.split_frames, ALLOC_BODY, FRAMES, 1 << 20)
    record(benchmark, FRAMES)
    assert frames == pure.split_frames(ALLOC_BODY, FRAMES, 1 << 20)


@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_run_batch(benchmark, compiled, pure, backend):
    """A 256-request BATCH run through a handler that returns a descriptor-sized
    reply (the loop's own cost: split, call, frame the replies, count), per frame."""
    mod = compiled if backend == "compiled" else pure
    handlers = {5: lambda conn, body: DESC}
    counts: dict[int, int] = {}

    def refuse(conn, t, unbatchable):  # pragma: no cover - not reached
        raise AssertionError("nothing is refused here")

    reply = benchmark(mod.run_batch, ALLOC_BODY, FRAMES, 1 << 20, handlers, None, refuse, refuse,
                      1 << 24, counts)
    record(benchmark, FRAMES)
    assert reply == pure.run_batch(ALLOC_BODY, FRAMES, 1 << 20, handlers, None, refuse, refuse,
                                   1 << 24, {})
    assert len(reply) == FRAMES * (HEADER.size + len(DESC))


@pytest.mark.parametrize("backend", ["compiled", "pure"])
def test_arena_take_give(benchmark, compiled, pure, backend):
    """``ArenaPages.take(1)`` + ``give`` (frames, storage pages, mapping, zeroing), per pair."""
    mod = compiled if backend == "compiled" else pure
    nframes = 256
    table = mod.FrameTable([(0x4000_0000, nframes * PAGE)])
    frames = mod.FrameAllocator(0x4000_0000, nframes)
    storage = bytearray(64 * PAGE)
    table.attach(1, storage)
    pages = mod.ArenaPages(table, frames)
    pages.add("segment", 1, 64)
    ops = 1000 if backend == "compiled" else 100
    take, give = pages.take, pages.give

    def run():
        for _ in range(ops):
            give(take(1))

    benchmark(run)
    record(benchmark, ops)
    assert pages.used_pages == 0 and frames.used_frames == 0 and table.mapped_frames == 0
