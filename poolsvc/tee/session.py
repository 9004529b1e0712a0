"""Sessions with trusted apps, as the GlobalPlatform client library and the OP-TEE
driver run them: OPEN_SESSION, INVOKE_COMMAND, CLOSE_SESSION.

- :class:`Session` (``Context.open_session(uuid)``): OPEN_SESSION with the
  two META values (TA UUID as RFC 4122 octets in ``a``/``b``, as
  ``export_uuid`` lays them out; client identity with the login in ``c``),
  INVOKE_COMMAND, CLOSE_SESSION, each through the System's driver
  (``poolsvc/tee/driver.py``).
- Parameters (``poolsvc/tee/params.py``) become message parameters as the
  kernel converts them: :class:`~poolsvc.tee.params.Value`;
  a :class:`~poolsvc.tee.params.RegisteredMemref` (a whole Shm or a range of
  it) becomes RMEM (offs, size, cookie) when the Shm is DYNAMIC and
  registered, and TMEM (the physical address) otherwise, i.e. for static-pool
  and private buffers; a :class:`~poolsvc.tee.params.TempMemref` registered
  for the call becomes a NONCONTIG TMEM whose page list lives in kernel pages
  during the call; a bounced one travels as its bounce buffer does.

Results: ``Session.invoke`` returns an :class:`~poolsvc.tee.params.InvokeResult`
(output values and sizes per parameter) and also updates the parameter
objects in place (``Value.a/b``, ``*.size``).  A non-zero return code raises
:class:`~poolsvc.errors.TeeError` with ``code``, ``origin`` and ``result``
(so a SHORT_BUFFER tells the size needed).

Concurrency: a Session belongs to its Context's thread (the System
serialises everything); an RPC is served inside the call that makes it.
:meth:`Session.cancel` is the exception: any thread may call it while the
Session's thread is inside a call.
"""
from __future__ import annotations

import uuid as uuidlib
from typing import Any, Sequence

from ..api import check_u32, parse_uuid
from ..constants import ATTR_META, ATTR_NONCONTIG, PAGE_SIZE, Attr, MsgCmd, ShmFlags
from ..errors import TEE_SUCCESS, Closed, PoolsvcError, TeeError
from .driver import KernelPages
from .msg import MsgArg, MsgParam, uuid_to_value
from .params import IN, InvokeResult, ParamCall, raise_for
from .rpc import RpcServer
from .ta import Login

_U32 = 0xFFFFFFFF


class _Call(ParamCall):
    """One call's parameters as message parameters (the codec's driver side).

    A RegisteredMemref becomes RMEM (offs, size, cookie) when its Shm is DYNAMIC
    and registered, else TMEM (the physical address); a registered temporary
    memref becomes a NONCONTIG TMEM whose page list lives in kernel pages until
    the call's ``close()``.  Each memref's Shm is held by one reference until
    ``close()`` (``tee_core``'s ``params_from_user`` / ``free_params``), so a
    ``Shm.close()`` during the call takes effect when the call returns.
    """

    def __init__(self, ctx: Any) -> None:
        system = ctx.system
        super().__init__(ctx, can_register=system.config.dynamic_shm,
                         memref_null=system.config.memref_null)
        self.driver = system.driver
        self.msg_params: list[MsgParam] = []
        self.lists: list[KernelPages] = []  # this call's page lists
        self.held: list[Any] = []  # the memrefs' shms, one reference each

    def emit_none(self) -> None:
        self.msg_params.append(MsgParam(Attr.NONE))

    def emit_value(self, a: int, b: int, d: int) -> None:
        self.msg_params.append(MsgParam(Attr.VALUE_INPUT + d, a, b, 0))

    def emit_memref(self, shm: Any, offset: int, size: int | None, d: int) -> None:
        shm.acquire()
        self.held.append(shm)
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
        kpages = self.driver.page_list(shm.pages, shm.offset)
        self.lists.append(kpages)
        self.msg_params.append(MsgParam(Attr.TMEM_INPUT + d | ATTR_NONCONTIG,
                                        kpages.pa | shm.offset, length, shm.cookie))

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
                self.driver.free_kernel_pages(self.lists.pop())
            while self.held:
                shm = self.held.pop()
                if not shm.closed:  # (its context may have closed during the call)
                    shm.close()
        finally:
            super().close()


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
        driver = context.system.driver
        driver.hold_cancel()  # the session's CANCEL needs the driver's cancel message
        try:
            with _Call(context) as conv:
                conv.add_all(params)
                reply = driver.call(MsgArg(cmd=MsgCmd.OPEN_SESSION, params=meta + conv.msg_params))
                result = conv.results(reply, 2)
            raise_for(f"open session with {ta_uuid}", result)
        except BaseException:
            driver.release_cancel()
            raise
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
            reply = self.context.system.driver.call(MsgArg(cmd=MsgCmd.INVOKE_COMMAND, func=func,
                                                     session=self.id, params=conv.msg_params))
            result = conv.results(reply, 0)
        raise_for(f"invoke {func} on session {self.id}", result)
        return result

    def cancel(self, cancel_id: int = 0) -> None:
        """Ask the secure world to cancel what this session runs (TEE_IOC_CANCEL).

        Sends OPTEE_MSG_CMD_CANCEL for the session (``optee_cancel_req``);
        may be called from any thread, also while another thread is inside
        :meth:`invoke` of this session.  The app sees the request when it
        checks for cancellation; the flag stays set for the session's life.
        Raises Closed for a closed session or System.
        """
        self._check()
        self.context.system.driver.cancel(self.id, check_u32(cancel_id, "cancel_id"))

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
        if system.driver is not None:
            system.driver.release_cancel()
        if system.closed or self.id not in system.tee.sessions:
            return
        reply = system.driver.call(MsgArg(cmd=MsgCmd.CLOSE_SESSION, session=self.id))
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


__all__ = ["Session", "close_context_sessions"]
