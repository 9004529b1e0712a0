"""Plain-Python reference of the compiled message-call kernels
(``ext/smc_driver.pyx``, ``ext/smc_entry.pyx``).

Owns both ends of the one-parameter ``struct optee_msg_arg`` call of the
driver's hot path (REGISTER_SHM, UNREGISTER_SHM):

- :class:`SmcDriver`, the normal world: writes the message into the message
  page through the FrameTable, builds a list of up to 511 pages in a fresh
  list frame backed by a scratch storage page, calls the secure world,
  reads ``ret``/``ret_origin`` back; the list frame is zeroed, unmapped and
  freed on every path.
- :class:`SmcEntry`, the secure world: copies the 64 bytes of a message out
  of shared memory and checks REGISTER_SHM / UNREGISTER_SHM from the copy in
  OP-TEE's order (the page list with ``pagelist_parse_frames``); writes
  ``ret``/``ret_origin`` back.  Bound to a secure world (``bind``) it is the
  world's ``call_with_arg``: ``entry(arg_pa)`` serves those messages with
  the bookkeeping (cookie table of :class:`RegisteredShm`, call counter,
  refusal counts, the RPC server's ``call_done``) and hands the rest to the
  world's generic path.  Two modes (``strict``): poolsvc's stricter rules,
  or OP-TEE 4.0's (cookie shadowing, no attr check on UNREGISTER_SHM, size 0
  at an offset one page, ``ret_origin`` unwritten, both commands to the
  generic path without DYNAMIC_SHM).

Same checks, same order, same error types and messages as the compiled
twin; ``docs/core.md`` is the contract.

Concurrency: an object belongs to one thread at a time.  SmcDriver calls back
into the secure world with a list frame taken; a nested ``register*`` is
refused with Busy.
"""
from __future__ import annotations

import operator
import struct
import time
from typing import Any, Callable

import numpy as np

from ..errors import AlignmentError, BadParameters, Busy, InternalError, NotSupported, PoolsvcError
from .alloc import FrameAllocator
from .pagelist import ENTRIES_PER_LIST_PAGE, pagelist_build, pagelist_parse_frames
from .tables import MAX_PAGE_INDEX, MAX_STORAGE_ID, PAGE_MASK, PAGE_SIZE, U64_LIMIT, FrameTable

ARG1_SIZE = 64               # header (32 bytes) + one parameter (32)
RET_OFFSET = 20              # ret, then ret_origin
CMD_REGISTER = 4             # OPTEE_MSG_CMD_REGISTER_SHM
CMD_UNREGISTER = 5           # OPTEE_MSG_CMD_UNREGISTER_SHM
ATTR_REGISTER = 0x20A        # TMEM_OUTPUT | NONCONTIG
ATTR_UNREGISTER = 0x5        # RMEM_INPUT
CAP_DYNAMIC_SHM = 1 << 2
ORIGIN_TEE = 3               # TEE_ORIGIN_TEE
INT64_MAX = (1 << 63) - 1
MAX_PAGES = 1 << 20          # the page limit of a registration

_ARG1 = struct.Struct("<8I4Q")
_RET = struct.Struct("<II")
_ZERO_PAGE = bytes(PAGE_SIZE)


def _int(value: Any) -> int | None:
    """``value`` as an int (``__index__``), or None."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _u64(value: Any, what: str) -> int:
    v = _int(value)
    if v is None or not 0 <= v < U64_LIMIT:
        raise BadParameters(f"{what} {value!r} is not a u64")
    return v


def _in(value: Any, lo: int, hi: int) -> int | None:
    """``value`` as an int in [lo, hi], or None."""
    v = _int(value)
    return v if v is not None and lo <= v <= hi else None


def _window(window: Any, what: str) -> tuple[int, int]:
    try:
        b, s = window
    except (TypeError, ValueError):
        raise BadParameters(f"{what} {window!r} is not a (base, size) pair") from None
    base, size = _int(b), _int(s)
    if base is None or size is None or not 0 <= base < U64_LIMIT or not 0 <= size < U64_LIMIT \
            or base + size >= U64_LIMIT:
        raise BadParameters(f"{what} {window!r} is not inside the 64-bit address space")
    return base, base + size


class SmcDriver:
    """The driver's end of the message call (see ``ext/smc_driver.pyx`` for the contract).

    ``SmcDriver(table, frames, msg_pa, smc, list_sid=-1, list_index=0)``.
    Invariant between calls: no list frame taken (not ``_busy``; a list frame
    may be at PA 0), the scratch page all zero.
    """

    _busy = False
    _list_pa = 0
    _table: Any = None          # None: made by __new__ alone (InternalError, as compiled)

    def __init__(self, table: Any, frames: Any, msg_pa: Any, smc: Callable[[int], Any],
                 list_sid: Any = -1, list_index: Any = 0) -> None:
        if self._busy:
            # the registration in flight must clean up in its own table and allocator
            raise Busy(f"a registration is in flight (list frame {self._list_pa:#x})")
        if not isinstance(table, FrameTable):
            raise BadParameters(f"table must be a FrameTable, not {type(table).__name__}")
        if not isinstance(frames, FrameAllocator):
            raise BadParameters(f"frames must be a FrameAllocator, not {type(frames).__name__}")
        if not callable(smc):
            raise BadParameters(f"smc must be callable, not {type(smc).__name__}")
        pa = _int(msg_pa)
        if pa is None or not 0 <= pa <= U64_LIMIT - 1 - ARG1_SIZE or pa & 7:
            raise BadParameters(f"msg_pa {msg_pa!r} is not an 8-byte aligned address")
        sid = _in(list_sid, -1, MAX_STORAGE_ID)
        index = _in(list_index, 0, MAX_PAGE_INDEX - 1)
        if sid is None or index is None:
            raise BadParameters(f"list page ({list_sid!r}, {list_index!r}) is not a storage "
                                f"id in -1..{MAX_STORAGE_ID} and a page index")
        self._table = table
        self._frames = frames
        self._smc = smc
        self._msg_pa = pa
        self._list_sid = sid
        self._list_index = index
        self._list_pa = 0
        self._elapsed = 0.0

    @property
    def msg_pa(self) -> int:
        """The message page's physical address."""
        return self._msg_pa

    @property
    def has_list_page(self) -> bool:
        """True if one-list-page registrations (``register``, ``register_run``) are possible."""
        return self._list_sid >= 0

    def _post(self, cmd: int, attr: int, a: int, b: int, c: int) -> None:
        if self._table is None:
            raise InternalError("SmcDriver is not initialised")
        self._table.write(self._msg_pa, _ARG1.pack(cmd, 0, 0, 0, 0, 0, 0, 1, attr, a, b, c))

    def _answer(self) -> tuple[int, int]:
        ret, origin = _RET.unpack(self._table.read(self._msg_pa + RET_OFFSET, _RET.size))
        return ret, origin

    def call1(self, cmd: Any, attr: Any, a: Any, b: Any, c: Any) -> tuple[int, int]:
        """Send a one-parameter message; ``(ret, ret_origin)``."""
        v = _int(cmd)
        if v is None or not 0 <= v <= 0xFFFFFFFF:
            raise BadParameters(f"cmd {cmd!r} is not a u32")
        self._post(v, _u64(attr, "attr"), _u64(a, "a"), _u64(b, "b"), _u64(c, "c"))
        self._smc(self._msg_pa)
        return self._answer()

    def unregister(self, cookie: Any) -> tuple[int, int]:
        """UNREGISTER_SHM of ``cookie``: ``call1(5, RMEM_INPUT, 0, 0, cookie)``."""
        self._post(CMD_UNREGISTER, ATTR_UNREGISTER, 0, 0, _u64(cookie, "cookie"))
        self._smc(self._msg_pa)
        return self._answer()

    @property
    def last_seconds(self) -> float:
        """Seconds the last ``register`` / ``register_run`` took (0.0 before any)."""
        return self._elapsed

    def _check_list(self) -> None:
        if self._table is None:
            raise InternalError("SmcDriver is not initialised")
        if self._list_sid < 0:
            raise BadParameters("no scratch list page: a page list needs kernel pages")
        if self._busy:
            raise Busy(f"a registration is in flight (list frame {self._list_pa:#x})")

    def register(self, pages: Any, offset: Any, size: Any, cookie: Any) -> tuple[int, int]:
        """REGISTER_SHM of at most 511 pages, its list in one fresh list frame."""
        self._check_list()
        try:
            arr = np.asarray(pages, dtype=np.uint64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadParameters(f"pages is not convertible to uint64: {exc}") from None
        if arr.ndim != 1:
            raise BadParameters(f"pages must be 1-D, got {arr.ndim} dimensions")
        entries = [int(p) for p in arr]
        n = len(entries)
        if not 1 <= n <= ENTRIES_PER_LIST_PAGE:
            raise BadParameters(f"{n} pages: one list page holds 1..{ENTRIES_PER_LIST_PAGE}")
        off = _in(offset, 0, PAGE_MASK)
        if off is None:
            raise BadParameters(f"offset {offset!r} is not in 0..4095")
        sz, ck = _u64(size, "size"), _u64(cookie, "cookie")
        for i, pa in enumerate(entries):
            if pa & PAGE_MASK:
                raise AlignmentError(f"page-list entry {i} is {pa:#x}, not 4 KiB-aligned")
        return self._register(entries, off, sz, ck)

    def register_run(self, pa: Any, npages: Any, offset: Any, size: Any, cookie: Any) -> tuple[int, int]:
        """``register`` of the contiguous pages ``pa``, ``pa + 4096``, ... (``npages``)."""
        self._check_list()
        n = _in(npages, 1, ENTRIES_PER_LIST_PAGE)
        if n is None:
            raise BadParameters(f"{npages!r} pages: one list page holds 1..{ENTRIES_PER_LIST_PAGE}")
        off = _in(offset, 0, PAGE_MASK)
        if off is None:
            raise BadParameters(f"offset {offset!r} is not in 0..4095")
        sz, ck = _u64(size, "size"), _u64(cookie, "cookie")
        first = _u64(pa, "pa")
        if first & PAGE_MASK:
            raise AlignmentError(f"page-list entry 0 is {first:#x}, not 4 KiB-aligned")
        if first + n * PAGE_SIZE > U64_LIMIT:
            raise BadParameters(f"{n} pages at {first:#x} run past 2**64")
        return self._register([first + i * PAGE_SIZE for i in range(n)], off, sz, ck)

    def _register(self, entries: list[int], offset: int, size: int, cookie: int) -> tuple[int, int]:
        table = self._table
        t0 = time.perf_counter()
        list_pa = self._frames.alloc_contig(1)
        try:
            table.map_range(list_pa, 1, self._list_sid, self._list_index)
            self._list_pa = list_pa
            self._busy = True
            try:
                table.write(list_pa, pagelist_build(entries, 0, list_pa))
                self._post(CMD_REGISTER, ATTR_REGISTER, list_pa | offset, size, cookie)
                self._smc(self._msg_pa)
                result = self._answer()
            finally:
                self._busy = False
                self._list_pa = 0
                try:
                    table.write(list_pa, _ZERO_PAGE)
                finally:
                    table.unmap_range(list_pa, 1)
        finally:
            self._frames.free_contig(list_pa, 1)
        self._elapsed = time.perf_counter() - t0
        return result


class RegisteredShm:
    """A shared-memory object the normal world registered (OP-TEE's ``mobj_reg_shm``).

    ``RegisteredShm(cookie, pages, offset, size, inflight=0)``: plain fields,
    no checks.  ``size == len(pages) * 4096 - offset``; ``inflight`` counts
    running calls' parameters that use it (it cannot be unregistered while
    ``inflight > 0``).
    """

    __slots__ = ("cookie", "pages", "offset", "size", "inflight")

    def __init__(self, cookie: Any, pages: Any, offset: Any, size: Any, inflight: Any = 0) -> None:
        self.cookie = cookie
        self.pages = pages
        self.offset = offset
        self.size = size
        self.inflight = inflight

    def __repr__(self) -> str:
        return (f"RegisteredShm(cookie={self.cookie!r}, pages={self.pages!r}, "
                f"offset={self.offset!r}, size={self.size!r}, inflight={self.inflight!r})")


class SmcEntry:
    """The secure world's end (see ``ext/smc_entry.pyx`` for the contract).

    ``SmcEntry(table, nonsecure, static_window, dynamic_window)``; bound to a
    secure world (``bind``), ``entry(arg_pa)`` is its ``call_with_arg``.
    """

    # made by __new__ alone: no window (fetch1 -1), nothing fetched, answer InternalError
    _table: Any = None
    _static = _dynamic = (0, 0)
    _fetched: tuple[int, int, int, int, int] | None = None
    # the secure world's state (bind); None until bound
    _registered: dict[int, Any] | None = None
    _rpc_shms: dict[int, Any] | None = None
    _generic: Any = None
    _stats: Any = None
    _rpc: Any = None
    _caps: Any = 0
    _dynamic_shm = False
    _calls = 0
    _strict = True
    _shadowed: dict[int, list[Any]]

    def __new__(cls, *args: Any, **kwargs: Any) -> "SmcEntry":
        self = super().__new__(cls)
        self._shadowed = {}   # as the compiled __cinit__: also for an entry made by __new__ alone
        return self

    def __init__(self, table: Any, nonsecure: Any, static_window: Any, dynamic_window: Any) -> None:
        if not isinstance(table, FrameTable):
            raise BadParameters(f"table must be a FrameTable, not {type(table).__name__}")
        # every argument checked before a field changes, as the compiled twin does
        static = _window(static_window, "static_window")
        dynamic = _window(dynamic_window, "dynamic_window")
        nonsecure = _check_ranges(nonsecure)    # checked and converted once, here
        self._static, self._dynamic, self._nonsecure = static, dynamic, nonsecure
        self._table = table
        self._fetched = None        # cmd, attr, a, b, c

    # -- the secure world's state, for call_with_arg ---------------------------------------------
    def bind(self, registered: dict[int, Any], rpc_shms: dict[int, Any], generic: Callable[[int], Any],
             stats: Any) -> None:
        """Bind the cookie tables, the generic path and the stats (``errors``) of a secure world."""
        _check_dicts(registered, rpc_shms)
        if not callable(generic):
            raise BadParameters(f"generic must be callable, not {type(generic).__name__}")
        self._registered = registered
        self._rpc_shms = rpc_shms
        self._generic = generic
        self._stats = stats

    @property
    def registered(self) -> dict[int, Any] | None:
        """The bound cookie table (cookie -> RegisteredShm), or None."""
        return self._registered

    @registered.setter
    def registered(self, value: dict[int, Any]) -> None:
        _check_dict(value)
        self._registered = value

    @property
    def rpc_shms(self) -> dict[int, Any] | None:
        """The bound dict whose keys are the cookies of RPC memory, or None."""
        return self._rpc_shms

    @rpc_shms.setter
    def rpc_shms(self, value: dict[int, Any]) -> None:
        _check_dict(value)
        self._rpc_shms = value

    @property
    def caps(self) -> Any:
        """The capability bits ``entry(arg_pa)`` checks (DYNAMIC_SHM); 0 at first."""
        return self._caps

    @caps.setter
    def caps(self, value: Any) -> None:
        self._dynamic_shm = bool(value & CAP_DYNAMIC_SHM)
        self._caps = value

    @property
    def strict(self) -> bool:
        """poolsvc's stricter rules (True, at first) or OP-TEE 4.0's (False)."""
        return self._strict

    @strict.setter
    def strict(self, value: Any) -> None:
        self._strict = bool(value)

    @property
    def shadowed(self) -> dict[int, list[Any]]:
        """Older registrations a reused cookie shadows (cookie -> list, oldest first)."""
        return self._shadowed

    @shadowed.setter
    def shadowed(self, value: dict[int, list[Any]]) -> None:
        _check_dict(value)
        self._shadowed = value

    @property
    def rpc(self) -> Any:
        """The RPC server (or None); after each call its ``call_done()``, if it has one."""
        return self._rpc

    @rpc.setter
    def rpc(self, value: Any) -> None:
        self._rpc = value

    @property
    def calls(self) -> int:
        """Messages served (the secure world's ``stats.calls``)."""
        return self._calls

    @calls.setter
    def calls(self, value: Any) -> None:
        n = _in(value, 0, INT64_MAX)
        if n is None:
            raise BadParameters(f"calls {value!r} is not a count")
        self._calls = n

    # -- the message ---------------------------------------------------------------------------------
    def fetch1(self, arg_pa: Any) -> int:
        """The ``cmd`` (4 or 5) of the one-parameter message at ``arg_pa``, copied; else -1."""
        if type(arg_pa) is not int or not 0 <= arg_pa <= U64_LIMIT - 1 - ARG1_SIZE:
            return -1
        end = arg_pa + ARG1_SIZE
        (s_lo, s_hi), (d_lo, d_hi) = self._static, self._dynamic
        if not ((d_lo <= arg_pa and end <= d_hi and not arg_pa & PAGE_MASK)
                or (s_lo <= arg_pa and end <= s_hi and not arg_pa & 7)):
            return -1
        words = _ARG1.unpack(self._table.read(arg_pa, ARG1_SIZE))
        self._fetched = None
        cmd = words[0]
        if words[7] != 1 or cmd not in (CMD_REGISTER, CMD_UNREGISTER):
            return -1
        self._fetched = (cmd, words[8], words[9], words[10], words[11])
        return cmd

    def _take(self, cmd: int) -> tuple[int, int, int, int, int]:
        fetched = self._fetched
        if fetched is None or fetched[0] != cmd:
            raise InternalError(f"no command {cmd} fetched")
        self._fetched = None
        return fetched

    def _check_register(self, fetched: tuple[int, int, int, int, int], dynamic_shm: bool,
                        registered: dict[int, Any], rpc_shms: dict[int, Any]) -> RegisteredShm:
        _, attr, buf_ptr, size, cookie = fetched
        if not dynamic_shm:
            raise NotSupported("REGISTER_SHM without dynamic shared memory")
        if attr != ATTR_REGISTER:
            raise BadParameters(f"REGISTER_SHM attr {attr:#x} is not TMEM_OUTPUT|NONCONTIG")
        offset = buf_ptr & PAGE_MASK
        if self._strict:
            if cookie in registered or cookie in rpc_shms:
                raise BadParameters(f"cookie {cookie:#x} is already registered (strict)")
        elif size == 0 and offset:  # (size + offset - 1) / 4096 + 1 pages: one, as for 1 byte
            size = 1
        pages = pagelist_parse_frames(buf_ptr, size, self._table, self._nonsecure, MAX_PAGES)
        return RegisteredShm(cookie, pages, offset, len(pages) * PAGE_SIZE - offset)

    def _check_unregister(self, fetched: tuple[int, int, int, int, int], registered: dict[int, Any]) -> int:
        _, attr, _, _, cookie = fetched
        if self._strict and attr != ATTR_UNREGISTER:
            raise BadParameters(f"UNREGISTER_SHM attr {attr:#x} is not RMEM_INPUT (strict)")
        entry = registered.get(cookie)
        if entry is None:
            raise BadParameters(f"cookie {cookie:#x} is not registered")
        if entry.inflight:
            raise Busy(f"cookie {cookie:#x} is in use by {entry.inflight} running call(s)")
        return cookie

    def register1(self, caps: Any, registered: dict[int, Any],
                  rpc_shms: dict[int, Any]) -> tuple[int, np.ndarray, int]:
        """REGISTER_SHM's checks on the fetched message: ``(cookie, pages, offset)``."""
        fetched = self._take(CMD_REGISTER)
        _check_dicts(registered, rpc_shms)
        shm = self._check_register(fetched, bool(caps & CAP_DYNAMIC_SHM), registered, rpc_shms)
        return shm.cookie, shm.pages, shm.offset

    def unregister1(self, registered: dict[int, Any]) -> int:
        """UNREGISTER_SHM's checks on the fetched message: the cookie to remove."""
        fetched = self._take(CMD_UNREGISTER)
        _check_dicts(registered)
        return self._check_unregister(fetched, registered)

    def answer(self, arg_pa: Any, ret: Any, origin: Any) -> None:
        """Write ``ret`` and ``ret_origin`` (u32s) into the message at ``arg_pa``."""
        if self._table is None:
            raise InternalError("SmcEntry is not initialised")
        pa = _int(arg_pa)
        if pa is None or not 0 <= pa <= U64_LIMIT - 1 - ARG1_SIZE:
            raise BadParameters(f"message address {arg_pa!r} is not a u64")
        r, o = _in(ret, 0, 0xFFFFFFFF), _in(origin, 0, 0xFFFFFFFF)
        if r is None or o is None:
            raise BadParameters(f"ret {ret!r} / origin {origin!r} are not u32s")
        self._table.write(pa + RET_OFFSET, _RET.pack(r, o))

    # -- call_with_arg -------------------------------------------------------------------------------
    def __call__(self, arg_pa: Any) -> Any:
        """Process the message at ``arg_pa`` (the secure world's ``call_with_arg``).

        A one-parameter REGISTER_SHM / UNREGISTER_SHM in a window: checked,
        applied to the bound cookie table (shadowing, when not ``strict``),
        counted (``calls``; a refusal also in ``stats.errors``), the RPC
        server's ``call_done()``, then answered (``ret``, and ``ret_origin``
        when ``strict``).  Anything else, and when not ``strict`` both
        commands without DYNAMIC_SHM: ``generic(arg_pa)``, whose result is
        returned (None for what the entry serves).
        Errors: InternalError (not bound); AddressError (the message
        unreadable, nothing counted); whatever ``generic`` or ``call_done`` raise.
        """
        registered = self._registered
        shadowed = self._shadowed
        strict = self._strict
        if self._generic is None:   # only bind() sets it (the setters set one dict each)
            raise InternalError("SmcEntry is not bound to a secure world")
        assert registered is not None and self._rpc_shms is not None  # bind() set them too
        cmd = self.fetch1(arg_pa)
        if cmd < 0 or not (strict or self._dynamic_shm):
            self._fetched = None
            return self._generic(arg_pa)
        self._calls += 1
        ret, origin = 0, ORIGIN_TEE
        try:
            fetched = self._take(cmd)
            if cmd == CMD_REGISTER:
                shm = self._check_register(fetched, self._dynamic_shm, registered, self._rpc_shms)
                older = registered.get(shm.cookie)
                if older is not None:   # (not strict) shadowed until the newer is unregistered
                    shadowed.setdefault(shm.cookie, []).append(older)
                registered[shm.cookie] = shm
            else:
                cookie = self._check_unregister(fetched, registered)
                olders = shadowed.get(cookie)
                if olders:
                    registered[cookie] = olders.pop()
                    if not olders:
                        del shadowed[cookie]
                else:
                    del registered[cookie]
        except PoolsvcError as exc:
            ret = exc.tee_code
            origin = getattr(exc, "origin", ORIGIN_TEE)
        finally:
            if self._rpc is not None:
                done = getattr(self._rpc, "call_done", None)
                if done is not None:
                    done()
        if ret != 0:
            errors = self._stats.errors
            errors[ret] = errors.get(ret, 0) + 1
        if not strict:  # OP-TEE leaves ret_origin as the normal world wrote it
            origin = _RET.unpack(self._table.read(arg_pa + RET_OFFSET, 8))[1]
        self.answer(arg_pa, ret, origin)
        return None


def _check_dicts(*dicts: Any) -> None:
    """TypeError unless each is exactly a dict, as a Cython ``dict`` argument."""
    for d in dicts:
        if type(d) is not dict:
            raise TypeError(f"Argument must be dict, not {type(d).__name__}")


def _check_dict(value: Any) -> None:
    """A Cython ``dict`` attribute's setter: TypeError unless a dict (not None)."""
    if type(value) is not dict:
        raise TypeError(f"Expected dict, got {type(value).__name__}")


def _check_ranges(nonsecure: Any) -> list[tuple[int, int]]:
    """``nonsecure`` as validated ``(base, size)`` pairs (BadParameters as ``pagelist_parse``)."""
    try:
        pairs = [(operator.index(b), operator.index(s)) for b, s in nonsecure]
    except (TypeError, ValueError, AttributeError) as exc:
        raise BadParameters(f"nonsecure must be (base, size) pairs of ints: {exc}") from None
    for base, size in pairs:
        if base < 0 or size < 0 or base + size > U64_LIMIT:
            raise BadParameters(f"nonsecure range {base:#x}+{size:#x} is outside the "
                                "64-bit address space")
    return pairs


__all__ = ["RegisteredShm", "SmcDriver", "SmcEntry"]
