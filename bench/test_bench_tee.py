"""Benchmarks of sessions with the simulated secure world (docs/tee.md).

Owns: the SHA-256 trusted app hashing a 32 MiB registered buffer, beside
``hashlib.sha256`` of the same memory in the benchmark process (the floor:
the app hashes spans of the backing storage, so the difference is the call
around it); and one ``invoke`` of that app on 64 bytes with each kind of
parameter the driver converts: registered memrefs (RMEM), temporary memrefs
of private memory and of POSIX shared memory (each registered for the call),
and a read-only input (bounced through a pool buffer).  ``extra_info["us_per_op"]``
holds the median round per call.

The backend is the process's (``POOLSVC_PUREPYTHON=1`` for the pure twins);
each benchmark checks the digest against ``hashlib`` first, so the smoke run
(``--benchmark-disable``) is a correctness run too.

Concurrency: single-threaded; each benchmark owns its context.  Figures from a
shared machine deserve scepticism: compare within one run.
"""
from __future__ import annotations

import hashlib
from multiprocessing import shared_memory

import pytest

from poolsvc.tee.driver import RegisteredMemref, TempMemref
from poolsvc.tee.ta import Sha256App

BIG = 32 << 20
SMALL = 64


def record(benchmark, what: str) -> None:
    benchmark.extra_info["op"] = what
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["us_per_op"] = round(stats.stats.median * 1e6, 2)


@pytest.fixture(scope="module")
def big(system):
    """A 32 MiB registered buffer of a POSIX shm object, filled with a pattern."""
    seg = shared_memory.SharedMemory(create=True, size=BIG)
    seg.buf[:] = bytes(range(256)) * (BIG // 256)
    ctx = system.open_context("tee-bench-big")
    shm = ctx.register_user_buf(seg.buf)
    yield ctx, shm, seg
    shm.close()
    ctx.close()
    seg.close()
    seg.unlink()


@pytest.mark.benchmark(group="sha256-32MiB")
def test_sha256_through_app(benchmark, big):
    ctx, shm, seg = big
    digest = ctx.alloc_kernel_buf(32)
    with ctx.open_session(Sha256App.UUID) as session:
        params = [RegisteredMemref(shm, 0, BIG, "in"), RegisteredMemref(digest, 0, 32, "out")]
        session.invoke(Sha256App.DIGEST, params)
        assert bytes(digest.view()[:32]) == hashlib.sha256(seg.buf).digest()
        benchmark.pedantic(session.invoke, (Sha256App.DIGEST, params), rounds=5, iterations=1)
    digest.close()
    record(benchmark, "SHA-256 app over a 32 MiB registered buffer, one invoke")


@pytest.mark.benchmark(group="sha256-32MiB")
def test_sha256_hashlib_floor(benchmark, big):
    _, _, seg = big
    view = seg.buf
    benchmark.pedantic(lambda: hashlib.sha256(view).digest(), rounds=5, iterations=1)
    record(benchmark, "hashlib.sha256 of the same memory, in this process")


def _small_params(ctx, kind: str, keep: list):
    """The two parameters of a DIGEST over 64 bytes, as memrefs of ``kind``; the
    objects that must outlive the call go in ``keep``; returns (params, digest view)."""
    data = bytes(range(SMALL))
    if kind == "registered":
        src, out = ctx.alloc_kernel_buf(SMALL), ctx.alloc_kernel_buf(32)
        src.view()[:SMALL] = data
        keep += [src, out]
        return [RegisteredMemref(src, 0, SMALL, "in"), RegisteredMemref(out, 0, 32, "out")], \
            lambda: bytes(out.view()[:32])
    if kind == "temp-private":
        src, out = bytearray(data), bytearray(32)
        return [TempMemref(src, "in"), TempMemref(out, "out")], lambda: bytes(out)
    if kind == "temp-readonly-in":  # bytes cannot be registered: the input is bounced
        out = bytearray(32)
        return [TempMemref(data, "in"), TempMemref(out, "out")], lambda: bytes(out)
    seg = shared_memory.SharedMemory(create=True, size=4096)
    seg.buf[:SMALL] = data
    keep.append(seg)
    return [TempMemref(seg.buf[:SMALL], "in"), TempMemref(seg.buf[2048:2080], "out")], \
        lambda: bytes(seg.buf[2048:2080])


@pytest.mark.benchmark(group="invoke-64B")
@pytest.mark.parametrize("kind", ["registered", "temp-private", "temp-readonly-in", "temp-posix-shm"])
def test_invoke_small(benchmark, system, kind):
    ctx = system.open_context(f"tee-bench-{kind}")
    keep: list = []
    params, result = _small_params(ctx, kind, keep)
    with ctx.open_session(Sha256App.UUID) as session:
        session.invoke(Sha256App.DIGEST, params)
        assert result() == hashlib.sha256(bytes(range(SMALL))).digest()
        benchmark(session.invoke, Sha256App.DIGEST, params)
    record(benchmark, f"invoke DIGEST over 64 bytes, {kind} memrefs")
    del params, result
    for obj in keep:
        if isinstance(obj, shared_memory.SharedMemory):
            obj.close()
            obj.unlink()
        else:
            obj.close()
    ctx.close()
