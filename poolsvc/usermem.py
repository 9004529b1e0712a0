"""The user-memory registry: registration of existing buffers, zero-copy.

``register_user_buf`` / ``register_kernel_buf`` pin a caller's buffer: each of
its pages gets a physical frame of dynamic RAM, mapped in the frame table to
the page's bytes, and the page list is registered with the secure world.

One registry, keyed by the backing object's identity (``ObjectKey``:
``(st_dev, st_ino)``), with one reference-count ledger: per object, per page
of the object, the frame given to it (``pa``), the storage it is mapped to
(``sid``) and how many live registrations cover it (``refs``).  Two
registrations that share pages of one object share their frames, whichever
mapping or descriptor they came through.  The ledger is the compiled
``core.UserPages`` (docs/core.md): a registration's frames are taken and
mapped in one call and given back in one call.  The storage of a page is a
*window*: one mapping of the object in this process, attached as storage;
a window is live while a page with ``refs > 0`` is mapped to it, so its
liveness follows from the same ledger.  A window of the caller's own mapping
stays attached, idle, when its last page goes (at most ``_IDLE_WINDOWS``),
and is used again only for the mapping it was made for, once
``poolsvc/mapping.py`` has confirmed that mapping current; a mapping the
registry made from a descriptor is released with its last page.

Invariants (per object):
  ``refs[p] > 0  <=>  pa[p] != 0``, and then ``sid[p]`` is a live window's
  ``sum over live registrations of their pages == sum(refs)``

Two entry points resolve the object and call the same pinning:
:meth:`UserMemory.register` finds the caller's mapping of a buffer in this
process's memory maps (``poolsvc/mapping.py``); :meth:`UserMemory.register_fd`
maps the object from a descriptor the caller already holds (the pool service
daemon, which receives the descriptor from its client), naming it by
``fstat`` without reading the maps.

Private memory (a ``bytearray``, a numpy array, an anonymous or
``MAP_PRIVATE`` mmap: anything writable in no shared mapping) is registered
zero-copy too: the object is the buffer's exporter (``mapping.private_mapping``:
a ``bytearray``, array or mmap, named by its first page), its window a view
of the exporter's pages, detached with its last pinned page, and its ledger is
dropped when no page is pinned.  The
registration's memoryview export keeps the buffer where it is: a
``bytearray``, numpy array or ``mmap`` with an export can be neither resized
nor closed.

The SIGBUS guard (``poolsvc._sigguard``, ext/guard/sigguard.c): every live
registration's pages are a guarded range, and every window is attached as a
``GuardedWindow``.  An owner that truncates a registered object can no longer
kill this process: a fault on a guarded page maps zero pages over the
registration's range and marks it dead; every export of a window (a trusted
app's view of the memory) first probes its registrations' pages, so a
truncation is found before the access, and a window holding a dead
registration refuses exports with NotSharedMemory (the request fails; the
registration stays pinned, and accounted, until its owner releases it).
Without the guard module (a pure-Python install) registrations are unguarded.

Concurrency: one thread (the System's).
"""
from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .api import check_writable
from ._backend import core
from .constants import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, ShmFlags
from .errors import BadParameters, NotSharedMemory, OutOfMemory
from .mapping import (PRIVATE_DEV, Mapping, ObjectKey, buffer_span, dev_string, find_shared,
                      mapping_view, private_mapping)
from .memory import PhysicalMemory
from .shm import Shm, UserBacking

try:  # an OS facility, not a kernel: both backends use it (docs/core.md, "The SIGBUS guard")
    from . import _sigguard as sigguard
except ImportError:  # pragma: no cover - a pure-Python install: registrations are unguarded
    sigguard = None  # type: ignore[assignment]
else:
    sigguard.set_error(NotSharedMemory)

if TYPE_CHECKING:  # pragma: no cover
    from .context import Context
    from .tee.driver import Driver

#: Per-object frame tables up to this many pages are kept when their last registration goes.
_KEEP_FILE_FRAMES = 4096
#: Windows of the caller's mappings kept attached when no page uses them.
_IDLE_WINDOWS = 16
#: Guard registrations against SIGBUS (tests and benchmarks turn it off to measure it).
GUARD = sigguard is not None


@dataclass(slots=True)
class GuardedBacking(UserBacking):
    """A registered buffer with its guarded range (``guard``: the slot, -1 when unguarded)."""

    guard: int = -1


@dataclass(eq=False)
class _Window:
    """One mapping of an object in this process, attached as storage ``sid``.

    ``where`` is ``(mapping start, end, file offset)``; ``first_page`` the
    object's page index at the mapping's start; ``own`` is True for a window
    detached with its last pinned page (a mapping the registry made itself,
    :meth:`UserMemory.register_fd`, or private memory); ``idle`` while no
    pinned page is mapped to it (then it is in ``UserMemory.idle``);
    ``storage`` is what is attached: a ``GuardedWindow`` over ``view``, or
    ``view`` itself when unguarded.
    """

    sid: int
    view: memoryview
    first_page: int
    own: bool
    where: tuple[int, int, int]
    storage: Any
    idle: bool = False


class _UserObject:
    """The ledger of one backing object (``core.UserPages``) and its windows."""

    __slots__ = ("pages", "attached")

    def __init__(self, pages: Any) -> None:
        self.pages = pages
        #: live and idle windows, by (mapping start, end, file offset)
        self.attached: dict[tuple[int, int, int], _Window] = {}

    @property
    def windows(self) -> dict[tuple[int, int, int], _Window]:
        """The live windows: those a pinned page is mapped to."""
        return {where: w for where, w in self.attached.items() if not w.idle}

    @property
    def refs(self) -> np.ndarray:
        """The reference count of each page of the object (a copy)."""
        return self.pages.refs_array()


def _non_negative(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadParameters(f"{what} {value!r} is not a non-negative int")
    return value


class UserMemory:
    """The registry of one System (see the module doc).

    ``UserMemory(memory, dynamic, cookies)``; ``driver`` is set by the System
    once its driver exists (registration needs it).
    """

    def __init__(self, memory: PhysicalMemory, dynamic: Any, cookies: Iterator[int]) -> None:
        self.memory = memory
        self.dynamic = dynamic
        self.cookies = cookies
        self.driver: Driver | None = None
        self.objects: dict[ObjectKey, _UserObject] = {}
        #: idle windows of caller mappings, oldest first, each with its object
        self.idle: dict[_Window, _UserObject] = {}

    # -- entry points ------------------------------------------------------------------------
    def register(self, ctx: "Context", obj: Any, flags: ShmFlags) -> Shm:
        """Register the buffer ``obj`` found in this process's shared mappings.

        Private memory is registered zero-copy as well (see the module doc).
        Raises BadParameters (not a contiguous non-empty buffer),
        NotSharedMemory (read-only memory, or a buffer straddling the end of a
        shared mapping), OutOfMemory, TeeError.
        """
        view, addr, length = buffer_span(obj)
        try:
            mapping = find_shared(addr, length, view.obj)
            if mapping is None:
                mapping = private_mapping(addr, length, view.obj)
            check_writable(view, addr, mapping.writable)
            return self._pin(ctx, view, mapping, addr, length, flags, None)
        except BaseException:
            view.release()
            raise

    def register_fd(self, ctx: "Context", spec: tuple[int, int, int], flags: ShmFlags) -> Shm:
        """Register ``length`` bytes at ``file_offset`` of the object open as ``fd``:
        ``spec = (fd, file_offset, length)``.

        The object is mapped read-write from ``fd`` (the descriptor stays the
        caller's) and named by ``os.fstat(fd)``.  Raises BadParameters for a bad
        range, NotSharedMemory for a descriptor that cannot be mapped shared
        and writable, OutOfMemory, TeeError.
        """
        fd, file_offset, length = spec
        _non_negative(fd, "descriptor")
        _non_negative(file_offset, "file offset")
        if _non_negative(length, "length") == 0:
            raise BadParameters("buffer is empty")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise BadParameters(f"descriptor {fd}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotSharedMemory(f"descriptor {fd} is not a shared-memory object")
        if file_offset + length > st.st_size:
            raise BadParameters(f"range [{file_offset:#x}, {file_offset + length:#x}) is beyond the "
                                f"object's {st.st_size:#x} bytes")
        start = file_offset & ~PAGE_MASK
        span = (file_offset - start + length + PAGE_MASK) & ~PAGE_MASK  # whole pages
        try:
            mm = mmap.mmap(fd, span, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=start)
        except OSError as exc:
            raise NotSharedMemory(f"cannot map descriptor {fd} shared and writable: "
                                  f"{exc.strerror}") from None
        whole = memoryview(mm)
        base = core.buffer_address(whole)
        view = whole[file_offset - start:file_offset - start + length]
        mapping = Mapping(base, base + span, True, start,
                          dev_string(st.st_dev), st.st_ino, f"/proc/self/fd/{fd}")
        try:
            return self._pin(ctx, view, mapping, base + file_offset - start, length, flags, whole)
        except BaseException:
            view.release()
            whole.release()
            raise

    # -- pinning --------------------------------------------------------------------------------
    def _window(self, obj: _UserObject, m: Mapping, whole: memoryview | None) -> _Window:
        """The window of mapping ``m`` of ``obj``, live from here on: an attached one
        (live, or idle: ``m`` was just confirmed to be that mapping), or a new one."""
        where = (m.start, m.end, m.file_offset)
        window = obj.attached.get(where)
        if window is None:
            view = whole[:] if whole is not None else mapping_view(m)
            storage: Any = view
            if GUARD:
                storage = sigguard.GuardedWindow(view, m.start, m.end)
            try:
                sid = self.memory.attach(storage, "user")
            except BaseException:
                if storage is not view:
                    storage.release()
                view.release()
                raise
            window = _Window(sid, view, m.file_offset // PAGE_SIZE,
                             whole is not None or m.key[0] == PRIVATE_DEV, where, storage)
            obj.attached[where] = window
        elif window.idle:
            window.idle = False
            del self.idle[window]
        return window

    def _drop_unused_windows(self, obj: _UserObject) -> None:
        """Retire the live windows no pinned page is mapped to: a window of the
        caller's mapping stays attached, idle, for the next registration through
        that mapping (at most ``_IDLE_WINDOWS`` of them, the oldest detached
        first); a mapping made by :meth:`register_fd` is detached and released."""
        storage_pages = obj.pages.storage_pages
        for window in [w for w in obj.attached.values() if not w.idle and not storage_pages(w.sid)]:
            if window.own:
                del obj.attached[window.where]
                self._detach(window)
                continue
            window.idle = True
            self.idle[window] = obj
            if len(self.idle) > _IDLE_WINDOWS:
                oldest = next(iter(self.idle))
                del self.idle.pop(oldest).attached[oldest.where]
                self._detach(oldest)

    def _detach(self, window: _Window) -> None:
        self.memory.detach(window.sid)
        if window.storage is not window.view:
            window.storage.release()
        window.view.release()

    @staticmethod
    def _guard(addr: int, length: int) -> int:
        """A guarded range over the pages of ``[addr, addr+length)``, probed: its slot
        (-1 when unguarded).  NotSharedMemory when a page is not backed (the object
        ends before the buffer does); OutOfMemory when every slot is taken."""
        if not GUARD:
            return -1
        lo, hi = addr & ~PAGE_MASK, (addr + length + PAGE_MASK) & ~PAGE_MASK
        slot = sigguard.add(lo, hi)
        if slot < 0:
            raise OutOfMemory(f"{sigguard.CAPACITY} registrations are guarded already; "
                              "release one first")
        if sigguard.probe(lo, hi):
            sigguard.remove(slot)
            raise NotSharedMemory(f"buffer at {addr:#x}+{length:#x} is not backed by its object "
                                  "(the object is shorter than the mapping)")
        return slot

    @staticmethod
    def dead(backing: UserBacking) -> bool:
        """True when the registration's memory was truncated under it (the guard
        replaced its pages with zeros): the owner can only release it."""
        slot = getattr(backing, "guard", -1)
        return slot >= 0 and bool(sigguard.dead(slot))

    def _pin(self, ctx: "Context", view: memoryview, m: Mapping, addr: int, length: int,
             flags: ShmFlags, whole: memoryview | None) -> Shm:
        """Frames for the pages of ``[addr, addr+length)`` of mapping ``m``, then REGISTER_SHM.

        ``whole`` is the mapping made by :meth:`register_fd` (None for the
        caller's own mapping); the Shm keeps it until released.  The frames
        are taken and mapped in one call (``core.UserPages.pin``); pages other
        registrations pinned already keep theirs.
        """
        offset = addr & PAGE_MASK
        npages = (offset + length + PAGE_MASK) >> PAGE_SHIFT
        first_fpage = (m.file_offset + addr - m.start) >> PAGE_SHIFT  # within the object
        key = m.key
        guard = self._guard(addr, length)
        try:
            obj = self.objects.get(key)
            if obj is None:
                obj = self.objects[key] = _UserObject(core.UserPages(self.memory.table, self.dynamic))
            window = self._window(obj, m, whole)
            try:
                pages = obj.pages.pin(first_fpage, npages, window.sid, window.first_page)
            finally:
                if not obj.pages.storage_pages(window.sid):
                    self._drop_unused_windows(obj)
                    self._forget_private(key, obj)
        except BaseException:
            if guard >= 0:
                sigguard.remove(guard)
            raise
        backing = GuardedBacking(view, key, first_fpage, npages, whole, guard)
        start = core.page_run_start(pages)
        if start is None:
            shm = Shm(ctx, flags, length, offset, pages, next(self.cookies), backing)
        else:  # consecutive frames: described as a run, as the pool's buffers are
            shm = Shm(ctx, flags, length, offset, None, next(self.cookies), backing,
                      run=(start, npages))
        try:
            assert self.driver is not None
            self.driver.register(pages, offset, length, shm.cookie)
        except BaseException:
            self.unpin(backing)
            raise
        shm.registered = True
        return shm

    def unpin(self, backing: UserBacking) -> None:
        """Drop a registration's references: pages no longer referenced give their frames
        back (``core.UserPages.unpin``), windows no page uses are detached, and the
        buffer's view is released."""
        key = backing.key
        obj = self.objects[key]
        if obj.pages.unpin(backing.first_page, backing.npages) and (
                len(obj.attached) > 1 or not obj.pages.pinned_pages):
            self._drop_unused_windows(obj)
            if obj.pages.npages > _KEEP_FILE_FRAMES and not obj.pages.pinned_pages:
                del self.objects[key]  # small ledgers stay, to spare the next registration
                for window in obj.attached.values():
                    del self.idle[window]
                    self._detach(window)
            self._forget_private(key, obj)
        guard = getattr(backing, "guard", -1)
        if guard >= 0:
            sigguard.remove(guard)
        backing.view.release()
        if backing.mm is not None:
            backing.mm.release()

    def _forget_private(self, key: ObjectKey, obj: _UserObject) -> None:
        """Drop the ledger of private memory once no page of it is pinned (its
        windows went with their last pages): the next registration there may be
        another buffer."""
        if key[0] == PRIVATE_DEV and not obj.pages.pinned_pages and self.objects.get(key) is obj:
            del self.objects[key]


__all__ = ["UserMemory"]
