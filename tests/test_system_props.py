"""Random operation sequences on a System: every step's outcome is the one the model expects.

A hypothesis state machine, once per pool (the dynamic pool, and the static
carve-out of a TEE without DYNAMIC_SHM), drives several contexts through
allocations of every kind, registrations at random offsets, id lookups (own,
foreign, freed), reference drops, context closes and bad requests.  The pools
are large enough that no allocation of the machine may fail, so every step has
one expected outcome: a success is checked (flags of the constructor table in
docs/design.md section 4, the lowest free id, size, alignment, registration, a
zeroed buffer) and a refusal must be the specific error the state calls for
(BadParameters, OutOfMemory, ItemNotFound, Closed).  After every
step frames, static-pool bytes, ids and secure-world cookies balance, no frame is
owned twice and every live buffer still holds what was written over all of it.
"""
from __future__ import annotations

from multiprocessing import shared_memory

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from poolsvc import Config, ShmFlags, System
from poolsvc.errors import BadParameters, Closed, ItemNotFound, OutOfMemory

from profiles import examples
from bytecheck import assert_bytes
from sysutil import LeakCheck, assert_accounting

PAGE = 4096
CLIENT_PAGES = 64
MAX_ALLOC_PAGES = 70
KINDS = ["alloc_user_buf", "alloc_kernel_buf", "alloc_priv_buf", "register_user_buf",
         "register_kernel_buf"]
# Both pools hold far more than a run of steps can take (steps x MAX_ALLOC_PAGES pages, in
# at most that many holes), so an allocation of the machine never has a reason to fail.
STEPS = 40
CONFIG = dict(dynamic_size=64 << 20, static_size=32 << 20, arena_step=1 << 20, max_contig_order=8)
#: the flags each constructor sets, per pool (the static pool clears DYNAMIC)
FLAGS = {
    ("dynamic", "alloc_user_buf"): ShmFlags.DYNAMIC | ShmFlags.POOL,
    ("dynamic", "alloc_kernel_buf"): ShmFlags.DYNAMIC | ShmFlags.POOL,
    ("dynamic", "alloc_priv_buf"): ShmFlags.PRIV | ShmFlags.POOL,
    ("static", "alloc_user_buf"): ShmFlags.POOL,
    ("static", "alloc_kernel_buf"): ShmFlags.POOL,
    ("static", "alloc_priv_buf"): ShmFlags.PRIV | ShmFlags.POOL,
    ("dynamic", "register_user_buf"): ShmFlags.USER_MAPPED | ShmFlags.DYNAMIC,
    ("dynamic", "register_kernel_buf"): ShmFlags.DYNAMIC,
}
WITH_ID = {"alloc_user_buf", "register_user_buf"}


class SystemMachine(RuleBasedStateMachine):
    POOL = "dynamic"

    def __init__(self) -> None:
        super().__init__()
        self.leaks = LeakCheck()
        self.system = System(Config(**CONFIG, dynamic_shm=self.POOL == "dynamic"))
        assert self.system.pool == self.POOL
        self.client = shared_memory.SharedMemory(create=True, size=CLIENT_PAGES * PAGE)
        self.contexts = [self.system.open_context(f"c{i}") for i in range(3)]
        # (shm, stamp byte written over all of it) for pool buffers; (shm, start in
        # client) for registered ones, whose bytes are the client's and may be shared.
        # Every live shm of the system is here, with one reference.
        self.live: list[tuple[object, object]] = []
        self.counter = 0

    def teardown(self) -> None:
        self.live.clear()
        self.system.close()
        self.client.close()
        self.client.unlink()
        self.leaks.assert_balanced()

    # -- the model -----------------------------------------------------------------------
    def lowest_free_id(self) -> int:
        taken = {shm.id for shm, _ in self.live if shm.id > 0}
        return next(i for i in range(1, len(taken) + 2) if i not in taken)

    def check_new(self, shm, kind, ctx, expected_id) -> None:
        """What every new shm must be: the table's flags, its id, its context, registration."""
        assert shm.flags == FLAGS[(self.POOL, kind)], (kind, shm.flags)
        assert shm.id == (expected_id if kind in WITH_ID else -1), (kind, shm.id, expected_id)
        assert shm.context is self.contexts[ctx] and not shm.closed
        assert shm.cookie in self.contexts[ctx].shms
        registered = self.POOL == "dynamic" and kind != "alloc_priv_buf"
        assert shm.registered == registered
        assert (shm.cookie in self.system.tee.registered) == registered
        if kind in WITH_ID:
            assert self.system.ids.find(shm.id) is shm

    # -- rules ---------------------------------------------------------------------------
    @rule(ctx=st.integers(0, 2), kind=st.sampled_from(KINDS[:3]), size=st.integers(1, MAX_ALLOC_PAGES * PAGE))
    def alloc(self, ctx, kind, size):
        expected_id = self.lowest_free_id()
        shm = getattr(self.contexts[ctx], kind)(size)          # the pool has room: must succeed
        self.check_new(shm, kind, ctx, expected_id)
        assert size <= shm.size < size + PAGE
        align = 16 if kind == "alloc_priv_buf" else PAGE
        assert shm.paddr is not None and shm.paddr % align == 0
        if kind != "alloc_priv_buf":
            assert shm.size % PAGE == 0 and shm.offset == 0
        view = shm.view()
        assert_bytes(view, bytes(shm.size), "a new buffer")
        self.counter += 1
        stamp = 1 + self.counter % 255
        view[:] = bytes([stamp]) * shm.size                    # all of it: its reuse must be zeroed
        self.live.append((shm, stamp))

    @rule(ctx=st.integers(0, 2), kind=st.sampled_from(KINDS[3:]),
          start=st.integers(0, (CLIENT_PAGES - 4) * PAGE), length=st.integers(1, 20000))
    def register(self, ctx, kind, start, length):
        context = self.contexts[ctx]
        end = min(start + length, CLIENT_PAGES * PAGE)
        ids_before, registered_before = len(self.system.ids), len(self.system.tee.registered)
        if self.POOL == "static":       # no DYNAMIC_SHM: REGISTER_SHM is sent and refused (EINVAL)
            with pytest.raises(BadParameters):
                getattr(context, kind)(self.client.buf[start:end])
            assert len(self.system.ids) == ids_before
            assert len(self.system.tee.registered) == registered_before
            return
        expected_id = self.lowest_free_id()
        shm = getattr(context, kind)(self.client.buf[start:end])
        self.check_new(shm, kind, ctx, expected_id)
        assert shm.size == end - start and shm.offset == start % PAGE
        assert len(shm.pages) == (end - start + shm.offset - 1) // PAGE + 1
        self.counter += 1
        self.client.buf[start] = self.counter & 0xFF
        self.live.append((shm, start))

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10_000))
    def close_one(self, pick):
        shm, _ = self.live.pop(pick % len(self.live))
        shm_id, cookie, context = shm.id, shm.cookie, shm.context
        shm.close()
        assert shm.closed and cookie not in context.shms
        assert cookie not in self.system.tee.registered
        with pytest.raises(Closed):
            shm.view()
        if shm_id > 0:
            assert shm_id not in self.system.ids
            with pytest.raises(ItemNotFound):
                context.shm_from_id(shm_id)

    @precondition(lambda self: self.live)
    @rule(pick=st.integers(0, 10_000), ctx=st.integers(0, 2))
    def lookup(self, pick, ctx):
        shm, _ = self.live[pick % len(self.live)]
        context = self.contexts[ctx]
        if shm.id < 0:
            return
        if shm.context is context:
            again = context.shm_from_id(shm.id)
            assert again is shm
            again.close()                                       # the extra reference only
            assert not shm.closed and self.system.ids.find(shm.id) is shm
        else:
            with pytest.raises(ItemNotFound):
                context.shm_from_id(shm.id)

    @rule(ctx=st.integers(0, 2), shm_id=st.sampled_from([0, -1, 9999, 1 << 31]))
    def lookup_free_id(self, ctx, shm_id):
        with pytest.raises(ItemNotFound):
            self.contexts[ctx].shm_from_id(shm_id)

    @rule(ctx=st.integers(0, 2))
    def close_context(self, ctx):
        context = self.contexts[ctx]
        mine = [s for s, _ in self.live if s.context is context]
        context.close()
        assert context.closed and all(s.closed for s in mine)
        assert not any(s.cookie in self.system.tee.registered for s in mine)
        with pytest.raises(Closed):
            context.alloc_user_buf(PAGE)
        with pytest.raises(Closed):
            context.shm_from_id(1)
        self.live = [(s, d) for s, d in self.live if s.context is not context]
        self.contexts[ctx] = self.system.open_context(f"c{ctx}-again")

    @rule(ctx=st.integers(0, 2), kind=st.sampled_from(KINDS[:3]),
          size_error=st.sampled_from([(0, OutOfMemory), (-5, BadParameters), (1.5, BadParameters),
                                      ("4096", BadParameters), (True, BadParameters),
                                      (1 << 40, OutOfMemory)]))
    def bad_alloc(self, ctx, kind, size_error):
        size, error = size_error
        ids_before = len(self.system.ids)
        with pytest.raises(error):
            getattr(self.contexts[ctx], kind)(size)
        assert len(self.system.ids) == ids_before             # the reserved id was given back

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def accounting(self):
        assert_accounting(self.system)
        assert sorted(self.system.ids.ids()) == sorted(s.id for s, _ in self.live if s.id > 0)

    @invariant()
    def frames_owned_once(self):
        seen: set[int] = set()
        for shm, _ in self.live:
            if not shm.flags & ShmFlags.POOL or self.POOL == "static":
                continue  # registered pages may be shared; sub-page static allocations may share a page
            for pa in shm.pages.tolist():
                assert pa not in seen, f"frame {pa:#x} owned twice"
                seen.add(pa)

    @invariant()
    def contents_survive(self):
        for shm, stamp in self.live:
            view = shm.view()
            n = min(shm.size, 64)
            if shm.flags & ShmFlags.POOL:          # its first and last bytes
                assert_bytes(view[:n], bytes([stamp]) * n, "the start of a live buffer")
                assert_bytes(view[-n:], bytes([stamp]) * n, "the end of a live buffer")
            else:  # registered: the client's bytes, seen through the view
                assert_bytes(view, self.client.buf[stamp:stamp + shm.size], "a registered buffer")
            view.release()


class StaticSystemMachine(SystemMachine):
    POOL = "static"


# max_examples: a share of the profile's (tests/conftest.py), each example being a System's life
for machine in (SystemMachine, StaticSystemMachine):
    machine.TestCase.settings = settings(max_examples=examples(0.5), stateful_step_count=STEPS,
                                         deadline=None)
TestDynamicPoolMachine = SystemMachine.TestCase
TestStaticPoolMachine = StaticSystemMachine.TestCase


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
