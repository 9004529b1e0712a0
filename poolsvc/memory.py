"""The memory model: physical address space, storage registry and arenas.

Frames are identities, storage is POSIX shared memory (DESIGN.md section 2).
:class:`PhysicalMemory` owns the frame table, which maps each 4 KiB frame of
the simulated physical address space to ``(storage id, page index)``, and the
registry of attached storage.  :class:`Arena` hands out runs of storage pages
to one owner (a context, or the kernel), in segments that grow in large
pre-faulted steps, so allocation makes no syscall in the steady state.

Invariants (per arena):
  ``sum(segment.pages) == pages_total``,
  ``used_pages + free_pages == pages_total``,
  every page handed out is zero (pages are zeroed when freed).

Concurrency: none; the System serialises every call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import core
from .config import Config
from .constants import PAGE_SIZE
from .errors import BadParameters
from .storage import Storage

_ZERO_PAGE = bytes(PAGE_SIZE)


class PhysicalMemory:
    """The simulated physical address space: regions, frame table, storage.

    ``read(pa, n)`` and ``write(pa, data)`` copy through the frame table, as a
    device with DMA would; an unmapped frame gives ``AddressError``.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.regions = config.regions()
        self.table = core.FrameTable([self.regions[name] for name in ("secure", "static", "dynamic")])
        self._sids = core.IdTable(max_id=65535)
        self.storages: dict[int, Any] = {}

    # -- storage registry ------------------------------------------------------
    def attach(self, buffer: Any, owner: Any = None) -> int:
        """Register a writable buffer as storage; returns its storage id."""
        sid = self._sids.alloc(owner if owner is not None else True)
        try:
            self.table.attach(sid, buffer)
        except BaseException:
            self._sids.remove(sid)
            raise
        self.storages[sid] = buffer
        return sid

    def detach(self, sid: int) -> None:
        """Forget a storage id (its frames must have been unmapped)."""
        self.table.detach(sid)
        self._sids.remove(sid)
        del self.storages[sid]

    # -- regions -----------------------------------------------------------------
    def region_of(self, pa: int) -> str | None:
        """The name of the region holding ``pa``, or None."""
        for name, (base, size) in self.regions.items():
            if base <= pa < base + size:
                return name
        return None

    def nonsecure_ranges(self) -> list[tuple[int, int]]:
        """The ``(base, size)`` ranges a normal-world page may lie in."""
        return [self.regions["static"], self.regions["dynamic"]]

    def in_region(self, name: str, pa: int, size: int) -> bool:
        """True if ``[pa, pa+size)`` lies inside region ``name``."""
        base, rsize = self.regions[name]
        return base <= pa and pa + size <= base + rsize and size >= 0

    # -- access --------------------------------------------------------------------
    def read(self, pa: int, n: int) -> bytes:
        """Read ``n`` bytes at physical address ``pa`` (AddressError if unmapped)."""
        return self.table.read(pa, n)

    def write(self, pa: int, data: bytes) -> None:
        """Write ``data`` at physical address ``pa`` (AddressError if unmapped)."""
        self.table.write(pa, data)

    def read_page(self, pa: int) -> bytes:
        """Read the 4 KiB frame at ``pa`` (page-aligned)."""
        return self.table.read(pa, PAGE_SIZE)


@dataclass
class Segment:
    """One storage object of an arena, with the allocator of its pages."""

    storage: Storage
    sid: int
    pages: Any  # core.FrameAllocator over page indices (base 0)
    zeros: np.ndarray  # uint8 view of the whole mapping, for zeroing


class Arena:
    """Runs of storage pages for one owner, grown in pre-faulted steps.

    ``alloc(npages)`` returns ``(segment, page_index)``; the run is contiguous
    inside one segment (one storage object), so a buffer's bytes are one
    contiguous span of one mapping: ``segment.storage.mm[i*4096 : ...]``.
    """

    def __init__(self, memory: PhysicalMemory, step: int, prefix: str, owner: Any = None) -> None:
        if step % PAGE_SIZE or step <= 0:
            raise BadParameters(f"arena step {step:#x} is not a positive multiple of 4096")
        self.memory = memory
        self.step = step
        self.prefix = prefix
        self.owner = owner
        self.segments: list[Segment] = []
        self.used_pages = 0

    @property
    def pages_total(self) -> int:
        return sum(seg.pages.nframes for seg in self.segments)

    @property
    def bytes_total(self) -> int:
        return self.pages_total * PAGE_SIZE

    def _grow(self, npages: int) -> Segment:
        step_pages = self.step // PAGE_SIZE
        count = max(step_pages, -(-npages // step_pages) * step_pages)
        storage = Storage.create(count * PAGE_SIZE, self.prefix)
        try:
            sid = self.memory.attach(storage.mm, self.owner)
        except BaseException:
            storage.close()
            raise
        zeros = np.frombuffer(storage.mm, dtype=np.uint8)
        seg = Segment(storage, sid, core.FrameAllocator(0, count, 30), zeros)
        self.segments.append(seg)
        return seg

    def alloc(self, npages: int) -> tuple[Segment, int]:
        """A run of ``npages`` zeroed storage pages: ``(segment, first page index)``."""
        if npages <= 0:
            raise BadParameters(f"arena request of {npages} pages")
        for seg in self.segments:
            if seg.pages.largest_free_run >= npages:
                index = seg.pages.alloc_contig(npages) // PAGE_SIZE
                self.used_pages += npages
                return seg, index
        seg = self._grow(npages)
        index = seg.pages.alloc_contig(npages) // PAGE_SIZE
        self.used_pages += npages
        return seg, index

    def reserve(self, nbytes: int) -> None:
        """Grow (pre-faulted) until ``nbytes`` more could be handed out without growing."""
        free = sum(seg.pages.free_frames for seg in self.segments) * PAGE_SIZE
        while free < nbytes:
            seg = self._grow(min(self.step, nbytes - free) // PAGE_SIZE or 1)
            free += seg.pages.nframes * PAGE_SIZE

    def free(self, seg: Segment, index: int, npages: int) -> None:
        """Zero and release a run.

        A segment that becomes empty is returned to the OS only when another empty
        segment is already kept as a spare (so a steady alloc/free pattern does not
        create and pre-fault storage over and over).
        """
        start = index * PAGE_SIZE
        if npages == 1:  # a bytes slice assignment: about half the cost of numpy's for one page
            seg.storage.mm[start:start + PAGE_SIZE] = _ZERO_PAGE
        else:
            seg.zeros[start:start + npages * PAGE_SIZE] = 0
        seg.pages.free_contig(index * PAGE_SIZE, npages)
        self.used_pages -= npages
        if seg.pages.used_frames == 0 and len(self.segments) > 1:
            spares = sum(1 for other in self.segments if other.pages.used_frames == 0)
            if spares > 1:
                self._drop(seg)

    def _drop(self, seg: Segment) -> None:
        self.segments.remove(seg)
        del seg.zeros
        self.memory.detach(seg.sid)
        seg.storage.close()

    def close(self) -> None:
        """Release every segment (the owner's frames must be unmapped first)."""
        for seg in list(self.segments):
            self._drop(seg)
        self.used_pages = 0
