"""The secure world's sessions with trusted apps: OPEN_SESSION, INVOKE_COMMAND,
CLOSE_SESSION, and running app code.

- OPEN_SESSION: the first two parameters are ``VALUE_INPUT | META`` (TA UUID
  as RFC 4122 octets in ``a``/``b``; client UUID in ``a``/``b`` and login
  in ``c`` of the second), then at most 4 TA parameters.  Unknown UUID:
  ITEM_NOT_FOUND.  INVOKE_COMMAND: at most 4 parameters; unknown session:
  BAD_PARAMETERS.  CLOSE_SESSION: no parameters; unknown session:
  BAD_PARAMETERS.  CANCEL: no parameters and an open session (else
  BAD_PARAMETERS); it sets the session's cancel flag and answers SUCCESS
  (``entry_cancel`` / ``tee_ta_cancel_command``).  The flag stays set for the
  session's life (OP-TEE never clears ``sess->cancel``).  An app sees it
  through its :class:`SessionEnv`: ``cancel_requested`` (the raw flag),
  ``cancellation_flag`` (TEE_GetCancellationFlag: the flag unless
  cancellation is masked, which it is when a session starts, as
  ``tee_ta_init_session`` sets ``cancel_mask``) and :meth:`SessionEnv.wait`
  (TEE_Wait: TEE_ERROR_CANCEL once the flag is set and unmasked).
- A trusted app's own errors carry origin TRUSTED_APP; an app that raises
  anything else, or whose code is not a u32 (or is 0 on an error), has
  panicked: TARGET_DEAD, and its session is dead.  The app gets a copy of
  the params list; what is written back is decided by the message's attrs.
- Memory an app still holds when its session closes is freed by the secure
  world.

Concurrency: one call at a time (the System serialises); a session inside a
call is ``running`` and refuses a re-entrant call (BUSY).  The one exception
is CANCEL, which another thread may send while a call runs (the driver's
``Driver.cancel``, as OP-TEE serves it on another thread): :meth:`_cancel`
only looks a session up and sets its ``cancelled`` event, which a waiting
app (:meth:`SessionEnv.wait`) wakes on.  A world whose ``wait_hook`` is set
waits through it instead (the pool service daemon reads the waiting client's
CANCEL there, on the thread the app runs on).
"""
from __future__ import annotations

import logging
import operator
import threading
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ..constants import ATTR_META, Attr, Origin, RpcShmType
from ..errors import TEE_ERROR_CANCEL, TEE_SUCCESS, BadParameters, Busy, Closed, ItemNotFound, PoolsvcError
from .msg import MsgArg, MsgParam, uuid_from_value
from .secure_rpc import RpcMemory
from .ta import TEE_ERROR_TARGET_DEAD, Login, Param, TrustedApp

_META_ATTR = Attr.VALUE_INPUT | ATTR_META
log = logging.getLogger("poolsvc.tee")


@dataclass
class TaSession:
    """A session with a trusted app (``id`` is what ``msg.session`` carries)."""

    id: int
    uuid: uuidlib.UUID
    app: TrustedApp
    login: int
    client_uuid: uuidlib.UUID
    dead: bool = False
    running: int = 0
    #: set by CANCEL, never cleared (OP-TEE's ``sess->cancel``); set from any thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: cancellation masked (TEE_MaskCancellation), as every session starts
    cancel_mask: bool = True
    #: a TEE_Wait over the world's bound was refused (logged once per session)
    wait_refused: bool = False
    rpc: dict[int, RpcMemory] = field(default_factory=dict)

    @property
    def cancel_requested(self) -> bool:
        """True once the normal world sent CANCEL for this session."""
        return self.cancelled.is_set()


class SessionEnv:
    """What a trusted app's instance may use of the secure world: its session and RPC.

    Attributes: ``session_id``, ``uuid`` (the app's), ``login`` and
    ``client_uuid`` (the client identity of OPEN_SESSION).
    """

    def __init__(self, world: Any, session: TaSession) -> None:
        self._world = world
        self._session = session
        self.session_id = session.id
        self.uuid = session.uuid
        self.login = session.login
        self.client_uuid = session.client_uuid
        self.closing = False

    @property
    def cancel_requested(self) -> bool:
        """True once the normal world sent CANCEL for this session (masked or not)."""
        return self._session.cancel_requested

    @property
    def cancellation_flag(self) -> bool:
        """TEE_GetCancellationFlag: the cancel flag, False while cancellation is masked."""
        return not self._session.cancel_mask and self._session.cancel_requested

    def mask_cancellation(self) -> bool:
        """TEE_MaskCancellation: mask cancellation; returns whether it was masked."""
        was, self._session.cancel_mask = self._session.cancel_mask, True
        return was

    def unmask_cancellation(self) -> bool:
        """TEE_UnmaskCancellation: unmask cancellation; returns whether it was masked."""
        was, self._session.cancel_mask = self._session.cancel_mask, False
        return was

    def wait(self, timeout_ms: int) -> int:
        """TEE_Wait: wait ``timeout_ms`` milliseconds (0xFFFFFFFF: forever).

        Returns TEE_SUCCESS when the time has passed, TEE_ERROR_CANCEL as soon
        as the session is cancelled with cancellation unmasked (at once when
        it already is).  A masked wait is not interrupted.  A wait longer than
        the world's ``max_wait_ms`` (forever included) raises Busy at once,
        unless the session is already cancelled.  An unmasked wait goes
        through the world's ``wait_hook`` when one is set.
        """
        forever = timeout_ms == 0xFFFFFFFF
        bound = self._world.max_wait_ms
        if bound is not None and (forever or timeout_ms > bound) and not self.cancellation_flag:
            msg = (f"session {self.session_id}: TEE_Wait of {'forever' if forever else f'{timeout_ms} ms'} "
                   f"refused: this secure world serves other callers from the app's thread "
                   f"(max_ta_wait_ms {bound})")
            if not self._session.wait_refused:  # the app sees only the code: say why, once
                self._session.wait_refused = True
                log.warning("%s", msg)
            raise Busy(msg)
        if self._session.cancel_mask:
            if forever:
                raise BadParameters("TEE_Wait forever with cancellation masked would never return")
            threading.Event().wait(timeout_ms / 1000)
            return TEE_SUCCESS
        timeout = None if forever else timeout_ms / 1000
        hook = self._world.wait_hook
        if hook(self._session, timeout) if hook is not None else self._session.cancelled.wait(timeout):
            return TEE_ERROR_CANCEL
        return TEE_SUCCESS

    def rpc_alloc(self, size: int, shm_type: int = RpcShmType.APPL, align: int = 0) -> RpcMemory:
        """Ask the normal world for ``size`` bytes of shared memory (RPC SHM_ALLOC).

        Returns a read-write :class:`RpcMemory` the app may keep across calls
        until :meth:`rpc_free` (or the session's end).  Raises OutOfMemory
        when the normal world cannot or will not serve it, BadParameters for
        a bad size/type, Closed when called from ``close_session``.
        """
        if self.closing:
            raise Closed("rpc_alloc from close_session: the session is ending")
        return self._world.rpc_alloc(self._session, size, shm_type, align)

    def rpc_free(self, memory: RpcMemory) -> None:
        """Give RPC memory back to the normal world (RPC SHM_FREE).

        Raises ItemNotFound if it is not this session's live RPC memory.
        """
        self._world.rpc_free(self._session, memory)


class SecureSessions:
    """The sessions of a secure world (a base of SecureWorld, which provides the
    attributes declared here)."""

    sessions: dict[int, TaSession]
    apps: dict[uuidlib.UUID, type[TrustedApp]]
    session_ids: Iterator[int]
    copy_in: Callable[[Sequence[MsgParam], list[Any]], list[Param]]
    copy_out: Callable[[Sequence[MsgParam], Sequence[Param]], None]
    release_holds: Callable[[list[Any]], None]
    rpc_free: Callable[[TaSession, RpcMemory], None]

    def _run(self, session: TaSession, fn: Callable[[], Any]) -> tuple[int, int]:
        """Run app code: (code, origin); a panic kills the session."""
        session.running += 1
        try:
            result = fn()
            code = TEE_SUCCESS if result is None else _app_code(result)
        except PoolsvcError as exc:
            code = _app_code(exc.tee_code)
            if code == TEE_SUCCESS:  # an error that claims success is a bug too
                code = -1
        except Exception:  # a TA panic: any bug in app code
            code = -1
        finally:
            session.running -= 1
        if code < 0:  # not a u32 TEE code: a TA panic
            session.dead = True
            return TEE_ERROR_TARGET_DEAD, Origin.TEE
        return code, Origin.TRUSTED_APP

    # -- sessions --------------------------------------------------------------------------
    def _open_session(self, msg: MsgArg) -> None:
        params = msg.params
        if len(params) < 2:
            raise BadParameters(f"OPEN_SESSION carries {len(params)} parameters; the first two "
                                "must be the META values (TA UUID, client identity)")
        if params[0].attr != _META_ATTR or params[1].attr != _META_ATTR:
            raise BadParameters(f"OPEN_SESSION META attrs are {params[0].attr:#x}, "
                                f"{params[1].attr:#x}, not {_META_ATTR:#x}")
        ta_uuid = uuid_from_value(params[0].a, params[0].b)
        login = params[1].c
        if login not in Login._value2member_map_:
            raise BadParameters(f"OPEN_SESSION login {login:#x} is not a TEE_LOGIN_* value")
        client = (uuidlib.UUID(int=0) if login == Login.PUBLIC
                  else uuid_from_value(params[1].a, params[1].b))
        holds: list[Any] = []
        try:
            ta_params = self.copy_in(params[2:], holds)
            app_cls = self.apps.get(ta_uuid)
            if app_cls is None:
                raise ItemNotFound(f"no trusted app with UUID {ta_uuid}")
            session = TaSession(next(self.session_ids), ta_uuid, None, login, client)  # type: ignore[arg-type]
            env = SessionEnv(self, session)

            def start() -> Any:
                session.app = app_cls(env)
                return session.app.open_session(list(ta_params))

            code, origin = self._run(session, start)
            self.copy_out(params[2:], ta_params)
            if code != TEE_SUCCESS:
                self._end_session(session, call_app=False)
                msg.ret, msg.ret_origin = code, origin
                return
            self.sessions[session.id] = session
            msg.session = session.id
            msg.ret_origin = origin
        finally:
            self.release_holds(holds)

    def _invoke_command(self, msg: MsgArg) -> None:
        holds: list[Any] = []
        try:
            ta_params = self.copy_in(msg.params, holds)
            session = self.sessions.get(msg.session)
            if session is None:
                raise BadParameters(f"session {msg.session} is not open")
            if session.dead:
                msg.ret, msg.ret_origin = TEE_ERROR_TARGET_DEAD, Origin.TEE
                return
            if session.running:
                # a re-entrant call (an RPC handler calling back in); OP-TEE would block
                # the second caller, which would deadlock a single-threaded System
                raise Busy(f"session {msg.session} is already running a call")
            func = msg.func
            code, origin = self._run(session, lambda: session.app.invoke(func, list(ta_params)))
            self.copy_out(msg.params, ta_params)
            msg.ret, msg.ret_origin = code, origin
        finally:
            self.release_holds(holds)

    def _close_session(self, msg: MsgArg) -> None:
        if msg.params:
            raise BadParameters(f"CLOSE_SESSION carries {len(msg.params)} parameters, not 0")
        self.close_session(msg.session)

    def close_session(self, session_id: int) -> None:
        """End a session: the app's close_session, then any RPC memory it still holds.

        Raises BadParameters for an unknown session, Busy for one inside a call.
        """
        session = self.sessions.get(session_id)
        if session is None:
            raise BadParameters(f"session {session_id} is not open")
        if session.running:
            raise Busy(f"session {session_id} is inside a call")
        del self.sessions[session_id]
        self._end_session(session, call_app=not session.dead)

    def _end_session(self, session: TaSession, call_app: bool) -> None:
        app = session.app
        if call_app and app is not None:
            env = getattr(app, "env", None)
            if isinstance(env, SessionEnv):
                env.closing = True
            self._run(session, app.close_session)
        for memory in list(session.rpc.values()):
            try:
                self.rpc_free(session, memory)
            except PoolsvcError:
                pass

    def close_rpc_users(self) -> int:
        """Close every session that holds RPC memory (the normal world's RPC server is going).

        Returns the number of sessions closed.
        """
        users = [s.id for s in self.sessions.values() if s.rpc and not s.running]
        for sid in users:
            self.close_session(sid)
        return len(users)

    def _cancel(self, msg: MsgArg) -> None:
        if msg.params:
            raise BadParameters(f"CANCEL carries {len(msg.params)} parameters, not 0")
        session = self.sessions.get(msg.session)
        if session is None:
            raise BadParameters(f"CANCEL of session {msg.session}, which is not open")
        session.cancelled.set()


def _app_code(value: Any) -> int:
    """A trusted app's return code as a u32, or -1 when it is not one (a TA panic)."""
    try:
        code = operator.index(value)
    except Exception:
        return -1
    return code if 0 <= code <= 0xFFFFFFFF else -1


__all__ = ["SecureSessions", "SessionEnv", "TaSession"]
