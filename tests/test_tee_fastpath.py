"""The one-parameter fast path of ``SecureWorld.call_with_arg`` against ``call(bytes)``.

Two identical Systems get the same random sequence of one-parameter messages
(REGISTER_SHM and UNREGISTER_SHM take the fast path; the other commands the
generic one): one through ``tee.call(bytes)``, the other placed in the
message page and handed over with ``call_with_arg``.  Every answer (all 64
bytes), the secure world's state, its stats and the pools' accounting must
be the same after every message (raw registrations of unknown cookies
leave the normal world's bookkeeping aside, so only the frame counts are
checked).  Also: the address rules of the fast path are those of ``_read_arg``.

The compiled entry is ``call_with_arg`` whenever DYNAMIC_SHM is on, in the
world's mode: the message tests run in a ``strict`` world (Config.strict)
and in the default one (OP-TEE's rules: cookie shadowing, no attr check on
UNREGISTER_SHM, ``ret_origin`` unwritten).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolsvc import Config, System
from poolsvc.constants import ATTR_NONCONTIG, PAGE_SIZE, Attr, MsgCmd
from poolsvc.errors import BadParameters
from poolsvc.tee.msg import ARG1, MsgArg, MsgParam, unpack

from teeutil import SMALL, snapshot, write_list

REG = Attr.TMEM_OUTPUT | ATTR_NONCONTIG


MODES = pytest.mark.parametrize("strict", [True, False], ids=["strict", "optee"])


def make_world(strict=True):
    system = System(Config(**SMALL, strict=strict))
    ctx = system.open_context("t")
    data = ctx.alloc_user_buf(3 * PAGE_SIZE)
    lists = ctx.alloc_user_buf(2 * PAGE_SIZE)
    good = write_list(lists, [int(p) for p in data.pages])
    write_list(lists, [int(data.pages[0]) | 8, 0x0E000000], page=1)
    return system, ctx, data, good


messages = st.tuples(
    st.sampled_from([MsgCmd.REGISTER_SHM, MsgCmd.UNREGISTER_SHM, MsgCmd.CLOSE_SESSION,
                     MsgCmd.CANCEL, 99]),
    st.sampled_from([REG, Attr.TMEM_INPUT | ATTR_NONCONTIG, Attr.RMEM_INPUT, Attr.TMEM_OUTPUT, 0]),
    st.sampled_from(["good", "good+off", "bad-list", "secure", "misaligned-list", 0]),
    st.sampled_from([0, 1, PAGE_SIZE, 3 * PAGE_SIZE, 3 * PAGE_SIZE + 1, (1 << 64) - 1]),
    st.sampled_from(["data", 0xC0FFEE, 0xC0FFEF, 0]),
)


@settings(max_examples=40)
def both_paths(a_sys, b_sys, a_data, good, cmd, attr, ptr, size, cookie):
    """One message through ``a_sys.tee.call(bytes)`` (generic) and ``b_sys``'s fast
    ``call_with_arg``: the same reply, the same System state, the same statistics.
    ``ptr`` and ``cookie`` may be the strategies' symbolic names."""
    ptr = {"good": good, "good+off": good | 0x10, "bad-list": good + PAGE_SIZE,
           "secure": 0x0E000000, "misaligned-list": good + 8}.get(ptr, ptr)
    if cookie == "data":  # the System's own registration: never unregistered behind its back
        cookie = 0xC0FFEE if cmd == MsgCmd.UNREGISTER_SHM else a_data.cookie
    msg = MsgArg(cmd=cmd, params=[MsgParam(attr, ptr, size, cookie)])
    reply_a = a_sys.tee.call(msg.pack())
    b_sys.memory.write(b_sys.driver.msg_pa, msg.pack())
    b_sys.tee.call_with_arg(b_sys.driver.msg_pa)
    reply_b = b_sys.memory.read(b_sys.driver.msg_pa, ARG1.size)
    assert reply_a == reply_b, (unpack(reply_a), unpack(reply_b))
    assert snapshot(a_sys) == snapshot(b_sys)
    assert a_sys.tee.stats == b_sys.tee.stats


@MODES
@given(st.lists(messages, min_size=1, max_size=12))
def test_call_with_arg_equals_call(strict, seq):
    a_sys, _, a_data, good = make_world(strict)
    b_sys, _, _, _ = make_world(strict)
    try:
        for cmd, attr, ptr, size, cookie in seq:
            both_paths(a_sys, b_sys, a_data, good, cmd, attr, ptr, size, cookie)
            dyn = b_sys.dynamic
            assert dyn.free_frames + dyn.used_frames == dyn.nframes
    finally:
        a_sys.close()
        b_sys.close()


def test_fast_path_address_rules():
    with System(Config(**SMALL)) as system:
        tee, cfg = system.tee, system.config
        msg = MsgArg(cmd=MsgCmd.UNREGISTER_SHM, params=[MsgParam(Attr.RMEM_INPUT, 0, 0, 0x77)])
        static_end = cfg.static_base + cfg.static_size
        for pa in (system.driver.msg_pa + 8, cfg.static_base + 4, static_end - 16, -1, 1 << 64,
                   cfg.secure_base, float(system.driver.msg_pa), True):
            with pytest.raises(BadParameters):
                tee.call_with_arg(pa)
        # the last 64 bytes of the carve-out, 8-byte aligned: a valid place
        system.phys.write(static_end - 64, msg.pack())
        tee.call_with_arg(static_end - 64)
        assert unpack(system.phys.read(static_end - 64, 64)).ret == 0xFFFF0006  # unknown cookie
        # the message page itself, then again (the remembered address)
        for _ in range(2):
            system.phys.write(system.driver.msg_pa, msg.pack())
            tee.call_with_arg(system.driver.msg_pa)
            assert unpack(system.phys.read(system.driver.msg_pa, 64)).ret == 0xFFFF0006
        assert tee.stats.calls == 3


@MODES
@settings(max_examples=30)
@given(st.lists(st.tuples(messages, st.integers(0, 2 * PAGE_SIZE // 8 - 1)), min_size=1, max_size=8))
def test_call_with_arg_in_the_carveout_equals_call(strict, seq):
    """Messages placed anywhere 8-byte aligned in the carve-out, across a page boundary too."""
    a_sys, _, _, good = make_world(strict)
    b_sys, _, _, _ = make_world(strict)
    try:
        base = b_sys.config.static_base + 3 * PAGE_SIZE
        for (cmd, attr, ptr, size, cookie), slot in seq:
            ptr = {"good": good, "good+off": good | 0x10, "bad-list": good + PAGE_SIZE,
                   "secure": 0x0E000000, "misaligned-list": good + 8}.get(ptr, ptr)
            cookie = 0xC0FFEE if cookie == "data" else cookie
            msg = MsgArg(cmd=cmd, params=[MsgParam(attr, ptr, size, cookie)])
            arg_pa = base + 8 * slot    # slots near 4096 straddle two frames
            reply_a = a_sys.tee.call(msg.pack())
            b_sys.phys.write(arg_pa, msg.pack())
            b_sys.tee.call_with_arg(arg_pa)
            reply_b = b_sys.phys.read(arg_pa, ARG1.size)
            assert reply_a == reply_b, (unpack(reply_a), unpack(reply_b))
            assert snapshot(a_sys) == snapshot(b_sys)
            assert a_sys.tee.stats == b_sys.tee.stats
    finally:
        a_sys.close()
        b_sys.close()


def accounting(system):
    scratch_seg, scratch_index = system.driver.list_scratch_page
    scratch = bytes(memoryview(scratch_seg.storage.mm)[scratch_index * PAGE_SIZE:(scratch_index + 1) * PAGE_SIZE])
    return (system.dynamic.used_frames, system.memory.table.mapped_frames, scratch == bytes(PAGE_SIZE),
            system.tee.state())


@settings(max_examples=40)
@given(st.lists(st.tuples(
    st.sampled_from(["pages", "run", "unregister"]),
    st.lists(st.sampled_from(["data", "data", "secure", "misaligned"]), min_size=1, max_size=4),
    st.sampled_from([0, 0x10]),
    st.sampled_from([0xC0FFEE, 0xC0FFEF, "data"]),
), min_size=1, max_size=8))
def test_driver_register_paths_keep_accounting(seq):
    """``Driver.register`` (page array), ``Driver.register_run`` (contiguous run) and
    ``Driver.unregister``: on every answer and refusal the list frame is freed, the scratch
    page zero and unmapped, and the run form registers exactly what the array form does."""
    from poolsvc.errors import PoolsvcError

    a_sys, _, a_data, _ = make_world()
    b_sys, _, _, _ = make_world()
    try:
        first = int(a_data.pages[0])
        for kind, spec, offset, cookie in seq:
            if cookie == "data":  # refused as a registration; never unregistered behind its back
                cookie = 0xC0FFEF if kind == "unregister" else a_data.cookie
            pages = np.array([{"data": first + i * PAGE_SIZE, "secure": 0x0E000000 + i * PAGE_SIZE,
                               "misaligned": first + 8}[s] for i, s in enumerate(spec)],
                             dtype=np.uint64)
            size = len(pages) * PAGE_SIZE - offset
            before = accounting(a_sys)
            outcomes = []
            for system, run in ((a_sys, False), (b_sys, kind == "run")):
                try:
                    if kind == "unregister":
                        system.driver.unregister(cookie)
                    elif run:
                        if offset or "misaligned" in spec or len(set(spec)) > 1:
                            system.driver.register(pages, offset, size, cookie)
                        else:
                            system.driver.register_run(int(pages[0]), len(pages), size, cookie)
                    else:
                        system.driver.register(pages, offset, size, cookie)
                    outcomes.append(None)
                except PoolsvcError as exc:
                    outcomes.append((type(exc).__name__, getattr(exc, "tee_code", None)))
            assert outcomes[0] == outcomes[1]
            after_a, after_b = accounting(a_sys), accounting(b_sys)
            assert after_a == after_b
            assert after_a[:3] == before[:3]            # frames, mappings, scratch page zero
            assert a_sys.tee.stats == b_sys.tee.stats
    finally:
        for system in (a_sys, b_sys):
            system.tee.registered.pop(0xC0FFEE, None)
            system.tee.registered.pop(0xC0FFEF, None)
            system.close()


class CallDone:
    """An RPC server stand-in: counts ``call_done``."""

    def __init__(self):
        self.n = 0

    def call_done(self):
        self.n += 1


knobs = st.one_of(
    st.tuples(st.just("caps"), st.booleans()),                  # DYNAMIC_SHM on / off
    st.tuples(st.just("inflight"), st.sampled_from([0, 1])),    # 0xC0FFEE in use by a call
    st.tuples(st.just("rpc"), st.sampled_from([None, "counting", "plain"])),
)


@MODES
@settings(max_examples=40)
@given(st.lists(st.one_of(messages, messages, knobs), min_size=1, max_size=14))
def test_fast_path_bookkeeping_equals_generic(strict, seq):
    """The knobs of the fast path's bookkeeping turned alike on both Systems: the
    capabilities (no DYNAMIC_SHM), a registered object in use by a running call
    (UNREGISTER_SHM answers BUSY), an RPC server with and without ``call_done``.
    ``call_with_arg`` and ``call(bytes)`` still agree on every answer, the state, the
    stats and the number of ``call_done`` calls."""
    from poolsvc.constants import SecCaps

    a_sys, _, a_data, good = make_world(strict)
    b_sys, _, _, _ = make_world(strict)
    caps = a_sys.tee.caps
    rpcs = []
    try:
        for step in seq:
            if step[0] == "caps":
                for system in (a_sys, b_sys):
                    system.tee.caps = caps if step[1] else SecCaps(caps & ~SecCaps.DYNAMIC_SHM)
                continue
            if step[0] == "inflight":
                for system in (a_sys, b_sys):
                    if 0xC0FFEE in system.tee.registered:
                        system.tee.registered[0xC0FFEE].inflight = step[1]
                continue
            if step[0] == "rpc":
                pair = [None, None] if step[1] is None else \
                    [CallDone(), CallDone()] if step[1] == "counting" else [object(), object()]
                rpcs.append(pair)
                a_sys.tee.rpc, b_sys.tee.rpc = pair
                continue
            cmd, attr, ptr, size, cookie = step
            both_paths(a_sys, b_sys, a_data, good, cmd, attr, ptr, size, cookie)
            assert [getattr(r, "n", None) for pair in rpcs for r in pair[:1]] == \
                [getattr(r, "n", None) for pair in rpcs for r in pair[1:]]
    finally:
        for system in (a_sys, b_sys):
            system.tee.rpc = None
            system.tee.caps = caps
            system.tee.registered.pop(0xC0FFEE, None)
            system.tee.registered.pop(0xC0FFEF, None)
            system.close()


def test_stats_calls_is_the_entry_counter():
    """``stats.calls`` counts both paths in one counter; a replaced SecureStats takes over."""
    from poolsvc.tee.secure import SecureStats

    with System(Config(**SMALL, strict=True)) as system:
        tee = system.tee
        assert tee.call_with_arg is tee.entry
        msg = MsgArg(cmd=MsgCmd.UNREGISTER_SHM, params=[MsgParam(Attr.RMEM_INPUT, 0, 0, 0x77)])
        calls = tee.stats.calls
        system.phys.write(system.driver.msg_pa, msg.pack())
        tee.call_with_arg(system.driver.msg_pa)                       # fast path
        tee.call(MsgArg(cmd=MsgCmd.CANCEL).pack())              # generic path
        assert tee.stats == SecureStats(calls + 2, {0xFFFF0006: 2})  # CANCEL of no session too
        assert repr(tee.stats) == (f"SecureStats(calls={calls + 2}, errors={{4294901766: 2}}, "
                                   "rpc_alloc=0, rpc_free=0)")
        tee.stats = SecureStats(calls=10)
        tee.call_with_arg(system.driver.msg_pa)
        tee.call(MsgArg(cmd=MsgCmd.CANCEL).pack())
        assert tee.stats == SecureStats(12, {0xFFFF0006: 2})
        tee.stats.calls = 0
        assert tee.stats.calls == 0 and SecureStats() == SecureStats(0, {}, 0, 0)
        assert SecureStats() != SecureStats(1) and SecureStats().__eq__(object()) is NotImplemented
        assert tee.call_with_arg is tee.entry
