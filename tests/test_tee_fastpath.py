"""The one-parameter fast path of ``SecureWorld.call_with_arg`` against ``call(bytes)``.

Two identical Systems get the same random sequence of one-parameter messages
(REGISTER_SHM and UNREGISTER_SHM take the fast path; the other commands the
generic one): one through ``tee.call(bytes)``, the other placed in the
message page and handed over with ``call_with_arg``.  Every answer (all 64
bytes), the secure world's state, its stats and the pools' accounting must
be the same after every message (raw registrations of unknown cookies
leave the normal world's bookkeeping aside, so only the frame counts are
checked).  Also: the address rules of the fast path are those of ``_read_arg``.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolsvc import Config, System
from poolsvc.constants import ATTR_NONCONTIG, PAGE_SIZE, Attr, MsgCmd
from poolsvc.errors import BadParameters
from poolsvc.tee.msg import ARG1, MsgArg, MsgParam, unpack

from teeutil import SMALL, snapshot, write_list

REG = Attr.TMEM_OUTPUT | ATTR_NONCONTIG


def make_world():
    system = System(Config(**SMALL))
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
@given(st.lists(messages, min_size=1, max_size=12))
def test_call_with_arg_equals_call(seq):
    a_sys, _, a_data, good = make_world()
    b_sys, _, _, _ = make_world()
    try:
        for cmd, attr, ptr, size, cookie in seq:
            ptr = {"good": good, "good+off": good | 0x10, "bad-list": good + PAGE_SIZE,
                   "secure": 0x0E000000, "misaligned-list": good + 8}.get(ptr, ptr)
            if cookie == "data":  # the System's own registration: never unregistered behind its back
                cookie = 0xC0FFEE if cmd == MsgCmd.UNREGISTER_SHM else a_data.cookie
            msg = MsgArg(cmd=cmd, params=[MsgParam(attr, ptr, size, cookie)])
            reply_a = a_sys.tee.call(msg.pack())
            ARG1.pack_into(b_sys._msg_view, 0, *ARG1.unpack(msg.pack()))
            b_sys.tee.call_with_arg(b_sys._msg_pa)
            reply_b = bytes(b_sys._msg_view[:ARG1.size])
            assert reply_a == reply_b, (unpack(reply_a), unpack(reply_b))
            assert snapshot(a_sys) == snapshot(b_sys)
            assert a_sys.tee.stats == b_sys.tee.stats
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
        for pa in (system._msg_pa + 8, cfg.static_base + 4, static_end - 16, -1, 1 << 64,
                   cfg.secure_base, float(system._msg_pa), True):
            with pytest.raises(BadParameters):
                tee.call_with_arg(pa)
        # the last 64 bytes of the carve-out, 8-byte aligned: a valid place
        system.phys.write(static_end - 64, msg.pack())
        tee.call_with_arg(static_end - 64)
        assert unpack(system.phys.read(static_end - 64, 64)).ret == 0xFFFF0006  # unknown cookie
        # the message page itself, then again (the remembered address)
        for _ in range(2):
            system.phys.write(system._msg_pa, msg.pack())
            tee.call_with_arg(system._msg_pa)
            assert unpack(system.phys.read(system._msg_pa, 64)).ret == 0xFFFF0006
        assert tee.stats.calls == 3
