"""The reserved static pool: frames are identities there too (docs/design.md section 2).

A user or kernel buffer of the static pool keeps the carve-out addresses the
genalloc-style range allocator gives it, and its bytes live in its context's
arena, mapped at those frames; a private buffer stays in the carve-out's own
storage.  Checked here on the embedded System and through the daemon (both
transports): the addresses, the bytes through ``view()`` and through the
physical address space both ways, isolation between clients, zero on free,
exact accounting, and reclaim after a client is SIGKILLed.
"""
from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from poolsvc import Config, System
from poolsvc._backend import core
from poolsvc.constants import PAGE_SIZE, ShmFlags
from poolsvc.errors import ItemNotFound, NotSupported, OutOfMemory
from poolsvc.memory import ARENA_FIRST_PAGES
from poolsvc.service import protocol as P
from poolsvc.service.client import connect
from poolsvc.shm import StaticBacking, StaticRun
from poolsvc.tee.driver import RegisteredMemref, Value
from poolsvc.tee.ta import FillApp, Sha256App

from poolsvc.load.mix import LoadSpec
from poolsvc.load.runner import LoadRunner

from svcutil import SMALL, DaemonThread, checked_daemon, idle, spawn_client, summary
from sysutil import LeakCheck, assert_accounting
from test_load import _assert_clean, _bare_worker, _FakeShm

STATIC = dict(SMALL, dynamic_shm=False)
STATIC_BASE = Config().static_base


def _pattern(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


# -- the embedded System ----------------------------------------------------------------------
@pytest.fixture
def system() -> Iterator[System]:
    leaks = LeakCheck()
    with System(Config(**STATIC)) as s:
        yield s
    leaks.assert_balanced()


def _assert_carve_out_mapping(system: System) -> None:
    """Each carve-out frame maps to a live StaticRun's arena page, else to its own
    carve-out page; the carve-out pages under a live run are zero (poolsvc/pools.py)."""
    table, base = system.memory.table, system.config.static_base
    carveout = system.pools.carveout.mm
    lent = {}
    for ctx in system.contexts.values():
        for shm in ctx.shms.values():
            if type(shm.backing) is StaticRun:
                run = shm.backing
                for k in range(run.npages):
                    lent[run.pa + k * PAGE_SIZE] = (run.segment.sid, run.index + k)
    [carveout_sid] = [sid for sid, buf in system.memory.storages.items() if buf is carveout]
    for k in range(system.config.static_size // PAGE_SIZE):
        pa = base + k * PAGE_SIZE
        if pa in lent:
            assert table.lookup(pa) == lent[pa], hex(pa)
            assert carveout[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] == bytes(PAGE_SIZE), hex(pa)
        else:
            assert table.lookup(pa) == (carveout_sid, k), hex(pa)


def test_addresses_are_genalloc_s(system):
    """Every buffer gets the address a lone range allocator gives the same requests;
    user and kernel buffers are page-aligned and page-rounded, as Linux's pool makes them."""
    cfg = system.config
    oracle = core.RangeAllocator(cfg.static_base, cfg.static_size, cfg.min_alloc_order, cfg.static_policy)
    oracle.alloc(PAGE_SIZE, PAGE_SIZE)  # the driver's message page
    ctx = system.open_context()
    rng = np.random.default_rng(7)
    held = []
    for step in range(200):
        if held and rng.random() < 0.4:
            shm = held.pop(int(rng.integers(len(held))))
            oracle.free(shm.paddr)
            shm.close()
        else:
            kind = int(rng.integers(3))
            size = int(rng.integers(1, 20000))
            align = 16 if kind == 2 else PAGE_SIZE
            shm = (ctx.alloc_user_buf, ctx.alloc_kernel_buf, ctx.alloc_priv_buf)[kind](size)
            expected = oracle.alloc(size, align)
            assert shm.paddr == expected, step
            if kind == 2:
                assert shm.flags == ShmFlags.PRIV | ShmFlags.POOL
                assert type(shm.backing) is StaticBacking
            else:
                assert shm.flags == ShmFlags.POOL  # the static pool clears DYNAMIC
                assert type(shm.backing) is StaticRun
                assert shm.paddr % PAGE_SIZE == 0 and shm.offset == 0
                assert shm.size == -(-size // PAGE_SIZE) * PAGE_SIZE == oracle.allocation_at(expected)[1]
            held.append(shm)
            if kind != 2:
                shm.view()[:] = _pattern(step, shm.size)
        assert_accounting(system)
        assert system.static.used_bytes == oracle.used_bytes
        _assert_carve_out_mapping(system)
    for shm in held:
        shm.close()


def test_frames_map_to_the_context_s_arena_and_bytes_agree_both_ways(system):
    table = system.memory.table
    a, b = system.open_context("a"), system.open_context("b")
    carveout_sids = {table.lookup(system.config.static_base + k * PAGE_SIZE)[0] for k in range(4)}
    for ctx, make in ((a, a.alloc_user_buf), (b, b.alloc_kernel_buf)):
        shm = make(3 * PAGE_SIZE - 5)
        own = {seg.sid for seg in ctx.arena.segments}
        run = shm.backing
        for k in range(3):
            assert table.lookup(shm.paddr + k * PAGE_SIZE) == (run.segment.sid, run.index + k)
        assert run.segment.sid in own and run.segment.sid not in carveout_sids
        data = _pattern(ctx.cid, shm.size)
        shm.view()[:] = data
        assert system.memory.read(shm.paddr, shm.size) == data
        system.memory.write(shm.paddr + PAGE_SIZE - 2, b"across")
        assert bytes(shm.view()[PAGE_SIZE - 2:PAGE_SIZE + 4]) == b"across"
        storage = run.segment.storage.mm
        start = run.index * PAGE_SIZE
        assert storage[start + PAGE_SIZE - 2:start + PAGE_SIZE + 4] == b"across"
    priv = a.alloc_priv_buf(100)
    assert table.lookup(priv.paddr & ~(PAGE_SIZE - 1))[0] in carveout_sids
    priv.view()[:5] = b"priv!"
    assert system.memory.read(priv.paddr, 5) == b"priv!"
    assert_accounting(system)


def test_zero_on_free_and_exact_accounting(system):
    table = system.memory.table
    before = (system.static.used_bytes, table.mapped_frames, 0)
    ctx = system.open_context()
    shms = [ctx.alloc_user_buf(5 * PAGE_SIZE), ctx.alloc_kernel_buf(1), ctx.alloc_priv_buf(600)]
    assert system.static.used_bytes == before[0] + 6 * PAGE_SIZE + 1024
    assert table.mapped_frames == before[1]  # carve-out frames are always mapped: lent, not added
    assert ctx.arena.used_pages == 6
    assert ctx.usage()["bytes"] == 6 * PAGE_SIZE + 1024
    addresses = [(s.paddr, s.size) for s in shms]
    for shm in shms:
        shm.view()[:] = b"\xa5" * shm.size
    runs = [(s.backing.segment.storage.mm, s.backing.index, s.backing.npages) for s in shms[:2]]
    for shm in shms:
        shm.close()
        assert_accounting(system)
    assert (system.static.used_bytes, table.mapped_frames, ctx.arena.used_pages) == before
    for pa, size in addresses:  # the frames are the carve-out's again, and zero
        assert system.memory.read(pa, size) == bytes(size)
    for mm, index, npages in runs:  # the arena pages were zeroed before reuse
        assert mm[index * PAGE_SIZE:(index + npages) * PAGE_SIZE] == bytes(npages * PAGE_SIZE)
    again = [ctx.alloc_user_buf(5 * PAGE_SIZE), ctx.alloc_kernel_buf(1), ctx.alloc_priv_buf(600)]
    assert [(s.paddr, s.size) for s in again] == addresses  # first fit: the same ranges
    assert all(bytes(s.view()) == bytes(s.size) for s in again)
    ctx.close()  # closing the context releases them all, storage too
    assert (system.static.used_bytes, table.mapped_frames) == before[:2]
    assert not ctx.arena.segments


def test_a_failure_takes_nothing(system, monkeypatch):
    ctx = system.open_context()
    used, mapped = system.static.used_bytes, system.memory.table.mapped_frames

    def refuse(npages: int) -> Any:
        raise OutOfMemory("storage refused (test)")

    monkeypatch.setattr(ctx.arena, "alloc", refuse)
    with pytest.raises(OutOfMemory):
        ctx.alloc_user_buf(PAGE_SIZE)
    monkeypatch.undo()
    assert (system.static.used_bytes, system.memory.table.mapped_frames, len(system.ids)) == (used, mapped, 0)
    with pytest.raises(OutOfMemory):
        ctx.alloc_user_buf(system.config.static_size)  # more than the carve-out holds
    with pytest.raises(OutOfMemory):
        ctx.alloc_kernel_buf(0)
    assert (system.static.used_bytes, ctx.arena.used_pages) == (used, 0)
    assert_accounting(system)


def test_the_carve_out_runs_out_and_comes_back(system):
    """Mixed kinds until the carve-out refuses; the arena never outgrows the carve-out."""
    ctx = system.open_context()
    makers = (ctx.alloc_user_buf, ctx.alloc_kernel_buf, ctx.alloc_priv_buf)
    held = []
    for step in range(system.config.static_size // (16 << 10) + 3):
        try:
            held.append(makers[step % 3](40 << 10))
        except OutOfMemory:
            break
    else:
        pytest.fail("the carve-out never ran out")
    assert system.static.largest_free < 40 << 10
    assert ctx.arena.bytes_total <= system.config.static_size
    assert ctx.arena.used_pages * PAGE_SIZE == sum(s.size for s in held if not s.flags & ShmFlags.PRIV)
    for shm in held:
        shm.close()
    assert_accounting(system)
    assert system.static.used_bytes == PAGE_SIZE  # the driver's message page


def test_a_context_s_arena_grows_geometrically_and_not_past_the_carve_out():
    with System(Config(**dict(STATIC, arena_step=16 << 20, static_size=1 << 20))) as system:
        ctx = system.open_context()
        held = [ctx.alloc_user_buf(1)]
        assert ctx.arena.bytes_total == ARENA_FIRST_PAGES * PAGE_SIZE  # one small buffer: a small arena
        with pytest.raises(OutOfMemory):
            while True:
                held.append(ctx.alloc_user_buf(PAGE_SIZE))
        assert len(held) == system.config.static_size // PAGE_SIZE - 1  # all but the message page
        assert ctx.arena.bytes_total <= system.config.static_size
        for shm in held:
            shm.close()


# -- through the daemon -----------------------------------------------------------------------
@pytest.fixture(params=["socket", "shm"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonThread]:
    monkeypatch.setenv("POOLSVC_TRANSPORT", request.param)
    with checked_daemon(tmp_path / "d.sock", Config(**STATIC)) as d:
        yield d


def test_bytes_agree_through_view_and_the_secure_world(daemon):
    with connect(daemon.path) as client:
        assert client.pool == "static"
        ctx = client.open_context("owner")
        user, kernel = ctx.alloc_user_buf(3 * PAGE_SIZE - 7), ctx.alloc_kernel_buf(100)
        digest = ctx.alloc_kernel_buf(32)
        for shm in (user, kernel, digest):
            assert shm.flags == ShmFlags.POOL and shm.paddr % PAGE_SIZE == 0 and not shm.registered
            assert STATIC_BASE <= shm.paddr < STATIC_BASE + Config().static_size
        data = _pattern(1, user.size)
        user.view()[:] = data  # client -> physical address space: the secure world hashes it
        with ctx.open_session(Sha256App.UUID) as session:
            session.invoke(Sha256App.DIGEST, [RegisteredMemref(user, 0, user.size, "in"),
                                              RegisteredMemref(digest, 0, 32, "out")])
            assert bytes(digest.view()[:32]) == hashlib.sha256(data).digest()
        with ctx.open_session(FillApp.UUID) as session:  # physical address space -> client
            session.invoke(FillApp.FILL, [RegisteredMemref(kernel, 0, kernel.size, "out"),
                                          Value(0x04030201, 4)])
            session.invoke(FillApp.FILL, [RegisteredMemref(user, PAGE_SIZE - 3, 6, "out"), Value(0x5A, 1)])
        assert bytes(kernel.view()) == b"\x01\x02\x03\x04" * (kernel.size // 4)
        expected = data[:PAGE_SIZE - 3] + b"Z" * 6 + data[PAGE_SIZE + 3:]
        assert bytes(user.view()) == expected
        again = ctx.shm_from_id(user.id)  # a lookup describes the same bytes
        assert again is user and bytes(again.view()[:16]) == expected[:16]
        again.close()
        priv = ctx.alloc_priv_buf(100)  # a private buffer shares its page: it stays in the daemon
        with pytest.raises(NotSupported):
            priv.view()
        for shm in (user, kernel, digest, priv):
            shm.close()
    daemon.wait_for(idle(daemon.baseline))


def test_another_client_cannot_reach_them(daemon):
    with connect(daemon.path) as a, connect(daemon.path) as b:
        ca, cb = a.open_context("a"), b.open_context("b")
        secret = _pattern(2, 2 * PAGE_SIZE)
        sa = [ca.alloc_user_buf(2 * PAGE_SIZE), ca.alloc_kernel_buf(2 * PAGE_SIZE)]
        for shm in sa:
            shm.view()[:] = secret
        sb = [cb.alloc_user_buf(2 * PAGE_SIZE), cb.alloc_kernel_buf(PAGE_SIZE)]
        assert all(bytes(s.view()) == bytes(s.size) for s in sb)
        # B maps exactly its own arena (the daemon's figure), and none of it holds A's bytes
        [entry] = [c for c in daemon.stats()["clients"] if c["name"] == "b" and c["role"] == "CONTEXT"]
        mapped = list(cb._channel.segments.values())
        assert sum(len(mm) for mm in mapped) == entry["arena_bytes"] > 0
        assert all(secret[:64] not in bytes(mm) for mm in mapped)
        with pytest.raises(ItemNotFound):
            cb.shm_from_id(sa[0].id)
        raw = cb._channel  # B names A's cookie directly: refused, A's buffer untouched
        kind, body = raw.call(P.MsgType.SHM_CLOSE, P.COOKIE.pack(sa[0].cookie))
        assert kind == P.MsgType.ERROR and P.ERROR.unpack_from(bytes(body))[0] == P.ErrorCode.ITEM_NOT_FOUND
        assert bytes(sa[0].view()) == secret and bytes(sa[1].view()) == secret
        for shm in sa + sb:
            shm.close()
    daemon.wait_for(idle(daemon.baseline))


def test_zero_on_free_and_exact_accounting_through_the_daemon(daemon):
    base_used = daemon.baseline["static_used_bytes"]
    with connect(daemon.path) as a, connect(daemon.path) as b:
        ca, cb = a.open_context("a"), b.open_context("b")
        shms = [ca.alloc_user_buf(3 * PAGE_SIZE), ca.alloc_kernel_buf(10), ca.alloc_priv_buf(700)]
        stats = daemon.stats()
        assert stats["pools"]["static"]["used_bytes"] == base_used + 4 * PAGE_SIZE + 1024
        [entry] = [c for c in stats["clients"] if c["name"] == "a" and c["role"] == "CONTEXT"]
        assert entry["bytes"] == 4 * PAGE_SIZE + 1024 and entry["shms"] == 3 and entry["ids"] == 1
        assert summary(stats)["mapped_frames"] == daemon.baseline["mapped_frames"]
        addresses = [s.paddr for s in shms[:2]]
        for shm in shms[:2]:
            shm.view()[:] = b"\xff" * shm.size
        for shm in shms:
            shm.close()
        ca.flush()
        assert summary(daemon.stats())["static_used_bytes"] == base_used
        # another client gets the same frames (first fit), zeroed
        reuse = [cb.alloc_user_buf(3 * PAGE_SIZE), cb.alloc_kernel_buf(10)]
        assert [s.paddr for s in reuse] == addresses
        assert all(bytes(s.view()) == bytes(s.size) for s in reuse)
        for shm in reuse:
            shm.close()
        batch = cb.batch()  # batched allocations take the same path
        for size in (1, PAGE_SIZE, PAGE_SIZE + 1):
            batch.alloc_user_buf(size)
        got = batch.run()
        assert [s.paddr for s in got[:2]] == addresses[:1] + [addresses[0] + PAGE_SIZE]
        for shm in got:
            assert bytes(shm.view()) == bytes(shm.size)
            shm.close()
    daemon.wait_for(idle(daemon.baseline))


HOLDER = """
import sys
import poolsvc
client = poolsvc.connect(sys.argv[1], name="holder")
ctx = client.open_context("holder")
held = [ctx.alloc_user_buf(n) for n in (1, 5000, 3 * 4096)] + [ctx.alloc_kernel_buf(9000)]
held += [ctx.alloc_priv_buf(n) for n in (16, 3000)]
b = ctx.batch()
for n in (100, 8192):
    b.alloc_user_buf(n)
held += b.run()
for shm in held:
    if not shm.flags & 8:  # not PRIV: the client maps its pages
        shm.view()[:] = b"\\xee" * shm.size
print(" ".join(hex(s.paddr) for s in held), flush=True)
sys.stdin.read()
"""


def test_crash_reclaim(daemon):
    proc = spawn_client(HOLDER, daemon.path)
    try:
        line = proc.stdout.readline().split()
        assert len(line) == 8, proc.stderr.read()
        used = daemon.stats()["pools"]["static"]["used_bytes"]
        assert used > daemon.baseline["static_used_bytes"]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    stats = daemon.wait_for(idle(daemon.baseline))
    assert stats["requests"]["crashes"] == 1
    with connect(daemon.path) as client:  # the frames come back zeroed, to someone else
        ctx = client.open_context("next")
        shm = ctx.alloc_user_buf(8 * PAGE_SIZE)
        assert shm.paddr == int(line[0], 16)
        assert bytes(shm.view()) == bytes(shm.size)
        shm.close()
    daemon.wait_for(idle(daemon.baseline))


# -- the load harness -------------------------------------------------------------------------
class _PrivateShm(_FakeShm):
    """A static-pool private buffer as the client sees it: no view."""

    def view(self) -> memoryview:
        raise NotSupported("a private buffer of the reserved static pool stays in the daemon")


def test_load_ledger_checks_static_buffers_like_dynamic_ones():
    w = _bare_worker(dynamic=False)
    user = w._hold(_FakeShm(0x42001000, 2, 8192), "u", 8192, 1)
    assert sorted(w.pages) == [0x42001000, 0x42002000] and w.violations == []
    w._hold(_FakeShm(0x42002000, 1, 4096), "k", 4096, 2, full=False)  # a page given twice
    assert len(w.violations) == 1 and "page 0x42002000 of new buffer 2" in w.violations[0]
    private = w._hold(_PrivateShm(0x42003000, 1, 512), "p", 512, 3)
    w._verify(private, "free")
    assert w.unverified == 0  # nothing of it is the client's to check
    user.shm.buf[100] ^= 1
    w._verify(user, "free")
    assert len(w.violations) == 2 and "changed under its owner" in w.violations[1]
    blind = w._hold(_PrivateShm(0x42004000, 1, 4096), "u", 4096, 4)  # a user buffer without a view
    w._verify(blind, "free")
    assert w.unverified == 1


@pytest.mark.parametrize("batch", [1, 16])
def test_load_without_dynamic_shm_skips_nothing_and_checks_everything(batch):
    rep = LoadRunner(LoadSpec(clients=2, duration=3.0, kill_rate=1.0, batch=batch, seed=11),
                     no_dynamic=True).run()
    _assert_clean(rep)
    assert rep["service"]["pool"] == "static"
    assert rep["skipped_ops"] == 0 and rep["unverified_checks"] == 0
    ops = ("alloc_user", "alloc_kernel", "alloc_priv", "free", "lookup") + (("invoke",) if batch == 1 else ())
    for op in ops:
        assert rep["ops"][op]["count"] > 0, op
