"""The GlobalPlatform TEE Client API v1.0, with libteec's behaviour, over poolsvc.

This module owns the ``TEEC_*`` names: constants, types and functions, as a C
client of OP-TEE's libteec sees them, over either backend of poolsvc (the
embedded :class:`~poolsvc.System` or a pool service daemon).  A C program
ports line by line; the mapping rules are:

- a C struct is a class with the same field names (``TEEC_SharedMemory``:
  ``buffer``, ``size``, ``flags``; ``TEEC_Operation``: ``started``,
  ``paramTypes``, ``params``); ``TEEC_Parameter`` carries all three members
  of the C union (``value``, ``tmpref``, ``memref``) and ``paramTypes`` says
  which one counts;
- a pointer to a struct the callee fills is that object, filled in place;
- a ``uint32_t *`` out-parameter (``returnOrigin``) is returned after the
  result: ``res, origin = TEEC_OpenSession(...)``;
- ``NULL`` is ``None``; a ``void *`` buffer is any object with the buffer
  protocol (``bytearray``, ``memoryview``, numpy arrays, ``mmap``...).

Behaviour follows libteec (``optee_client/libteec/src/tee_client_api.c``):

- ``TEEC_InitializeContext(None, ctx)`` opens the default TEE: the daemon at
  ``$POOLSVC_SOCKET`` when that is set, else one embedded System per process,
  created at the first context and closed with the last one.  A name is the
  socket path of a daemon.
- Allocating takes pool memory (the kernel's ``TEE_IOC_SHM_ALLOC``); a size
  of 0 takes 8 bytes, as libteec does, and ``buffer`` is an empty view.
- Registering is zero-copy when the TEE reports ``TEE_GEN_CAP_REG_MEM`` and
  the buffer can be registered; otherwise the memory gets a *shadow buffer*
  from the pool, copied in before and out after each call as the direction
  requires.  :attr:`TEEC_SharedMemory.kind` says which (``"allocated"``,
  ``"registered"``, ``"shadow"``).
- ``TEEC_MEMREF_WHOLE`` takes its direction from the shared memory's flags;
  ``TEEC_MEMREF_PARTIAL_*`` must agree with them and stay inside it, else
  ``TEEC_ERROR_BAD_PARAMETERS`` with origin API.
- Temporary memrefs are registered for the call or bounced, by the driver
  (:class:`poolsvc.TempMemref`); a NULL buffer with a size is
  ``TEEC_ERROR_BAD_PARAMETERS``.
- Output sizes and values are written back into the operation whatever the
  result, so ``TEEC_ERROR_SHORT_BUFFER`` leaves the size needed in the memref.
- Login methods: PUBLIC and USER are served; GROUP needs ``connectionData``
  naming a group of the caller (else ``TEEC_ERROR_GENERIC``, as the kernel's
  ``-EPERM``); the APPLICATION methods and unknown ones give
  ``TEEC_ERROR_BAD_PARAMETERS`` with origin COMMS, as the kernel's
  ``-EINVAL`` reaches libteec.
- Releasing, finalizing or closing ``None`` does nothing.

Cancellation: ``TEEC_RequestCancellation`` on an operation whose ``started``
is 0 cancels it before it starts: the call returns ``TEEC_ERROR_CANCEL``
with origin API and never reaches the TEE.  On an operation that an invoke
has started, it sends a CANCEL for the operation's session, as libteec's
``TEE_IOC_CANCEL`` (cancel id 0) does, from the calling thread, while the
invoking thread is inside the call: an app that checks for cancellation
(``env.wait``, ``env.cancellation_flag``; the built-in
:class:`~poolsvc.tee.ta.WaitApp`) returns ``TEEC_ERROR_CANCEL`` with origin
TRUSTED_APP.  As in OP-TEE, the session's cancel flag then stays set.  The
request goes through the Session's ``cancel()`` (embedded: the driver's
cancel message; through a daemon: a CANCEL on the context's MONITOR
connection, which the daemon reads while the app waits, so a daemon's
``max_ta_wait_ms`` bounds how long an app may wait for it).  An open in progress has no session yet, so
it cannot be cancelled once started (libteec's request then names no session).

Size: this module is over 600 lines on purpose: it is the one header a
ported C client imports (``from poolsvc.teec import *``), so the constants,
types and functions of the specification stay together.

Concurrency: one context per thread, or a context shared under the caller's
own lock, as the specification allows.  Contexts of the embedded System are
serialised by one process-wide lock, since a System is single-threaded.
"""
from __future__ import annotations

import os
import threading
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from .constants import GenCaps, Origin
from .errors import (
    Closed,
    PoolsvcError,
    ProtocolError,
    TeeError,
)
from .tee.driver import RegisteredMemref, TempMemref, Value

# -- constants (GlobalPlatform TEE Client API v1.0 and libteec) --------------------------------

TEEC_CONFIG_PAYLOAD_REF_COUNT = 4
TEEC_CONFIG_SHAREDMEM_MAX_SIZE = 0xFFFFFFFFFFFFFFFF

TEEC_NONE = 0x00000000
TEEC_VALUE_INPUT = 0x00000001
TEEC_VALUE_OUTPUT = 0x00000002
TEEC_VALUE_INOUT = 0x00000003
TEEC_MEMREF_TEMP_INPUT = 0x00000005
TEEC_MEMREF_TEMP_OUTPUT = 0x00000006
TEEC_MEMREF_TEMP_INOUT = 0x00000007
TEEC_MEMREF_WHOLE = 0x0000000C
TEEC_MEMREF_PARTIAL_INPUT = 0x0000000D
TEEC_MEMREF_PARTIAL_OUTPUT = 0x0000000E
TEEC_MEMREF_PARTIAL_INOUT = 0x0000000F

TEEC_MEM_INPUT = 0x00000001
TEEC_MEM_OUTPUT = 0x00000002

TEEC_SUCCESS = 0x00000000
TEEC_ERROR_STORAGE_NOT_AVAILABLE = 0xF0100003
TEEC_ERROR_GENERIC = 0xFFFF0000
TEEC_ERROR_ACCESS_DENIED = 0xFFFF0001
TEEC_ERROR_CANCEL = 0xFFFF0002
TEEC_ERROR_ACCESS_CONFLICT = 0xFFFF0003
TEEC_ERROR_EXCESS_DATA = 0xFFFF0004
TEEC_ERROR_BAD_FORMAT = 0xFFFF0005
TEEC_ERROR_BAD_PARAMETERS = 0xFFFF0006
TEEC_ERROR_BAD_STATE = 0xFFFF0007
TEEC_ERROR_ITEM_NOT_FOUND = 0xFFFF0008
TEEC_ERROR_NOT_IMPLEMENTED = 0xFFFF0009
TEEC_ERROR_NOT_SUPPORTED = 0xFFFF000A
TEEC_ERROR_NO_DATA = 0xFFFF000B
TEEC_ERROR_OUT_OF_MEMORY = 0xFFFF000C
TEEC_ERROR_BUSY = 0xFFFF000D
TEEC_ERROR_COMMUNICATION = 0xFFFF000E
TEEC_ERROR_SECURITY = 0xFFFF000F
TEEC_ERROR_SHORT_BUFFER = 0xFFFF0010
TEEC_ERROR_EXTERNAL_CANCEL = 0xFFFF0011
TEEC_ERROR_TARGET_DEAD = 0xFFFF3024
TEEC_ERROR_STORAGE_NO_SPACE = 0xFFFF3041

TEEC_ORIGIN_API = int(Origin.API)
TEEC_ORIGIN_COMMS = int(Origin.COMMS)
TEEC_ORIGIN_TEE = int(Origin.TEE)
TEEC_ORIGIN_TRUSTED_APP = int(Origin.TRUSTED_APP)

TEEC_LOGIN_PUBLIC = 0x00000000
TEEC_LOGIN_USER = 0x00000001
TEEC_LOGIN_GROUP = 0x00000002
TEEC_LOGIN_APPLICATION = 0x00000004
TEEC_LOGIN_USER_APPLICATION = 0x00000005
TEEC_LOGIN_GROUP_APPLICATION = 0x00000006

#: Result codes by name, for messages (``TEEC_ERROR_SHORT_BUFFER`` rather than 0xffff0010).
RESULT_NAMES: dict[int, str] = {v: k for k, v in list(globals().items())
                                if k.startswith(("TEEC_ERROR_", "TEEC_SUCCESS"))}
#: Origins by name.
ORIGIN_NAMES: dict[int, str] = {v: k for k, v in list(globals().items()) if k.startswith("TEEC_ORIGIN_")}

_MEM_INOUT = TEEC_MEM_INPUT | TEEC_MEM_OUTPUT
#: libteec's smallest allocation: a size of 0 takes this many bytes.
_EMPTY_ALLOC = 8


def TEEC_PARAM_TYPES(t0: int, t1: int, t2: int, t3: int) -> int:
    """The ``paramTypes`` word of four parameter types (4 bits each, parameter 0 lowest)."""
    return (t0 & 0xF) | (t1 & 0xF) << 4 | (t2 & 0xF) << 8 | (t3 & 0xF) << 12


def TEEC_PARAM_TYPE_GET(param_types: int, index: int) -> int:
    """The type of parameter ``index`` in a ``paramTypes`` word."""
    return (param_types >> (index * 4)) & 0xF


# -- types -----------------------------------------------------------------------------------


@dataclass
class TEEC_UUID:
    """A TA's UUID in the C layout; :meth:`from_uuid` and ``uuid`` convert."""

    timeLow: int = 0
    timeMid: int = 0
    timeHiAndVersion: int = 0
    clockSeqAndNode: bytes = bytes(8)

    @classmethod
    def from_uuid(cls, value: uuidlib.UUID | str) -> "TEEC_UUID":
        u = value if isinstance(value, uuidlib.UUID) else uuidlib.UUID(str(value))
        return cls(u.time_low, u.time_mid, u.time_hi_version, u.bytes[8:])

    @property
    def uuid(self) -> uuidlib.UUID:
        return uuidlib.UUID(bytes=self.timeLow.to_bytes(4, "big") + self.timeMid.to_bytes(2, "big")
                            + self.timeHiAndVersion.to_bytes(2, "big") + bytes(self.clockSeqAndNode))


@dataclass
class TEEC_Value:
    """A value parameter: two u32."""

    a: int = 0
    b: int = 0


@dataclass
class TEEC_TempMemoryReference:
    """A temporary memory reference: ``buffer`` (None is NULL) and ``size`` in bytes."""

    buffer: Any = None
    size: int = 0


@dataclass
class TEEC_RegisteredMemoryReference:
    """A reference to (part of) a :class:`TEEC_SharedMemory`."""

    parent: "TEEC_SharedMemory | None" = None
    size: int = 0
    offset: int = 0


@dataclass
class TEEC_Parameter:
    """One operation parameter: the C union's three members, chosen by ``paramTypes``."""

    value: TEEC_Value = field(default_factory=TEEC_Value)
    tmpref: TEEC_TempMemoryReference = field(default_factory=TEEC_TempMemoryReference)
    memref: TEEC_RegisteredMemoryReference = field(default_factory=TEEC_RegisteredMemoryReference)


@dataclass
class TEEC_Operation:
    """The payload of an open or invoke: ``started``, ``paramTypes``, four ``params``."""

    started: int = 0
    paramTypes: int = 0
    params: list[TEEC_Parameter] = field(
        default_factory=lambda: [TEEC_Parameter() for _ in range(TEEC_CONFIG_PAYLOAD_REF_COUNT)])
    _cancelled: bool = field(default=False, repr=False)
    _session: Any = field(default=None, repr=False)  # the Session an invoke runs it in


@dataclass
class TEEC_SharedMemory:
    """A block of shared memory: ``buffer``, ``size``, ``flags`` (TEEC_MEM_*) set by the caller.

    After allocation ``buffer`` is a writable view of the memory.  ``kind``
    is ``"allocated"``, ``"registered"`` (zero-copy), ``"shadow"`` (registered
    through a pool copy) or ``None`` when not in use.
    """

    buffer: Any = None
    size: int = 0
    flags: int = 0
    kind: str | None = None
    _shm: Any = field(default=None, repr=False)  # the poolsvc Shm the TEE sees
    _context: "TEEC_Context | None" = field(default=None, repr=False)


class TEEC_Context:
    """A connection to a TEE, set up by :func:`TEEC_InitializeContext`."""

    def __init__(self) -> None:
        self._ctx: Any = None        # a poolsvc Context (embedded or remote)
        self._owner: Any = None      # the Client to close with it (daemon), else None
        self._lock: Any = None       # the embedded System's lock, else a no-op lock
        self._gen_caps = 0

    @property
    def context(self) -> Any:
        """The poolsvc Context behind this TEEC context (None when finalized)."""
        return self._ctx


class TEEC_Session:
    """A session with a trusted app, opened by :func:`TEEC_OpenSession`."""

    def __init__(self) -> None:
        self._session: Any = None
        self._context: TEEC_Context | None = None


# -- the default TEE ---------------------------------------------------------------------------


class _Embedded:
    """The process's embedded System: created by the first context, closed with the last."""

    lock = threading.RLock()
    system: Any = None
    config: Any = None
    users = 0

    @classmethod
    def open_context(cls) -> Any:
        from .system import System

        with cls.lock:
            if cls.system is None:
                cls.system = System(cls.config)
            cls.users += 1
            return cls.system.open_context("teec")

    @classmethod
    def release(cls) -> None:
        with cls.lock:
            cls.users -= 1
            if cls.users == 0 and cls.system is not None:
                system, cls.system = cls.system, None
                system.close()


def configure_embedded(config: Any) -> None:
    """Set the :class:`~poolsvc.Config` of the embedded System that later contexts open.

    None restores the default.  Raises :class:`~poolsvc.errors.BadParameters`
    while a context of the embedded System is open.
    """
    from .errors import BadParameters

    with _Embedded.lock:
        if _Embedded.system is not None:
            raise BadParameters("the embedded System is in use: finalize its contexts first")
        _Embedded.config = config


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _fail(exc: BaseException) -> tuple[int, int]:
    """(result, origin) of an exception raised on the way to or from the TEE."""
    if isinstance(exc, TeeError):
        return exc.code & 0xFFFFFFFF, int(exc.origin)
    if isinstance(exc, (ProtocolError, OSError)):
        return TEEC_ERROR_COMMUNICATION, TEEC_ORIGIN_COMMS
    if isinstance(exc, Closed):
        return TEEC_ERROR_BAD_STATE, TEEC_ORIGIN_API
    if isinstance(exc, PoolsvcError):
        return exc.tee_code & 0xFFFFFFFF, TEEC_ORIGIN_API
    raise exc


# -- contexts ------------------------------------------------------------------------------------


def TEEC_InitializeContext(name: str | None, context: TEEC_Context) -> int:
    """Connect ``context`` to a TEE: None is the default, a string a daemon's socket path.

    Returns TEEC_SUCCESS, TEEC_ERROR_BAD_PARAMETERS for a context that is not
    a TEEC_Context, or TEEC_ERROR_COMMUNICATION / ITEM_NOT_FOUND when no TEE
    answers at ``name``.
    """
    if not isinstance(context, TEEC_Context) or (name is not None and not isinstance(name, str)):
        return TEEC_ERROR_BAD_PARAMETERS
    path = name if name is not None else os.environ.get("POOLSVC_SOCKET")
    try:
        if path is None:
            context._ctx = _Embedded.open_context()
            context._lock = _Embedded.lock
            context._gen_caps = int(context._ctx.system.config.gen_caps)
        else:
            from .service.client import connect

            client = connect(path)
            try:
                context._ctx = client.open_context("teec")
            except BaseException:
                client.close()
                raise
            context._owner = client
            context._lock = threading.RLock()
            context._gen_caps = int(client.gen_caps)
    except Closed:
        return TEEC_ERROR_ITEM_NOT_FOUND
    except (PoolsvcError, OSError) as exc:
        return _fail(exc)[0]
    return TEEC_SUCCESS


def TEEC_FinalizeContext(context: TEEC_Context | None) -> None:
    """Close ``context``: its sessions and shared memory go with it.  None does nothing."""
    if context is None or context._ctx is None:
        return
    ctx, context._ctx = context._ctx, None
    with context._lock:
        try:
            ctx.close()
        except PoolsvcError:
            pass
    if context._owner is not None:
        owner, context._owner = context._owner, None
        owner.close()
    else:
        _Embedded.release()


# -- shared memory ------------------------------------------------------------------------------


def _valid_flags(flags: Any) -> bool:
    return isinstance(flags, int) and flags != 0 and not flags & ~_MEM_INOUT


def TEEC_AllocateSharedMemory(context: TEEC_Context, sharedMem: TEEC_SharedMemory) -> int:
    """Allocate ``sharedMem.size`` bytes of pool memory; ``buffer`` becomes a view of them.

    Returns TEEC_SUCCESS, TEEC_ERROR_BAD_PARAMETERS (no context, bad flags or
    size) or TEEC_ERROR_OUT_OF_MEMORY.
    """
    if not isinstance(context, TEEC_Context) or context._ctx is None or not isinstance(
            sharedMem, TEEC_SharedMemory) or not _valid_flags(sharedMem.flags):
        return TEEC_ERROR_BAD_PARAMETERS
    size = sharedMem.size
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return TEEC_ERROR_BAD_PARAMETERS
    with context._lock:
        try:
            shm = context._ctx.alloc_user_buf(size or _EMPTY_ALLOC)
        except PoolsvcError as exc:
            return _fail(exc)[0]
        try:
            buffer = shm.view()[:size]
        except PoolsvcError as exc:  # memory this process cannot map
            shm.close()
            return _fail(exc)[0]
        sharedMem._shm, sharedMem._context, sharedMem.kind = shm, context, "allocated"
        sharedMem.buffer = buffer
    return TEEC_SUCCESS


def TEEC_RegisterSharedMemory(context: TEEC_Context, sharedMem: TEEC_SharedMemory) -> int:
    """Register ``sharedMem.buffer[:size]``: zero-copy when the TEE can, else a shadow buffer.

    Returns TEEC_SUCCESS, TEEC_ERROR_BAD_PARAMETERS (no context, no buffer,
    bad flags, a size beyond the buffer) or TEEC_ERROR_OUT_OF_MEMORY.
    """
    if not isinstance(context, TEEC_Context) or context._ctx is None or not isinstance(
            sharedMem, TEEC_SharedMemory) or not _valid_flags(sharedMem.flags) or sharedMem.buffer is None:
        return TEEC_ERROR_BAD_PARAMETERS
    size = sharedMem.size
    try:
        with memoryview(sharedMem.buffer) as whole:
            length = whole.nbytes
    except TypeError:
        return TEEC_ERROR_BAD_PARAMETERS
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= length:
        return TEEC_ERROR_BAD_PARAMETERS
    with context._lock:
        shm = None
        if size and context._gen_caps & GenCaps.REG_MEM:
            try:
                with memoryview(sharedMem.buffer) as whole:
                    shm = context._ctx.register_user_buf(whole.cast("B")[:size])
            except PoolsvcError:
                # not registrable zero-copy (read-only memory, or private memory
                # through a daemon): shadow it
                shm = None
        kind = "registered"
        if shm is None:
            try:
                shm = context._ctx.alloc_user_buf(size or _EMPTY_ALLOC)
            except PoolsvcError as exc:
                return _fail(exc)[0]
            try:
                shm.view().release()  # the copies go through it: refuse memory this process cannot map
            except PoolsvcError as exc:
                shm.close()
                return _fail(exc)[0]
            kind = "shadow"
        sharedMem._shm, sharedMem._context, sharedMem.kind = shm, context, kind
    return TEEC_SUCCESS


def TEEC_ReleaseSharedMemory(sharedMem: TEEC_SharedMemory | None) -> None:
    """Release shared memory; the caller's buffer of a registration stays theirs.  None does nothing."""
    if sharedMem is None or sharedMem._shm is None:
        return
    shm, sharedMem._shm = sharedMem._shm, None
    context, sharedMem._context = sharedMem._context, None
    if sharedMem.kind == "allocated":
        sharedMem.buffer = None
    sharedMem.kind = None
    lock = context._lock if context is not None else _NoLock()
    with lock:
        try:
            shm.close()
        except PoolsvcError:
            pass  # the context is already gone, and the memory with it


# -- operations ------------------------------------------------------------------------------------

_DIRECTION = {TEEC_MEM_INPUT: "in", TEEC_MEM_OUTPUT: "out", _MEM_INOUT: "inout"}


class _Marshal:
    """One operation's parameters, converted for poolsvc, and what to write back after the call."""

    def __init__(self, context: TEEC_Context, operation: TEEC_Operation | None) -> None:
        self.context = context
        self.operation = operation
        self.params: list[Any] = []
        self.after: list[Any] = []  # per param: a function run after the call
        self.temps: list[Any] = []  # Shms to close after the call

    def convert(self) -> int:
        """Fill ``params``; TEEC_SUCCESS or TEEC_ERROR_BAD_PARAMETERS (origin API)."""
        op = self.operation
        if op is None:
            return TEEC_SUCCESS
        if not isinstance(op, TEEC_Operation) or len(op.params) != TEEC_CONFIG_PAYLOAD_REF_COUNT:
            return TEEC_ERROR_BAD_PARAMETERS
        for i, param in enumerate(op.params):
            ptype = TEEC_PARAM_TYPE_GET(op.paramTypes, i)
            if ptype == TEEC_NONE:
                self.params.append(None)
            elif ptype in (TEEC_VALUE_INPUT, TEEC_VALUE_OUTPUT, TEEC_VALUE_INOUT):
                self._value(param.value, ptype)
            elif ptype in (TEEC_MEMREF_TEMP_INPUT, TEEC_MEMREF_TEMP_OUTPUT, TEEC_MEMREF_TEMP_INOUT):
                if not self._temp(param.tmpref, ptype - TEEC_MEMREF_TEMP_INPUT + 1):
                    return TEEC_ERROR_BAD_PARAMETERS
            elif ptype in (TEEC_MEMREF_WHOLE, TEEC_MEMREF_PARTIAL_INPUT, TEEC_MEMREF_PARTIAL_OUTPUT,
                           TEEC_MEMREF_PARTIAL_INOUT):
                if not self._registered(param.memref, ptype):
                    return TEEC_ERROR_BAD_PARAMETERS
            else:
                return TEEC_ERROR_BAD_PARAMETERS
        return TEEC_SUCCESS

    def _value(self, value: TEEC_Value, ptype: int) -> None:
        flags = ptype  # VALUE_INPUT/OUTPUT/INOUT are 1/2/3, as TEEC_MEM_* bits
        param = Value(value.a, value.b, _DIRECTION[flags])
        self.params.append(param)
        if flags & TEEC_MEM_OUTPUT:
            def back() -> None:
                value.a, value.b = param.a, param.b
            self.after.append(back)

    def _temp(self, tmpref: TEEC_TempMemoryReference, flags: int) -> bool:
        size = tmpref.size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return False
        if tmpref.buffer is None:
            if size:
                return False  # libteec: a NULL buffer carries no bytes
            if self.context._gen_caps & GenCaps.MEMREF_NULL:
                param: TempMemref | RegisteredMemref = TempMemref(None, _DIRECTION[flags], 0)
            else:  # libteec allocates an empty block to stand for NULL
                shm = self.context._ctx.alloc_kernel_buf(_EMPTY_ALLOC)
                self.temps.append(shm)
                param = RegisteredMemref(shm, 0, 0, _DIRECTION[flags])
        else:
            try:
                with memoryview(tmpref.buffer) as whole:
                    if size > whole.nbytes:
                        return False
            except TypeError:
                return False
            window = memoryview(tmpref.buffer).cast("B")[:size]
            param = TempMemref(window, _DIRECTION[flags], size)
        self.params.append(param)
        if flags & TEEC_MEM_OUTPUT:
            def back() -> None:
                if param.size is not None:
                    tmpref.size = param.size
            self.after.append(back)
        return True

    def _registered(self, memref: TEEC_RegisteredMemoryReference, ptype: int) -> bool:
        parent = memref.parent
        if not isinstance(parent, TEEC_SharedMemory) or parent._shm is None or parent._context is not self.context:
            return False
        if ptype == TEEC_MEMREF_WHOLE:
            flags = parent.flags & _MEM_INOUT
            if not flags:
                return False
            offset, size = 0, parent.size
        else:
            flags = ptype - TEEC_MEMREF_PARTIAL_INPUT + 1
            if parent.flags & flags != flags:
                return False
            offset, size = memref.offset, memref.size
            for v in (offset, size):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    return False
            if offset + size > parent.size:
                return False
        param = RegisteredMemref(parent._shm, offset, size, _DIRECTION[flags])
        shadow = parent.kind == "shadow"
        if shadow and flags & TEEC_MEM_INPUT and size:
            with memoryview(parent.buffer) as src, parent._shm.view() as dst:
                dst[offset:offset + size] = src.cast("B")[offset:offset + size]
        self.params.append(param)
        if flags & TEEC_MEM_OUTPUT:
            def back() -> None:
                reported = param.size if param.size is not None else size
                if shadow and reported <= size and reported:
                    with memoryview(parent.buffer) as dst, parent._shm.view() as src:
                        dst.cast("B")[offset:offset + reported] = src[offset:offset + reported]
                memref.size = reported
            self.after.append(back)
        return True

    def write_back(self) -> None:
        for back in self.after:
            back()

    def release(self) -> None:
        for shm in self.temps:
            try:
                shm.close()
            except PoolsvcError:
                pass
        self.temps.clear()


def _run(context: TEEC_Context, operation: TEEC_Operation | None, call: Any) -> tuple[int, int]:
    """Convert ``operation``, run ``call(params)``, write the outputs back: (result, origin)."""
    if operation is not None and isinstance(operation, TEEC_Operation):
        if operation._cancelled:
            operation._cancelled = False
            return TEEC_ERROR_CANCEL, TEEC_ORIGIN_API
        operation.started = 1
    marshal = _Marshal(context, operation)
    with context._lock:
        try:
            try:
                res = marshal.convert()
            except PoolsvcError as exc:
                return _fail(exc)[0], TEEC_ORIGIN_API
            if res != TEEC_SUCCESS:
                return res, TEEC_ORIGIN_API
            try:
                call(marshal.params)
            except PoolsvcError as exc:
                result = _fail(exc)
                if isinstance(exc, TeeError):
                    marshal.write_back()
                return result
            marshal.write_back()
            return TEEC_SUCCESS, TEEC_ORIGIN_TRUSTED_APP
        finally:
            marshal.release()


# -- sessions --------------------------------------------------------------------------------------


def _login_error(method: Any, data: Any) -> tuple[int, int] | None:
    """The kernel's answer to a login method it refuses, as libteec reports it; None if served."""
    if method in (TEEC_LOGIN_PUBLIC, TEEC_LOGIN_USER):
        return None
    if method == TEEC_LOGIN_GROUP:
        if isinstance(data, int) and not isinstance(data, bool) and (
                data == os.getegid() or data in os.getgroups()):
            return None
        return TEEC_ERROR_GENERIC, TEEC_ORIGIN_COMMS  # -EPERM: not a group of the caller
    return TEEC_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_COMMS  # -EINVAL: not a method the kernel serves


def TEEC_OpenSession(context: TEEC_Context, session: TEEC_Session, destination: TEEC_UUID | uuidlib.UUID | str,
                     connectionMethod: int = TEEC_LOGIN_PUBLIC, connectionData: Any = None,
                     operation: TEEC_Operation | None = None) -> tuple[int, int]:
    """Open a session with the trusted app ``destination``: returns (result, returnOrigin).

    An unknown app gives (TEEC_ERROR_ITEM_NOT_FOUND, TEEC_ORIGIN_TEE); the
    app's own refusal comes with TEEC_ORIGIN_TRUSTED_APP.
    """
    if not isinstance(context, TEEC_Context) or context._ctx is None or not isinstance(session, TEEC_Session):
        return TEEC_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API
    try:
        ta = destination.uuid if isinstance(destination, TEEC_UUID) else uuidlib.UUID(str(destination))
    except ValueError:
        return TEEC_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API
    refused = _login_error(connectionMethod, connectionData)
    if refused is not None:
        return refused

    def call(params: list[Any]) -> None:
        session._session = context._ctx.open_session(ta, params, login=connectionMethod)
        session._context = context

    return _run(context, operation, call)


def TEEC_CloseSession(session: TEEC_Session | None) -> None:
    """Close ``session``.  None, or a session already closed, does nothing."""
    if session is None or session._session is None:
        return
    s, session._session = session._session, None
    context, session._context = session._context, None
    with context._lock if context is not None else _NoLock():
        try:
            s.close()
        except PoolsvcError:
            pass


def TEEC_InvokeCommand(session: TEEC_Session, commandID: int,
                       operation: TEEC_Operation | None = None) -> tuple[int, int]:
    """Invoke ``commandID`` in the session's app: returns (result, returnOrigin)."""
    if not isinstance(session, TEEC_Session) or session._session is None or session._context is None:
        return TEEC_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API
    if isinstance(commandID, bool) or not isinstance(commandID, int) or not 0 <= commandID <= 0xFFFFFFFF:
        return TEEC_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API
    s = session._session
    if isinstance(operation, TEEC_Operation):
        operation._session = s  # libteec's operation->session, what a cancellation names
    return _run(session._context, operation, lambda params: s.invoke(commandID, params))


def TEEC_RequestCancellation(operation: TEEC_Operation | None) -> None:
    """Ask that ``operation`` be cancelled (any thread).

    One not yet started returns TEEC_ERROR_CANCEL (origin API) when started;
    for one an invoke has started, a CANCEL goes to its session (see the
    module doc).  Errors are not reported, as in libteec.
    """
    if operation is None or not isinstance(operation, TEEC_Operation):
        return
    if operation.started == 0:
        operation._cancelled = True
        return
    cancel = getattr(operation._session, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except PoolsvcError:
            pass  # a closed session or context: nothing runs to cancel


def result_name(code: int) -> str:
    """``TEEC_ERROR_SHORT_BUFFER`` for 0xFFFF0010; the hex value for a code without a name."""
    return RESULT_NAMES.get(code & 0xFFFFFFFF, f"{code & 0xFFFFFFFF:#010x}")


def origin_name(origin: int) -> str:
    """``TEEC_ORIGIN_TEE`` for 3; the number for an origin without a name."""
    return ORIGIN_NAMES.get(origin, str(origin))

