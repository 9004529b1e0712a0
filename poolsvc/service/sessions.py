"""The pool service's handlers of sessions with trusted apps, and their parameter codec.

OPEN_SESSION, INVOKE and CLOSE_SESSION run against the connection's Context.
CANCEL (on any connection, a MONITOR one in practice: the CONTEXT connection
is busy with the INVOKE) cancels a session of a context of the sender's own
process, told by the peer pid each connection records.
Parameters come off the wire as driver parameters (``poolsvc.tee.driver``);
a memref names one of the client's *own* shms by cookie, never another's.
A trusted app's non-zero return code travels in an OK reply with its
outputs (see ``protocol``, RESULT).

A memref to a buffer the client *registered* is bounced (see
:class:`~.provider.RegisteredFiles`): its range is copied from the client's
object into the daemon's shadow before the call (every direction, so that
bytes the app does not write keep the client's values) and back after it
(OUTPUT and INOUT).  An object the client shrank fails the request with
NotSharedMemory; the daemon never faults on it.  Open sessions per client
are bounded (``max_sessions_per_client``).

Concurrency: the daemon's loop thread only.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from ..errors import BadParameters, ItemNotFound, OutOfMemory, ProtocolError, TeeError
from . import protocol as P
from .connection import Connection, ServerParts
from .provider import RegisteredFiles, Registration

#: A registered memref's bounce: (registration, start, end, copy back after the call).
Bounce = tuple[Registration, int, int, bool]
_DIRECTIONS = ("in", "out", "inout")


def rpc_bytes_by_session(tee: Any) -> dict[int, int]:
    """The RPC memory trusted apps hold, by secure-world session id."""
    held: dict[int, int] = {}
    for memory in tee.rpc_shms.values():
        if not memory.freed:
            held[memory.session_id] = held.get(memory.session_id, 0) + memory.capacity
    return held


def rpc_bytes_of(connections: Iterable[Connection], tee: Any, pid: int) -> int:
    """The RPC memory trusted apps hold for the sessions of client process ``pid``."""
    if not tee.rpc_shms:
        return 0
    by_session = rpc_bytes_by_session(tee)
    return sum(by_session.get(sid, 0) for conn in connections
               if conn.pid == pid and conn.context is not None for sid in conn.context.sessions)


def session_owner(connections: Iterable[Connection], session_id: int, pid: int | None = None) -> Connection | None:
    """The CONTEXT connection whose context holds session ``session_id`` (of client
    process ``pid`` when given), or None."""
    for conn in connections:
        ctx = conn.context
        if ctx is not None and session_id in ctx.sessions and (pid is None or conn.pid == pid):
            return conn
    return None


class SessionHandlers(ServerParts):
    """Request handlers for OPEN_SESSION, INVOKE, CLOSE_SESSION and CANCEL."""

    def _session_params(self, conn: Connection, body: Any, pos: int) -> tuple[list[Any], list[Bounce]]:
        """Driver parameters from the wire (memrefs name the client's own shms only),
        and the bounces of the registered buffers they name."""
        from ..tee import driver

        (count,) = P.COOKIE.unpack_from(body, pos)
        pos += P.COOKIE.size
        if count > P.MAX_PARAMS:
            raise BadParameters(f"{count} parameters; a trusted app takes at most {P.MAX_PARAMS}")
        if len(body) != pos + count * P.PARAM.size:
            raise ProtocolError(f"{count} parameters need {pos + count * P.PARAM.size} bytes of "
                                f"body, got {len(body)}")
        params: list[Any] = []
        bounces: list[Bounce] = []
        shms = conn.context.shms
        for i in range(count):
            word, a, b, c = P.PARAM.unpack_from(body, pos + i * P.PARAM.size)
            kind, direction = word & 0xFF, (word >> 8) & 0xFF
            if direction > 2 or word & ~(0xFFFF | P.PARAM_WHOLE):
                raise BadParameters(f"parameter {i}: kind word {word:#x} is malformed")
            dname = _DIRECTIONS[direction]
            if kind == P.ParamKind.NONE:
                params.append(None)
            elif kind == P.ParamKind.VALUE:
                params.append(driver.Value(a, b, dname))
            elif kind == P.ParamKind.MEMREF:
                shm = shms.get(a)
                if shm is None:
                    raise ItemNotFound(f"parameter {i}: no shm with cookie {a:#x} in this client's context")
                size = None if word & P.PARAM_WHOLE else c
                params.append(driver.RegisteredMemref(shm, b, size, dname))
                reg = conn.registered.get(a)
                if reg is not None and reg.storage is not None:
                    bounces.append((reg, b, reg.length if size is None else b + size, direction != 0))
            elif kind == P.ParamKind.NULL_MEMREF:
                params.append(driver.TempMemref(None, dname, c))
            else:
                raise BadParameters(f"parameter {i}: unknown kind {kind}")
        return params, bounces

    def _charged(self, conn: Connection, call: Callable[[], Any]) -> Any:
        """``call()`` with the RPC memory a trusted app asks for meanwhile charged to
        ``conn``'s byte quota: an RPC SHM_ALLOC over it is answered OUT_OF_MEMORY
        (the app sees it; the refusal is logged, naming the limit)."""
        limit = self._max_bytes
        if not limit:
            return call()
        pinned = conn.pinned
        system = self.system

        def admit(size: int) -> None:
            rpc = rpc_bytes_of(self.connections.values(), system.tee, pinned.pid)
            held = pinned.allocated + pinned.registered + rpc
            if held + size > limit:
                msg = (f"RPC SHM_ALLOC of {size} bytes for client pid {pinned.pid} refused: "
                       f"{held} bytes pinned ({pinned.allocated} allocated, {pinned.registered} "
                       f"registered, {rpc} RPC), over max_bytes_per_client {limit}")
                self._log_limited("rpc-quota", logging.WARNING, "%s", msg)
                raise OutOfMemory(msg)

        system.rpc_admit = admit
        try:
            return call()
        finally:
            system.rpc_admit = None

    @staticmethod
    def _bounced(bounces: list[Bounce], call: Callable[[], Any]) -> Any:
        """``call()`` with the registered buffers it names copied in before and out after."""
        if not bounces:
            return call()
        for reg, start, end, _ in bounces:
            RegisteredFiles.copy_in(reg, start, end)
        try:
            return call()
        finally:
            for reg, start, end, back in bounces:
                if back:
                    RegisteredFiles.copy_out(reg, start, end)

    @staticmethod
    def _session_result(result: Any) -> bytes:
        out = [P.RESULT.pack(result.ret & 0xFFFFFFFF, result.origin & 0xFFFFFFFF, len(result.values))]
        for value, size in zip(result.values, result.sizes):
            if value is not None:
                out.append(P.OUTPUT.pack(P.OutputKind.VALUE, value[0], value[1]))
            elif size is not None:
                out.append(P.OUTPUT.pack(P.OutputKind.SIZE, size, 0))
            else:
                out.append(P.OUTPUT.pack(P.OutputKind.NONE, 0, 0))
        return b"".join(out)

    def _op_open_session(self, conn: Connection, body: Any) -> bytes:
        import uuid as uuidlib

        ctx = conn.context
        if len(ctx.sessions) >= self._max_sessions:
            raise P.LimitExceeded(f"client has {len(ctx.sessions)} sessions open, the daemon's limit "
                                  f"(max_sessions_per_client {self._max_sessions})")
        if len(body) < 16 + P.COOKIE.size * 2:
            raise ProtocolError(f"OPEN_SESSION body of {len(body)} bytes is shorter than 32")
        ta_uuid = uuidlib.UUID(bytes=bytes(body[:16]))
        (login,) = P.COOKIE.unpack_from(body, 16)
        if login > 0xFFFFFFFF:
            raise BadParameters(f"login {login:#x} is not a u32")
        params, bounces = self._session_params(conn, body, 16 + P.COOKIE.size)
        try:
            session = self._charged(conn, lambda: self._bounced(
                bounces, lambda: ctx.open_session(ta_uuid, params, login)))
        except TeeError as exc:
            result = getattr(exc, "result", None)
            if result is None:
                raise
            return P.COOKIE.pack(0) + self._session_result(result)
        return P.COOKIE.pack(session.id) + self._session_result(session.open_result)

    def _op_invoke(self, conn: Connection, body: Any) -> bytes:
        session_id, func, _ = P.SESSION.unpack_from(body)
        session = conn.context.sessions.get(session_id)
        if session is None:
            raise ItemNotFound(f"no session {session_id} in this client's context")
        params, bounces = self._session_params(conn, body, P.SESSION.size)
        try:
            result = self._charged(conn, lambda: self._bounced(
                bounces, lambda: session.invoke(func, params)))
        except TeeError as exc:
            result = getattr(exc, "result", None)
            if result is None:
                raise
        return self._session_result(result)

    def _op_close_session(self, conn: Connection, body: Any) -> bytes:
        (session_id,) = P.COOKIE.unpack(body)
        session = conn.context.sessions.get(session_id)
        if session is None:
            raise ItemNotFound(f"no session {session_id} in this client's context")
        session.close()
        return b""

    def _op_cancel(self, conn: Connection, body: Any) -> bytes:
        """CANCEL of a session of the sender's own process (on any of its connections).

        Sets the session's cancel flag in the secure world (TEE_IOC_CANCEL); the
        OK says nothing about whether the app saw it.  Raises ItemNotFound when
        no context of the sender's process holds the session.
        """
        session_id, cancel_id, reserved = P.SESSION.unpack(body)
        if reserved:
            raise BadParameters(f"CANCEL reserved word is {reserved:#x}, not 0")
        owner = session_owner(self.connections.values(), session_id, conn.pid)
        if owner is None:
            raise ItemNotFound(f"no session {session_id} in a context of client pid {conn.pid}")
        owner.context.sessions[session_id].cancel(cancel_id)
        return b""


__all__ = ["SessionHandlers", "rpc_bytes_by_session", "rpc_bytes_of", "session_owner"]
