"""Finding the POSIX shared-memory object behind a buffer.

``register_*_buf(obj)`` accepts any buffer-protocol object backed by POSIX
shared memory.  This module finds, from the buffer's virtual address, the
mapping that holds it by reading the process's memory maps
(``/proc/self/maps``): a shared (``s``) mapping of a file under ``/dev/shm``
or of a memfd (poolsvc's own storage, or a caller's).
Private memory (heap, anonymous, ``MAP_PRIVATE``) and read-only mappings are
refused with :class:`~poolsvc.errors.NotSharedMemory`.

Mappings found are kept in a compiled ``AddressMap`` (the lookup over known
mappings).  A mapping can be replaced at the same address at any time, so a
cached hit is confirmed with one ``stat`` of ``/proc/self/map_files/START-END``
(same device and inode); if that fails (the mapping changed, or the kernel
refuses map_files to this process) the maps are read again.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import core
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

    @property
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
    addr = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
    return view, int(addr), view.nbytes


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


class MappingCache:
    """Known ``/dev/shm`` mappings of this process, confirmed before each use."""

    def __init__(self) -> None:
        self._amap = core.AddressMap()
        self._mappings: list[Mapping] = []

    def refresh(self) -> None:
        """Read ``/proc/self/maps`` again."""
        self._mappings = shm_mappings()
        self._amap = core.AddressMap()
        for i, m in enumerate(self._mappings):
            self._amap.add(m.start, m.end, i, m.file_offset)

    def _confirmed(self, m: Mapping) -> bool:
        try:
            st = os.stat(f"/proc/self/map_files/{m.start:x}-{m.end:x}")
        except OSError:
            return False
        return st.st_ino == m.inode and st.st_dev == _dev_number(m.dev)

    def lookup(self, addr: int) -> Mapping | None:
        """The mapping holding ``addr``, confirmed current, or None."""
        hit = self._amap.lookup(addr)
        if hit is not None and self._confirmed(self._mappings[hit[0]]):
            return self._mappings[hit[0]]
        self.refresh()
        hit = self._amap.lookup(addr)
        return None if hit is None else self._mappings[hit[0]]


_CACHE = MappingCache()


def find_mapping(addr: int, length: int) -> Mapping:
    """The shared ``/dev/shm`` mapping holding ``[addr, addr+length)``.

    Raises NotSharedMemory when none does (private memory, or a buffer that
    straddles two mappings).
    """
    m = _CACHE.lookup(addr)
    if m is None:
        raise NotSharedMemory(
            f"buffer at {addr:#x} is not in POSIX shared memory (it is private memory); "
            "use multiprocessing.shared_memory or posix_ipc")
    if addr + length > m.end:
        raise NotSharedMemory(
            f"buffer at {addr:#x}+{length:#x} runs past its mapping's end {m.end:#x}")
    return m


def mapping_view(m: Mapping) -> memoryview:
    """A writable memoryview of a whole mapping (caller keeps the mapping alive)."""
    size = m.end - m.start
    return memoryview((ctypes.c_char * size).from_address(m.start)).cast("B")
