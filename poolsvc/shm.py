"""A shared-memory object (``struct tee_shm``) and where its bytes live.

:class:`Shm` is what every constructor of a Context returns.  Its backing is
one of four kinds, and ``view()`` reads the bytes from it:

- ``ArenaRun`` (``core.ArenaRun``): a dynamic-pool buffer, a run of pages of
  one of its context's arena segments;
- :class:`StaticRun`: a page-granular buffer of the reserved static pool (a
  user or kernel buffer): carve-out addresses whose frames are mapped to a
  run of pages of one of its context's arena segments, like an ``ArenaRun``;
- :class:`StaticBacking`: a private buffer of the reserved static pool, a
  range of the carve-out's own storage (several may share a page);
- :class:`UserBacking`: a registered buffer, the caller's own object, pinned
  by a memoryview of it (``poolsvc/usermem.py``).

References: ``_refs`` counts ``close()`` calls still due (one from the
constructor, one per ``Context.shm_from_id``, one per memref of a running
call, as ``params_from_user`` takes them); the last ``close()`` hands the
Shm to ``System.release``.

Concurrency: a Shm belongs to its System's thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import core
from .api import ShmBase
from .constants import PAGE_SHIFT, PAGE_SIZE, ShmFlags
from .storage import LIVE, Storage

#: The backing of a dynamic-pool Shm: frames + storage pages + mapping (ext/arena.pyx).
ArenaRun = core.ArenaRun


class StaticRun:
    """A page-granular range of the reserved static pool, backed by its context's arena.

    ``pa`` (first carve-out PA, page-aligned), ``npages``, ``segment`` (the
    ``poolsvc.memory.Segment`` holding the bytes) and ``index`` (first page
    of the run in that segment): the frames ``pa .. pa + npages * 4096`` are
    mapped to those storage pages while the buffer lives, and to the
    carve-out's own (zero) pages otherwise.  ``segment`` and ``index`` have
    the meaning they have on an ``ArenaRun``, so the pool service describes
    both alike.
    """

    __slots__ = ("pa", "npages", "segment", "index")

    def __init__(self, pa: int, npages: int, segment: Any, index: int) -> None:
        self.pa = pa
        self.npages = npages
        self.segment = segment
        self.index = index

    def __repr__(self) -> str:
        return f"StaticRun(pa={self.pa:#x}, npages={self.npages}, index={self.index})"


@dataclass
class StaticBacking:
    """A private range of the reserved static pool: PA, length, byte offset in the carve-out."""

    pa: int
    length: int
    start: int
    carveout: Storage


@dataclass(slots=True)
class UserBacking:
    """A registered buffer: the caller's object, pinned by our memoryview of it.

    ``key`` names the backing object in the user-memory registry; the buffer
    covers pages ``[first_page, first_page + npages)`` of that object; ``mm``
    is the mapping the registry made itself (registration by descriptor),
    closed with the view, else None.
    """

    view: memoryview
    key: tuple[int, int]
    first_page: int
    npages: int
    mm: Any = None


class Shm(ShmBase):
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

    def __init__(self, context: Any, flags: ShmFlags, size: int, offset: int,
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
    def run(self) -> tuple[int, int] | None:
        """The ``(first page PA, page count)`` the buffer was allocated as; None for a page array."""
        return self._run

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

    def view(self) -> memoryview:
        """A writable memoryview of the buffer's bytes (zero-copy).

        Views are released when the Shm is freed; a view used after that
        raises ValueError.  Keep no numpy array of a view beyond the Shm's life.
        """
        self._check()
        backing = self._backing
        if type(backing) is ArenaRun or type(backing) is StaticRun:
            start = backing.index * PAGE_SIZE + self.offset
            base = memoryview(backing.segment.storage.mm)
            view = base[start:start + self.size]
            base.release()
        elif type(backing) is StaticBacking:
            start = backing.start
            base = memoryview(backing.carveout.mm)
            view = base[start:start + self.size]
            base.release()
        else:
            view = backing.view[:]
        if self._views:
            self._views.append(view)
        else:
            self._views = [view]
        return view

    @property
    def backing(self) -> Any:
        """Where the bytes live: an ArenaRun, a StaticRun, a StaticBacking or a UserBacking."""
        return self._backing

    def acquire(self) -> None:
        """One more reference (``Context.shm_from_id``); ``close()`` drops it."""
        self._refs += 1

    def retire(self) -> None:
        """Mark the Shm released and release the views handed out (before ``System.release``).

        A view still exported (a numpy array over it) cannot be released; it is
        counted in ``LIVE["exported_views"]``.
        """
        self._refs = 0
        if self._views:
            for view in self._views:
                try:
                    view.release()
                except BufferError:
                    LIVE["exported_views"] += 1
            self._views = ()

    def close(self) -> None:
        """Drop one reference; the last one frees the memory.

        Closing a released Shm does nothing (like ``SharedMemory.close()``).
        """
        refs = self._refs - 1
        if refs < 0:
            return
        self._refs = refs
        if refs == 0:
            if self._views:
                self.retire()
            ctx = self.context
            ctx.shms.pop(self.cookie, None)
            ctx.system.release(self, self._backing)

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


def pool_shm(context: Any, flags: ShmFlags, run: Any, npages: int, cookie: int) -> Shm:
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


__all__ = ["ArenaRun", "Shm", "StaticBacking", "StaticRun", "UserBacking", "pool_shm"]
