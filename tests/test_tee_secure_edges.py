"""The simulated secure world against misbehaving trusted apps and odd messages.

Apps that answer codes that are not TEE errors or not u32 (a panic), replace or
tamper with their params, or re-enter a running session (Busy); input values
never written back; memrefs without a size reporting their capacity; RPC memory
unreachable once freed; a message in a strided memoryview.  Messages are built
by hand with poolsvc.tee.msg and sent through ``SecureWorld.call``.
"""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from poolsvc import Config, System
from poolsvc.constants import PAGE_SIZE, Attr, MsgCmd, Origin
from poolsvc.errors import TEE_ERROR_SECURITY, TeeError
from poolsvc.tee.msg import MsgArg, MsgParam, unpack
from poolsvc.tee.ta import TEE_ERROR_TARGET_DEAD, Memref, ParamType, TrustedApp, Value

from teeutil import SMALL, open_params, open_raw, raw


class Misbehaving(TrustedApp):
    """A buggy app: bad error codes, bad results, tampering with its params."""

    UUID = uuid.UUID("6b1f1a52-8d0e-4c36-9a51-2f6f0f5c7a10")
    NAME = "misbehaving"
    STASH: dict[str, object] = {}

    def open_session(self, params):
        if isinstance(params[0], Value) and params[0].a == 1:
            self.env.rpc_alloc(PAGE_SIZE)      # memory the session must give back
            params[0] = object()               # then tamper with the list
        return None

    def invoke(self, func, params):
        if func == 0:
            raise TeeError("claims success", 0, 0)
        if func == 1:
            raise TeeError("code beyond u32", 1 << 32, 0)
        if func == 2:
            raise TeeError("negative code", -1, 0)
        if func == 3:
            return np.array([1, 2])            # not a code at all
        if func == 4:
            params[0] = object()               # replace a param by junk
            return None
        if func == 5:                          # replace an input value by an output memref
            params[0] = Memref(None, ParamType.MEMREF_OUTPUT, None, 0, 7)
            return None
        if func == 6:
            del params[0].size                 # a memref without a size
            return None
        if func == 7:                          # keep RPC memory after giving it back
            memory = self.env.rpc_alloc(PAGE_SIZE)
            self.STASH["freed"] = memory
            self.env.rpc_free(memory)
            return None
        if func == 8:
            self.STASH["freed"].write(b"PWNED", 0)  # type: ignore[attr-defined]
            return None
        raise AssertionError(func)


@pytest.fixture
def system():
    with System(Config(**SMALL)) as system:
        system.tee.install(Misbehaving)
        yield system


@pytest.mark.parametrize("func", [0, 1, 2, 3])
def test_app_code_that_is_not_a_tee_error_is_a_panic(system, func):
    """An app error claiming success (0) or a code that is not a u32 is a TA panic:
    TARGET_DEAD from the TEE, the session dead; before, 0 answered success and the
    others escaped ``call`` as struct.error / ValueError."""
    sid = open_raw(system, Misbehaving.UUID)
    reply = raw(system, MsgCmd.INVOKE_COMMAND, [], session=sid, func=func)
    assert (reply.ret, reply.ret_origin) == (TEE_ERROR_TARGET_DEAD, Origin.TEE)
    assert system.tee.sessions[sid].dead


def test_app_code_beyond_u32_through_call_with_arg(system):
    """The same fault through the message page: answered, not an exception."""
    sid = open_raw(system, Misbehaving.UUID)
    msg = MsgArg(cmd=MsgCmd.INVOKE_COMMAND, func=1, session=sid)
    system.memory.write(system._msg_pa, msg.pack())
    system.tee.call_with_arg(system._msg_pa)
    reply = unpack(system.memory.read(system._msg_pa, msg.size))
    assert reply.ret == TEE_ERROR_TARGET_DEAD


def test_replaced_param_does_not_escape_or_leak_into_outputs(system):
    """An app that replaces an entry of its params list: no AttributeError out of
    ``call``, and the message keeps what was sent."""
    sid = open_raw(system, Misbehaving.UUID)
    pa = system.config.static_base
    sent = [MsgParam(Attr.TMEM_OUTPUT, pa, 10, 0x77)]
    reply = raw(system, MsgCmd.INVOKE_COMMAND, sent, session=sid, func=4)
    assert reply.ret == 0
    assert [(p.attr, p.a, p.b, p.c) for p in reply.params] == [(Attr.TMEM_OUTPUT, pa, 10, 0x77)]


def test_input_value_is_never_written_back(system):
    """Only outputs are written back, decided by the message's attrs: an app that
    swaps an input value for an output memref does not get ``b`` rewritten."""
    sid = open_raw(system, Misbehaving.UUID)
    sent = [MsgParam(Attr.VALUE_INPUT, 1, 2, 3)]
    reply = raw(system, MsgCmd.INVOKE_COMMAND, sent, session=sid, func=5)
    assert reply.ret == 0
    assert [(p.attr, p.a, p.b, p.c) for p in reply.params] == [(Attr.VALUE_INPUT, 1, 2, 3)]


def test_memref_without_size_reports_its_capacity(system):
    sid = open_raw(system, Misbehaving.UUID)
    pa = system.config.static_base
    reply = raw(system, MsgCmd.INVOKE_COMMAND, [MsgParam(Attr.TMEM_OUTPUT, pa, 10, 0)],
                session=sid, func=6)
    assert reply.ret == 0
    assert reply.params[0].b == 10


def test_open_session_tampering_keeps_state_consistent(system):
    """OPEN_SESSION whose app got RPC memory then tampered with its params: the
    answer comes back and the RPC memory belongs to a live session (before, an
    AttributeError escaped and the memory was held by no session)."""
    params = open_params(Misbehaving.UUID) + [MsgParam(Attr.VALUE_INPUT, 1, 0, 0)]
    reply = raw(system, MsgCmd.OPEN_SESSION, params)
    assert reply.ret == 0
    tee = system.tee
    assert sorted(tee.rpc_shms) == sorted(c for s in tee.sessions.values() for c in s.rpc)
    assert tee.sessions[reply.session].rpc


def test_rpc_memory_is_unreachable_after_free(system):
    """RPC memory given back (SHM_FREE) must not stay mapped: the normal world hands
    the same pages to someone else, and the app's stale object wrote into them."""
    sid = open_raw(system, Misbehaving.UUID)
    assert raw(system, MsgCmd.INVOKE_COMMAND, [], session=sid, func=7).ret == 0
    victim = system.open_context("victim").alloc_priv_buf(PAGE_SIZE)
    reply = raw(system, MsgCmd.INVOKE_COMMAND, [], session=sid, func=8)
    assert (reply.ret, reply.ret_origin) == (TEE_ERROR_SECURITY, Origin.TRUSTED_APP)
    assert bytes(victim.view()[:5]) == bytes(5)


def test_strided_memoryview_message(system):
    """``call`` takes a memoryview; a non-contiguous one is a message like any other
    (before: BufferError escaped)."""
    data = MsgArg(cmd=MsgCmd.CANCEL).pack()
    spread = bytearray(2 * len(data))
    spread[::2] = data
    reply = unpack(system.tee.call(memoryview(spread)[::2]))
    assert reply.ret == 0xFFFF0006  # CANCEL without an open session (id 0)


def test_reentrant_invoke_of_a_running_session_is_busy(system):
    """An RPC handler that calls back into the session being served gets BUSY
    (OP-TEE would block that caller; a single-threaded System would deadlock)."""
    from poolsvc.errors import TEE_ERROR_BUSY

    sid = open_raw(system, Misbehaving.UUID)
    inner = system.tee._rpc_port()
    seen: list[int] = []

    class Reentering:
        def handle(self, msg):
            if not seen:
                seen.append(raw(system, MsgCmd.INVOKE_COMMAND, [], session=sid, func=4).ret)
            return inner.handle(msg)

        def __getattr__(self, name):
            return getattr(inner, name)

    system.tee.rpc = Reentering()
    try:
        reply = raw(system, MsgCmd.INVOKE_COMMAND, [], session=sid, func=7)  # does an RPC
    finally:
        system.tee.rpc = inner
    assert seen == [TEE_ERROR_BUSY]
    assert reply.ret == 0
    assert system.tee.sessions[sid].running == 0
