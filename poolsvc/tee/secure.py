"""The simulated secure world: receives ``struct optee_msg_arg`` and trusts nothing.

It owns the registered shared-memory objects (by cookie), the sessions with
trusted apps, the per-call temporary memory objects and the memory it got
from the normal world by RPC, and validates every page list and every
address the way OP-TEE does (docs/design.md section 6):

- REGISTER_SHM: exactly one parameter whose ``attr`` is exactly
  ``TMEM_OUTPUT | NONCONTIG``; the page list is parsed and checked (alignment
  of list pages, ``next`` pointers and entries; every page in non-secure
  memory; size+offset and num_pages*8 overflow; zero pages); the object's size
  is ``num_pages*4096 - offset``; a cookie already registered is refused
  (BAD_PARAMETERS).
- UNREGISTER_SHM: exactly one parameter, ``attr == RMEM_INPUT``, a known
  cookie (else BAD_PARAMETERS).  A cookie in use by a running call is
  **refused with TEE_ERROR_BUSY** and stays registered: one thread runs the
  whole machine, so waiting for the call to finish would deadlock; the
  normal world retries after the call returns.
- OPEN_SESSION: the first two parameters are ``VALUE_INPUT | META`` (TA UUID
  as RFC 4122 octets in ``a``/``b``; client UUID in ``a``/``b`` and login
  in ``c`` of the second), then at most 4 TA parameters.  Unknown UUID:
  ITEM_NOT_FOUND.  INVOKE_COMMAND: at most 4 parameters; unknown session:
  BAD_PARAMETERS.  CLOSE_SESSION: no parameters; unknown session:
  BAD_PARAMETERS.  CANCEL: NOT_SUPPORTED.
- TA parameters (``copy_in``): META set: BAD_PARAMETERS.  VALUE: a and b
  (u32).  RMEM: cookie lookup (unknown: BAD_PARAMETERS) takes a reference
  (``inflight``) held until the call returns; ``offs + size`` overflowing or
  beyond the object: SECURITY.  TMEM with ``buf_ptr == 0``: a NULL memref
  (only with the MEMREF_NULL capability, else BAD_PARAMETERS).  TMEM with
  NONCONTIG: a page list parsed into a temporary object that lives for the
  call.  Plain TMEM: the range must lie inside the static carve-out, else
  BAD_PARAMETERS.  Every page a memref reaches must be backed by storage
  (else BAD_PARAMETERS).  On the way out only ``size`` is written back for
  OUTPUT/INOUT memrefs and ``a``/``b`` for OUTPUT/INOUT values, also when the
  app answers SHORT_BUFFER (``size`` then says how much it needs).

Every refusal answers with the exact return code (origin TEE) and leaves the
state as it was: references taken for earlier parameters are dropped and
temporary objects freed.  Errors are :mod:`poolsvc.errors` exceptions
inside; they become return codes at one boundary, :meth:`SecureWorld.process`
(and its compiled twin for REGISTER_SHM / UNREGISTER_SHM, ``core.SmcEntry``,
which is ``call_with_arg``: the same checks, codes and bookkeeping in C, over
the cookie tables, counter and RPC server it holds for this world).
A trusted app's own errors carry origin TRUSTED_APP; an app that raises
anything else, or whose code is not a u32 (or is 0 on an error), has
panicked: TARGET_DEAD, and its session is dead.  The app gets a copy of the
params list; what is written back is decided by the message's attrs.

RPC: during a call an app may ask the normal world for memory
(:meth:`SessionEnv.rpc_alloc`): the secure world sends SHM_ALLOC (value
a=type, b=size, c=align) through ``self.rpc`` (the System's
:class:`~poolsvc.tee.rpc.RpcServer`, made on first use by ``rpc_factory``) and checks the
answer as OP-TEE does: ``ret == 0``, one parameter, attr TMEM_OUTPUT (plain:
inside the carve-out) or TMEM_OUTPUT|NONCONTIG (a page list, parsed and
checked), size at least what was asked.  A bad answer is freed again
(SHM_FREE) and the app gets OUT_OF_MEMORY.  Memory an app still holds when
its session closes is freed by the secure world; freed RPC memory is
unmapped (``Memref.revoke``): a stale reference reaches nothing.

Invariants:
  ``registered[c].inflight == number of running-call parameters naming c``
  ``temp_live == 0`` and every inflight is 0 between calls
  ``rpc_shms`` holds exactly the RPC memory of live sessions

Concurrency: one call at a time (the System serialises); a call that is
running marks the objects it uses as in flight.
"""
from __future__ import annotations

import itertools
import operator
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .._backend import core
from ..constants import (
    ATTR_META,
    ATTR_NONCONTIG,
    ATTR_TYPE_MASK,
    MSG_ARG_HEADER_SIZE,
    PAGE_MASK,
    PAGE_SIZE,
    TEE_NUM_PARAMS,
    Attr,
    MsgCmd,
    Origin,
    RpcCmd,
    RpcShmType,
    SecCaps,
)
from ..errors import (
    TEE_SUCCESS,
    BadParameters,
    Busy,
    Closed,
    ItemNotFound,
    NotSupported,
    OutOfMemory,
    PoolsvcError,
    ProtocolError,
    SecurityViolation,
)
from .msg import MsgArg, MsgParam, arg_size, peek_num_params, unpack, uuid_from_value
from .ta import (
    BUILTIN_APPS,
    TEE_ERROR_TARGET_DEAD,
    Login,
    Memref,
    Param,
    ParamType,
    TrustedApp,
    Value,
)

U64_MAX = (1 << 64) - 1
_VALUE_TYPES = (Attr.VALUE_INPUT, Attr.VALUE_OUTPUT, Attr.VALUE_INOUT)
_RMEM_TYPES = (Attr.RMEM_INPUT, Attr.RMEM_OUTPUT, Attr.RMEM_INOUT)
_TMEM_TYPES = (Attr.TMEM_INPUT, Attr.TMEM_OUTPUT, Attr.TMEM_INOUT)
_META_ATTR = Attr.VALUE_INPUT | ATTR_META
_OUT_VALUE_TYPES = (Attr.VALUE_OUTPUT, Attr.VALUE_INOUT)
_OUT_MEMREF_TYPES = (Attr.RMEM_OUTPUT, Attr.RMEM_INOUT, Attr.TMEM_OUTPUT, Attr.TMEM_INOUT)

# Plain ints for the checks of REGISTER_SHM / UNREGISTER_SHM (enum arithmetic costs ~0.3 us a go).
_REGISTER_ATTR = int(Attr.TMEM_OUTPUT | ATTR_NONCONTIG)
_UNREGISTER_ATTR = int(Attr.RMEM_INPUT)
_DYNAMIC_SHM = int(SecCaps.DYNAMIC_SHM)
_NO_PARAM = MsgParam()


# A shared-memory object the normal world registered (OP-TEE's ``mobj_reg_shm``):
# ``RegisteredShm(cookie, pages, offset, size, inflight=0)`` with
# ``size == len(pages) * 4096 - offset`` and ``inflight`` the running calls'
# parameters that use it (it cannot be unregistered while ``inflight > 0``).
# It is the backend's (compiled: a C struct the entry builds without Python).
if TYPE_CHECKING:
    from .._pure.smc import RegisteredShm
else:
    RegisteredShm = core.RegisteredShm


class RpcMemory(Memref):
    """Normal-world memory an app obtained by RPC SHM_ALLOC (a read-write Memref).

    ``cookie`` names it to the normal world; ``shm_type`` is APPL/KERNEL/GLOBAL;
    ``freed`` once given back.
    """

    __slots__ = ("cookie", "shm_type", "session_id", "freed")

    # Set by SecureWorld._rpc_alloc right after the mapping is made.
    cookie: int
    shm_type: int
    session_id: int
    freed: bool


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
    rpc: dict[int, RpcMemory] = field(default_factory=dict)


class _Counter:
    """Where a SecureStats not bound to a secure world keeps ``calls``."""

    __slots__ = ("calls",)

    def __init__(self, calls: int) -> None:
        self.calls = calls


class SecureStats:
    """The secure world's counters: ``calls`` (messages processed), ``errors``
    (refusals by return code), ``rpc_alloc``, ``rpc_free``.

    Bound to a secure world, ``calls`` is the counter its compiled entry
    keeps (``SmcEntry.calls``), so the fast path counts in C.  Compares and
    prints as the dataclass it was.
    """

    __slots__ = ("_counter", "errors", "rpc_alloc", "rpc_free")
    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __init__(self, calls: int = 0, errors: dict[int, int] | None = None, rpc_alloc: int = 0,
                 rpc_free: int = 0) -> None:
        self._counter: Any = _Counter(calls)
        self.errors: dict[int, int] = {} if errors is None else errors
        self.rpc_alloc = rpc_alloc
        self.rpc_free = rpc_free

    @property
    def calls(self) -> int:
        return self._counter.calls

    @calls.setter
    def calls(self, value: int) -> None:
        self._counter.calls = value

    def _astuple(self) -> tuple[int, dict[int, int], int, int]:
        return (self.calls, self.errors, self.rpc_alloc, self.rpc_free)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._astuple() == other._astuple()

    def __repr__(self) -> str:
        return (f"SecureStats(calls={self.calls!r}, errors={self.errors!r}, "
                f"rpc_alloc={self.rpc_alloc!r}, rpc_free={self.rpc_free!r})")


class SessionEnv:
    """What a trusted app's instance may use of the secure world: its session and RPC.

    Attributes: ``session_id``, ``uuid`` (the app's), ``login`` and
    ``client_uuid`` (the client identity of OPEN_SESSION).
    """

    def __init__(self, world: "SecureWorld", session: TaSession) -> None:
        self._world = world
        self._session = session
        self.session_id = session.id
        self.uuid = session.uuid
        self.login = session.login
        self.client_uuid = session.client_uuid
        self.closing = False

    def rpc_alloc(self, size: int, shm_type: int = RpcShmType.APPL, align: int = 0) -> RpcMemory:
        """Ask the normal world for ``size`` bytes of shared memory (RPC SHM_ALLOC).

        Returns a read-write :class:`RpcMemory` the app may keep across calls
        until :meth:`rpc_free` (or the session's end).  Raises OutOfMemory
        when the normal world cannot or will not serve it, BadParameters for
        a bad size/type, Closed when called from ``close_session``.
        """
        if self.closing:
            raise Closed("rpc_alloc from close_session: the session is ending")
        return self._world._rpc_alloc(self._session, size, shm_type, align)

    def rpc_free(self, memory: RpcMemory) -> None:
        """Give RPC memory back to the normal world (RPC SHM_FREE).

        Raises ItemNotFound if it is not this session's live RPC memory.
        """
        self._world._rpc_free(self._session, memory)


class SecureWorld:
    """An OP-TEE-like secure world over a :class:`~poolsvc.memory.PhysicalMemory`.

    ``caps`` are the capability bits it reports (``SecCaps``).  Trusted apps
    are installed by UUID (:meth:`install`); the built-in apps are installed
    from the start.  ``rpc_factory`` (set by the System) makes the normal
    world's RPC server on first use; ``rpc`` may be set to any callable taking
    an RPC :class:`MsgArg` to replace it.
    """

    def __init__(self, memory: Any, caps: SecCaps) -> None:
        self.memory = memory
        # fixed for the memory's life: what call_with_arg and the page-list checks use
        self._table = memory.table
        self._nonsecure = tuple(memory.nonsecure_ranges())
        # The compiled end of call_with_arg: where messages are accepted (as _read_arg).
        # It holds the state its fast path reads and updates (the cookie tables, the
        # DYNAMIC_SHM bit, the RPC server, the call counter); the properties below
        # keep it in step with the attributes of the same names.
        self._entry = core.SmcEntry(self._table, self._nonsecure, memory.regions["static"],
                                    memory.regions["dynamic"])
        self.caps = caps
        #: Makes the normal world's RPC server on first use (the System hands it over).
        self.rpc_factory: Callable[[], Any] | None = None
        self.sessions: dict[int, TaSession] = {}
        self.apps: dict[uuidlib.UUID, type[TrustedApp]] = {}
        self.temp_live = 0
        self._stats = SecureStats()
        self._entry.bind({}, {}, self._call_generic, self._stats)
        self._stats._counter = self._entry
        self._session_ids = itertools.count(1)
        self._handlers: dict[int, Callable[[MsgArg], None]] = {
            MsgCmd.OPEN_SESSION: self._open_session,
            MsgCmd.INVOKE_COMMAND: self._invoke_command,
            MsgCmd.CLOSE_SESSION: self._close_session,
            MsgCmd.CANCEL: self._cancel,
            MsgCmd.REGISTER_SHM: self._register_shm,
            MsgCmd.UNREGISTER_SHM: self._unregister_shm,
        }
        for app in BUILTIN_APPS:
            self.install(app)

    @property
    def caps(self) -> SecCaps:
        """The capability bits this secure world reports (``SecCaps``)."""
        return self._caps

    @caps.setter
    def caps(self, value: SecCaps) -> None:
        self._caps = value
        self._caps_bits = int(value)
        self._entry.caps = self._caps_bits

    @property
    def registered(self) -> dict[int, RegisteredShm]:
        """Registered shared memory by cookie (the compiled entry's table)."""
        return self._entry.registered

    @registered.setter
    def registered(self, value: dict[int, RegisteredShm]) -> None:
        self._entry.registered = value

    @property
    def rpc_shms(self) -> dict[int, RpcMemory]:
        """RPC memory of live sessions by cookie."""
        return self._entry.rpc_shms

    @rpc_shms.setter
    def rpc_shms(self, value: dict[int, RpcMemory]) -> None:
        self._entry.rpc_shms = value

    @property
    def rpc(self) -> Any:
        """The normal world's RPC server (None until first used); its ``call_done()``
        runs after every call."""
        return self._entry.rpc

    @rpc.setter
    def rpc(self, value: Any) -> None:
        self._entry.rpc = value

    @property
    def stats(self) -> SecureStats:
        """The counters; ``stats.calls`` is the compiled entry's call counter."""
        return self._stats

    @stats.setter
    def stats(self, value: SecureStats) -> None:
        self._entry.calls = value.calls
        value._counter = self._entry
        self._stats = value
        self._entry.bind(self.registered, self.rpc_shms, self._call_generic, value)

    # -- apps ------------------------------------------------------------------------
    def install(self, app: type[TrustedApp], uuid: uuidlib.UUID | str | None = None) -> uuidlib.UUID:
        """Make ``app`` (a TrustedApp subclass) reachable under ``uuid`` (default ``app.UUID``).

        Replaces an app installed under the same UUID (sessions already open
        keep their instance).  Raises BadParameters for a non-TrustedApp or a
        missing/invalid UUID.
        """
        if not (isinstance(app, type) and issubclass(app, TrustedApp)):
            raise BadParameters(f"{app!r} is not a TrustedApp subclass")
        key = uuid if uuid is not None else getattr(app, "UUID", None)
        if key is None:
            raise BadParameters(f"{app.__name__} has no UUID")
        try:
            key = key if isinstance(key, uuidlib.UUID) else uuidlib.UUID(str(key))
        except ValueError:
            raise BadParameters(f"{key!r} is not a UUID") from None
        self.apps[key] = app
        return key

    # -- entry points ------------------------------------------------------------
    def call(self, arg: bytes | bytearray | memoryview) -> bytes:
        """Process one raw ``struct optee_msg_arg``; return it with ret/outputs filled.

        Raises ProtocolError only when the bytes cannot be a message at all
        (shorter than the header or than ``num_params`` parameters); every
        other fault is answered in ``ret`` / ``ret_origin``.
        """
        msg = unpack(arg)
        self.process(msg)
        return msg.pack()

    @property
    def call_with_arg(self) -> Callable[[int], None]:
        """``call_with_arg(arg_pa)``: process the message the normal world placed at
        physical address ``arg_pa``.

        The argument must lie inside the static carve-out (8-byte aligned), or
        start a page-aligned page of non-secure RAM and fit in it; otherwise
        BadParameters (OP-TEE answers such a call with an error at the SMC
        level, before any message exists).

        The callable is the compiled entry itself (``core.SmcEntry``, which the
        driver's ``SmcDriver`` then calls in C): a one-parameter REGISTER_SHM /
        UNREGISTER_SHM is copied out, checked in the order and with the codes of
        ``_register`` / ``_unregister``, and applied with the bookkeeping of
        :meth:`process` (cookie table, ``stats``, the RPC server's
        ``call_done``); only ``ret`` and ``ret_origin`` are written back (those
        commands' only outputs).  Anything else takes :meth:`_call_generic`.
        """
        return self._entry

    def _call_generic(self, arg_pa: int) -> None:
        """``call_with_arg`` of every message the compiled entry does not serve."""
        if not isinstance(arg_pa, int) or arg_pa < 0 or arg_pa >= 1 << 64:
            raise BadParameters(f"message address {arg_pa!r} is not a u64")
        header = self._read_arg(arg_pa, MSG_ARG_HEADER_SIZE)
        size = arg_size(peek_num_params(header))
        data = self._read_arg(arg_pa, size)
        msg = unpack(data)
        self.process(msg)
        self.memory.write(arg_pa, msg.pack())

    def _read_arg(self, pa: int, size: int) -> bytes:
        mem = self.memory
        if mem.in_region("static", pa, size):
            if pa % 8:
                raise BadParameters(f"message at {pa:#x} in the static carve-out is not 8-byte aligned")
        elif mem.in_region("dynamic", pa, size):
            if pa & PAGE_MASK:
                raise BadParameters(f"message at {pa:#x} in dynamic RAM is not page-aligned")
            if size > PAGE_SIZE:
                raise BadParameters(f"message of {size} bytes at {pa:#x} does not fit in one page")
        else:
            raise BadParameters(f"message at {pa:#x}+{size:#x} is not in non-secure shared memory")
        return mem.read(pa, size)

    def process(self, msg: MsgArg) -> None:
        """Handle a decoded message in place: sets ``ret`` and ``ret_origin``."""
        self.stats.calls += 1
        msg.ret, msg.ret_origin = TEE_SUCCESS, Origin.TEE
        handler = self._handlers.get(msg.cmd)
        try:
            if handler is None:
                raise NotSupported(f"command {msg.cmd} is not supported")
            handler(msg)
        except PoolsvcError as exc:
            msg.ret = exc.tee_code
            msg.ret_origin = getattr(exc, "origin", Origin.TEE)
        finally:
            done = getattr(self.rpc, "call_done", None)
            if done is not None:
                done()
        if msg.ret != TEE_SUCCESS:
            self.stats.errors[msg.ret] = self.stats.errors.get(msg.ret, 0) + 1

    # -- shared-memory registration ------------------------------------------------
    def parse_noncontig(self, buf_ptr: int, size: int) -> tuple[np.ndarray, int]:
        """Pages and offset of a NONCONTIG buffer, validated as OP-TEE does."""
        # list pages are read straight through the frame table (no read_page callback)
        pages = core.pagelist_parse_frames(buf_ptr, size, self._table, self._nonsecure)
        return pages, buf_ptr & PAGE_MASK

    def _register_shm(self, msg: MsgArg) -> None:
        params = msg.params
        p = params[0] if len(params) == 1 else _NO_PARAM
        self._register(len(params), p.attr, p.a, p.b, p.c)

    def _register(self, num_params: int, attr: int, buf_ptr: int, size: int, cookie: int) -> None:
        """REGISTER_SHM's checks, in OP-TEE's order (``attr`` etc. of param 0)."""
        if not self._caps_bits & _DYNAMIC_SHM:
            raise NotSupported("REGISTER_SHM without dynamic shared memory")
        if num_params != 1:
            raise BadParameters(f"REGISTER_SHM carries {num_params} parameters, not 1")
        if attr != _REGISTER_ATTR:
            raise BadParameters(f"REGISTER_SHM attr {attr:#x} is not TMEM_OUTPUT|NONCONTIG")
        if cookie in self.registered or cookie in self.rpc_shms:
            raise BadParameters(f"cookie {cookie:#x} is already registered")
        pages = core.pagelist_parse_frames(buf_ptr, size, self._table, self._nonsecure)
        offset = buf_ptr & PAGE_MASK
        self.registered[cookie] = RegisteredShm(cookie, pages, offset,
                                                len(pages) * PAGE_SIZE - offset)

    def _unregister_shm(self, msg: MsgArg) -> None:
        params = msg.params
        p = params[0] if len(params) == 1 else _NO_PARAM
        self._unregister(len(params), p.attr, p.a, p.b, p.c)

    def _unregister(self, num_params: int, attr: int, offs: int, size: int, cookie: int) -> None:
        """UNREGISTER_SHM's checks (``attr`` etc. of param 0; ``offs``, ``size`` unused)."""
        if num_params != 1:
            raise BadParameters(f"UNREGISTER_SHM carries {num_params} parameters, not 1")
        if attr != _UNREGISTER_ATTR:
            raise BadParameters(f"UNREGISTER_SHM attr {attr:#x} is not RMEM_INPUT")
        entry = self.registered.get(cookie)
        if entry is None:
            raise BadParameters(f"cookie {cookie:#x} is not registered")
        if entry.inflight:
            raise Busy(f"cookie {cookie:#x} is in use by {entry.inflight} running call(s)")
        del self.registered[cookie]

    def lookup_cookie(self, cookie: int) -> RegisteredShm:
        """The registered object of ``cookie`` (BadParameters if unknown)."""
        entry = self.registered.get(cookie)
        if entry is None:
            raise BadParameters(f"cookie {cookie:#x} is not registered")
        return entry

    # -- parameters ------------------------------------------------------------------
    def _memref(self, ptype: ParamType, pages: np.ndarray | None, offset: int, size: int) -> Memref:
        return Memref(self.memory, ptype, pages, offset, size)

    def _copy_in(self, params: Sequence[MsgParam], holds: list[Any]) -> list[Param]:
        """The TA's four params from the message's; references taken go to ``holds``.

        Raises (with ``holds`` released by the caller): BadParameters,
        SecurityViolation, OutOfMemory (page list too long).
        """
        if len(params) > TEE_NUM_PARAMS:
            raise BadParameters(f"{len(params)} parameters for a trusted app; at most "
                                f"{TEE_NUM_PARAMS}")
        out: list[Param] = [None] * TEE_NUM_PARAMS
        for i, p in enumerate(params):
            if p.attr & ATTR_META:
                raise BadParameters(f"parameter {i}: META bit set (attr {p.attr:#x})")
            kind = p.attr & ATTR_TYPE_MASK
            if kind == Attr.NONE:
                continue
            if kind in _VALUE_TYPES:
                out[i] = Value(ParamType(kind), p.a & 0xFFFFFFFF, p.b & 0xFFFFFFFF)
            elif kind in _RMEM_TYPES:
                out[i] = self._rmem_param(i, p, ParamType(kind), holds)
            elif kind in _TMEM_TYPES:
                out[i] = self._tmem_param(i, p, ParamType(kind - 4), holds)
            else:
                raise BadParameters(f"parameter {i}: attr type {kind:#x} is not a parameter type")
        return out

    def _rmem_param(self, i: int, p: MsgParam, ptype: ParamType, holds: list[Any]) -> Memref:
        entry = self.registered.get(p.c)
        if entry is None:
            raise BadParameters(f"parameter {i}: cookie {p.c:#x} is not registered")
        offs, size = p.a, p.b
        if offs + size > U64_MAX:
            raise SecurityViolation(f"parameter {i}: offs {offs:#x} + size {size:#x} overflows u64")
        if offs + size > entry.size:
            raise SecurityViolation(f"parameter {i}: [{offs:#x}, {offs + size:#x}) is beyond the "
                                    f"{entry.size:#x} bytes of cookie {p.c:#x}")
        start = entry.offset + offs
        first = start // PAGE_SIZE
        count = (start % PAGE_SIZE + size + PAGE_MASK) // PAGE_SIZE if size else 0
        memref = self._memref(ptype, entry.pages[first:first + count], start % PAGE_SIZE, size)
        entry.inflight += 1
        holds.append(entry)
        holds.append(memref)
        return memref

    def _tmem_param(self, i: int, p: MsgParam, ptype: ParamType, holds: list[Any]) -> Memref:
        buf_ptr, size = p.a, p.b
        if buf_ptr == 0:
            if not self.caps & SecCaps.MEMREF_NULL:
                raise BadParameters(f"parameter {i}: NULL memref without the MEMREF_NULL capability")
            memref = self._memref(ptype, None, 0, size)
        elif p.attr & ATTR_NONCONTIG:
            pages, offset = self.parse_noncontig(buf_ptr, size)
            memref = self._memref(ptype, pages, offset, size)
            self.temp_live += 1
            holds.append(_Temp(self))
        else:
            base, rsize = self.memory.regions["static"]
            if not self.caps & SecCaps.HAVE_RESERVED_SHM:
                raise BadParameters(f"parameter {i}: contiguous TMEM {buf_ptr:#x} without a "
                                    "reserved shared-memory carve-out")
            if buf_ptr + size > U64_MAX or not (base <= buf_ptr and buf_ptr + max(size, 1) <= base + rsize):
                raise BadParameters(f"parameter {i}: TMEM [{buf_ptr:#x}, +{size:#x}) is not inside "
                                    f"the static carve-out [{base:#x}, {base + rsize:#x})")
            first = buf_ptr & ~PAGE_MASK
            count = ((buf_ptr & PAGE_MASK) + size + PAGE_MASK) // PAGE_SIZE if size else 0
            pages = np.arange(first, first + count * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)
            memref = self._memref(ptype, pages, buf_ptr & PAGE_MASK, size)
        holds.append(memref)
        return memref

    @staticmethod
    def _copy_out(params: Sequence[MsgParam], ta_params: Sequence[Param]) -> None:
        """Write back ``size`` of output memrefs and ``a``/``b`` of output values.

        The message's attrs decide what is written (OP-TEE's saved attrs), never
        the app's params: ``ta_params`` is the secure world's own list (the app
        got a copy), and an attribute the app broke falls back safely.
        """
        for p, tp in zip(params, ta_params):
            kind = p.attr & ATTR_TYPE_MASK
            if kind in _OUT_VALUE_TYPES:
                p.a = _u32(getattr(tp, "a", 0))
                p.b = _u32(getattr(tp, "b", 0))
            elif kind in _OUT_MEMREF_TYPES:
                p.b = _u64(getattr(tp, "size", None), _u64(getattr(tp, "capacity", None), p.b))

    @staticmethod
    def _release(holds: list[Any]) -> None:
        for hold in reversed(holds):
            if isinstance(hold, RegisteredShm):
                hold.inflight -= 1
            elif isinstance(hold, Memref):
                hold.release()
            else:
                hold.release()
        holds.clear()

    # -- running an app -------------------------------------------------------------------
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
            ta_params = self._copy_in(params[2:], holds)
            app_cls = self.apps.get(ta_uuid)
            if app_cls is None:
                raise ItemNotFound(f"no trusted app with UUID {ta_uuid}")
            session = TaSession(next(self._session_ids), ta_uuid, None, login, client)  # type: ignore[arg-type]
            env = SessionEnv(self, session)

            def start() -> Any:
                session.app = app_cls(env)
                return session.app.open_session(list(ta_params))

            code, origin = self._run(session, start)
            self._copy_out(params[2:], ta_params)
            if code != TEE_SUCCESS:
                self._end_session(session, call_app=False)
                msg.ret, msg.ret_origin = code, origin
                return
            self.sessions[session.id] = session
            msg.session = session.id
            msg.ret_origin = origin
        finally:
            self._release(holds)

    def _invoke_command(self, msg: MsgArg) -> None:
        holds: list[Any] = []
        try:
            ta_params = self._copy_in(msg.params, holds)
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
            self._copy_out(msg.params, ta_params)
            msg.ret, msg.ret_origin = code, origin
        finally:
            self._release(holds)

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
                self._rpc_free(session, memory)
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
        raise NotSupported("CANCEL is not supported: calls run to completion")

    # -- RPC ----------------------------------------------------------------------------------
    def _rpc_port(self) -> Any:
        if self.rpc is None and self.rpc_factory is not None:
            self.rpc = self.rpc_factory()
        if self.rpc is None:
            raise OutOfMemory("no normal world to serve RPC")
        return self.rpc

    def _rpc_send(self, msg: MsgArg) -> MsgArg:
        """One RPC round trip: the request travels as bytes and the answer is re-read."""
        port = self._rpc_port()
        request = unpack(msg.pack())
        handle = getattr(port, "handle", port)
        handle(request)
        return unpack(request.pack())

    def _rpc_alloc(self, session: TaSession, size: int, shm_type: int, align: int) -> RpcMemory:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= 0xFFFFFFFF:
            raise BadParameters(f"RPC allocation of {size!r} bytes")
        if shm_type not in (RpcShmType.APPL, RpcShmType.KERNEL, RpcShmType.GLOBAL):
            raise BadParameters(f"RPC shm type {shm_type!r} is not APPL, KERNEL or GLOBAL")
        reply = self._rpc_send(MsgArg(cmd=RpcCmd.SHM_ALLOC, params=[
            MsgParam(Attr.VALUE_INPUT, int(shm_type), size, align)]))
        if reply.ret != TEE_SUCCESS:
            raise OutOfMemory(f"normal world refused RPC SHM_ALLOC of {size:#x} bytes "
                              f"(ret {reply.ret:#x})")
        if len(reply.params) != 1:
            raise OutOfMemory(f"RPC SHM_ALLOC answer has {len(reply.params)} parameters, not 1")
        p = reply.params[0]
        cookie = p.c
        try:
            memory = self._rpc_memory(p, size)
        except PoolsvcError as exc:
            self._rpc_send_free(shm_type, cookie)
            raise OutOfMemory(f"bad RPC SHM_ALLOC answer: {exc}") from None
        memory.cookie = cookie
        memory.shm_type = int(shm_type)
        memory.session_id = session.id
        memory.freed = False
        self.rpc_shms[cookie] = memory
        session.rpc[cookie] = memory
        self.stats.rpc_alloc += 1
        return memory

    def _rpc_memory(self, p: MsgParam, size: int) -> RpcMemory:
        """Check an SHM_ALLOC answer as OP-TEE does and map it."""
        if p.attr not in (Attr.TMEM_OUTPUT, Attr.TMEM_OUTPUT | ATTR_NONCONTIG):
            raise BadParameters(f"attr {p.attr:#x} is not TMEM_OUTPUT[|NONCONTIG]")
        if p.b < size:
            raise BadParameters(f"size {p.b:#x} is less than the {size:#x} asked for")
        size = p.b
        if p.c in self.rpc_shms or p.c in self.registered:
            raise BadParameters(f"cookie {p.c:#x} is already in use")
        if p.attr & ATTR_NONCONTIG:
            pages, offset = self.parse_noncontig(p.a, size)
        else:
            base, rsize = self.memory.regions["static"]
            if not (p.a and base <= p.a and p.a + size <= base + rsize):
                raise BadParameters(f"contiguous buffer {p.a:#x}+{size:#x} is not inside the "
                                    "static carve-out")
            first = p.a & ~PAGE_MASK
            count = ((p.a & PAGE_MASK) + size + PAGE_MASK) // PAGE_SIZE
            pages = np.arange(first, first + count * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)
            offset = p.a & PAGE_MASK
        return RpcMemory(self.memory, ParamType.MEMREF_INOUT, pages, offset, size)

    def _rpc_send_free(self, shm_type: int, cookie: int) -> int:
        reply = self._rpc_send(MsgArg(cmd=RpcCmd.SHM_FREE, params=[
            MsgParam(Attr.VALUE_INPUT, int(shm_type), cookie, 0)]))
        return reply.ret

    def _rpc_free(self, session: TaSession, memory: RpcMemory) -> None:
        if not isinstance(memory, RpcMemory) or session.rpc.get(memory.cookie) is not memory:
            raise ItemNotFound(f"{memory!r} is not RPC memory of session {session.id}")
        memory.revoke()
        memory.freed = True
        del session.rpc[memory.cookie]
        del self.rpc_shms[memory.cookie]
        self.stats.rpc_free += 1
        self._rpc_send_free(memory.shm_type, memory.cookie)

    # -- observability ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a refused message must leave unchanged, as comparable plain data."""
        return {
            "registered": {c: (tuple(int(x) for x in r.pages), r.offset, r.size, r.inflight)
                           for c, r in self.registered.items()},
            "sessions": {s.id: (str(s.uuid), s.dead, sorted(s.rpc)) for s in self.sessions.values()},
            "rpc_shms": sorted(self.rpc_shms),
            "temp_live": self.temp_live,
        }


class _Temp:
    """A temporary NONCONTIG object of one call; its release balances ``temp_live``."""

    __slots__ = ("world",)

    def __init__(self, world: SecureWorld) -> None:
        self.world = world

    def release(self) -> None:
        self.world.temp_live -= 1


def _u32(value: Any) -> int:
    return value & 0xFFFFFFFF if isinstance(value, int) else 0


def _u64(value: Any, default: int) -> int:
    """``value`` if it is an int in u64 range, else ``default``."""
    return value if isinstance(value, int) and 0 <= value <= U64_MAX else default


def _app_code(value: Any) -> int:
    """A trusted app's return code as a u32, or -1 when it is not one (a TA panic)."""
    try:
        code = operator.index(value)
    except Exception:
        return -1
    return code if 0 <= code <= 0xFFFFFFFF else -1


__all__ = ["ProtocolError", "RegisteredShm", "RpcMemory", "SecureWorld", "SessionEnv",
           "TaSession"]
