"""The secure world's checks (docs/design.md section 6), one hand-crafted raw message per rejection.

Every refusal must give the exact return code AND leave the secure world's
state (cookies, inflight counts, sessions, temporary objects, RPC memory)
and the pools' accounting exactly as they were.  REGISTER_SHM and
UNREGISTER_SHM leave ``ret_origin`` as the normal world wrote it (OP-TEE's
``register_shm`` / ``unregister_shm``); the other commands answer origin TEE.
"""
from __future__ import annotations

import pytest

from poolsvc import Config, System
from poolsvc.constants import ATTR_META, ATTR_NONCONTIG, PAGE_SIZE, Attr, MsgCmd, Origin
from poolsvc.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_BUSY,
    TEE_ERROR_ITEM_NOT_FOUND,
    TEE_ERROR_SECURITY,
    ProtocolError,
)
from poolsvc.tee.msg import SMC_RETURN_EBADCMD, MsgArg, MsgParam
from poolsvc.tee.ta import Sha256App, TrustedApp

from sysutil import LeakCheck, assert_accounting
from teeutil import SMALL, open_params, open_raw, raw, snapshot, write_list

BAD = TEE_ERROR_BAD_PARAMETERS
SEC = TEE_ERROR_SECURITY
U64 = (1 << 64) - 1


@pytest.fixture
def leaks():
    check = LeakCheck()
    yield check
    check.assert_balanced()


@pytest.fixture
def world(leaks):
    """A dynamic-shm System with a registered buffer, scratch list pages and a session."""
    with System(Config(**SMALL)) as system:
        ctx = system.open_context("t")
        env = type("Env", (), {})()
        env.system, env.ctx = system, ctx
        env.data = ctx.alloc_user_buf(3 * PAGE_SIZE)       # registered: cookie known
        env.lists = ctx.alloc_user_buf(4 * PAGE_SIZE)      # where hand-made lists go
        env.big = None
        env.session = open_raw(system, Sha256App.UUID)
        yield env
        assert system.tee.temp_live == 0
        assert all(r.inflight == 0 for r in system.tee.registered.values())
        assert_accounting(system)


def expect(env, code, cmd, params, session=0, func=0):
    """Send the message, check the code, and that nothing changed."""
    before = snapshot(env.system)
    reply = raw(env.system, cmd, params, session=session, func=func)
    assert reply.ret == code, f"{reply.ret:#x} != {code:#x}"
    registration = cmd in (MsgCmd.REGISTER_SHM, MsgCmd.UNREGISTER_SHM)
    assert reply.ret_origin == (0 if registration and not env.system.tee.strict else Origin.TEE)
    assert snapshot(env.system) == before
    return reply


def data_pages(env):
    return [int(p) for p in env.data.pages]


def register(env, entries, size=None, offset=0, cookie=0xC0FFEE, next_pa=None):
    list_pa = write_list(env.lists, entries, next_pa)
    size = len(entries) * PAGE_SIZE - offset if size is None else size
    return [MsgParam(Attr.TMEM_OUTPUT | ATTR_NONCONTIG, list_pa | offset, size, cookie)]


# -- REGISTER_SHM ---------------------------------------------------------------------------
def test_register_valid_then_state_changes(world):
    reply = raw(world.system, MsgCmd.REGISTER_SHM, register(world, data_pages(world), offset=5))
    assert reply.ret == 0
    entry = world.system.tee.registered[0xC0FFEE]
    assert entry.size == 3 * PAGE_SIZE - 5 and entry.offset == 5
    assert raw(world.system, MsgCmd.UNREGISTER_SHM,
               [MsgParam(Attr.RMEM_INPUT, 0, 0, 0xC0FFEE)]).ret == 0


def test_register_misaligned_entry(world):
    pages = data_pages(world)
    pages[1] |= 0x10
    expect(world, BAD, MsgCmd.REGISTER_SHM, register(world, pages))


def test_register_misaligned_next_list_page(world):
    n = 512  # one more than a list page holds: the next pointer is followed
    big = world.ctx.alloc_user_buf(n * PAGE_SIZE)
    pages = [int(p) for p in big.pages]
    first = write_list(world.lists, pages[:511], next_pa=int(world.lists.pages[1]) | 0x8)
    write_list(world.lists, pages[511:], page=1)
    params = [MsgParam(Attr.TMEM_OUTPUT | ATTR_NONCONTIG, first, n * PAGE_SIZE, 0xBEEF)]
    expect(world, BAD, MsgCmd.REGISTER_SHM, params)
    # the same list with an aligned next pointer is accepted
    write_list(world.lists, pages[:511], next_pa=int(world.lists.pages[1]))
    assert raw(world.system, MsgCmd.REGISTER_SHM, params).ret == 0
    assert len(world.system.tee.registered[0xBEEF].pages) == n
    raw(world.system, MsgCmd.UNREGISTER_SHM, [MsgParam(Attr.RMEM_INPUT, 0, 0, 0xBEEF)])
    big.close()


def test_register_list_page_in_secure_memory(world):
    secure = world.system.config.secure_base
    params = [MsgParam(Attr.TMEM_OUTPUT | ATTR_NONCONTIG, secure, PAGE_SIZE, 0xC0FFEE)]
    expect(world, BAD, MsgCmd.REGISTER_SHM, params)


def test_register_entry_in_secure_memory(world):
    pages = data_pages(world)
    pages[2] = world.system.config.secure_base + 5 * PAGE_SIZE
    expect(world, BAD, MsgCmd.REGISTER_SHM, register(world, pages))


def test_register_entry_outside_every_region(world):
    pages = data_pages(world)
    pages[0] = 0x1000
    expect(world, BAD, MsgCmd.REGISTER_SHM, register(world, pages))


def test_register_zero_pages(world):
    expect(world, BAD, MsgCmd.REGISTER_SHM, register(world, data_pages(world), size=0))


def test_register_size_offset_overflow(world):
    expect(world, BAD, MsgCmd.REGISTER_SHM, register(world, data_pages(world), size=U64, offset=8))


@pytest.mark.parametrize("attr", [
    Attr.TMEM_OUTPUT,                                  # no NONCONTIG
    Attr.TMEM_INPUT | ATTR_NONCONTIG,
    Attr.TMEM_INOUT | ATTR_NONCONTIG,
    Attr.TMEM_OUTPUT | ATTR_NONCONTIG | ATTR_META,
    Attr.RMEM_OUTPUT | ATTR_NONCONTIG,
])
def test_register_wrong_attr(world, attr):
    params = register(world, data_pages(world))
    params[0].attr = attr
    expect(world, BAD, MsgCmd.REGISTER_SHM, params)


def test_register_two_params(world):
    params = register(world, data_pages(world))
    expect(world, BAD, MsgCmd.REGISTER_SHM, params + [MsgParam(Attr.NONE)])


def test_register_cookie_already_registered_when_strict(world):
    """Config.strict keeps the check OP-TEE does not make (tests/test_fidelity.py has
    the shadowing OP-TEE does)."""
    world.system.tee.strict = True
    expect(world, BAD, MsgCmd.REGISTER_SHM, register(world, data_pages(world), cookie=world.data.cookie))


def test_register_without_dynamic_shm(leaks):
    with System(Config(**SMALL, dynamic_shm=False)) as system:
        ctx = system.open_context()
        lists = ctx.alloc_user_buf(PAGE_SIZE)
        data = ctx.alloc_user_buf(PAGE_SIZE)
        list_pa = write_list(lists, [int(data.pages[0])])
        before = snapshot(system)
        msg = MsgArg(cmd=MsgCmd.REGISTER_SHM, ret=0x1234, ret_origin=9,
                     params=[MsgParam(Attr.TMEM_OUTPUT | ATTR_NONCONTIG, list_pa, PAGE_SIZE, 7)])
        # an unknown command without CFG_CORE_DYN_SHM: EBADCMD at the SMC level, message untouched
        assert system.tee.call_smc(msg.pack()) == (SMC_RETURN_EBADCMD, msg.pack())
        assert snapshot(system) == before


# -- UNREGISTER_SHM ---------------------------------------------------------------------------
def test_unregister_unknown_cookie(world):
    expect(world, BAD, MsgCmd.UNREGISTER_SHM, [MsgParam(Attr.RMEM_INPUT, 0, 0, 0xDEAD)])


def test_double_unregister(world):
    assert raw(world.system, MsgCmd.REGISTER_SHM, register(world, data_pages(world))).ret == 0
    unreg = [MsgParam(Attr.RMEM_INPUT, 0, 0, 0xC0FFEE)]
    assert raw(world.system, MsgCmd.UNREGISTER_SHM, unreg).ret == 0
    expect(world, BAD, MsgCmd.UNREGISTER_SHM, unreg)


@pytest.mark.parametrize("attr", [Attr.RMEM_INOUT, Attr.TMEM_INPUT, Attr.RMEM_INPUT | ATTR_META])
def test_unregister_wrong_attr_when_strict(world, attr):
    """Config.strict keeps the attr check; OP-TEE looks only at the parameter count
    (tests/test_fidelity.py)."""
    world.system.tee.strict = True
    expect(world, BAD, MsgCmd.UNREGISTER_SHM, [MsgParam(attr, 0, 0, world.data.cookie)])


class _Unregisterer(TrustedApp):
    """Test app: during a call, tries to unregister the cookie the call is using."""

    NAME = "unregisterer"

    def invoke(self, func, params):
        msg = MsgArg(cmd=MsgCmd.UNREGISTER_SHM, params=[MsgParam(Attr.RMEM_INPUT, 0, 0, func)])
        reply = self.env._world.call(msg.pack())
        from poolsvc.tee.msg import unpack
        params[0].a = unpack(reply).ret & 0xFFFFFFFF
        params[0].b = self.env._world.registered[func].inflight


def test_unregister_in_flight_is_refused_busy(world):
    import uuid
    key = world.system.tee.install(_Unregisterer, uuid.uuid4())
    sid = open_raw(world.system, key)
    cookie = world.data.cookie
    reply = raw(world.system, MsgCmd.INVOKE_COMMAND, [
        MsgParam(Attr.VALUE_OUTPUT), MsgParam(Attr.RMEM_INPUT, 0, 100, cookie)],
        session=sid, func=cookie)
    assert reply.ret == 0
    assert reply.params[0].a == TEE_ERROR_BUSY & 0xFFFFFFFF  # refused while in flight
    assert reply.params[0].b == 1
    assert world.system.tee.registered[cookie].inflight == 0  # released after the call
    raw(world.system, MsgCmd.CLOSE_SESSION, [], session=sid)


# -- TA parameters ------------------------------------------------------------------------------
def invoke_params(world, first):
    out = MsgParam(Attr.TMEM_OUTPUT, 0, 32, 0)  # NULL output: the digest size comes back
    return [first, out]


def test_tmem_outside_carveout(world):
    pa = int(world.data.pages[0])  # dynamic RAM, not the carve-out
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, invoke_params(world, MsgParam(Attr.TMEM_INPUT, pa, 16, 0)),
           session=world.session)


def test_tmem_straddling_carveout_end(world):
    cfg = world.system.config
    pa = cfg.static_base + cfg.static_size - 8
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, invoke_params(world, MsgParam(Attr.TMEM_INPUT, pa, 16, 0)),
           session=world.session)


def test_tmem_in_secure_memory(world):
    pa = world.system.config.secure_base
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, invoke_params(world, MsgParam(Attr.TMEM_INPUT, pa, 16, 0)),
           session=world.session)


def test_tmem_size_overflow(world):
    pa = world.system.config.static_base + 64
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, invoke_params(world, MsgParam(Attr.TMEM_INPUT, pa, U64 - 8, 0)),
           session=world.session)


def test_tmem_inside_carveout_accepted(world):
    pa = world.system.config.static_base + 100
    reply = raw(world.system, MsgCmd.INVOKE_COMMAND,
                invoke_params(world, MsgParam(Attr.TMEM_INPUT, pa, 5000, 0)), session=world.session)
    assert reply.ret == 0xFFFF0010  # a NULL output memref: SHORT_BUFFER, size needed
    assert reply.params[1].b == 32 and reply.ret_origin == Origin.TRUSTED_APP


def test_rmem_past_the_object(world):
    p = MsgParam(Attr.RMEM_INPUT, PAGE_SIZE, 2 * PAGE_SIZE + 1, world.data.cookie)
    expect(world, SEC, MsgCmd.INVOKE_COMMAND, invoke_params(world, p), session=world.session)


def test_rmem_offs_size_overflow(world):
    p = MsgParam(Attr.RMEM_INPUT, 16, U64 - 8, world.data.cookie)
    expect(world, SEC, MsgCmd.INVOKE_COMMAND, invoke_params(world, p), session=world.session)


def test_rmem_unknown_cookie(world):
    p = MsgParam(Attr.RMEM_INPUT, 0, 16, 0x5EC)
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, invoke_params(world, p), session=world.session)


def test_rmem_reference_dropped_when_a_later_param_fails(world):
    good = MsgParam(Attr.RMEM_INPUT, 0, 16, world.data.cookie)
    bad = MsgParam(Attr.RMEM_INPUT, 0, 16, 0x5EC)
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, [good, bad], session=world.session)


def test_noncontig_temp_misaligned_entry(world):
    pages = data_pages(world)
    pages[0] |= 1
    list_pa = write_list(world.lists, pages)
    p = MsgParam(Attr.TMEM_INPUT | ATTR_NONCONTIG, list_pa, 3 * PAGE_SIZE, 0)
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, invoke_params(world, p), session=world.session)


def test_noncontig_temp_zero_pages(world):
    list_pa = write_list(world.lists, data_pages(world))
    p = MsgParam(Attr.TMEM_INPUT | ATTR_NONCONTIG, list_pa, 0, 0)
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, invoke_params(world, p), session=world.session)


def test_noncontig_temp_overflow(world):
    list_pa = write_list(world.lists, data_pages(world))
    p = MsgParam(Attr.TMEM_INPUT | ATTR_NONCONTIG, list_pa | 0x10, U64 - 4, 0)
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, invoke_params(world, p), session=world.session)


def test_noncontig_temp_released_after_call(world):
    list_pa = write_list(world.lists, data_pages(world))
    p = MsgParam(Attr.TMEM_INPUT | ATTR_NONCONTIG, list_pa | 7, 2 * PAGE_SIZE, 0)
    before = snapshot(world.system)
    reply = raw(world.system, MsgCmd.INVOKE_COMMAND, invoke_params(world, p), session=world.session)
    assert reply.ret == 0xFFFF0010 and reply.params[1].b == 32
    assert snapshot(world.system) == before  # the temporary object is gone


def test_more_than_four_params_invoke(world):
    params = [MsgParam(Attr.NONE)] * 5
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, params, session=world.session)


def test_more_than_four_params_open_session(world):
    params = open_params(Sha256App.UUID) + [MsgParam(Attr.NONE)] * 5
    expect(world, BAD, MsgCmd.OPEN_SESSION, params)


def test_meta_bit_on_invoke_param(world):
    params = [MsgParam(Attr.VALUE_INPUT | ATTR_META, 1, 2, 3)]
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, params, session=world.session)


def test_meta_bit_on_third_open_session_param(world):
    params = open_params(Sha256App.UUID) + [MsgParam(Attr.VALUE_INPUT | ATTR_META)]
    expect(world, BAD, MsgCmd.OPEN_SESSION, params)


@pytest.mark.parametrize("kind", [0x4, 0x8, 0xC, 0xFF])
def test_unknown_param_type(world, kind):
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, [MsgParam(kind)], session=world.session)


def test_null_memref_needs_capability(leaks):
    with System(Config(**SMALL, memref_null=False)) as system:
        sid = open_raw(system, Sha256App.UUID)
        before = snapshot(system)
        reply = raw(system, MsgCmd.INVOKE_COMMAND, [MsgParam(Attr.TMEM_INPUT, 0, 0, 0),
                                                   MsgParam(Attr.TMEM_OUTPUT, 0, 32, 0)], session=sid)
        assert reply.ret == BAD and snapshot(system) == before


# -- sessions and commands ------------------------------------------------------------------------
def test_open_session_unknown_uuid(world):
    import uuid
    expect(world, TEE_ERROR_ITEM_NOT_FOUND, MsgCmd.OPEN_SESSION, open_params(uuid.uuid4()))


def test_open_session_without_meta(world):
    params = open_params(Sha256App.UUID)
    params[0].attr = Attr.VALUE_INPUT
    expect(world, BAD, MsgCmd.OPEN_SESSION, params)
    expect(world, BAD, MsgCmd.OPEN_SESSION, open_params(Sha256App.UUID)[:1])


def test_open_session_bad_login(world):
    expect(world, BAD, MsgCmd.OPEN_SESSION, open_params(Sha256App.UUID, login=3))


def test_uuid_octets_match_export_uuid(world):
    # export_uuid copies the 16 RFC 4122 octets: a holds octets 0..7 as a little-endian u64
    from poolsvc.tee.msg import uuid_from_value, uuid_to_value
    u = Sha256App.UUID
    a, b = uuid_to_value(u)
    assert a.to_bytes(8, "little") + b.to_bytes(8, "little") == u.bytes
    assert uuid_from_value(a, b) == u


def test_invoke_unknown_session(world):
    expect(world, BAD, MsgCmd.INVOKE_COMMAND, [], session=world.session + 100)


def test_close_session_with_params(world):
    expect(world, BAD, MsgCmd.CLOSE_SESSION, [MsgParam(Attr.NONE)], session=world.session)


def test_close_unknown_session(world):
    expect(world, BAD, MsgCmd.CLOSE_SESSION, [], session=world.session + 100)


def test_cancel_and_unknown_command(world):
    """CANCEL without an open session or with parameters: BAD_PARAMETERS (``entry_cancel``);
    an unknown command: EBADCMD at the SMC level, the message left as sent."""
    expect(world, BAD, MsgCmd.CANCEL, [], session=world.session + 100)
    expect(world, BAD, MsgCmd.CANCEL, [MsgParam()], session=world.session)
    before = snapshot(world.system)
    msg = MsgArg(cmd=99, ret=0x55, ret_origin=2).pack()
    assert world.system.tee.call_smc(msg) == (SMC_RETURN_EBADCMD, msg)
    assert snapshot(world.system) == before


def test_truncated_message_is_a_protocol_error(world):
    data = MsgArg(cmd=MsgCmd.INVOKE_COMMAND, params=[MsgParam()] * 2).pack()
    with pytest.raises(ProtocolError):
        world.system.tee.call(data[:-1])
    with pytest.raises(ProtocolError):
        world.system.tee.call(data[:20])


def test_only_size_written_back(world):
    """Outputs: size for output memrefs, a/b for output values; everything else as sent."""
    pa = world.system.config.static_base
    params = [MsgParam(Attr.TMEM_INPUT, pa, 10, 0x1111),
              MsgParam(Attr.TMEM_OUTPUT, pa + 4096, 100, 0x2222)]
    reply = raw(world.system, MsgCmd.INVOKE_COMMAND, params, session=world.session)
    assert reply.ret == 0
    assert [(p.attr, p.a, p.b, p.c) for p in reply.params] == [
        (Attr.TMEM_INPUT, pa, 10, 0x1111), (Attr.TMEM_OUTPUT, pa + 4096, 32, 0x2222)]
