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
from dataclasses import dataclass, field
from typing import Any, Sequence

from .. import pagelist
from ..api import check_param_count, check_u32, parse_uuid
from ..constants import ATTR_META, ATTR_NONCONTIG, PAGE_SIZE, Attr, MsgCmd, RpcCmd, RpcShmType, ShmFlags
from ..errors import (
    TEE_SUCCESS,
    BadParameters,
    Closed,
    NotSharedMemory,
    NotSupported,
    PoolsvcError,
    TeeError,
)
from .msg import MsgArg, MsgParam, unpack
from .secure import uuid_to_value
from .ta import Login

_DIRECTIONS = {"in": 0, "out": 1, "inout": 2}


def _direction(value: str) -> int:
    try:
        return _DIRECTIONS[value]
    except (KeyError, TypeError):
        raise BadParameters(f"direction {value!r} is not 'in', 'out' or 'inout'") from None


@dataclass
class Value:
    """A value parameter (``TEEC_VALUE_*``): ``a``, ``b`` (u32), direction."""

    a: int = 0
    b: int = 0
    direction: str = "in"


@dataclass
class RegisteredMemref:
    """A range of a Shm (``TEEC_MEMREF_PARTIAL_*``; the whole Shm when size is None).

    After the call ``size`` holds what the secure world reported (OUTPUT/INOUT).
    """

    shm: Any
    offset: int = 0
    size: int | None = None
    direction: str = "inout"


@dataclass
class TempMemref:
    """A temporary memory reference (``TEEC_MEMREF_TEMP_*``) to a buffer-protocol object.

    ``buffer=None`` with a ``size`` is a NULL memref.  After the call ``size``
    holds what the secure world reported (OUTPUT/INOUT).
    """

    buffer: Any
    direction: str = "inout"
    size: int | None = None


@dataclass
class InvokeResult:
    """What a call returned: ``ret``, ``origin``, and per parameter ``values`` ((a, b)
    for output values, else None) and ``sizes`` (for output memrefs, else None)."""

    ret: int
    origin: int
    values: list[tuple[int, int] | None] = field(default_factory=list)
    sizes: list[int | None] = field(default_factory=list)


class _Call:
    """One call's conversions: the message parameters and what to undo afterwards."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.system = ctx.system
        self.msg_params: list[MsgParam] = []
        self.after: list[Any] = []  # per param: (kind, param, extra)
        self.cleanups: list[Any] = []

    # -- to the message ------------------------------------------------------------------
    def add(self, param: Any) -> None:
        if param is None:
            self.msg_params.append(MsgParam(Attr.NONE))
            self.after.append(None)
        elif isinstance(param, Value):
            d = _direction(param.direction)
            self.msg_params.append(MsgParam(Attr.VALUE_INPUT + d, check_u32(param.a, "value a"),
                                            check_u32(param.b, "value b"), 0))
            self.after.append(("value", param, d))
        elif isinstance(param, RegisteredMemref):
            self._registered(param)
        elif isinstance(param, TempMemref):
            self._temp(param)
        elif hasattr(param, "cookie") and hasattr(param, "pages"):  # a bare Shm: whole, inout
            self._registered(RegisteredMemref(param))
        else:
            raise BadParameters(f"parameter {param!r} is not None, Value, RegisteredMemref, "
                                "TempMemref or Shm")

    def _registered(self, ref: RegisteredMemref, bounce: tuple[Any, Any] | None = None) -> None:
        shm = ref.shm
        d = _direction(ref.direction)
        if getattr(shm, "context", None) is not self.ctx:
            raise BadParameters(f"shm {shm!r} does not belong to context {self.ctx.name}")
        if shm.closed:
            raise Closed(f"shm {shm!r} is released")
        size = shm.size - ref.offset if ref.size is None else ref.size
        for what, v in (("offset", ref.offset), ("size", size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BadParameters(f"memref {what} {v!r} is not a non-negative int")
        if ref.offset + size > shm.size:
            raise BadParameters(f"memref [{ref.offset:#x}, {ref.offset + size:#x}) is beyond the "
                                f"{shm.size:#x} bytes of the shm")
        if shm.flags & ShmFlags.DYNAMIC and shm.registered:
            self.msg_params.append(MsgParam(Attr.RMEM_INPUT + d, ref.offset, size, shm.cookie))
        else:
            pos = shm.offset + ref.offset
            pa = int(shm.pages[min(pos // PAGE_SIZE, len(shm.pages) - 1)]) + pos % PAGE_SIZE
            self.msg_params.append(MsgParam(Attr.TMEM_INPUT + d, pa, size, shm.cookie))
        self.after.append(("memref", ref, d) if bounce is None else ("bounce", bounce, d))

    def _temp(self, ref: TempMemref) -> None:
        d = _direction(ref.direction)
        config = self.system.config
        if ref.buffer is None:
            size = 0 if ref.size is None else ref.size
            if not config.memref_null:
                raise BadParameters("NULL memref without the MEMREF_NULL capability")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadParameters(f"NULL memref size {size!r}")
            self.msg_params.append(MsgParam(Attr.TMEM_INPUT + d, 0, size, 0))
            self.after.append(("memref", ref, d))
            return
        try:
            view = memoryview(ref.buffer)
        except TypeError:
            raise BadParameters(f"{type(ref.buffer).__name__} does not support the buffer protocol") from None
        with view:
            length = view.nbytes
            readonly = view.readonly
        if ref.size is not None and ref.size != length:
            raise BadParameters(f"temporary memref size {ref.size!r} differs from the buffer's "
                                f"{length} bytes")
        if length == 0:
            if not config.memref_null:
                raise BadParameters("empty temporary memref without the MEMREF_NULL capability")
            self.msg_params.append(MsgParam(Attr.TMEM_INPUT + d, 0, 0, 0))
            self.after.append(("memref", ref, d))
            return
        shm = None
        if config.dynamic_shm and not readonly:  # read-only memory cannot be registered
            try:
                shm = self.ctx.register_kernel_buf(ref.buffer)
            except (NotSharedMemory, NotSupported):
                shm = None
        if shm is not None:
            self.cleanups.append(shm.close)
            nlist = pagelist.list_pages_needed(len(shm.pages))
            list_pages = self.system._alloc_kernel_pages(nlist)
            self.cleanups.append(lambda: self.system._free_kernel_pages(*list_pages))
            list_pa, _, seg, index = list_pages
            with memoryview(seg.storage.mm) as whole:
                with whole[index * PAGE_SIZE:(index + nlist) * PAGE_SIZE] as out:
                    pagelist.build_into(shm.pages, shm.offset, list_pa, out)
            self.msg_params.append(MsgParam(Attr.TMEM_INPUT + d | ATTR_NONCONTIG,
                                            list_pa | shm.offset, length, shm.cookie))
            self.after.append(("memref", ref, d))
            return
        bounce = self.ctx.alloc_kernel_buf(length)
        self.cleanups.append(bounce.close)
        if d != 1:  # in, inout: copy in
            with memoryview(ref.buffer) as src, bounce.view() as dst:
                dst[:length] = src.cast("B")
        self._registered(RegisteredMemref(bounce, 0, length, ref.direction), bounce=(ref, bounce))

    # -- from the message ------------------------------------------------------------------
    def results(self, reply: MsgArg, first: int) -> InvokeResult:
        result = InvokeResult(reply.ret, reply.ret_origin)
        for entry, p in zip(self.after, reply.params[first:]):
            value: tuple[int, int] | None = None
            size: int | None = None
            if entry is not None:
                kind, obj, d = entry
                if kind == "value":
                    if d != 0:
                        obj.a, obj.b = p.a & 0xFFFFFFFF, p.b & 0xFFFFFFFF
                        value = (obj.a, obj.b)
                elif d != 0:
                    size = p.b
                    if kind == "bounce":
                        ref, bounce = obj
                        if reply.ret == TEE_SUCCESS:
                            with memoryview(ref.buffer) as dst, bounce.view() as src:
                                flat = dst.cast("B")
                                n = min(size, len(flat))
                                flat[:n] = src[:n]
                        obj = ref
                    obj.size = size
            result.values.append(value)
            result.sizes.append(size)
        return result

    def cleanup(self) -> None:
        errors = []
        for fn in reversed(self.cleanups):
            try:
                fn()
            except PoolsvcError as exc:
                errors.append(exc)
        self.cleanups.clear()
        if errors:
            raise errors[0]


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


def _raise(what: str, result: InvokeResult) -> None:
    exc = TeeError(f"{what}: secure world answered {result.ret:#x} (origin {result.origin})",
                   result.ret, result.origin)
    exc.result = result  # type: ignore[attr-defined]
    raise exc


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
        check_param_count(params)
        meta = [MsgParam(Attr.VALUE_INPUT | ATTR_META, *uuid_to_value(ta_uuid), 0),
                MsgParam(Attr.VALUE_INPUT | ATTR_META, *uuid_to_value(client), int(login))]
        conv = _Call(context)
        try:
            for p in params:
                conv.add(p)
            reply = call(context.system, MsgArg(cmd=MsgCmd.OPEN_SESSION, params=meta + conv.msg_params))
            result = conv.results(reply, 2)
        finally:
            conv.cleanup()
        if result.ret != TEE_SUCCESS:
            _raise(f"open session with {ta_uuid}", result)
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
        check_param_count(params)
        conv = _Call(self.context)
        try:
            for p in params:
                conv.add(p)
            reply = call(self.context.system, MsgArg(cmd=MsgCmd.INVOKE_COMMAND, func=func,
                                                     session=self.id, params=conv.msg_params))
            result = conv.results(reply, 0)
        finally:
            conv.cleanup()
        if result.ret != TEE_SUCCESS:
            _raise(f"invoke {func} on session {self.id}", result)
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
