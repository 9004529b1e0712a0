"""The memory model: physical address space, storage registry and arenas.

Frames are identities, storage is POSIX shared memory (docs/design.md section 2).
:class:`PhysicalMemory` owns the frame table, which maps each 4 KiB frame of
the simulated physical address space to ``(storage id, page index)``, and the
registry of attached storage.  :class:`Arena` hands out runs of storage pages
to one owner (a context, or the kernel), in segments that grow in large
pre-faulted steps, so allocation makes no syscall in the steady state.

Invariants (per arena):
  ``sum(segment.npages) == pages_total``,
  ``used_pages + free_pages == pages_total``,
  every page handed out is zero (pages are zeroed when freed).

Concurrency: none; the System serialises every call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._backend import core
from .config import Config
from .constants import PAGE_SIZE
from .errors import BadParameters
from .storage import Storage


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


@dataclass(eq=False)
class Segment:
    """One storage object of an arena (its pages are counted in ``Arena.pages``)."""

    storage: Storage
    sid: int
    npages: int


#: The first segment of an arena: 64 KiB (pre-faulted), then each new segment doubles the arena.
ARENA_FIRST_PAGES = 16


class Arena:
    """Runs of storage pages for one owner, grown geometrically in pre-faulted segments.

    ``take(npages)`` returns a ``core.ArenaRun``: contiguous frames of
    ``frames`` (the dynamic RAM allocator), a run of storage pages inside one
    segment (one storage object) and the frame-table mapping between them, so
    a buffer's bytes are one contiguous span of one mapping:
    ``run.segment.storage.mm[run.index*4096 : ...]``.  ``give(run)`` undoes it
    and zeroes the pages.  ``alloc`` / ``free`` hand out storage pages alone.
    The per-allocation work is one compiled call (``core.ArenaPages``, in
    ``pages``); the policy is here: growing when no segment has room, by a
    segment as large as the arena has ever been (from ARENA_FIRST_PAGES up to
    ``step``; a larger request gets a segment of its own size), and returning
    an emptied segment to the OS only when another empty one is kept as a
    spare (so a steady alloc/free pattern does not create and pre-fault
    storage over and over).
    """

    def __init__(self, memory: PhysicalMemory, step: int, prefix: str, owner: Any = None, *,
                 frames: Any) -> None:
        if step % PAGE_SIZE or step <= 0:
            raise BadParameters(f"arena step {step:#x} is not a positive multiple of 4096")
        self.memory = memory
        self.step = step
        self.prefix = prefix
        self.owner = owner
        self.segments: list[Segment] = []
        self.pages = core.ArenaPages(memory.table, frames)
        #: the most pages the arena has held at once (its growth follows it)
        self.peak_pages = 0

    @property
    def used_pages(self) -> int:
        return int(self.pages.used_pages)

    @property
    def pages_total(self) -> int:
        return int(self.pages.pages_total)

    @property
    def bytes_total(self) -> int:
        return self.pages_total * PAGE_SIZE

    def _grow(self, npages: int) -> Segment:
        # geometric: a new segment as large as the arena has ever been (at least
        # ARENA_FIRST_PAGES, at most one step), and never smaller than the request,
        # so an arena that serves one small buffer costs a few pages, not a step, and
        # one whose spare segment was returned does not shrink back and churn
        want = min(self.step // PAGE_SIZE, max(ARENA_FIRST_PAGES, self.peak_pages))
        count = max(want, npages)
        self.peak_pages = max(self.peak_pages, self.pages_total + count)
        storage = Storage.create(count * PAGE_SIZE, self.prefix)
        try:
            sid = self.memory.attach(storage.mm, self.owner)
        except BaseException:
            storage.close()
            raise
        seg = Segment(storage, sid, count)
        try:
            self.pages.add(seg, sid, count)
        except BaseException:
            self.memory.detach(sid)
            storage.close()
            raise
        self.segments.append(seg)
        return seg

    def take(self, npages: int) -> Any:
        """Contiguous frames mapped to a run of zeroed storage pages: a ``core.ArenaRun``.

        Grows when no segment has room.  Errors: those of the frame allocator
        (BadParameters, OutOfMemory), checked before growing; OutOfMemory when
        the OS refuses new storage.  Nothing is taken when it raises.
        """
        run = self.pages.take(npages)
        if run is None:
            self._grow(npages)
            run = self.pages.take(npages)
        return run

    def give(self, run: Any) -> None:
        """Undo :meth:`take` (the pages are zeroed)."""
        if self.pages.give(run) > 1:  # run's segment emptied, and another is empty too
            self.drop_spare()

    def drop_spare(self) -> None:
        """Of the empty segments, return the smallest to the OS: the larger one stays the spare."""
        empty = [seg for seg in self.segments if self.pages.used(seg) == 0]
        self.drop(min(empty, key=lambda seg: seg.npages))

    def alloc(self, npages: int) -> tuple[Segment, int]:
        """A run of ``npages`` zeroed storage pages: ``(segment, first page index)``."""
        if npages <= 0:
            raise BadParameters(f"arena request of {npages} pages")
        found = self.pages.alloc(npages)
        if found is None:
            self._grow(npages)
            found = self.pages.alloc(npages)
        seg, index = found
        return seg, index

    def reserve(self, nbytes: int) -> None:
        """Grow (pre-faulted) until ``nbytes`` more could be handed out without growing."""
        free = self.pages.free_pages * PAGE_SIZE
        while free < nbytes:
            seg = self._grow(min(self.step, nbytes - free) // PAGE_SIZE or 1)
            free += seg.npages * PAGE_SIZE

    def free(self, seg: Segment, index: int, npages: int) -> None:
        """Zero and release a run of storage pages."""
        if self.pages.free(seg, index, npages) > 1:
            self.drop_spare()

    def drop(self, seg: Segment) -> None:
        """Return an emptied segment to the OS."""
        self.segments.remove(seg)
        self.pages.remove(seg)
        self.memory.detach(seg.sid)
        seg.storage.close()

    def close(self) -> None:
        """Release every segment (the owner's frames must be unmapped first)."""
        for seg in list(self.segments):
            self.drop(seg)
