"""Finding the POSIX shared-memory object behind a buffer.

``register_*_buf(obj)`` accepts any writable buffer-protocol object.  This
module finds, from the buffer's virtual address, the mapping that holds it by
reading the process's memory maps (``/proc/self/maps``): a shared (``s``)
mapping of a file under ``/dev/shm`` or of a memfd (poolsvc's own storage, or
a caller's).  A buffer in no such mapping is private memory (heap, anonymous,
``MAP_PRIVATE``): :func:`private_mapping` describes it, and
``poolsvc/usermem.py`` registers it zero-copy as well.

Mappings found are kept in a compiled ``AddressMap`` (the lookup over known
mappings), and the maps are read again only on a miss.  A mapping can be
replaced at the same address at any time, so a cached hit is confirmed before
use: by the buffer's exporter when it is the open ``mmap`` confirmed last
time, unmoved (an open mmap cannot be unmapped from Python), else with one
``stat`` of ``/proc/self/map_files/START-END`` (same device and inode); if
that fails (the mapping changed, or the kernel refuses map_files to this
process) the maps are read again.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from ._backend import core
from .constants import PAGE_MASK, PAGE_SHIFT
from .errors import BadParameters, NotSharedMemory

SHM_PREFIX = "/dev/shm/"


@dataclass(frozen=True)
class Mapping:
    """One shared mapping of a ``/dev/shm`` object in this process."""

    start: int
    end: int
    writable: bool
    file_offset: int
    dev: str
    inode: int
    path: str

    @cached_property
    def key(self) -> "ObjectKey":
        """Identity of the backing object: ``(st_dev, st_ino)``, as ``os.fstat`` gives them."""
        return (_dev_number(self.dev), self.inode)


#: The identity of a backing object, ``(st_dev, st_ino)``: one key format for every
#: place that names a registered object.
ObjectKey = tuple[int, int]


def dev_string(st_dev: int) -> str:
    """``st_dev`` as ``/proc/self/maps`` prints it (``major:minor`` in hex)."""
    return f"{os.major(st_dev):02x}:{os.minor(st_dev):02x}"


def buffer_span(obj: Any) -> tuple[memoryview, int, int]:
    """``(memoryview, address, length)`` of a contiguous buffer.

    Raises BadParameters for a non-contiguous or empty buffer.
    """
    try:
        view = memoryview(obj)
    except TypeError as exc:
        raise BadParameters(f"{type(obj).__name__} does not support the buffer protocol") from exc
    if not view.c_contiguous:
        raise BadParameters("buffer is not C-contiguous")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if view.nbytes == 0:
        raise BadParameters("buffer is empty")
    return view, core.buffer_address(view), view.nbytes


def shm_mappings() -> list[Mapping]:
    """The shared mappings of ``/dev/shm`` objects and memfds in this process."""
    found: list[Mapping] = []
    with open("/proc/self/maps", "rb") as fh:
        for raw in fh:
            if b"/dev/shm/" not in raw and b"/memfd:" not in raw:
                continue
            parts = raw.decode("utf-8", "replace").split(None, 5)
            if len(parts) < 6:
                continue
            span, perms, offset, dev, inode, path = parts
            if perms[3] != "s":
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            found.append(Mapping(start, end, perms[1] == "w", int(offset, 16), dev,
                                 int(inode), path.strip()))
    return found


def _dev_number(dev: str) -> int:
    major, minor = (int(x, 16) for x in dev.split(":"))
    return os.makedev(major, minor)


class _Known:
    """A mapping found in the maps, with the exporter last confirmed to hold it.

    ``exporter`` is a weak reference to an ``mmap.mmap`` whose buffer lay in
    the mapping when it was last confirmed, ``base`` and ``size`` where that
    mmap was then (None: no such exporter).
    """

    __slots__ = ("mapping", "exporter", "base", "size")

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping
        self.exporter: weakref.ref[mmap.mmap] | None = None
        self.base = 0
        self.size = 0

    def note(self, exporter: Any) -> None:
        """Remember ``exporter`` (whose buffer was just found in this mapping) if it is an mmap."""
        if type(exporter) is mmap.mmap and not exporter.closed:
            self.exporter = weakref.ref(exporter)
            self.base = core.buffer_address(exporter)
            self.size = len(exporter)

    def pinned_by(self, exporter: Any) -> bool:
        """True when ``exporter`` is the mmap noted, still open, where it was.

        An open ``mmap.mmap`` keeps its pages mapped where they are (only
        ``close`` unmaps it, and a ``resize`` that moves or shrinks it changes
        the base or size checked here), so a buffer it exports lies in the
        object it lay in when noted, at the same offsets; and while the
        registration holds its export, the mmap can be neither closed nor resized.
        """
        ref = self.exporter
        return (ref is not None and type(exporter) is mmap.mmap and ref() is exporter
                and not exporter.closed
                and len(exporter) == self.size and core.buffer_address(exporter) == self.base)


class MappingCache:
    """Known ``/dev/shm`` mappings of this process, confirmed before each use.

    The maps are read only on a miss: a hit is confirmed by the export that
    pins it (``_Known.pinned_by``) or by one ``stat`` of its ``map_files``
    entry, and a hit that fails both reads the maps again.
    """

    def __init__(self) -> None:
        self._amap = core.AddressMap()
        self._known: list[_Known] = []
        self.refreshes = 0

    def refresh(self) -> None:
        """Read ``/proc/self/maps`` again."""
        self._known = [_Known(m) for m in shm_mappings()]
        self._amap = core.AddressMap()
        for i, known in enumerate(self._known):
            self._amap.add(known.mapping.start, known.mapping.end, i, known.mapping.file_offset)
        self.refreshes += 1

    def _confirmed(self, m: Mapping) -> bool:
        try:
            st = os.stat(f"/proc/self/map_files/{m.start:x}-{m.end:x}")
        except OSError:
            return False
        return st.st_ino == m.inode and st.st_dev == m.key[0]

    def lookup(self, addr: int, exporter: Any = None) -> Mapping | None:
        """The mapping holding ``addr``, confirmed current, or None.

        ``exporter`` is the object whose buffer lies at ``addr`` (a
        memoryview's ``obj``), or None.
        """
        hit = self._amap.lookup(addr)
        if hit is not None:
            known = self._known[hit[0]]
            if known.pinned_by(exporter):
                return known.mapping
            if self._confirmed(known.mapping):
                known.note(exporter)
                return known.mapping
        self.refresh()
        hit = self._amap.lookup(addr)
        if hit is None:
            return None
        known = self._known[hit[0]]
        known.note(exporter)
        return known.mapping


_CACHE = MappingCache()


#: The ``st_dev`` of private memory's ``ObjectKey``: no file system has device 0.
PRIVATE_DEV = 0


def private_mapping(addr: int, length: int, exporter: Any = None) -> Mapping:
    """The pages of the private memory holding ``[addr, addr+length)``, described
    as a mapping: those of ``exporter``'s whole buffer (the object a memoryview
    of the buffer came from) when it holds the range, else those of the range.

    Its key is ``(PRIVATE_DEV, first page number)``: registrations of parts of
    one exporter share one ledger, and so get the same frames for the same
    pages (registrations through different exporters that share a page get
    frames of their own for it).
    """
    lo, hi = addr, addr + length
    if exporter is not None:
        try:
            with memoryview(exporter) as whole:
                if whole.c_contiguous and whole.nbytes:
                    base = core.buffer_address(whole)
                    if base <= lo and hi <= base + whole.nbytes:
                        lo, hi = base, base + whole.nbytes
        except (TypeError, BufferError, BadParameters):
            pass
    start = lo & ~PAGE_MASK
    end = (hi + PAGE_MASK) & ~PAGE_MASK
    return Mapping(start, end, True, 0, dev_string(PRIVATE_DEV), start >> PAGE_SHIFT, "<private>")


def find_shared(addr: int, length: int, exporter: Any = None) -> Mapping | None:
    """The shared ``/dev/shm`` mapping holding ``[addr, addr+length)``, or None
    for private memory.

    ``exporter``: the object exporting the buffer (lets an open ``mmap``
    confirm a known mapping without a system call; a ``bytearray`` and a
    numpy array that owns its data are private memory without a look at the
    maps).  Raises NotSharedMemory for a buffer that straddles the end of a
    shared mapping.
    """
    if type(exporter) is bytearray or (type(exporter) is np.ndarray and exporter.flags.owndata):
        return None
    m = _CACHE.lookup(addr, exporter)
    if m is not None and addr + length > m.end:
        raise NotSharedMemory(
            f"buffer at {addr:#x}+{length:#x} runs past its mapping's end {m.end:#x}")
    return m


def find_mapping(addr: int, length: int, exporter: Any = None) -> Mapping:
    """The shared ``/dev/shm`` mapping holding ``[addr, addr+length)`` (:func:`find_shared`).

    Raises NotSharedMemory when none does (private memory, which only the
    embedded System can register, or a buffer that straddles two mappings).
    """
    m = find_shared(addr, length, exporter)
    if m is None:
        raise NotSharedMemory(
            f"buffer at {addr:#x} is not in POSIX shared memory (it is private memory); "
            "use multiprocessing.shared_memory or posix_ipc")
    return m


def mapping_view(m: Mapping) -> memoryview:
    """A writable memoryview of a whole mapping (caller keeps the mapping alive)."""
    size = m.end - m.start
    return memoryview((ctypes.c_char * size).from_address(m.start)).cast("B")
