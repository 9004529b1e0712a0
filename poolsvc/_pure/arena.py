"""Plain-Python reference of the compiled arena kernel (``ext/arena.pyx``).

Owns: ArenaPages (first-fit runs of storage pages over an owner's segments,
zeroed when freed, and the dynamic pool's all-or-nothing ``take`` / ``give``
of frames + storage pages + frame-table mapping) and ArenaRun (what ``take``
hands out).  The contract is ``docs/core.md``; same checks, same order and
same error types as the compiled twin.  The storage bytes are the buffers
attached to the pure FrameTable (read through its ``_storage`` dict: both
files are the reference backend).

Concurrency: none; an object belongs to one thread at a time.
"""
from __future__ import annotations

import operator
from typing import Any

from ..errors import AddressError, BadParameters, DoubleFree, InternalError, ItemNotFound
from .alloc import MAX_UNITS, FrameAllocator
from .tables import MAX_STORAGE_ID, FrameTable

PAGE_SIZE = 4096
_I64_MAX = (1 << 63) - 1


def _int(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise BadParameters(f"{what} must be an int, got {type(value).__name__}") from None


class _Segment:
    """One segment: ``used[i]`` is 1 while storage page i is handed out,
    ``taken[i]`` 1 while it belongs to a run of ``take`` (only ``give`` frees it)."""

    __slots__ = ("segment", "sid", "npages", "used", "taken", "owner")

    def __init__(self, segment: Any, sid: int, npages: int, owner: "ArenaPages") -> None:
        self.segment = segment
        self.sid = sid
        self.npages = npages
        self.used = bytearray(npages)
        self.taken = bytearray(npages)
        self.owner: ArenaPages | None = owner

    @property
    def nfree(self) -> int:
        return self.npages - sum(self.used)


class ArenaRun:
    """A run handed out by ``ArenaPages.take``: ``pa``, ``npages``, ``segment``, ``index``."""

    __slots__ = ("_pa", "_npages", "_seg", "_index", "_live")
    _pa: int
    _npages: int
    _seg: _Segment
    _index: int
    _live: bool

    def __init__(self, *args: Any) -> None:
        raise BadParameters("ArenaRun objects are made by ArenaPages.take")

    @classmethod
    def _make(cls, pa: int, npages: int, seg: _Segment, index: int) -> "ArenaRun":
        run = object.__new__(cls)
        run._pa, run._npages, run._seg, run._index, run._live = pa, npages, seg, index, True
        return run

    @property
    def pa(self) -> int:
        return self._pa

    @property
    def npages(self) -> int:
        return self._npages

    @property
    def segment(self) -> Any:
        return self._seg.segment

    @property
    def index(self) -> int:
        return self._index

    def __repr__(self) -> str:
        return (f"ArenaRun(pa={self._pa:#x}, npages={self._npages}, index={self._index}, "
                f"{'live' if self._live else 'given back'})")


class ArenaPages:
    """Runs of storage pages over an owner's segments, first-fit.

    ``ArenaPages(table, frames)``: the FrameTable the segments' storage is
    attached to (and ``take`` maps in), the FrameAllocator ``take`` takes
    frames from; BadParameters if either is of the wrong type.
    """

    def __init__(self, table: Any, frames: Any) -> None:
        if not isinstance(table, FrameTable):
            raise BadParameters(f"table must be a FrameTable, got {type(table).__name__}")
        if not isinstance(frames, FrameAllocator):
            raise BadParameters(f"frames must be a FrameAllocator, got {type(frames).__name__}")
        self._table = table
        self._frames = frames
        self._segs: list[_Segment] = []

    # -- internal ------------------------------------------------------------
    def _find(self, segment: Any) -> _Segment | None:
        for s in self._segs:
            if s.segment is segment:
                return s
        return None

    def _first_fit(self, n: int) -> tuple[_Segment, int] | None:
        want = bytes(n)
        for s in self._segs:
            p = s.used.find(want)
            if p >= 0:
                return s, p
        return None

    def _check_storage(self, s: _Segment, index: int, n: int) -> None:
        view = self._table._storage.get(s.sid)
        if view is None:
            raise AddressError(f"storage {s.sid} of the segment is not attached")
        if (index + n) * PAGE_SIZE > len(view):
            raise AddressError(f"storage {s.sid} holds {len(view)} bytes; pages "
                               f"{index}..{index + n} need {(index + n) * PAGE_SIZE}")

    def _zero(self, s: _Segment, index: int, n: int) -> None:
        self._table._storage[s.sid][index * PAGE_SIZE:(index + n) * PAGE_SIZE] = bytes(n * PAGE_SIZE)

    def _freed(self, s: _Segment, index: int, n: int) -> int:
        s.used[index:index + n] = bytes(n)
        if not any(s.used):
            return self.empty_segments
        return 0

    # -- segments ------------------------------------------------------------
    def add(self, segment: Any, storage_id: Any, npages: Any) -> None:
        """Append a segment of ``npages`` zeroed storage pages, attached as ``storage_id``."""
        n = _int(npages, "npages")
        sid = _int(storage_id, "storage_id")
        if self._find(segment) is not None:
            raise BadParameters("the segment is already in this arena")
        if not 0 <= sid <= MAX_STORAGE_ID:
            raise BadParameters(f"storage id {storage_id} is not in 0..{MAX_STORAGE_ID}")
        if any(s.sid == sid for s in self._segs):  # else the same bytes handed out twice
            raise BadParameters(f"storage {sid} already backs a segment of this arena")
        if not 0 < n <= MAX_UNITS:
            raise BadParameters(f"npages must be in 1..{MAX_UNITS}, got {npages}")
        view = self._table._storage.get(sid)
        if view is None:
            raise BadParameters(f"storage {sid} is not attached to the frame table")
        if len(view) < n * PAGE_SIZE:
            raise BadParameters(f"storage {sid} holds {len(view)} bytes, fewer than {n} pages")
        self._segs.append(_Segment(segment, sid, n, self))

    def remove(self, segment: Any) -> None:
        """Forget a segment, whatever it holds; ItemNotFound if not here."""
        s = self._find(segment)
        if s is None:
            raise ItemNotFound("the segment is not in this arena")
        self._segs.remove(s)
        s.owner = None

    def segments(self) -> list[Any]:
        """The segments, in search order."""
        return [s.segment for s in self._segs]

    def used(self, segment: Any) -> int:
        """Pages of ``segment`` handed out (ItemNotFound if not here)."""
        s = self._find(segment)
        if s is None:
            raise ItemNotFound("the segment is not in this arena")
        return s.npages - s.nfree

    @property
    def pages_total(self) -> int:
        return sum(s.npages for s in self._segs)

    @property
    def free_pages(self) -> int:
        return sum(s.nfree for s in self._segs)

    @property
    def used_pages(self) -> int:
        return self.pages_total - self.free_pages

    @property
    def empty_segments(self) -> int:
        return sum(1 for s in self._segs if not any(s.used))

    # -- storage pages only --------------------------------------------------
    def alloc(self, npages: Any) -> tuple[Any, int] | None:
        """The first run of ``npages`` free pages: ``(segment, index)``, or None."""
        n = _int(npages, "npages")
        if n <= 0:
            raise BadParameters(f"npages must be > 0, got {npages}")
        if n > _I64_MAX:
            return None
        found = self._first_fit(n)
        if found is None:
            return None
        s, index = found
        s.used[index:index + n] = b"\x01" * n
        return s.segment, index

    def free(self, segment: Any, index: Any, npages: Any) -> int:
        """Zero and free pages ``[index, index + npages)``; 0, or the empty-segment count."""
        s = self._find(segment)
        if s is None:
            raise ItemNotFound("the segment is not in this arena")
        i = _int(index, "index")
        n = _int(npages, "npages")
        if n <= 0:
            raise BadParameters(f"npages must be > 0, got {npages}")
        if i < 0 or n > s.npages or i > s.npages - n:
            raise AddressError(f"pages {index}..+{npages} are outside the segment's "
                               f"{s.npages} pages")
        self._check_storage(s, i, n)
        q = s.used.find(b"\x00", i, i + n)
        if q >= 0:
            raise DoubleFree(f"storage page {q} of the segment is not in use")
        q = s.taken.find(b"\x01", i, i + n)
        if q >= 0:
            raise BadParameters(f"storage page {q} of the segment belongs to a run of take "
                                "(its frames still map it): give the run back instead")
        self._zero(s, i, n)
        return self._freed(s, i, n)

    # -- the dynamic pool: frames + storage pages + mapping ----------------------
    def take(self, npages: Any) -> ArenaRun | None:
        """Frames, storage pages and the mapping between them, all or nothing; or None."""
        frames, table = self._frames, self._table
        pa = frames.alloc_contig(npages)  # its errors first
        n = operator.index(npages)
        found = self._first_fit(n)
        if found is None:
            frames.free_contig(pa, n)
            return None
        s, index = found
        try:
            table.map_range(pa, n, s.sid, index)
        except BaseException:
            frames.free_contig(pa, n)
            raise
        s.used[index:index + n] = s.taken[index:index + n] = b"\x01" * n
        return ArenaRun._make(pa, n, s, index)

    def give(self, run: Any) -> int:
        """Undo ``take``: zero the storage pages, unmap the frames, free both."""
        if type(run) is not ArenaRun:
            raise BadParameters(f"run must be an ArenaRun, got {type(run).__name__}")
        if not run._live:
            raise DoubleFree(f"the run at {run._pa:#x} was given back already")
        s = run._seg
        if s.owner is not self:
            raise ItemNotFound("the run's segment is not in this arena")
        pa, n, index = run._pa, run._npages, run._index
        table, frames = self._table, self._frames
        self._check_storage(s, index, n)
        q = s.used.find(b"\x00", index, index + n)
        if q >= 0:
            raise DoubleFree(f"storage page {q} of the segment is not in use")
        if not all(table.is_mapped(pa + k * PAGE_SIZE) for k in range(n)):
            table.unmap_range(pa, n)  # raises its error
            raise InternalError(f"frames at {pa:#x} should not have been unmappable")
        if any(frames.is_free(pa + k * PAGE_SIZE) for k in range(n)):
            frames.free_contig(pa, n)  # raises its error
            raise InternalError(f"frames at {pa:#x} should not have been free")
        self._zero(s, index, n)
        table.unmap_range(pa, n)
        frames.free_contig(pa, n)
        run._live = False
        s.taken[index:index + n] = bytes(n)
        return self._freed(s, index, n)
