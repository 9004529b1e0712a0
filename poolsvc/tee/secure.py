"""The simulated secure world: receives ``struct optee_msg_arg`` and trusts nothing.

It owns the registered shared-memory objects (by cookie), the sessions with
trusted apps, the per-call temporary memory objects and the memory it got
from the normal world by RPC, and validates every page list and every
address the way OP-TEE does (docs/design.md section 6):

- REGISTER_SHM: exactly one parameter whose ``attr`` is exactly
  ``TMEM_OUTPUT | NONCONTIG``; the page list is parsed and checked (alignment
  of list pages, ``next`` pointers and entries; every page in non-secure
  memory; size+offset and num_pages*8 overflow; zero pages; size 0 at an
  offset is one page); the object's size is ``num_pages*4096 - offset``.  A
  cookie already registered is shadowed:
  the newer registration answers to it until it is unregistered, then the
  older one again (OP-TEE's ``reg_shm_list`` is searched newest first).
- UNREGISTER_SHM: exactly one parameter naming a known cookie (else
  BAD_PARAMETERS); its ``attr`` is not looked at.  A cookie in use by a
  running call is **refused with TEE_ERROR_BUSY** and stays registered: one
  thread runs the whole machine, so waiting for the call to finish (as
  OP-TEE does) would deadlock; the normal world retries after the call.
- Neither command writes ``ret_origin`` (OP-TEE leaves it as the driver
  wrote it), except UNREGISTER_SHM with a wrong parameter count.
- Without DYNAMIC_SHM, REGISTER_SHM and UNREGISTER_SHM are unknown commands.
  An unknown command is refused at the SMC level: :meth:`SecureWorld.serve`
  returns ``SMC_RETURN_EBADCMD`` and ``ret`` / ``ret_origin`` are left as
  the normal world wrote them (``thread_optee_smc.c``'s ``call_entry_std``).
- ``strict`` (``Config.strict``) adds poolsvc's stricter checks: a reused
  cookie is refused, UNREGISTER_SHM must carry ``RMEM_INPUT``, a page list of
  size 0 is refused at any offset, and both registration commands answer with
  origin TEE.
- sessions and app code: ``poolsvc/tee/secure_sessions.py``
  (:class:`~poolsvc.tee.secure_sessions.SecureSessions`);
- the copies of TA parameters in and out: ``poolsvc/tee/secure_params.py``
  (:class:`~poolsvc.tee.secure_params.TaParamCopies`);
- RPC to the normal world: ``poolsvc/tee/secure_rpc.py``
  (:class:`~poolsvc.tee.secure_rpc.SecureRpc`; the normal world's server is
  made on first use by ``rpc_factory``, which the System sets).

:class:`SecureWorld` is those three parts plus this module's dispatch, entry
points and registration of shared memory.

Every refusal answers with the exact return code (origin TEE) and leaves the
state as it was: references taken for earlier parameters are dropped and
temporary objects freed.  Errors are :mod:`poolsvc.errors` exceptions
inside; they become return codes at one boundary, :meth:`SecureWorld.process`
(and its compiled twin for REGISTER_SHM / UNREGISTER_SHM, ``core.SmcEntry``:
the checks, codes and bookkeeping of either mode in C, over the cookie
tables, shadowed registrations, counter and RPC server it holds for this
world).

Two entries: :meth:`SecureWorld.serve` (every message, Python, returns the
SMC-level result) and the compiled entry, which has both modes (``strict``
or OP-TEE's) and answers every message exactly as ``serve`` does.
``call_with_arg`` (and ``driver_entry``, what the System's driver sends its
own REGISTER_SHM / UNREGISTER_SHM through) is the compiled entry with
DYNAMIC_SHM, else ``serve``.

Invariants:
  ``registered[c].inflight == number of running-call parameters naming c``
  ``temp_live == 0`` and every inflight is 0 between calls
  ``rpc_shms`` holds exactly the RPC memory of live sessions

Concurrency: one call at a time (the System serialises); a call that is
running marks the objects it uses as in flight.  The exception is CANCEL,
which another thread may send while a call runs (``Driver.cancel``, in its
own message buffer): it touches only a session's cancel event and the
counters, which ``_count_lock`` guards.
"""
from __future__ import annotations

import itertools
import threading
import uuid as uuidlib
from typing import Any, Callable

from .._backend import core
from ..constants import (ATTR_NONCONTIG, MSG_ARG_HEADER_SIZE, PAGE_MASK, PAGE_SIZE, RPC_MAX_PARAMS, Attr, MsgCmd,
                         Origin, SecCaps)
from ..errors import TEE_SUCCESS, BadParameters, Busy, PoolsvcError
from .msg import SMC_RETURN_EBADCMD, SMC_RETURN_OK, MsgArg, MsgParam, arg_size, peek_num_params, unpack
from .secure_params import RegisteredShm, TaParamCopies
from .secure_rpc import RpcMemory, SecureRpc
from .secure_sessions import SecureSessions, TaSession
from .ta import BUILTIN_APPS, TrustedApp

# Plain ints for the checks of REGISTER_SHM / UNREGISTER_SHM (enum arithmetic is slow on this path).
_REGISTER_ATTR = int(Attr.TMEM_OUTPUT | ATTR_NONCONTIG)
_UNREGISTER_ATTR = int(Attr.RMEM_INPUT)
_DYNAMIC_SHM = int(SecCaps.DYNAMIC_SHM)
_NO_PARAM = MsgParam()
_REG_CMDS = (int(MsgCmd.REGISTER_SHM), int(MsgCmd.UNREGISTER_SHM))
_CANCEL = int(MsgCmd.CANCEL)


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


class SecureWorld(TaParamCopies, SecureSessions, SecureRpc):
    """An OP-TEE-like secure world over a :class:`~poolsvc.memory.PhysicalMemory`.

    ``caps`` are the capability bits it reports (``SecCaps``); ``strict``
    turns on poolsvc's stricter checks (the module doc).  Trusted apps
    are installed by UUID (:meth:`install`); the built-in apps are installed
    from the start.  ``rpc_factory`` (set by the System) makes the normal
    world's RPC server on first use; ``rpc`` may be set to any callable taking
    an RPC :class:`MsgArg` to replace it.
    """

    def __init__(self, memory: Any, caps: SecCaps, strict: bool = False) -> None:
        self.memory = memory
        # fixed for the memory's life: what call_with_arg and the page-list checks use
        self._table = memory.table
        self._nonsecure = tuple(memory.nonsecure_ranges())
        # The compiled end of call_with_arg: where messages are accepted (as _read_arg).
        # It holds the state its fast path reads and updates (the cookie tables, the
        # shadowed registrations, the mode, the DYNAMIC_SHM bit, the RPC server, the
        # call counter); the properties below keep it in step with the attributes of
        # the same names.
        self._entry = core.SmcEntry(self._table, self._nonsecure, memory.regions["static"],
                                    memory.regions["dynamic"])
        self.strict = strict
        self.caps = caps
        #: per thread: the RPC argument of the call that thread is serving (0: none)
        self._rpc_arg = threading.local()
        #: The longest TEE_Wait a trusted app may make (ms), None for no bound.  A
        #: process that serves other callers from the thread the app runs on (the
        #: pool service daemon) bounds it: a waiting app would stall every caller.
        self.max_wait_ms: int | None = None
        #: How an app's cancellable TEE_Wait waits: ``hook(session, timeout_s)`` returns
        #: True once ``session.cancelled`` is set, False when ``timeout_s`` (None:
        #: forever) has passed.  None: wait on the event.  The pool service daemon sets
        #: it to read CANCEL requests from the waiting client meanwhile.
        self.wait_hook: Callable[[TaSession, float | None], bool] | None = None
        #: Makes the normal world's RPC server on first use (the System hands it over).
        self.rpc_factory: Callable[[], Any] | None = None
        self.sessions: dict[int, TaSession] = {}
        self.apps: dict[uuidlib.UUID, type[TrustedApp]] = {}
        self.temp_live = 0
        #: guards the counters a CANCEL from another thread updates beside a running call
        self._count_lock = threading.Lock()
        self._stats = SecureStats()
        self._entry.bind({}, {}, self._call_generic, self._stats)
        self._stats._counter = self._entry
        self.session_ids = itertools.count(1)
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
    def entry(self) -> Any:
        """The compiled end of the message call (``core.SmcEntry``), for the whole life of
        this world: it holds the tables the properties below read (``registered``,
        ``rpc_shms``, ``shadowed``) and the mode.  :attr:`call_with_arg` is this entry
        when the world reports DYNAMIC_SHM; read-only."""
        return self._entry

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
    def strict(self) -> bool:
        """poolsvc's stricter checks (``Config.strict``; the module doc lists them)."""
        return bool(self._entry.strict)

    @strict.setter
    def strict(self, value: bool) -> None:
        self._entry.strict = value

    @property
    def shadowed(self) -> dict[int, list[RegisteredShm]]:
        """Older registrations a reused cookie shadows, oldest first (not strict)."""
        return self._entry.shadowed

    @shadowed.setter
    def shadowed(self, value: dict[int, list[RegisteredShm]]) -> None:
        self._entry.shadowed = value

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

        The SMC-level result is :meth:`call_smc`'s; a message refused at that
        level comes back as it went in.  Raises ProtocolError only when the
        bytes cannot be a message at all (shorter than the header or than
        ``num_params`` parameters); every other fault is answered in ``ret`` /
        ``ret_origin``.
        """
        return self.call_smc(arg)[1]

    def call_smc(self, arg: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """:meth:`call` with the SMC-level result: ``(SMC_RETURN_*, message bytes)``."""
        msg = unpack(arg)
        rc = self.process(msg)
        return rc, msg.pack()

    @property
    def call_with_arg(self) -> Callable[[int], Any]:
        """``call_with_arg(arg_pa)``: process the message the normal world placed at
        physical address ``arg_pa``.

        The argument must lie inside the static carve-out (8-byte aligned), or
        start a page-aligned page of non-secure RAM and fit in it; otherwise
        BadParameters (OP-TEE answers such a call with an error at the SMC
        level, before any message exists).

        With DYNAMIC_SHM this is the compiled entry (``core.SmcEntry``, which
        the driver's ``SmcDriver`` then calls in C), in the world's mode
        (``strict`` or not): a one-parameter REGISTER_SHM / UNREGISTER_SHM is
        copied out, checked in the order and with the codes of ``_register``
        / ``_unregister``, and applied with the bookkeeping of
        :meth:`process` (cookie table and shadowed registrations, ``stats``,
        the RPC server's ``call_done``); only ``ret`` (and ``ret_origin``
        when strict) is written back, those commands' only outputs, so the
        message ends as :meth:`serve` leaves it.  Anything else takes
        :meth:`serve`, whose SMC-level result it returns; what the entry
        serves returns None (SMC result OK).  Without DYNAMIC_SHM this is
        :meth:`serve`.
        """
        if self._caps_bits & _DYNAMIC_SHM:
            return self._entry
        return self.serve

    @property
    def driver_entry(self) -> Callable[[int], Any]:
        """What the System's driver sends its own one-parameter REGISTER_SHM /
        UNREGISTER_SHM through: :attr:`call_with_arg`."""
        return self.call_with_arg

    def serve(self, arg_pa: int, rpc_arg_pa: int = 0) -> int:
        """Process the message at physical address ``arg_pa`` (every command, in Python).

        ``rpc_arg_pa`` (OPTEE_SMC_CALL_WITH_RPC_ARG, with SEC_CAP RPC_ARG) is
        where the driver preallocated the RPC argument: the RPCs this call
        makes are written there and their answers read back from there
        (:meth:`_rpc_send`); it must hold ``RPC_MAX_PARAMS`` parameters of
        non-secure memory, 8-byte aligned (else BadParameters).  0: none.

        Returns the SMC-level result: ``SMC_RETURN_OK``, or
        ``SMC_RETURN_EBADCMD`` for a command this world does not serve (then
        the message is left as it was).  Raises BadParameters for an address
        :attr:`call_with_arg` does not accept.
        """
        if not isinstance(arg_pa, int) or arg_pa < 0 or arg_pa >= 1 << 64:
            raise BadParameters(f"message address {arg_pa!r} is not a u64")
        if rpc_arg_pa:
            self._check_rpc_arg(rpc_arg_pa)
        header = self._read_arg(arg_pa, MSG_ARG_HEADER_SIZE)
        size = arg_size(peek_num_params(header))
        data = self._read_arg(arg_pa, size)
        msg = unpack(data)
        tls = self._rpc_arg
        outer = getattr(tls, "pa", 0)
        tls.pa = rpc_arg_pa  # this thread's call's RPC argument (a cancel may nest in a wait)
        try:
            rc = self.process(msg)
        finally:
            tls.pa = outer
        if rc == SMC_RETURN_OK:
            self.memory.write(arg_pa, msg.pack())
        return rc

    def _check_rpc_arg(self, pa: int) -> None:
        """The RPC argument's area: a u64, 8-byte aligned, in non-secure memory."""
        if not isinstance(pa, int) or pa < 0 or pa >= 1 << 64 or pa % 8:
            raise BadParameters(f"RPC argument address {pa!r} is not an 8-byte aligned u64")
        size = arg_size(RPC_MAX_PARAMS)
        mem = self.memory
        if not (mem.in_region("static", pa, size) or mem.in_region("dynamic", pa, size)):
            raise BadParameters(f"RPC argument at {pa:#x}+{size:#x} is not in non-secure memory")

    _call_generic = serve  # the compiled entry's path for what it does not serve

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

    def process(self, msg: MsgArg) -> int:
        """Handle a decoded message in place: sets ``ret`` (and ``ret_origin`` where
        OP-TEE does); returns the SMC-level result (``SMC_RETURN_*``).

        A CANCEL may come from another thread while a call runs: it is
        counted under ``_count_lock`` and does not end the running call's
        RPC memory (the RPC server's ``call_done`` is for the calls that may
        make RPCs).
        """
        cmd = msg.cmd
        with self._count_lock:
            self.stats.calls += 1
        handler = self._handlers.get(cmd)
        registration = cmd in _REG_CMDS
        cancel = cmd == _CANCEL
        if handler is None or (registration and not self._caps_bits & _DYNAMIC_SHM):
            self._call_done()
            return SMC_RETURN_EBADCMD
        writes_origin = self.strict or not registration
        msg.ret = TEE_SUCCESS
        if writes_origin:
            msg.ret_origin = Origin.TEE
        try:
            handler(msg)
        except PoolsvcError as exc:
            msg.ret = exc.tee_code
            if writes_origin:
                msg.ret_origin = getattr(exc, "origin", Origin.TEE)
        finally:
            if not cancel:
                self._call_done()
        if msg.ret != TEE_SUCCESS:
            errors = self.stats.errors
            with self._count_lock:
                errors[msg.ret] = errors.get(msg.ret, 0) + 1
        return SMC_RETURN_OK

    def _call_done(self) -> None:
        done = getattr(self.rpc, "call_done", None)
        if done is not None:
            done()

    # -- shared-memory registration ------------------------------------------------
    def _register_shm(self, msg: MsgArg) -> None:
        params = msg.params
        p = params[0] if len(params) == 1 else _NO_PARAM
        self._register(len(params), p.attr, p.a, p.b, p.c)

    def _register(self, num_params: int, attr: int, buf_ptr: int, size: int, cookie: int) -> None:
        """REGISTER_SHM's checks, in OP-TEE's order (``attr`` etc. of param 0)."""
        if num_params != 1:
            raise BadParameters(f"REGISTER_SHM carries {num_params} parameters, not 1")
        if attr != _REGISTER_ATTR:
            raise BadParameters(f"REGISTER_SHM attr {attr:#x} is not TMEM_OUTPUT|NONCONTIG")
        registered = self.registered
        if self.strict and (cookie in registered or cookie in self.rpc_shms):
            raise BadParameters(f"cookie {cookie:#x} is already registered (strict)")
        pages, offset = self.parse_noncontig(buf_ptr, size)
        older = registered.get(cookie)
        if older is not None:  # shadowed until the newer one is unregistered
            self.shadowed.setdefault(cookie, []).append(older)
        registered[cookie] = RegisteredShm(cookie, pages, offset, len(pages) * PAGE_SIZE - offset)

    def _unregister_shm(self, msg: MsgArg) -> None:
        params = msg.params
        if len(params) != 1:
            msg.ret_origin = Origin.TEE  # the one refusal OP-TEE gives an origin
        p = params[0] if len(params) == 1 else _NO_PARAM
        self._unregister(len(params), p.attr, p.a, p.b, p.c)

    def _unregister(self, num_params: int, attr: int, offs: int, size: int, cookie: int) -> None:
        """UNREGISTER_SHM's checks (``attr`` etc. of param 0; ``offs``, ``size`` unused)."""
        if num_params != 1:
            raise BadParameters(f"UNREGISTER_SHM carries {num_params} parameters, not 1")
        if self.strict and attr != _UNREGISTER_ATTR:
            raise BadParameters(f"UNREGISTER_SHM attr {attr:#x} is not RMEM_INPUT (strict)")
        entry = self.registered.get(cookie)
        if entry is None:
            raise BadParameters(f"cookie {cookie:#x} is not registered")
        if entry.inflight:
            raise Busy(f"cookie {cookie:#x} is in use by {entry.inflight} running call(s)")
        older = self.shadowed.get(cookie)
        if older:
            self.registered[cookie] = older.pop()
            if not older:
                del self.shadowed[cookie]
        else:
            del self.registered[cookie]

    def lookup_cookie(self, cookie: int) -> RegisteredShm:
        """The registered object of ``cookie`` (BadParameters if unknown)."""
        entry = self.registered.get(cookie)
        if entry is None:
            raise BadParameters(f"cookie {cookie:#x} is not registered")
        return entry

    # -- observability ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a refused message must leave unchanged, as comparable plain data."""
        return {
            "registered": {c: (tuple(int(x) for x in r.pages), r.offset, r.size, r.inflight)
                           for c, r in self.registered.items()},
            "shadowed": {c: len(older) for c, older in self.shadowed.items()},
            "sessions": {s.id: (str(s.uuid), s.dead, sorted(s.rpc)) for s in self.sessions.values()},
            "rpc_shms": sorted(self.rpc_shms),
            "temp_live": self.temp_live,
        }


__all__ = ["SMC_RETURN_EBADCMD", "SMC_RETURN_OK", "RegisteredShm", "RpcMemory", "SecureStats",
           "SecureWorld", "TaSession"]
