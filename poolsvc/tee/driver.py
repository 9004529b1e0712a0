"""The normal-world driver side of the TEE: sessions, parameter conversion, RPC service.

This module owns what the Linux OP-TEE driver (``drivers/tee/optee``) and the
GlobalPlatform client library do between a client and the secure world:

- :class:`Session` (``Context.open_session(uuid)``): OPEN_SESSION with the
  two META values (TA UUID as RFC 4122 octets in ``a``/``b``, as
  ``export_uuid`` lays them out; client identity with the login in ``c``),
  INVOKE_COMMAND, CLOSE_SESSION.  Messages are placed in the System's message
  page and handed over by physical address (``SecureWorld.call_with_arg``).
- GlobalPlatform-style parameters, converted as the kernel converts them:
  :class:`Value`; :class:`RegisteredMemref` (a whole Shm or a range of it)
  becomes RMEM (offs, size, cookie) when the Shm is DYNAMIC, and TMEM (the
  physical address) otherwise, i.e. for static-pool and private buffers;
  :class:`TempMemref` (any buffer-protocol object) is registered for the call
  (``register_kernel_buf``) and passed as a NONCONTIG TMEM whose page list
  lives in kernel pages during the call, then released.  A buffer that cannot
  be registered (private memory, read-only, or a TEE without DYNAMIC_SHM) goes
  through a bounce buffer from the pool, copied in before and out after the
  call, as libteec does without REG_MEM.  ``TempMemref(None, size=n)`` is a
  NULL memref (needs MEMREF_NULL).
- :class:`RpcServer`: the RPC requests the secure world makes during a call.
  SHM_ALLOC (types APPL, KERNEL, GLOBAL) is served by the System's pool as a
  private buffer of the context ``tee-rpc`` (so it is never REGISTER_SHM'd
  and carries no id) and answered in the formats of DESIGN.md section 5: a
  NONCONTIG page list (TMEM_OUTPUT|NONCONTIG) from the dynamic pool, a plain
  TMEM_OUTPUT physical address from the reserved pool.  The list pages live
  until the current call returns.  The requested alignment is not honoured
  beyond the pool's own (page for dynamic, 16 bytes for static), as in Linux.
  SHM_FREE releases it by cookie.  Linux gives APPL memory from the
  supplicant's registered user buffers; here every type is a private buffer,
  charged to ``tee-rpc``, so that the secure world's cookie table holds
  exactly the normal world's registrations.

Results: ``Session.invoke`` returns an :class:`InvokeResult` (output values
and sizes per parameter) and also updates the parameter objects in place
(``Value.a/b``, ``*.size``).  A non-zero return code raises
:class:`~poolsvc.errors.TeeError` with ``code``, ``origin`` and ``result``
(so a SHORT_BUFFER tells the size needed).

Concurrency: a Session belongs to its Context's thread (the System
serialises everything); an RPC is served inside the call that makes it.
"""
from __future__ import annotations

import uuid as uuidlib
from typing import Any, Sequence

from .. import pagelist
from ..api import check_u32, parse_uuid
from ..constants import ATTR_META, ATTR_NONCONTIG, PAGE_SIZE, Attr, MsgCmd, RpcCmd, RpcShmType, ShmFlags
from ..errors import (
    TEE_SUCCESS,
    BadParameters,
    Closed,
    NotSupported,
    PoolsvcError,
    TeeError,
)
from .msg import MsgArg, MsgParam, unpack
from .params import IN, InvokeResult, ParamCall, RegisteredMemref, TempMemref, Value, raise_for
from .secure import uuid_to_value
from .ta import Login

_U32 = 0xFFFFFFFF


class _Call(ParamCall):
    """One call's parameters as message parameters (the codec's driver side).

    A RegisteredMemref becomes RMEM (offs, size, cookie) when its Shm is DYNAMIC
    and registered, else TMEM (the physical address); a registered temporary
    memref becomes a NONCONTIG TMEM whose page list lives in kernel pages until
    the call's ``close()``.
    """

    def __init__(self, ctx: Any) -> None:
        system = ctx.system
        super().__init__(ctx, can_register=system.config.dynamic_shm,
                         memref_null=system.config.memref_null)
        self.system = system
        self.msg_params: list[MsgParam] = []
        self.lists: list[Any] = []  # kernel pages of this call's page lists

    def emit_none(self) -> None:
        self.msg_params.append(MsgParam(Attr.NONE))

    def emit_value(self, a: int, b: int, d: int) -> None:
        self.msg_params.append(MsgParam(Attr.VALUE_INPUT + d, a, b, 0))

    def emit_memref(self, shm: Any, offset: int, size: int | None, d: int) -> None:
        if size is None:
            size = shm.size - offset
        if shm.flags & ShmFlags.DYNAMIC and shm.registered:
            self.msg_params.append(MsgParam(Attr.RMEM_INPUT + d, offset, size, shm.cookie))
        else:
            pos = shm.offset + offset
            pa = int(shm.pages[min(pos // PAGE_SIZE, len(shm.pages) - 1)]) + pos % PAGE_SIZE
            self.msg_params.append(MsgParam(Attr.TMEM_INPUT + d, pa, size, shm.cookie))

    def emit_null(self, size: int, d: int) -> None:
        self.msg_params.append(MsgParam(Attr.TMEM_INPUT + d, 0, size, 0))

    def emit_temp(self, shm: Any, length: int, d: int) -> None:
        nlist = pagelist.list_pages_needed(len(shm.pages))
        list_pages = self.system._alloc_kernel_pages(nlist)
        self.lists.append(list_pages)
        list_pa, _, seg, index = list_pages
        with memoryview(seg.storage.mm) as whole:
            with whole[index * PAGE_SIZE:(index + nlist) * PAGE_SIZE] as out:
                pagelist.build_into(shm.pages, shm.offset, list_pa, out)
        self.msg_params.append(MsgParam(Attr.TMEM_INPUT + d | ATTR_NONCONTIG,
                                        list_pa | shm.offset, length, shm.cookie))

    def results(self, reply: MsgArg, first: int) -> InvokeResult:
        """The InvokeResult of ``reply`` (whose TA parameters start at ``first``), applied."""
        outputs: list[tuple[tuple[int, int] | None, int | None]] = []
        for entry, p in zip(self.after, reply.params[first:]):
            if entry is None or entry[2] == IN:
                outputs.append((None, None))
            elif entry[0] == "value":
                outputs.append(((p.a & _U32, p.b & _U32), None))
            else:
                outputs.append((None, p.b))
        return self.finish(reply.ret, reply.ret_origin, outputs)

    def close(self) -> None:
        try:
            while self.lists:
                self.system._free_kernel_pages(*self.lists.pop())
        finally:
            super().close()


def call(system: Any, msg: MsgArg) -> MsgArg:
    """Place ``msg`` in the System's message page, call the secure world, read it back.

    Unlike ``System.call_tee`` this returns the answer whatever its ``ret``.
    """
    data = msg.pack()
    if len(data) > PAGE_SIZE:
        raise BadParameters(f"message of {len(msg.params)} parameters does not fit in a page")
    system._check()
    system.memory.write(system._msg_pa, data)
    system.tee.call_with_arg(system._msg_pa)
    return unpack(system.memory.read(system._msg_pa, len(data)))


class Session:
    """A session with a trusted app, opened by ``Context.open_session(uuid)``.

    Attributes: ``id`` (the secure world's session id), ``uuid``, ``context``,
    ``closed``, ``open_result`` (the OPEN_SESSION outputs).  Use as a context
    manager or call :meth:`close`.
    """

    open_result: InvokeResult  # set by open()

    def __init__(self, context: Any, session_id: int, uuid: uuidlib.UUID) -> None:
        self.context = context
        self.id = session_id
        self.uuid = uuid
        self.closed = False

    @classmethod
    def open(cls, context: Any, uuid: uuidlib.UUID | str, params: Sequence[Any] = (),
             login: int = Login.PUBLIC, client_uuid: uuidlib.UUID | str | None = None) -> "Session":
        """OPEN_SESSION with the app ``uuid`` and up to 4 params.

        Raises TeeError (ITEM_NOT_FOUND for an unknown app, or the app's
        code), BadParameters for a bad UUID or params, Closed for a closed
        context.
        """
        context._check()
        ta_uuid = parse_uuid(uuid)
        client = uuidlib.UUID(int=0) if client_uuid is None else parse_uuid(client_uuid)
        login = check_u32(login, "login")
        meta = [MsgParam(Attr.VALUE_INPUT | ATTR_META, *uuid_to_value(ta_uuid), 0),
                MsgParam(Attr.VALUE_INPUT | ATTR_META, *uuid_to_value(client), int(login))]
        with _Call(context) as conv:
            conv.add_all(params)
            reply = call(context.system, MsgArg(cmd=MsgCmd.OPEN_SESSION, params=meta + conv.msg_params))
            result = conv.results(reply, 2)
        raise_for(f"open session with {ta_uuid}", result)
        session = cls(context, reply.session, ta_uuid)
        session.open_result = result
        context.sessions[session.id] = session
        return session

    def invoke(self, func: int, params: Sequence[Any] = ()) -> InvokeResult:
        """INVOKE_COMMAND ``func`` with up to 4 params; returns the outputs.

        Raises TeeError (code, origin, ``result``) on a non-zero answer,
        BadParameters for bad params, Closed after close().
        """
        self._check()
        func = check_u32(func, "command")
        with _Call(self.context) as conv:
            conv.add_all(params)
            reply = call(self.context.system, MsgArg(cmd=MsgCmd.INVOKE_COMMAND, func=func,
                                                     session=self.id, params=conv.msg_params))
            result = conv.results(reply, 0)
        raise_for(f"invoke {func} on session {self.id}", result)
        return result

    def _check(self) -> None:
        if self.closed:
            raise Closed(f"session {self.id} is closed")
        self.context._check()

    def close(self) -> None:
        """CLOSE_SESSION. Idempotent; a session the secure world already ended just closes."""
        if self.closed:
            return
        self.closed = True
        self.context.sessions.pop(self.id, None)
        system = self.context.system
        if system.closed or self.id not in system.tee.sessions:
            return
        reply = call(system, MsgArg(cmd=MsgCmd.CLOSE_SESSION, session=self.id))
        if reply.ret != TEE_SUCCESS:
            raise TeeError(f"close session {self.id}: secure world answered {reply.ret:#x}",
                           reply.ret, reply.ret_origin)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.uuid}{' closed' if self.closed else ''}>"


def close_context_sessions(ctx: Any) -> None:
    """Close every session of ``ctx`` (Context.close calls this first).

    When ``ctx`` is the RPC server's context, every session still holding
    RPC memory is closed first, so that no secure-world object outlives the
    memory it points to.
    """
    rpc = getattr(ctx.system.tee, "rpc", None)
    if isinstance(rpc, RpcServer) and rpc.ctx is ctx:
        ctx.system.tee.close_rpc_users()
        rpc.drop_context()
    for session in list(ctx.sessions.values()):
        try:
            session.close()
        except PoolsvcError:
            pass


class RpcServer:
    """Serves the secure world's RPC requests (SHM_ALLOC, SHM_FREE) from a System's pools.

    ``handle(msg)`` fills ``ret`` and the answer in place; ``call_done()``
    frees the page lists made during the call that just ended.
    Invariant: ``shms`` maps each cookie handed out and not yet freed.
    """

    CONTEXT_NAME = "tee-rpc"

    def __init__(self, system: Any) -> None:
        self.system = system
        self.ctx: Any = None
        self.shms: dict[int, Any] = {}
        self._lists: list[tuple[int, int, Any, int]] = []

    def _context(self) -> Any:
        if self.ctx is None or self.ctx.closed:
            self.shms.clear()
            self.ctx = self.system.open_context(self.CONTEXT_NAME)
        return self.ctx

    def drop_context(self) -> None:
        """The context is closing: forget it and its buffers (it releases them)."""
        self.shms.clear()
        self.ctx = None

    def handle(self, msg: MsgArg) -> None:
        """Serve one RPC message in place."""
        msg.ret = TEE_SUCCESS
        try:
            if msg.cmd == RpcCmd.SHM_ALLOC:
                self._shm_alloc(msg)
            elif msg.cmd == RpcCmd.SHM_FREE:
                self._shm_free(msg)
            else:
                raise NotSupported(f"RPC command {msg.cmd} is not supported")
        except PoolsvcError as exc:
            msg.ret = exc.tee_code

    @staticmethod
    def _value(msg: MsgArg) -> MsgParam:
        if len(msg.params) != 1 or msg.params[0].attr != Attr.VALUE_INPUT:
            raise BadParameters("RPC expects one VALUE_INPUT parameter")
        p = msg.params[0]
        if p.a not in (RpcShmType.APPL, RpcShmType.KERNEL, RpcShmType.GLOBAL):
            raise BadParameters(f"RPC shm type {p.a} is not APPL, KERNEL or GLOBAL")
        return p

    def _shm_alloc(self, msg: MsgArg) -> None:
        p = self._value(msg)
        size = p.b
        if size == 0:
            raise BadParameters("RPC SHM_ALLOC of 0 bytes")
        shm = self._context().alloc_priv_buf(size)
        try:
            if self.system.pool == "dynamic":
                nlist = pagelist.list_pages_needed(len(shm.pages))
                list_pages = self.system._alloc_kernel_pages(nlist)
                self._lists.append(list_pages)
                list_pa, _, seg, index = list_pages
                with memoryview(seg.storage.mm) as whole:
                    with whole[index * PAGE_SIZE:(index + nlist) * PAGE_SIZE] as out:
                        pagelist.build_into(shm.pages, shm.offset, list_pa, out)
                answer = MsgParam(Attr.TMEM_OUTPUT | ATTR_NONCONTIG, list_pa | shm.offset,
                                  shm.size, shm.cookie)
            else:
                answer = MsgParam(Attr.TMEM_OUTPUT, shm.paddr, shm.size, shm.cookie)
        except BaseException:
            shm.close()
            raise
        self.shms[shm.cookie] = shm
        msg.params[0] = answer

    def _shm_free(self, msg: MsgArg) -> None:
        p = self._value(msg)
        shm = self.shms.pop(p.b, None)
        if shm is None:
            raise BadParameters(f"RPC SHM_FREE of unknown cookie {p.b:#x}")
        if not shm.closed:
            shm.close()

    def call_done(self) -> None:
        """Free the page lists of the call that just returned."""
        while self._lists:
            self.system._free_kernel_pages(*self._lists.pop())

    def stats(self) -> dict[str, int]:
        """Live RPC buffers and their bytes."""
        return {"buffers": len(self.shms), "bytes": sum(s.size for s in self.shms.values())}


__all__ = ["InvokeResult", "RegisteredMemref", "RpcServer", "Session", "TempMemref", "Value",
           "call", "close_context_sessions"]
