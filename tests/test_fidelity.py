"""poolsvc against Linux 6.x (drivers/tee) and OP-TEE 4.0, one test per row of docs/fidelity.md
that this suite owns, with ``Config.strict`` both ways where it changes the answer.

Each test names the source function whose behaviour it holds poolsvc to.
"""
from __future__ import annotations

import logging
import threading
import uuid

import pytest

from poolsvc import Config, System
from poolsvc.constants import ATTR_NONCONTIG, PAGE_SIZE, Attr, MsgCmd, Origin, RpcCmd, RpcShmType, SecCaps
from poolsvc.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_CANCEL,
    TEE_ERROR_COMMUNICATION,
    TEE_ERROR_OUT_OF_MEMORY,
    TEE_SUCCESS,
    BadParameters,
    Closed,
    ConfigError,
    ProtocolError,
    TeeError,
)
from poolsvc.tee.driver import RegisteredMemref, Value
from poolsvc.tee.msg import MAX_PARAMS, SMC_RETURN_EBADCMD, SMC_RETURN_OK, MsgArg, MsgParam, unpack
from poolsvc.tee.ta import ParamType, StorageApp, TrustedApp, WaitApp, check_types

from sysutil import LeakCheck, assert_accounting
from teeutil import SMALL, open_raw, raw, write_list

BAD = TEE_ERROR_BAD_PARAMETERS
REG = Attr.TMEM_OUTPUT | ATTR_NONCONTIG


@pytest.fixture
def leaks():
    check = LeakCheck()
    yield check
    check.assert_balanced()


@pytest.fixture(params=[False, True], ids=["optee", "strict"])
def world(request, leaks):
    """A System (strict or not) with a registered data buffer and a buffer for lists."""
    with System(Config(**SMALL, strict=request.param)) as system:
        ctx = system.open_context("t")
        env = type("Env", (), {})()
        env.system, env.ctx, env.strict = system, ctx, request.param
        env.data = ctx.alloc_user_buf(2 * PAGE_SIZE)
        env.lists = ctx.alloc_user_buf(2 * PAGE_SIZE)
        yield env
        assert_accounting(system)


def _register_msg(env, page: int, cookie: int) -> list[MsgParam]:
    list_pa = write_list(env.lists, [int(env.data.pages[page])], page=page)
    return [MsgParam(REG, list_pa, PAGE_SIZE, cookie)]


# -- tee_core.c:params_from_user: a memref holds its shm during the call -------------------------
class _CloseDuring(TrustedApp):
    """Test app: runs ``during`` (the normal world acting while the call runs), then
    reads its MEMREF_INPUT and answers its length in a VALUE_OUTPUT."""

    UUID = uuid.uuid5(uuid.NAMESPACE_URL, "https://poolsvc/test/close-during")
    NAME = "close-during"
    during = staticmethod(lambda: None)

    def invoke(self, func, params):
        check_types(params, ParamType.MEMREF_INPUT, ParamType.VALUE_OUTPUT)
        type(self).during()
        params[1].a = len(params[0].read())


def test_close_during_a_call_takes_effect_after_it(world):
    system, ctx = world.system, world.ctx
    system.tee.install(_CloseDuring)
    shm = ctx.alloc_user_buf(PAGE_SIZE)
    shm.view()[:5] = b"hello"
    cookie = shm.cookie
    seen = []

    def close_now():
        shm.close()                       # the caller's only reference: no error, no BUSY
        seen.append((shm.closed, cookie in system.tee.registered, cookie in ctx.shms))

    _CloseDuring.during = staticmethod(close_now)
    try:
        from poolsvc.tee.driver import Value
        with ctx.open_session(_CloseDuring.UUID) as session:
            out = Value(0, 0, "out")
            session.invoke(0, [RegisteredMemref(shm, 0, 5, "in"), out])
    finally:
        _CloseDuring.during = staticmethod(lambda: None)
    assert out.a == 5
    assert seen == [(False, True, True)]  # still alive and registered inside the call
    assert shm.closed and cookie not in system.tee.registered and cookie not in ctx.shms


# -- smc_abi.c:optee_shm_register + entry_std.c / thread_optee_smc.c: no DYNAMIC_SHM --------------
def test_unknown_command_is_ebadcmd_and_leaves_the_message(world):
    system = world.system
    msg = MsgArg(cmd=99, ret=0x1234, ret_origin=7, params=[MsgParam(Attr.VALUE_INPUT, 1, 2, 3)])
    system.memory.write(system.driver.msg_pa, msg.pack())
    assert system.tee.serve(system.driver.msg_pa) == SMC_RETURN_EBADCMD
    assert system.memory.read(system.driver.msg_pa, len(msg.pack())) == msg.pack()
    # the driver answers a call refused at the SMC level as optee_invoke_func does
    rc, reply = system.driver.call_smc(msg)
    assert (rc, reply) == (SMC_RETURN_EBADCMD, msg)
    reply = system.driver.call(msg)
    assert (reply.ret, reply.ret_origin) == (TEE_ERROR_COMMUNICATION, Origin.COMMS)


def test_registration_without_dynamic_shm_is_ebadcmd_at_the_smc_level(leaks):
    with System(Config(**SMALL, dynamic_shm=False)) as system:
        ctx = system.open_context()
        lists, data = ctx.alloc_user_buf(PAGE_SIZE), ctx.alloc_user_buf(PAGE_SIZE)
        list_pa = write_list(lists, [int(data.pages[0])])
        for cmd, param in ((MsgCmd.REGISTER_SHM, MsgParam(REG, list_pa, PAGE_SIZE, 9)),
                           (MsgCmd.UNREGISTER_SHM, MsgParam(Attr.RMEM_INPUT, 0, 0, 9))):
            msg = MsgArg(cmd=cmd, params=[param]).pack()
            assert system.tee.call_smc(msg) == (SMC_RETURN_EBADCMD, msg)
        assert system.tee.call_with_arg == system.tee.serve and not system.tee.registered


# -- entry_std.c:register_shm / unregister_shm ----------------------------------------------------
def test_registration_answers_leave_ret_origin_unless_strict(world):
    msg = MsgArg(cmd=MsgCmd.REGISTER_SHM, ret_origin=2, params=_register_msg(world, 0, 0xAB))
    reply = unpack(world.system.tee.call(msg.pack()))
    assert reply.ret == TEE_SUCCESS
    assert reply.ret_origin == (Origin.TEE if world.strict else 2)
    msg = MsgArg(cmd=MsgCmd.UNREGISTER_SHM, ret_origin=2, params=[MsgParam(Attr.RMEM_INPUT, 0, 0, 0xAB)])
    reply = unpack(world.system.tee.call(msg.pack()))
    assert (reply.ret, reply.ret_origin) == (TEE_SUCCESS, Origin.TEE if world.strict else 2)
    # a wrong parameter count is the one refusal OP-TEE gives an origin
    reply = unpack(world.system.tee.call(MsgArg(cmd=MsgCmd.UNREGISTER_SHM, ret_origin=2).pack()))
    assert (reply.ret, reply.ret_origin) == (BAD, Origin.TEE)


def test_reused_cookie_shadows_or_is_refused_when_strict(world):
    tee = world.system.tee
    assert raw(world.system, MsgCmd.REGISTER_SHM, _register_msg(world, 0, 0x77)).ret == TEE_SUCCESS
    first = tuple(int(p) for p in tee.registered[0x77].pages)
    reply = raw(world.system, MsgCmd.REGISTER_SHM, _register_msg(world, 1, 0x77))
    unreg = [MsgParam(Attr.RMEM_INPUT, 0, 0, 0x77)]
    if world.strict:
        assert reply.ret == BAD
        assert tuple(int(p) for p in tee.registered[0x77].pages) == first
    else:  # mobj_reg_shm: the newer registration answers to the cookie until unregistered
        assert reply.ret == TEE_SUCCESS
        assert tuple(int(p) for p in tee.registered[0x77].pages) == (int(world.data.pages[1]),)
        assert raw(world.system, MsgCmd.UNREGISTER_SHM, unreg).ret == TEE_SUCCESS
        assert tuple(int(p) for p in tee.registered[0x77].pages) == first and not tee.shadowed
    assert raw(world.system, MsgCmd.UNREGISTER_SHM, unreg).ret == TEE_SUCCESS
    assert 0x77 not in tee.registered
    assert raw(world.system, MsgCmd.UNREGISTER_SHM, unreg).ret == BAD


def test_unregister_checks_only_the_parameter_count_unless_strict(world):
    tee = world.system.tee
    assert raw(world.system, MsgCmd.REGISTER_SHM, _register_msg(world, 0, 0x55)).ret == TEE_SUCCESS
    reply = raw(world.system, MsgCmd.UNREGISTER_SHM, [MsgParam(Attr.TMEM_INPUT, 0, 0, 0x55)])
    assert reply.ret == (BAD if world.strict else TEE_SUCCESS)
    assert (0x55 in tee.registered) == world.strict
    tee.registered.pop(0x55, None)


# -- entry_std.c:entry_cancel --------------------------------------------------------------------
class _Canceller(TrustedApp):
    UUID = uuid.uuid5(uuid.NAMESPACE_URL, "https://poolsvc/test/cancel")
    NAME = "cancel"

    def invoke(self, func, params):
        check_types(params, ParamType.VALUE_OUTPUT)
        params[0].a = int(self.env.cancel_requested)


def test_cancel_of_an_open_session_succeeds(world):
    system = world.system
    system.tee.install(_Canceller)
    sid = open_raw(system, _Canceller.UUID)
    reply = raw(system, MsgCmd.CANCEL, [], session=sid)
    assert (reply.ret, reply.ret_origin) == (TEE_SUCCESS, Origin.TEE)
    answer = raw(system, MsgCmd.INVOKE_COMMAND, [MsgParam(Attr.VALUE_OUTPUT)], session=sid)
    assert answer.params[0].a == 1
    assert raw(system, MsgCmd.CANCEL, [], session=sid + 1).ret == BAD
    assert raw(system, MsgCmd.CLOSE_SESSION, [], session=sid).ret == TEE_SUCCESS
    assert raw(system, MsgCmd.CANCEL, [], session=sid).ret == BAD


# -- call.c:optee_cancel_req, tee_ta_manager.c:tee_ta_cancel_command, a call running -----------
class _Started(WaitApp):
    """WaitApp that says when its wait begins (the test's condition to cancel on)."""

    UUID = uuid.uuid5(uuid.NAMESPACE_URL, "https://poolsvc/test/started")
    started = threading.Event()

    def invoke(self, func, params):
        type(self).started.set()
        return super().invoke(func, params)


def _wait_in_thread(session, ms, masked=0):
    """Invoke WAIT in another thread; returns (thread, outcomes): the TeeError or None."""
    outcomes = []

    def run():
        try:
            session.invoke(WaitApp.WAIT, [Value(ms, masked, "in")])
            outcomes.append(None)
        except TeeError as exc:
            outcomes.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcomes


@pytest.mark.parametrize("dynamic_shm", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("strict", [False, True], ids=["optee", "strict"])
def test_cancel_reaches_a_running_call_from_another_thread(leaks, strict, dynamic_shm):
    with System(Config(**SMALL, strict=strict, dynamic_shm=dynamic_shm)) as system:
        system.tee.install(_Started)
        ctx = system.open_context("t")
        idle = (system.dynamic.used_frames, system.static.used_bytes if system.static else 0)
        _Started.started.clear()
        with ctx.open_session(_Started.UUID) as session, ctx.open_session(WaitApp.UUID) as other:
            # the driver's cancel message exists while sessions are open: a block of the carve-out
            held = (system.dynamic.used_frames, system.static.used_bytes if system.static else 0)
            assert held[0] == idle[0] and held[1] > idle[1]
            calls = system.tee.stats.calls
            thread, outcomes = _wait_in_thread(session, 0xFFFFFFFF)
            assert _Started.started.wait(60)
            session.cancel()                       # this thread, while the call runs
            thread.join(60)
            assert not thread.is_alive()
            (exc,) = outcomes
            assert (exc.code, exc.origin) == (TEE_ERROR_CANCEL, Origin.TRUSTED_APP)
            assert system.tee.stats.calls == calls + 2      # the INVOKE and the CANCEL
            assert system.tee.stats.errors.get(TEE_ERROR_CANCEL) == 1
            # the flag stays set for the session's life (OP-TEE never clears sess->cancel) ...
            with pytest.raises(TeeError) as again:
                session.invoke(WaitApp.WAIT, [Value(0xFFFFFFFF, 0, "in")])
            assert again.value.code == TEE_ERROR_CANCEL
            session.invoke(WaitApp.WAIT, [Value(1, 1, "in")])  # ... but a masked wait ignores it
            other.invoke(WaitApp.WAIT, [Value(1, 0, "in")])    # other sessions are not cancelled
            assert system.tee.sessions[other.id].cancel_requested is False
        assert (system.dynamic.used_frames, system.static.used_bytes if system.static else 0) == idle
        with pytest.raises(Closed):
            session.cancel()
        with pytest.raises(BadParameters):                  # no session open: optee_cancel_req's EINVAL
            system.driver.cancel(session.id)


def test_cancel_message_in_a_kernel_page_without_a_carve_out(leaks):
    with System(Config(**SMALL, reserved_shm=False)) as system:
        ctx = system.open_context("t")
        idle = system.dynamic.used_frames
        with ctx.open_session(WaitApp.UUID) as session:
            assert system.dynamic.used_frames == idle + 1
            session.cancel()
            assert system.tee.sessions[session.id].cancel_requested
        assert system.dynamic.used_frames == idle


def test_cancel_message_is_the_one_optee_cancel_req_sends(world):
    system, ctx = world.system, world.ctx
    seen = []
    entry = system.driver.call_with_arg

    def spy(pa):
        seen.append(unpack(system.memory.read(pa, 32)))
        return entry(pa)

    with ctx.open_session(WaitApp.UUID) as session:
        system.driver.call_with_arg = spy
        try:
            session.cancel(7)
        finally:
            system.driver.call_with_arg = entry
        (msg,) = seen
        assert (msg.cmd, msg.session, msg.cancel_id, msg.params) == (MsgCmd.CANCEL, session.id, 7, [])
        assert system.tee.sessions[session.id].cancel_requested


# -- smc_abi.c:handle_rpc_func_cmd_shm_alloc / _shm_free -----------------------------------------
def _rpc(system, cmd, params):
    msg = MsgArg(cmd=cmd, params=params)
    system.tee._rpc_port().handle(msg)
    system.tee.rpc.call_done()
    return msg


def test_rpc_shm_alloc_as_the_kernel_serves_it(world):
    system = world.system
    value = Attr.VALUE_INPUT
    for params, code in (
            ([MsgParam(value, RpcShmType.GLOBAL, 64, 0)], BAD),
            ([MsgParam(value, 7, 64, 0)], BAD),
            ([MsgParam(value, RpcShmType.KERNEL, 0, 0)], TEE_ERROR_OUT_OF_MEMORY),
            ([MsgParam(value, RpcShmType.KERNEL, 64, 0), MsgParam(Attr.VALUE_INPUT)], BAD),
            ([], BAD)):
        reply = _rpc(system, RpcCmd.SHM_ALLOC, params)
        assert (reply.ret, reply.ret_origin) == (code, Origin.COMMS), params
    reply = _rpc(system, RpcCmd.SHM_ALLOC, [MsgParam(value, RpcShmType.APPL, 64, 0), MsgParam(), MsgParam()])
    assert (reply.ret, reply.ret_origin) == (TEE_SUCCESS, Origin.COMMS)
    assert reply.params[0].attr == REG and reply.params[1:] == [MsgParam(), MsgParam()]
    cookie = reply.params[0].c
    assert cookie in system.tee.rpc.shms
    free = _rpc(system, RpcCmd.SHM_FREE, [MsgParam(value, RpcShmType.APPL, cookie, 0)])
    assert (free.ret, free.ret_origin) == (TEE_SUCCESS, Origin.COMMS)
    assert cookie not in system.tee.rpc.shms


def test_rpc_shm_free_does_not_look_the_cookie_up_unless_strict(world):
    system = world.system
    value = Attr.VALUE_INPUT
    expected = BAD if world.strict else TEE_SUCCESS
    reply = _rpc(system, RpcCmd.SHM_ALLOC, [MsgParam(value, RpcShmType.KERNEL, 64, 0)])
    cookie = reply.params[0].c
    assert _rpc(system, RpcCmd.SHM_FREE, [MsgParam(value, RpcShmType.KERNEL, 0xDEAD, 0)]).ret == expected
    # an unknown type: Linux sets BAD_PARAMETERS, then SUCCESS over it, and frees nothing
    assert _rpc(system, RpcCmd.SHM_FREE, [MsgParam(value, RpcShmType.GLOBAL, cookie, 0)]).ret == expected
    assert cookie in system.tee.rpc.shms
    assert _rpc(system, RpcCmd.SHM_FREE, [MsgParam(value, RpcShmType.KERNEL, cookie, 0),
                                          MsgParam()]).ret == BAD       # exactly one parameter
    assert _rpc(system, RpcCmd.SHM_FREE, [MsgParam(value, RpcShmType.KERNEL, cookie, 0)]).ret == TEE_SUCCESS
    assert cookie not in system.tee.rpc.shms


# -- tee_shm.c:tee_shm_release: a refused unregistration frees the memory all the same -----------
def test_refused_unregister_is_logged_and_the_memory_freed(world, caplog):
    system, ctx = world.system, world.ctx
    shm = ctx.alloc_user_buf(PAGE_SIZE)
    cookie = shm.cookie
    system.tee.registered[cookie].inflight = 1  # a call the driver does not know of uses it: BUSY
    used = system.dynamic.used_frames
    with caplog.at_level(logging.ERROR, logger="poolsvc.system"):
        shm.close()
    assert shm.closed and cookie not in ctx.shms
    assert system.dynamic.used_frames == used - 1
    assert any(f"{cookie:#x}" in r.getMessage() for r in caplog.records)
    assert cookie in system.tee.registered  # the secure world keeps what it refused to drop
    del system.tee.registered[cookie]


# -- message size: as many parameters as fit in one page -----------------------------------------
def test_a_message_carries_up_to_127_parameters(world):
    assert MAX_PARAMS == 127
    full = MsgArg(cmd=MsgCmd.CLOSE_SESSION, params=[MsgParam()] * MAX_PARAMS)
    assert len(full.pack()) == PAGE_SIZE
    assert world.system.driver.call_smc(full)[0] == SMC_RETURN_OK  # fits the message page
    assert unpack(full.pack()).params == full.params
    over = MsgArg(cmd=MsgCmd.CLOSE_SESSION, params=[MsgParam()] * (MAX_PARAMS + 1)).pack()
    with pytest.raises(ProtocolError):
        unpack(over)


# -- the strict setting ----------------------------------------------------------------------------
def test_strict_is_a_validated_config_field():
    assert Config().strict is False
    assert Config.from_dict({"strict": True}).strict is True
    with pytest.raises(ConfigError, match="strict"):
        Config(strict="yes")


def test_call_with_arg_is_the_compiled_entry_in_both_modes(world):
    tee = world.system.tee
    assert tee.call_with_arg is tee.entry and tee.driver_entry is tee.entry
    assert tee.entry.strict == world.strict and tee.entry.shadowed is tee.shadowed
    tee.strict = not world.strict       # the mode is the entry's
    assert tee.entry.strict != world.strict
    tee.strict = world.strict
    tee.caps &= ~SecCaps.DYNAMIC_SHM    # without DYNAMIC_SHM: the Python path
    assert tee.call_with_arg == tee.serve and tee.driver_entry == tee.serve
    tee.caps |= SecCaps.DYNAMIC_SHM


# -- msg_param.c:msg_param_mobj_from_noncontig: size 0 at an offset is one page --------------------
def test_size_0_at_an_offset_is_one_page_unless_strict(world):
    tee = world.system.tee
    params = _register_msg(world, 0, 0x66)
    params[0].a |= 0x10
    params[0].b = 0
    reply = raw(world.system, MsgCmd.REGISTER_SHM, params)
    if world.strict:
        assert reply.ret == BAD and 0x66 not in tee.registered
    else:
        entry = tee.registered.pop(0x66)
        assert reply.ret == TEE_SUCCESS
        assert (len(entry.pages), entry.offset, entry.size) == (1, 0x10, PAGE_SIZE - 0x10)
    params[0].a &= ~0xFFF  # size 0 at offset 0: (0 - 1) / 4096 + 1 pages, refused
    assert raw(world.system, MsgCmd.REGISTER_SHM, params).ret == BAD


def test_unregister_without_dynamic_shm_reads_the_smc_result(leaks):
    from poolsvc.errors import TeeError

    with System(Config(**SMALL, dynamic_shm=False)) as system:
        with pytest.raises(TeeError) as info:
            system.driver.unregister(0x1234)
        assert (info.value.code, info.value.origin) == (TEE_ERROR_COMMUNICATION, Origin.COMMS)


def test_rpc_travels_in_the_rpc_argument_after_the_message(world):
    """SEC_CAP RPC_ARG (entry_fast.c: tee_entry_exchange_capabilities reports it with
    THREAD_RPC_MAX_NUM_PARAMS in a3): the driver places the RPC argument right after
    each call's message (smc_abi.c: optee_smc_do_call_with_arg), and the secure
    world's RPCs travel in it (optee_handle_rpc reads rpc_arg)."""
    system = world.system
    assert system.config.sec_caps & SecCaps.RPC_ARG
    driver = system.driver
    assert driver.rpc_arg_size == 32 + 4 * 32
    server = system.tee._rpc_port()
    seen = []
    handle_arg = server.handle_arg

    def spy(pa):
        seen.append((pa, unpack(system.memory.read(pa, 32 + 32))))
        handle_arg(pa)

    server.handle_arg = spy
    session = world.ctx.open_session(StorageApp.UUID, [Value(3 * PAGE_SIZE)])
    [(pa, request)] = seen
    # OPEN_SESSION carries two meta parameters and the app's one: three in the message
    assert pa == driver.msg_pa + 32 + 3 * 32
    assert request.cmd == RpcCmd.SHM_ALLOC and request.params[0].b == 3 * PAGE_SIZE
    session.close()  # SHM_FREE through the same argument
    assert len(seen) == 2 and seen[1][1].cmd == RpcCmd.SHM_FREE
    with pytest.raises(BadParameters, match="RPC argument"):  # misaligned, then secure memory
        system.tee.serve(driver.msg_pa, driver.msg_pa + 4)
    with pytest.raises(BadParameters, match="non-secure"):
        system.tee.serve(driver.msg_pa, system.memory.regions["secure"][0])


def test_rpc_without_an_rpc_argument_is_served_as_before(leaks):
    """A driver that sets no RPC argument (rpc_param_count 0): the RPC is handed over
    directly, and the app's memory works the same."""
    with System(Config(**SMALL)) as system:
        system.driver.rpc_arg_size = 0
        server = system.tee._rpc_port()
        server.handle_arg = None  # would fail if called
        ctx = system.open_context("t")
        with ctx.open_session(StorageApp.UUID, [Value(PAGE_SIZE)]):
            pass
        assert server.stats()["buffers"] == 0
        ctx.close()
        assert_accounting(system)
