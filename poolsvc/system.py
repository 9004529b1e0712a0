"""The embedded system: memory, pools, the TEE driver's semantics and a secure world.

:class:`System` is what ``/dev/tee0`` plus the OP-TEE driver plus the secure
world are on a real machine, in one process.  Contexts (``open_context()``)
allocate and register shared memory with the constructors of the Linux TEE
subsystem (DESIGN.md section 4), each of which sets exactly its flags:

=====================  ====================  =========================================
constructor            flags                 notes
=====================  ====================  =========================================
alloc_user_buf         DYNAMIC | POOL        page-aligned; id (lowest free from 1)
alloc_kernel_buf       DYNAMIC | POOL        page-aligned; no id (-1)
alloc_priv_buf         PRIV | POOL           16-byte aligned; never registered
register_user_buf      USER_MAPPED | DYNAMIC any alignment, must be writable; id
register_kernel_buf    DYNAMIC               any alignment; no id
=====================  ====================  =========================================

An allocation served by the reserved static pool clears DYNAMIC.  The pool is
chosen from the TEE's capabilities: DYNAMIC_SHM gives the dynamic pool
(contiguous frames, registered with the secure world through a REGISTER_SHM
page list unless PRIV); otherwise the reserved static pool.  Registration of
existing buffers needs REG_MEM, offered only with DYNAMIC_SHM.

Release order (``tee_shm_release``): a pool buffer is unregistered from the
secure world (if it was registered) and its memory returned to the pool; a
registered buffer is unregistered, then its frames released.  Memory is
zeroed when freed, so every allocation starts zeroed.

Accounting invariants, checked by the tests after every operation:
  ``dynamic.free_frames + dynamic.used_frames == dynamic.nframes``
  ``static.free_bytes + static.used_bytes == static.size``
  ``len(ids) == number of live shms with an id``

Concurrency: a System and everything it hands out belong to one thread at a
time; the pool service serialises its clients' requests onto one System.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import pagelist
from ._backend import BACKEND, core
from .api import SIZE_LIMIT, check_shm_id, check_size, check_writable, require_reg_mem
from .config import Config
from .constants import ATTR_NONCONTIG, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, Attr, MsgCmd, ShmFlags
from .errors import (
    BadParameters,
    Closed,
    ItemNotFound,
    TeeError,
)
from .fragmentation import unusable_indices
from .mapping import Mapping, buffer_span, find_mapping, mapping_view
from .memory import Arena, PhysicalMemory, Segment
from .storage import LIVE, Storage, cleanup_stale
from .tee.msg import RET, RET_OFFSET, MsgArg
from .tee.secure import SecureWorld

#: Per-object frame tables up to this many pages are kept when their last registration goes.
_KEEP_FILE_FRAMES = 4096

#: Alignment of alloc_priv_buf (2 * sizeof(long) on 64-bit).
PRIV_ALIGN = 16

# The flags each constructor sets (section 4), computed once: enum arithmetic is
# slow enough to show on the allocation path.
_POOL_DYNAMIC = ShmFlags.DYNAMIC | ShmFlags.POOL
_POOL_STATIC = ShmFlags.POOL
_POOL_PRIV = ShmFlags.PRIV | ShmFlags.POOL
_USER_MAPPED = ShmFlags.USER_MAPPED | ShmFlags.DYNAMIC
_KERNEL_REG = ShmFlags.DYNAMIC


# The driver's one-parameter commands, as plain ints for the hot path.
_REGISTER = int(MsgCmd.REGISTER_SHM)
_UNREGISTER = int(MsgCmd.UNREGISTER_SHM)
_REGISTER_ATTR = int(Attr.TMEM_OUTPUT | ATTR_NONCONTIG)
_UNREGISTER_ATTR = int(Attr.RMEM_INPUT)
#: Pages a single list page holds (longer lists take kernel pages from the arena).
_LIST_ENTRIES = pagelist.ENTRIES_PER_LIST_PAGE


#: The backing of a dynamic-pool Shm: frames + storage pages + mapping (ext/arena.pyx).
_ArenaRun = core.ArenaRun


def _npages(offset: int, size: int) -> int:
    return (offset + size + PAGE_MASK) // PAGE_SIZE


# ---------------------------------------------------------------------------------------
# Backing of an Shm: where its frames came from and where its bytes live
# ---------------------------------------------------------------------------------------
@dataclass
class _StaticBacking:
    pa: int
    length: int


@dataclass
class _UserBacking:
    """A registered buffer: the caller's object, pinned by our memoryview of it."""

    view: memoryview
    key: tuple[str, int]
    file_pages: np.ndarray  # page index within the backing object, per page
    interval_sids: list[int]


class Shm:
    """A shared-memory object (``struct tee_shm``).

    Attributes: ``id`` (-1 when none), ``size`` (bytes), ``offset`` (start of
    the buffer within its first page), ``flags`` (:class:`ShmFlags`),
    ``pages`` (numpy uint64, the PA of each 4 KiB page), ``paddr`` (PA of the
    first byte when the pages are physically contiguous, else None),
    ``page_run`` (``(first page PA, count)`` when contiguous, else None),
    ``cookie`` (what the secure world knows it by).

    ``close()`` drops one reference (``Context.shm_from_id`` takes one); the
    last frees the memory.  Using a released Shm raises :class:`Closed`.
    """

    __slots__ = ("context", "id", "size", "offset", "flags", "_pages", "_run", "paddr", "cookie",
                 "registered", "_refs", "_backing", "_views", "__weakref__")

    def __init__(self, context: "Context", flags: ShmFlags, size: int, offset: int,
                 pages: np.ndarray | None, cookie: int, backing: Any,
                 run: tuple[int, int] | None = None) -> None:
        self.context = context
        self.id = -1
        self.flags = flags
        self.size = size
        self.offset = offset
        self.cookie = cookie
        self.registered = False  # known to the secure world by cookie
        self._refs = 1
        self._backing = backing
        self._views: list[memoryview] | tuple[()] = ()  # a list from the first view() on
        self._pages: np.ndarray | None
        self._run: tuple[int, int] | None
        self.paddr: int | None
        if run is not None:
            # physically contiguous: (first page PA, page count); ``pages`` is built on demand
            self._pages = None
            self._run = run
            self.paddr = run[0] + offset
        else:
            assert pages is not None, "a scattered shm needs its page array"
            pages.flags.writeable = False
            self._pages = pages
            self._run = None
            first, n = int(pages[0]), len(pages)
            # contiguous iff the span matches and every step is one page (checked only then)
            contiguous = n == 1 or (int(pages[-1]) - first == (n - 1) * PAGE_SIZE and
                                    bool(np.all(np.diff(pages.astype(np.int64)) == PAGE_SIZE)))
            self.paddr = first + offset if contiguous else None

    @property
    def pages(self) -> np.ndarray:
        """The PA of each 4 KiB page of the buffer (read-only numpy uint64)."""
        if self._pages is None:
            assert self._run is not None
            first, count = self._run
            pages = np.arange(first, first + count * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)
            pages.flags.writeable = False
            self._pages = pages
        return self._pages

    @property
    def page_run(self) -> tuple[int, int] | None:
        """``(PA of the first page, page count)`` when the pages are physically
        consecutive, else None (read ``pages`` then); builds no array."""
        if self._run is not None:
            return self._run
        if self.paddr is None:
            return None
        pages = self.pages
        return int(pages[0]), len(pages)

    @property
    def closed(self) -> bool:
        return self._refs <= 0

    def _check(self) -> None:
        if self._refs <= 0:
            raise Closed(f"shm (id {self.id}, cookie {self.cookie:#x}) is released")

    def view(self) -> memoryview:
        """A writable memoryview of the buffer's bytes (zero-copy).

        Views are released when the Shm is freed; a view used after that
        raises ValueError.  Keep no numpy array of a view beyond the Shm's life.
        """
        self._check()
        backing = self._backing
        system = self.context.system
        if type(backing) is _ArenaRun:
            start = backing.index * PAGE_SIZE + self.offset
            base = memoryview(backing.segment.storage.mm)
            view = base[start:start + self.size]
            base.release()
        elif isinstance(backing, _StaticBacking):
            start = backing.pa - system.config.static_base
            assert system._carveout is not None
            base = memoryview(system._carveout.mm)
            view = base[start:start + self.size]
            base.release()
        else:
            view = backing.view[:]
        if self._views:
            self._views.append(view)
        else:
            self._views = [view]
        return view

    def close(self) -> None:
        """Drop one reference; the last one frees the memory."""
        refs = self._refs - 1
        if refs < 0:
            self._check()  # raises Closed
        self._refs = refs
        if refs == 0:
            ctx = self.context  # Context._release, inlined
            ctx.shms.pop(self.cookie, None)
            ctx.system._release(self)

    def __enter__(self) -> "Shm":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.close()

    def __repr__(self) -> str:
        state = "released" if self.closed else f"refs={self._refs}"
        paddr = f"{self.paddr:#x}" if self.paddr is not None else "scattered"
        return (f"<Shm id={self.id} size={self.size:#x} offset={self.offset:#x} "
                f"flags={self.flags!r} pages={len(self.pages)} paddr={paddr} {state}>")


_new_shm = object.__new__


def _pool_shm(context: "Context", flags: ShmFlags, run: Any, npages: int, cookie: int) -> Shm:
    """``Shm.__init__`` for a dynamic-pool run at offset 0, minus its branches (hot path)."""
    shm: Shm = _new_shm(Shm)
    pa = run.pa
    shm.context = context
    shm.id = -1
    shm.flags = flags
    shm.size = npages << PAGE_SHIFT
    shm.offset = 0
    shm.cookie = cookie
    shm.registered = False
    shm._refs = 1
    shm._backing = run
    shm._views = ()
    shm._pages = None
    shm._run = (pa, npages)
    shm.paddr = pa
    return shm


# ---------------------------------------------------------------------------------------
# Context
# ---------------------------------------------------------------------------------------
class Context:
    """A client context, as opening ``/dev/tee0`` gives one.

    Closing it releases everything it holds (its shms, whatever their
    reference counts, and its storage).
    """

    def __init__(self, system: "System", cid: int, name: str = "") -> None:
        self.system = system
        self.cid = cid
        self.name = name or f"ctx{cid}"
        self.shms: dict[int, Shm] = {}  # by cookie
        self.arena = Arena(system.memory, system.config.arena_step, system.config.shm_prefix,
                           owner=self, frames=system.dynamic)
        # the compiled halves of Arena.take / Arena.give, for the allocation hot path
        self._take = self.arena.pages.take
        self._give = self.arena.pages.give
        self.closed = False
        self.sessions: dict[int, Any] = {}

    def _check(self) -> None:
        if self.closed:
            raise Closed(f"context {self.name} is closed")
        self.system._check()

    # -- allocation ------------------------------------------------------------------
    def alloc_user_buf(self, size: int) -> Shm:
        """Allocate a buffer user space can map; it gets an id (DYNAMIC | POOL)."""
        return self._alloc(size, PAGE_SIZE, _POOL_DYNAMIC, with_id=True)

    def alloc_kernel_buf(self, size: int) -> Shm:
        """Allocate a driver buffer shared with the TEE; no id (DYNAMIC | POOL)."""
        return self._alloc(size, PAGE_SIZE, _POOL_DYNAMIC, with_id=False)

    def alloc_priv_buf(self, size: int) -> Shm:
        """Allocate a driver-private buffer, never registered (PRIV | POOL)."""
        return self._alloc(size, PRIV_ALIGN, _POOL_PRIV, with_id=False)

    def _alloc(self, size: int, align: int, flags: ShmFlags, with_id: bool) -> Shm:
        system = self.system
        if self.closed or system._closed:
            self._check()  # raises Closed
        if type(size) is not int or not 0 < size < SIZE_LIMIT:  # (bool is not int here)
            check_size(size)
        if system.pool == "dynamic":
            return self._adopt(with_id, system._alloc_dynamic, self, size, flags)
        # an allocation from the static pool clears DYNAMIC
        return self._adopt(with_id, system._alloc_static, self, size, align,
                           _POOL_STATIC if flags is _POOL_DYNAMIC else flags)

    def _adopt(self, with_id: bool, make: Any, *args: Any) -> Shm:
        """Run ``make(*args)`` with an id reserved first (idr_alloc with NULL, then
        idr_replace, as the kernel does), so a failure frees the id and nothing leaks."""
        ids = self.system.ids
        shm_id = ids.alloc(None) if with_id else -1
        try:
            shm: Shm = make(*args)
        except BaseException:
            if with_id:
                ids.remove(shm_id)
            raise
        if with_id:
            shm.id = shm_id
            ids.replace(shm_id, shm)
        self.shms[shm.cookie] = shm
        return shm

    # -- registration ------------------------------------------------------------------
    def register_user_buf(self, obj: Any) -> Shm:
        """Register a writable buffer backed by POSIX shm; it gets an id.

        Flags USER_MAPPED | DYNAMIC. Raises NotSupported without REG_MEM,
        NotSharedMemory for private or read-only memory.
        """
        return self._register(obj, _USER_MAPPED, with_id=True)

    def register_kernel_buf(self, obj: Any) -> Shm:
        """Register a buffer backed by POSIX shm for the driver's use; no id (DYNAMIC)."""
        return self._register(obj, _KERNEL_REG, with_id=False)

    def _register(self, obj: Any, flags: ShmFlags, with_id: bool) -> Shm:
        self._check()
        system = self.system
        require_reg_mem(system.config.gen_caps)
        return self._adopt(with_id, system._register, self, obj, flags)

    # -- lookup -------------------------------------------------------------------------
    def shm_from_id(self, shm_id: int) -> Shm:
        """The shm with this id, with one more reference (close() it when done).

        ItemNotFound (EINVAL in the kernel) for a free, reserved or foreign id.
        """
        self._check()
        check_shm_id(shm_id)
        shm = self.system.ids.find(shm_id)
        if shm is None or shm.context is not self or shm.closed:
            raise ItemNotFound(f"no shm with id {shm_id} in context {self.name}")
        shm._refs += 1
        return shm

    # -- sessions with trusted apps (the driver side lives in poolsvc/tee/driver.py) --------
    def open_session(self, uuid: Any, params: Any = (), login: int = 0) -> Any:
        """Open a session with the trusted app ``uuid``: a :class:`poolsvc.tee.driver.Session`.

        ``params``: up to 4 driver parameters (``poolsvc.tee.driver.Value``,
        ``RegisteredMemref``, ``TempMemref``, a Shm, or None).  Raises
        TeeError (code, origin) when the secure world or the app refuses.
        """
        from .tee.driver import Session

        return Session.open(self, uuid, params, login)

    def _close_sessions(self) -> None:
        """Close this context's sessions (close() calls it before releasing memory)."""
        from .tee.driver import close_context_sessions

        close_context_sessions(self)

    # -- release -------------------------------------------------------------------------
    def _release(self, shm: Shm) -> None:
        self.shms.pop(shm.cookie, None)
        self.system._release(shm)

    def usage(self) -> dict[str, int]:
        """Bytes and objects this context holds."""
        return {
            "shms": len(self.shms),
            "bytes": sum(s.size for s in self.shms.values()),
            "arena_bytes": self.arena.bytes_total,
            "sessions": len(self.sessions),
        }

    def close(self) -> None:
        """Release every shm and session of this context, then its storage. Idempotent."""
        if self.closed:
            return
        closer = getattr(self, "_close_sessions", None)
        if closer is not None:
            closer()
        for shm in list(self.shms.values()):
            shm._refs = 0
            self._release(shm)
        self.arena.close()
        self.closed = True
        self.system.contexts.pop(self.cid, None)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Context {self.name} shms={len(self.shms)}{' closed' if self.closed else ''}>"


# ---------------------------------------------------------------------------------------
# System
# ---------------------------------------------------------------------------------------
@dataclass
class _Interval:
    """A registered mapping of a client's shm object, attached as storage."""

    sid: int
    mapping: Mapping
    view: memoryview
    refs: int = 0


@dataclass
class _FileFrames:
    """Physical frames given to the pages of one backing object while registered."""

    pa: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    refs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    sid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def grow(self, n: int) -> None:
        if n > len(self.pa):
            extra = n - len(self.pa)
            self.pa = np.concatenate([self.pa, np.zeros(extra, np.uint64)])
            self.refs = np.concatenate([self.refs, np.zeros(extra, np.uint32)])
            self.sid = np.concatenate([self.sid, np.full(extra, -1, np.int32)])


class System:
    """An embedded simulated machine: physical memory, pools, contexts and a TEE.

    ``System(config=None)`` uses the default layout (:class:`Config`).  Use it
    as a context manager, or call :meth:`close`; nothing is left in
    ``/dev/shm`` either way (objects are unlinked as soon as they are mapped).
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config = config or Config()
        cleanup_stale(config.shm_prefix)
        self._closed = False
        self.memory = PhysicalMemory(config)
        self.phys = self.memory
        self.ids = core.IdTable()
        self.contexts: dict[int, Context] = {}
        self._cids = itertools.count(1)
        self._cookies = itertools.count(0x1000)
        self._intervals: dict[tuple[int, int, str, int], _Interval] = {}
        self._files: dict[tuple[str, int], _FileFrames] = {}
        self.pool = "dynamic" if config.dynamic_shm else "static"
        self.dynamic = core.FrameAllocator(config.dynamic_base, config.dynamic_size // PAGE_SIZE,
                                           config.max_contig_order)
        self.static: Any = None  # core.RangeAllocator when the TEE has a reserved pool
        self._carveout: Storage | None = None
        self._msg: tuple[int, int, Segment, int] | None = None
        # the kernel storage page that backs the list frame of one-list-page
        # registrations (all zero between calls), with dynamic shm
        self._list_scratch_page: tuple[Segment, int] | None = None
        self._smc: Any = None  # core.SmcDriver: the driver's end of the message call
        self.kernel_arena = Arena(self.memory, min(config.arena_step, 4 << 20),
                                  config.shm_prefix, owner="kernel", frames=self.dynamic)
        try:
            if config.reserved_shm:
                self.static = core.RangeAllocator(config.static_base, config.static_size,
                                                  config.min_alloc_order, config.static_policy)
                self._carveout = Storage.create(config.static_size, config.shm_prefix)
                self._carveout_zero = np.frombuffer(self._carveout.mm, dtype=np.uint8)
                sid = self.memory.attach(self._carveout.mm, "carveout")
                self._carveout_sid = sid
                self.memory.table.map_range(config.static_base, config.static_size // PAGE_SIZE, sid, 0)
            self.tee = SecureWorld(self.memory, config.sec_caps)
            self.tee.system = self
            self._msg_pa = self._alloc_msg_page()
            scratch = self._list_scratch_page
            self._smc = core.SmcDriver(self.memory.table, self.dynamic, self._msg_pa,
                                       self.tee.call_with_arg,
                                       -1 if scratch is None else scratch[0].sid,
                                       0 if scratch is None else scratch[1])
        except BaseException:
            self._teardown()
            raise

    # -- lifecycle -------------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise Closed("system is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def open_context(self, name: str = "") -> Context:
        """A new client context (like opening /dev/tee0)."""
        self._check()
        cid = next(self._cids)
        ctx = Context(self, cid, name)
        self.contexts[cid] = ctx
        return ctx

    def close(self) -> None:
        """Close every context and release all memory and storage. Idempotent."""
        if self._closed:
            return
        for ctx in list(self.contexts.values()):
            ctx.close()
        self._teardown()
        self._closed = True

    def _teardown(self) -> None:
        self._smc = None
        scratch = getattr(self, "_list_scratch_page", None)
        if scratch is not None:
            self.kernel_arena.free(scratch[0], scratch[1], 1)
            self._list_scratch_page = None
        msg = getattr(self, "_msg", None)
        if msg is not None:
            self._free_kernel_pages(*msg)
            self._msg = None
        self.kernel_arena.close()
        if self._carveout is not None:
            self.memory.table.unmap_range(self.config.static_base, self.config.static_size // PAGE_SIZE)
            self.memory.detach(self._carveout_sid)
            del self._carveout_zero
            self._carveout.close()
            self._carveout = None

    def __enter__(self) -> "System":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # -- kernel-owned pages (page lists, message buffers) ------------------------------------
    def _alloc_kernel_pages(self, npages: int) -> tuple[int, int, Segment, int]:
        """Contiguous dynamic frames backed by the kernel arena: (pa, npages, seg, index).

        Not a hot path (page lists longer than one page, the message page);
        poolsvc.tee.driver uses the tuple too.
        """
        pa = self.dynamic.alloc_contig(npages)
        try:
            seg, index = self.kernel_arena.alloc(npages)
        except BaseException:
            self.dynamic.free_contig(pa, npages)
            raise
        try:
            self.memory.table.map_range(pa, npages, seg.sid, index)
        except BaseException:  # (a frame the table still maps: a bug elsewhere; leak nothing)
            self.kernel_arena.free(seg, index, npages)
            self.dynamic.free_contig(pa, npages)
            raise
        return pa, npages, seg, index

    def _free_kernel_pages(self, pa: int, npages: int, seg: Segment, index: int) -> None:
        self.memory.table.unmap_range(pa, npages)
        self.kernel_arena.free(seg, index, npages)
        self.dynamic.free_contig(pa, npages)

    def _alloc_msg_page(self) -> int:
        """Where the driver places ``struct optee_msg_arg`` for the secure world.

        With dynamic shm, also takes the scratch storage page of one-page lists.
        """
        if self.config.dynamic_shm or self.static is None:
            msg = self._alloc_kernel_pages(1)
            self._msg = msg
            if self.config.dynamic_shm:
                self._list_scratch_page = self.kernel_arena.alloc(1)
            return msg[0]
        self._msg = None
        return int(self.static.alloc(PAGE_SIZE, PAGE_SIZE))

    def call_tee(self, msg: MsgArg) -> None:
        """Driver path: place ``msg`` in shared memory, call the secure world, check ``ret``.

        Raises TeeError when the secure world answers with a non-zero code.  (The
        driver's own commands here, REGISTER_SHM and UNREGISTER_SHM, have no outputs
        beyond ``ret`` and ``ret_origin``; ``poolsvc.tee.driver`` reads whole replies.)
        """
        data = msg.pack()
        if len(data) > PAGE_SIZE:
            raise BadParameters(f"message of {len(msg.params)} parameters does not fit in a page")
        self.memory.write(self._msg_pa, data)
        self.tee.call_with_arg(self._msg_pa)
        ret, origin = RET.unpack(self.memory.read(self._msg_pa + RET_OFFSET, RET.size))
        self._check_ret(msg.cmd, ret, origin)

    @staticmethod
    def _check_ret(cmd: int, ret: int, origin: int) -> None:
        if ret != 0:
            raise TeeError(f"secure world answered {ret:#x} (origin {origin}) "
                           f"to command {cmd}", ret, origin)

    def _tee_register(self, pages: np.ndarray, offset: int, size: int, cookie: int) -> None:
        """REGISTER_SHM: build the page list in kernel pages, hand it over, free the list.

        A list of one list page (up to 511 pages) is built by ``core.SmcDriver``
        in a fresh frame, as always, backed by the System's scratch storage page
        (zeroed after each use), and timed by it; longer lists get kernel pages
        from the arena.  ``last_register_seconds`` is set after a success.
        """
        if len(pages) <= _LIST_ENTRIES and self._list_scratch_page is not None:
            smc = self._smc
            ret, origin = smc.register(pages, offset, size, cookie)
            if ret != 0:
                self._check_ret(_REGISTER, ret, origin)
            #: seconds the last registration took (page list + REGISTER_SHM), for the study
            self.last_register_seconds = smc.last_seconds
            return
        t0 = time.perf_counter()
        nlist = pagelist.list_pages_needed(len(pages))
        list_pages = self._alloc_kernel_pages(nlist)
        list_pa, _, seg, index = list_pages
        try:
            with memoryview(seg.storage.mm) as whole:
                with whole[index * PAGE_SIZE:(index + nlist) * PAGE_SIZE] as out:
                    core.pagelist_build_into(pages, offset, list_pa, out)
            ret, origin = self._smc.call1(_REGISTER, _REGISTER_ATTR, list_pa | offset, size, cookie)
        finally:
            self._free_kernel_pages(*list_pages)
        if ret != 0:
            self._check_ret(_REGISTER, ret, origin)
        self.last_register_seconds = time.perf_counter() - t0

    def _tee_register_run(self, pa: int, npages: int, size: int, cookie: int) -> None:
        """``_tee_register`` of the contiguous pages from ``pa`` at offset 0 (no page array)."""
        if npages > _LIST_ENTRIES or self._list_scratch_page is None:
            self._tee_register(np.arange(pa, pa + npages * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64),
                               0, size, cookie)
            return
        smc = self._smc
        ret, origin = smc.register_run(pa, npages, 0, size, cookie)
        if ret != 0:
            self._check_ret(_REGISTER, ret, origin)
        self.last_register_seconds = smc.last_seconds

    def _tee_unregister(self, cookie: int) -> None:
        ret, origin = self._smc.unregister(cookie)
        if ret != 0:
            self._check_ret(_UNREGISTER, ret, origin)

    # -- pools ---------------------------------------------------------------------------------
    def _alloc_dynamic(self, ctx: Context, size: int, flags: ShmFlags) -> Shm:
        """alloc_pages_exact + registration (unless PRIV): frames, zeroed storage pages
        and their mapping come from one compiled call (``core.ArenaPages.take``)."""
        npages = (size + PAGE_MASK) >> PAGE_SHIFT
        run = ctx._take(npages)
        if run is None:  # no segment has room: the Arena grows (policy) and takes
            run = ctx.arena.take(npages)
        shm = _pool_shm(ctx, flags, run, npages, next(self._cookies))
        if flags is not _POOL_PRIV:
            try:
                self._tee_register_run(run.pa, npages, shm.size, shm.cookie)
            except BaseException:
                ctx.arena.give(run)
                raise
            shm.registered = True
        return shm

    def _alloc_static(self, ctx: Context, size: int, align: int, flags: ShmFlags) -> Shm:
        assert self.static is not None
        pa = self.static.alloc(size, align)
        length = self.static.allocation_at(pa)[1]
        offset = pa & PAGE_MASK
        npages = (offset + length + PAGE_MASK) // PAGE_SIZE
        return Shm(ctx, flags, length, offset, None, next(self._cookies), _StaticBacking(pa, length),
                   (pa - offset, npages))

    def _free_static(self, shm: Shm) -> None:
        b: _StaticBacking = shm._backing
        start = b.pa - self.config.static_base
        self._carveout_zero[start:start + b.length] = 0
        self.static.free(b.pa)

    # -- registration of existing buffers ---------------------------------------------------------
    def _register(self, ctx: Context, obj: Any, flags: ShmFlags) -> Shm:
        view, addr, length = buffer_span(obj)
        try:
            mapping = find_mapping(addr, length)
            check_writable(view, addr, mapping.writable)
            return self._register_span(ctx, view, mapping, addr, length, flags)
        except BaseException:
            view.release()
            raise

    def _interval(self, m: Mapping) -> _Interval:
        key = (m.start, m.end, m.dev, m.inode)
        interval = self._intervals.get(key)
        if interval is None:
            view = mapping_view(m)
            sid = self.memory.attach(view, "user")
            interval = _Interval(sid, m, view)
            self._intervals[key] = interval
        return interval

    def _put_interval(self, sid: int) -> None:
        for key, interval in self._intervals.items():
            if interval.sid == sid:
                interval.refs -= 1
                if interval.refs == 0:
                    del self._intervals[key]
                    self.memory.detach(sid)
                    interval.view.release()
                return

    def _register_span(self, ctx: Context, view: memoryview, m: Mapping, addr: int,
                       length: int, flags: ShmFlags) -> Shm:
        offset = addr & PAGE_MASK
        npages = _npages(offset, length)
        first_vpage = (addr - m.start) // PAGE_SIZE  # page index within the mapping
        first_fpage = (m.file_offset // PAGE_SIZE) + first_vpage  # within the object
        file_pages = np.arange(first_fpage, first_fpage + npages, dtype=np.int64)
        frames = self._files.get(m.key)
        if frames is None:
            frames = self._files[m.key] = _FileFrames()
        frames.grow(int(file_pages[-1]) + 1)
        fresh = file_pages[frames.refs[file_pages] == 0]
        interval = self._interval(m)
        interval.refs += 1  # held by this registration
        try:
            if len(fresh):
                new_pa = self.dynamic.alloc_scattered(len(fresh))
                vpages = fresh - (m.file_offset // PAGE_SIZE)
                try:
                    self._map_file_pages(new_pa, vpages, interval.sid)
                except BaseException:
                    self.dynamic.free_pages(new_pa)
                    raise
                frames.pa[fresh] = new_pa
                frames.sid[fresh] = interval.sid
            sids = sorted({int(s) for s in frames.sid[file_pages]} - {interval.sid})
            for sid in sids:
                self._get_interval(sid)
            frames.refs[file_pages] += 1
        except BaseException:
            self._put_interval(interval.sid)
            raise
        pages = frames.pa[file_pages].copy()
        shm = Shm(ctx, flags, length, offset, pages, next(self._cookies),
                  _UserBacking(view, m.key, file_pages, [interval.sid] + sids))
        try:
            self._tee_register(pages, offset, length, shm.cookie)
        except BaseException:
            self._unpin_user(shm)
            raise
        shm.registered = True
        return shm

    def _get_interval(self, sid: int) -> None:
        for interval in self._intervals.values():
            if interval.sid == sid:
                interval.refs += 1
                return

    def _map_file_pages(self, pas: np.ndarray, vpages: np.ndarray, sid: int) -> None:
        """Map frames ``pas[i]`` to page ``vpages[i]`` of storage ``sid``, run by run."""
        if int(vpages[-1]) - int(vpages[0]) == len(vpages) - 1:  # one run: the usual case
            self.memory.table.map_pages(pas, sid, int(vpages[0]))
            return
        breaks = np.flatnonzero(np.diff(vpages) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(vpages)]])
        done = 0
        try:
            for s, e in zip(starts.tolist(), ends.tolist()):
                self.memory.table.map_pages(pas[s:e], sid, int(vpages[s]))
                done = e
        except BaseException:
            if done:
                self.memory.table.unmap_pages(pas[:done])
            raise

    def _unpin_user(self, shm: Shm) -> None:
        b: _UserBacking = shm._backing
        frames = self._files[b.key]
        frames.refs[b.file_pages] -= 1
        gone = b.file_pages[frames.refs[b.file_pages] == 0]
        if len(gone):
            pas = frames.pa[gone].copy()
            self.memory.table.unmap_pages(pas)
            self.dynamic.free_pages(pas)
            frames.pa[gone] = 0
            frames.sid[gone] = -1
        if len(frames.pa) > _KEEP_FILE_FRAMES and not frames.refs.any():
            del self._files[b.key]  # small tables stay, to spare the next registration
        for sid in b.interval_sids:
            self._put_interval(sid)
        b.view.release()

    # -- release -----------------------------------------------------------------------------------
    def _release(self, shm: Shm) -> None:
        """tee_shm_release: unregister (if registered), free memory, drop the id."""
        shm._refs = 0
        if shm._views:
            for view in shm._views:
                try:
                    view.release()
                except BufferError:
                    LIVE["exported_views"] += 1
            shm._views = ()
        if shm.registered:
            try:
                self._tee_unregister(shm.cookie)
            except BaseException:
                # The secure world refused (a running call uses the cookie): keep the
                # shm alive and owned, so that a later close() can finish the job.
                shm._refs = 1
                shm.context.shms[shm.cookie] = shm
                raise
            shm.registered = False
        backing = shm._backing
        if type(backing) is _ArenaRun:
            ctx = shm.context  # Arena.give, inlined: zero, unmap and free in one call
            if ctx._give(backing) > 1:  # its segment emptied, and another is empty too
                ctx.arena._drop(backing.segment)
        elif isinstance(backing, _StaticBacking):
            self._free_static(shm)
        else:
            self._unpin_user(shm)
        if shm.id > 0:
            self.ids.remove(shm.id)

    # -- observability ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Pools, frames, ids, storage and per-context usage, as plain data."""
        dyn = self.dynamic
        blocks = dyn.free_blocks_per_order()
        out: dict[str, Any] = {
            "backend": BACKEND,
            "pool": self.pool,
            "caps": {"sec_caps": int(self.config.sec_caps), "gen_caps": int(self.config.gen_caps)},
            "dynamic": {
                "base": self.config.dynamic_base,
                "frames": dyn.nframes,
                "free_frames": dyn.free_frames,
                "used_frames": dyn.used_frames,
                "largest_free_run": dyn.largest_free_run,
                "free_blocks_per_order": [int(x) for x in blocks],
                "unusable_index": unusable_indices(blocks),
            },
            "static": None,
            "ids": len(self.ids),
            "registered_cookies": len(self.tee.registered),
            "mapped_frames": self.memory.table.mapped_frames,
            "storage": {"objects": LIVE["storage"], "fds": LIVE["fd"],
                        "kernel_arena_bytes": self.kernel_arena.bytes_total},
            "contexts": {ctx.name: ctx.usage() for ctx in self.contexts.values()},
            "pid": os.getpid(),
        }
        if self.static is not None:
            st = self.static
            out["static"] = {"base": st.base, "size": st.size, "free": st.free_bytes,
                             "used": st.used_bytes, "largest_free": st.largest_free,
                             "allocations": st.count}
        return out

    def __repr__(self) -> str:
        return f"<System pool={self.pool} contexts={len(self.contexts)}{' closed' if self._closed else ''}>"
