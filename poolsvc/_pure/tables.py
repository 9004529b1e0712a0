"""Plain-Python reference of the compiled tables (``ext/frametable.pyx``,
``ext/idtable.pyx``, ``ext/addressmap.pyx``).

Owns: FrameTable (frame -> storage id and page index, attached storage),
IdTable (the kernel's idr: lowest free id from 1) and AddressMap (virtual
intervals -> storage key and file offset).  The contract is ``docs/core.md``;
these classes are the oracle the tests hold the compiled ones to, so they
make the same checks in the same order and raise the same error types.

Concurrency: none; an object belongs to one thread at a time.  (The
compiled FrameTable also raises Busy from attach/detach while a copy runs
without the GIL in another thread; nothing here runs without the GIL.)
"""
from __future__ import annotations

import bisect
import heapq
import operator

import numpy as np

from ..errors import (
    AddressError,
    AlignmentError,
    BadParameters,
    ItemNotFound,
    OutOfMemory,
)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
U64_LIMIT = 1 << 64
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

MAX_REGIONS = 16                # region records a frame table holds
MAX_FRAMES = 1 << 24            # frames of all regions together
MAX_STORAGE_ID = 65535          # 0 <= storage_id <= MAX_STORAGE_ID
MAX_PAGE_INDEX = 1 << 51        # first_index + npages <= MAX_PAGE_INDEX


def as_page_array(pages, what: str = "pages") -> np.ndarray:
    """``pages`` as a 1-D C-contiguous uint64 array; BadParameters if impossible."""
    try:
        arr = np.asarray(pages, dtype=np.uint64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadParameters(f"{what} is not convertible to uint64: {exc}") from None
    if arr.ndim != 1:
        raise BadParameters(f"{what} must be 1-D, got {arr.ndim} dimensions")
    return np.ascontiguousarray(arr)


def clamp_i64(value) -> int:
    """An int argument clamped to the int64 range (TypeError for a non-int)."""
    return min(max(operator.index(value), I64_MIN), I64_MAX)


def is_u64(value) -> bool:
    """True for an int in [0, 2**64) (TypeError for a non-int)."""
    return 0 <= operator.index(value) < U64_LIMIT


def flat_bytes(buffer, what: str) -> memoryview:
    """A writable, C-contiguous byte view of ``buffer``; BadParameters otherwise."""
    try:
        mv = memoryview(buffer)
    except TypeError:
        raise BadParameters(f"{what}: {type(buffer).__name__} is not a buffer") from None
    if mv.readonly:
        mv.release()
        raise BadParameters(f"{what}: the buffer is read-only")
    if not mv.c_contiguous:
        mv.release()
        raise BadParameters(f"{what}: the buffer is not contiguous")
    if mv.ndim != 1 or mv.format != "B":
        flat = mv.cast("B")
        mv.release()
        mv = flat
    return mv


class FrameTable:
    """Maps each frame of the physical address space to ``(storage_id, page_index)``.

    ``regions``: ``(base_pa, size)`` pairs, page-aligned, non-overlapping,
    ``size > 0``; at most 16 regions and 2**24 frames.  BadParameters (or
    AlignmentError) otherwise.
    """

    def __init__(self, regions) -> None:
        try:
            pairs = [(operator.index(b), operator.index(s)) for b, s in regions]
        except (TypeError, ValueError, AttributeError) as exc:
            raise BadParameters(f"regions must be (base_pa, size) pairs of ints: {exc}") from None
        if not pairs:
            raise BadParameters("a frame table needs at least one region")
        if len(pairs) > MAX_REGIONS:
            raise BadParameters(f"{len(pairs)} regions, more than the {MAX_REGIONS} "
                                "a frame table holds")
        for base, size in pairs:
            if size <= 0:
                raise BadParameters(f"region at {base:#x} has size {size}, must be > 0")
            if base < 0 or base + size > U64_LIMIT:
                raise BadParameters(f"region {base:#x}+{size:#x} is outside the 64-bit "
                                    "physical address space")
            if base & PAGE_MASK or size & PAGE_MASK:
                raise AlignmentError(f"region {base:#x}+{size:#x} is not 4 KiB-aligned")
        ordered = sorted(pairs)
        for (b0, s0), (b1, s1) in zip(ordered, ordered[1:]):
            if b1 < b0 + s0:
                raise BadParameters(f"regions {b0:#x}+{s0:#x} and {b1:#x}+{s1:#x} overlap")
        total = sum(size >> PAGE_SHIFT for _, size in pairs)
        if total > MAX_FRAMES:
            raise BadParameters(f"regions cover {total} frames, more than the "
                                f"{MAX_FRAMES} a frame table holds")
        self._regions = pairs
        self._frames: dict[int, tuple[int, int]] = {}   # pfn -> (sid, page index)
        self._storage: dict[int, memoryview] = {}        # sid -> flat byte view

    # -- internal ----------------------------------------------------------

    def _region_of(self, pa: int) -> int:
        for r, (base, size) in enumerate(self._regions):
            if base <= pa < base + size:
                return r
        return -1

    @staticmethod
    def _check_ids(storage_id: int, first_index: int, npages: int) -> None:
        if npages <= 0:
            raise BadParameters(f"npages is {npages}, must be > 0")
        if not 0 <= storage_id <= MAX_STORAGE_ID:
            raise BadParameters(f"storage id {storage_id} is not in 0..{MAX_STORAGE_ID}")
        if first_index < 0 or npages > MAX_PAGE_INDEX - first_index:
            raise BadParameters(f"page indexes {first_index}..{first_index}+{npages} are "
                                f"not in 0..{MAX_PAGE_INDEX}")

    def _check_range(self, pa, npages: int) -> int:
        """Validate ``npages`` frames from ``pa`` inside one region; return ``pa``."""
        if not is_u64(pa):
            raise AddressError(f"physical address {pa:#x} is outside every region")
        if pa & PAGE_MASK:
            raise AlignmentError(f"physical address {pa:#x} is not 4 KiB-aligned")
        r = self._region_of(pa)
        if r < 0:
            raise AddressError(f"physical address {pa:#x} is outside every region")
        base, size = self._regions[r]
        if pa + npages * PAGE_SIZE > base + size:
            raise AddressError(f"{npages} frames at {pa:#x} run past the end of their "
                               f"region ({base + size:#x})")
        return pa

    def _check_page(self, pa: int, i: int) -> None:
        if pa & PAGE_MASK:
            raise AlignmentError(f"page {i} is {pa:#x}, not 4 KiB-aligned")
        if self._region_of(pa) < 0:
            raise AddressError(f"page {i} ({pa:#x}) is outside every region")

    def frame_view(self, pa: int, end_in_page: int) -> memoryview:
        """The storage bytes of the frame holding ``pa``: ``[0, end_in_page)`` of it.

        AddressError if the frame is outside, unmapped, its storage not
        attached or shorter than needed.
        """
        if self._region_of(pa) < 0:
            raise AddressError(f"physical address {pa:#x} is outside every region")
        frame = pa & ~PAGE_MASK
        entry = self._frames.get(pa >> PAGE_SHIFT)
        if entry is None:
            raise AddressError(f"frame {frame:#x} is not mapped")
        sid, index = entry
        view = self._storage.get(sid)
        if view is None:
            raise AddressError(f"storage {sid} of frame {frame:#x} is not attached")
        start = index * PAGE_SIZE
        if start + end_in_page > len(view):
            raise AddressError(f"storage {sid} holds {len(view)} bytes; frame {frame:#x} "
                               f"needs {start + end_in_page}")
        return view[start:start + end_in_page]

    def _resolve_range(self, pa: int, n: int) -> list[memoryview]:
        """Views of the ``n`` bytes from ``pa``, one per page touched."""
        views = []
        done, off = 0, pa & PAGE_MASK
        while done < n:
            chunk = min(PAGE_SIZE - off, n - done)
            views.append(self.frame_view(pa + done, off + chunk)[off:])
            done += chunk
            off = 0
        return views

    # -- mapping -----------------------------------------------------------

    def map_range(self, pa, npages, storage_id, first_index) -> None:
        """Map ``npages`` frames from ``pa`` to ``(storage_id, first_index + i)``."""
        n, sid, first = clamp_i64(npages), clamp_i64(storage_id), clamp_i64(first_index)
        self._check_ids(sid, first, n)
        self._check_range(pa, n)
        pfn = pa >> PAGE_SHIFT
        for k in range(n):
            if pfn + k in self._frames:
                raise BadParameters(f"frame {(pfn + k) << PAGE_SHIFT:#x} is already mapped")
        for k in range(n):
            self._frames[pfn + k] = (sid, first + k)

    def map_pages(self, pages, storage_id, first_index) -> None:
        """Map ``pages[i]`` to ``(storage_id, first_index + i)``; all-or-nothing."""
        pas = [int(p) for p in as_page_array(pages)]
        sid, first = clamp_i64(storage_id), clamp_i64(first_index)
        self._check_ids(sid, first, len(pas))
        seen = set()
        for i, pa in enumerate(pas):
            self._check_page(pa, i)
            if pa in seen:
                raise BadParameters(f"page {i} ({pa:#x}) appears twice in the array")
            if pa >> PAGE_SHIFT in self._frames:
                raise BadParameters(f"page {i}: frame {pa:#x} is already mapped")
            seen.add(pa)
        for i, pa in enumerate(pas):
            self._frames[pa >> PAGE_SHIFT] = (sid, first + i)

    def unmap_range(self, pa, npages) -> None:
        """Unmap ``npages`` frames from ``pa``; every one must be mapped."""
        n = clamp_i64(npages)
        if n <= 0:
            raise BadParameters(f"npages is {n}, must be > 0")
        self._check_range(pa, n)
        pfn = pa >> PAGE_SHIFT
        for k in range(n):
            if pfn + k not in self._frames:
                raise AddressError(f"frame {(pfn + k) << PAGE_SHIFT:#x} is not mapped")
        for k in range(n):
            del self._frames[pfn + k]

    def unmap_pages(self, pages) -> None:
        """Unmap the frames of a non-empty page array; each must be mapped once."""
        pas = [int(p) for p in as_page_array(pages)]
        if not pas:
            raise BadParameters("pages is empty")
        seen = set()
        for i, pa in enumerate(pas):
            self._check_page(pa, i)
            if pa in seen:
                raise AddressError(f"page {i} ({pa:#x}) appears twice in the array")
            if pa >> PAGE_SHIFT not in self._frames:
                raise AddressError(f"page {i}: frame {pa:#x} is not mapped")
            seen.add(pa)
        for pa in pas:
            del self._frames[pa >> PAGE_SHIFT]

    # -- lookups -----------------------------------------------------------

    def lookup(self, pa) -> tuple[int, int]:
        """``(storage_id, page_index)`` of the frame holding ``pa``; AddressError."""
        if not is_u64(pa) or self._region_of(pa) < 0:
            raise AddressError(f"physical address {pa:#x} is outside every region")
        entry = self._frames.get(pa >> PAGE_SHIFT)
        if entry is None:
            raise AddressError(f"physical address {pa:#x} is not mapped")
        return entry

    def translate(self, pa) -> tuple[int, int]:
        """``(storage_id, page_index * 4096 + pa % 4096)``; AddressError."""
        sid, index = self.lookup(pa)
        return sid, index * PAGE_SIZE + (pa & PAGE_MASK)

    def translate_batch(self, pas) -> tuple[np.ndarray, np.ndarray]:
        """The batch form of ``translate``: ``(ndarray[int32], ndarray[int64])``."""
        arr = as_page_array(pas, "pas")
        sids = np.empty(len(arr), dtype=np.int32)
        offsets = np.empty(len(arr), dtype=np.int64)
        for i, pa in enumerate(arr.tolist()):
            sids[i], offsets[i] = self.translate(pa)
        return sids, offsets

    def is_mapped(self, pa) -> bool:
        """True if the frame holding ``pa`` is mapped."""
        return is_u64(pa) and self._region_of(pa) >= 0 and (pa >> PAGE_SHIFT) in self._frames

    def region_index(self, pa) -> int:
        """Index of the region holding ``pa`` (constructor order), or -1."""
        return self._region_of(pa) if is_u64(pa) else -1

    @property
    def mapped_frames(self) -> int:
        """Number of frames currently mapped."""
        return len(self._frames)

    @property
    def regions(self) -> list[tuple[int, int]]:
        """The regions as ``[(base_pa, size), ...]`` in the constructor's order."""
        return list(self._regions)

    # -- storage -----------------------------------------------------------

    def attach(self, storage_id, buffer) -> None:
        """Attach the writable buffer holding storage ``storage_id``'s bytes."""
        sid = clamp_i64(storage_id)
        if not 0 <= sid <= MAX_STORAGE_ID:
            raise BadParameters(f"storage id {storage_id} is not in 0..{MAX_STORAGE_ID}")
        view = flat_bytes(buffer, f"storage {sid}")
        old = self._storage.get(sid)
        self._storage[sid] = view
        if old is not None:
            old.release()

    def detach(self, storage_id) -> None:
        """Drop the buffer of storage ``storage_id``; ItemNotFound if none."""
        sid = clamp_i64(storage_id)
        if sid not in self._storage:
            raise ItemNotFound(f"storage {storage_id} is not attached")
        self._storage.pop(sid).release()

    def attached(self) -> list[int]:
        """The attached storage ids, ascending."""
        return sorted(self._storage)

    def read(self, pa, n) -> bytes:
        """``n`` bytes from physical address ``pa``, copied page by page."""
        count = clamp_i64(n)
        if count < 0:
            raise BadParameters(f"n is {n}, must be >= 0")
        if not is_u64(pa):
            raise AddressError(f"physical address {pa:#x} is outside every region")
        if count == 0:
            return b""
        if count > MAX_FRAMES * PAGE_SIZE or pa + count > U64_LIMIT:
            raise AddressError(f"{n} bytes at {pa:#x} run past every region")
        return b"".join(bytes(v) for v in self._resolve_range(pa, count))

    def write(self, pa, data) -> None:
        """Copy the bytes-like ``data`` to physical address ``pa``, page by page."""
        try:
            src = memoryview(data)
        except TypeError as exc:
            raise BadParameters(f"data is not a contiguous buffer: {exc}") from None
        if not src.c_contiguous:
            raise BadParameters("data is not a contiguous buffer")
        src = src.cast("B") if (src.ndim != 1 or src.format != "B") else src
        count = len(src)
        if not is_u64(pa):
            raise AddressError(f"physical address {pa:#x} is outside every region")
        if count == 0:
            return None
        if pa + count > U64_LIMIT:
            raise AddressError(f"{count} bytes at {pa:#x} run past every region")
        done = 0
        for view in self._resolve_range(pa, count):
            view[:] = bytes(src[done:done + len(view)])
            done += len(view)
        return None


class IdTable:
    """The kernel's ``idr``: ids from 1 up, always the lowest free one."""

    _RESERVED = object()

    def __init__(self, max_id=2**31 - 1) -> None:
        m = clamp_i64(max_id)
        if not 1 <= m <= 0x7FFFFFFF:
            raise BadParameters(f"max_id is {max_id}, must be in 1..{0x7FFFFFFF}")
        self._max_id = m
        self._objects: dict[int, object] = {}   # allocated id -> object or _RESERVED
        self._free: list[int] = []              # heap of free ids below _hwm
        self._hwm = 1                           # ids >= _hwm were never handed out

    def _allocated(self, id) -> bool:
        return operator.index(id) in self._objects

    def alloc(self, obj=None) -> int:
        """Allocate the lowest free id >= 1 for ``obj`` (None reserves it)."""
        if self._free:
            i = heapq.heappop(self._free)
        elif self._hwm <= self._max_id:
            i = self._hwm
            self._hwm += 1
        else:
            raise OutOfMemory(f"no free id: all {self._max_id} ids are in use")
        self._objects[i] = self._RESERVED if obj is None else obj
        return i

    def replace(self, id, obj):
        """Set the object of allocated ``id``; return the old one (None if reserved)."""
        if not self._allocated(id):
            raise ItemNotFound(f"id {id} is not allocated")
        old = self._objects[id]
        self._objects[id] = self._RESERVED if obj is None else obj
        return None if old is self._RESERVED else old

    def remove(self, id):
        """Free ``id`` and return its object (None if reserved); ItemNotFound."""
        if not self._allocated(id):
            raise ItemNotFound(f"id {id} is not allocated")
        old = self._objects.pop(id)
        heapq.heappush(self._free, operator.index(id))
        return None if old is self._RESERVED else old

    def find(self, id):
        """The object of ``id``, or None (reserved, free or out of range)."""
        obj = self._objects.get(operator.index(id))
        return None if obj is self._RESERVED else obj

    def __contains__(self, id) -> bool:
        try:
            return self._allocated(id)
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._objects)

    def ids(self) -> list[int]:
        """The allocated ids (reserved included), ascending."""
        return sorted(self._objects)

    @property
    def max_id(self) -> int:
        """The largest id this table hands out."""
        return self._max_id


class AddressMap:
    """Sorted, non-overlapping virtual-address intervals -> (storage key, file offset)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._rest: list[tuple[int, int, int]] = []   # (end, key, file_offset)

    def add(self, start, end, key, file_offset) -> None:
        """Add ``[start, end)`` -> ``(key, file_offset)``; BadParameters on overlap."""
        if not (is_u64(start) and is_u64(end)) or start >= end:
            raise BadParameters(f"interval [{start:#x}, {end:#x}) is empty or outside "
                                "the 64-bit address space")
        if not I64_MIN <= operator.index(key) <= I64_MAX:
            raise BadParameters(f"key {key} does not fit in 64 bits")
        if not is_u64(file_offset) or file_offset + (end - start) > U64_LIMIT:
            raise BadParameters(f"file offset {file_offset:#x} for [{start:#x}, {end:#x}) "
                                "is out of range")
        i = bisect.bisect_right(self._starts, start)
        if i > 0 and self._rest[i - 1][0] > start:
            raise BadParameters(f"interval [{start:#x}, {end:#x}) overlaps "
                                f"[{self._starts[i - 1]:#x}, {self._rest[i - 1][0]:#x})")
        if i < len(self._starts) and self._starts[i] < end:
            raise BadParameters(f"interval [{start:#x}, {end:#x}) overlaps "
                                f"[{self._starts[i]:#x}, {self._rest[i][0]:#x})")
        self._starts.insert(i, operator.index(start))
        self._rest.insert(i, (operator.index(end), operator.index(key),
                              operator.index(file_offset)))

    def remove(self, start) -> None:
        """Remove the interval starting exactly at ``start``; ItemNotFound otherwise."""
        i = bisect.bisect_left(self._starts, operator.index(start))
        if i == len(self._starts) or self._starts[i] != start:
            raise ItemNotFound(f"no interval starts at {start:#x}")
        del self._starts[i]
        del self._rest[i]

    def lookup(self, addr):
        """``(key, file_offset + addr - start)`` of the interval holding ``addr``, or None."""
        i = bisect.bisect_right(self._starts, operator.index(addr)) - 1
        if i < 0:
            return None
        end, key, offset = self._rest[i]
        if addr >= end:
            return None
        return key, offset + addr - self._starts[i]

    def clear(self) -> None:
        """Remove every interval."""
        self._starts.clear()
        self._rest.clear()

    def __len__(self) -> int:
        return len(self._starts)

    def intervals(self) -> list[tuple[int, int, int, int]]:
        """``[(start, end, key, file_offset), ...]`` ascending."""
        return [(s, *rest) for s, rest in zip(self._starts, self._rest)]
