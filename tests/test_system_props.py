"""Random operation sequences on a System: accounting stays exact after every step.

A hypothesis state machine drives several contexts through allocations of
every kind, registrations at random offsets, id lookups (own and foreign),
reference drops, context closes and bad requests, and checks after every step
that frames, static-pool bytes, ids and secure-world cookies balance, that no
frame is owned twice and that every live buffer still holds what was written.
"""
from __future__ import annotations

from multiprocessing import shared_memory

import hypothesis.strategies as st
import numpy as np
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from poolsvc import Config, System
from poolsvc.errors import PoolsvcError

from sysutil import LeakCheck, assert_accounting

KINDS = ["alloc_user_buf", "alloc_kernel_buf", "alloc_priv_buf", "register_user_buf",
         "register_kernel_buf"]


class SystemMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.leaks = LeakCheck()
        self.dynamic = True
        self.system = System(Config(dynamic_size=8 << 20, static_size=1 << 20, arena_step=1 << 20,
                                    max_contig_order=8))
        self.client = shared_memory.SharedMemory(create=True, size=64 * 4096)
        self.contexts = [self.system.open_context(f"c{i}") for i in range(3)]
        # (shm, stamp written at its start) for pool buffers; (shm, start in client) for
        # registered ones, whose bytes are the client's and may be shared.
        self.live: list[tuple[object, object]] = []
        self.counter = 0

    def teardown(self) -> None:
        self.live.clear()
        self.system.close()
        self.client.close()
        self.client.unlink()
        self.leaks.assert_balanced()

    def _stamp(self, shm) -> None:
        self.counter += 1
        stamp = self.counter.to_bytes(4, "little")[: min(4, shm.size)]
        shm.view()[: len(stamp)] = stamp
        self.live.append((shm, stamp))

    @rule(ctx=st.integers(0, 2), kind=st.sampled_from(KINDS[:3]),
          size=st.integers(1, 70 * 4096))
    def alloc(self, ctx, kind, size):
        context = self.contexts[ctx]
        if context.closed:
            return
        try:
            shm = getattr(context, kind)(size)
        except PoolsvcError:
            return
        assert shm.size >= size
        assert bytes(shm.view()[:min(64, shm.size)]) == bytes(min(64, shm.size))
        self._stamp(shm)

    @rule(ctx=st.integers(0, 2), kind=st.sampled_from(KINDS[3:]),
          start=st.integers(0, 60 * 4096), length=st.integers(1, 20000))
    def register(self, ctx, kind, start, length):
        context = self.contexts[ctx]
        if context.closed:
            return
        end = min(start + length, 64 * 4096)
        try:
            shm = getattr(context, kind)(self.client.buf[start:end])
        except PoolsvcError:
            return
        assert shm.offset == start % 4096
        assert len(shm.pages) == (end - start + shm.offset - 1) // 4096 + 1
        self.counter += 1
        self.client.buf[start] = self.counter & 0xFF
        self.live.append((shm, start))

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10_000))
    def close_one(self, pick):
        shm, _ = self.live.pop(pick % len(self.live))
        shm.close()

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10_000), ctx=st.integers(0, 2))
    def lookup(self, pick, ctx):
        shm, _ = self.live[pick % len(self.live)]
        context = self.contexts[ctx]
        if shm.id < 0 or context.closed:
            return
        if shm.context is context:
            again = context.shm_from_id(shm.id)
            assert again is shm
            again.close()
        else:
            try:
                context.shm_from_id(shm.id)
            except PoolsvcError:
                pass
            else:
                raise AssertionError("foreign id was found")

    @rule(ctx=st.integers(0, 2))
    def close_context(self, ctx):
        context = self.contexts[ctx]
        context.close()
        self.live = [(s, d) for s, d in self.live if s.context is not context]
        self.contexts[ctx] = self.system.open_context(f"c{ctx}-again")

    @rule(ctx=st.integers(0, 2), size=st.sampled_from([0, -5, 1 << 40]))
    def bad_alloc(self, ctx, size):
        context = self.contexts[ctx]
        try:
            context.alloc_user_buf(size)
        except PoolsvcError:
            pass
        else:
            raise AssertionError(f"size {size} was accepted")

    @invariant()
    def accounting(self):
        assert_accounting(self.system)

    @invariant()
    def frames_owned_once(self):
        pools = [s for s, _ in self.live if s.flags & 4]  # POOL
        seen: set[int] = set()
        for shm in pools:
            if shm.paddr is not None and self.system.static is not None and \
                    self.system.config.static_base <= shm.paddr < self.system.config.static_base + \
                    self.system.config.static_size:
                continue  # sub-page static allocations may share a page
            for pa in shm.pages.tolist():
                assert pa not in seen, f"frame {pa:#x} owned twice"
                seen.add(pa)

    @invariant()
    def contents_survive(self):
        for shm, stamp in self.live:
            if isinstance(stamp, int):  # registered: the client's bytes, seen through the view
                n = min(shm.size, 64)
                assert bytes(shm.view()[:n]) == bytes(self.client.buf[stamp:stamp + n])
            else:
                assert bytes(shm.view()[: len(stamp)]) == stamp


# max_examples comes from the hypothesis profile (tests/conftest.py): 60 dev, 40 CI, 1000 thorough
SystemMachine.TestCase.settings = settings(stateful_step_count=40, deadline=None)
TestSystemMachine = SystemMachine.TestCase


def test_registered_pages_match_frame_table():
    """Every page of a registered buffer translates back to the buffer's own bytes."""
    with System(Config(dynamic_size=8 << 20, arena_step=1 << 20)) as system:
        seg = shared_memory.SharedMemory(create=True, size=16 * 4096)
        try:
            data = np.random.default_rng(3).integers(0, 256, 16 * 4096, dtype=np.uint8)
            seg.buf[:] = data.tobytes()
            ctx = system.open_context()
            shm = ctx.register_kernel_buf(seg.buf[777:40000])
            for i, pa in enumerate(shm.pages.tolist()):
                page = system.phys.read(pa, 4096)
                base = (777 // 4096 + i) * 4096
                assert page == data[base:base + 4096].tobytes()
            shm.close()
            ctx.close()
        finally:
            seg.close()
            seg.unlink()
