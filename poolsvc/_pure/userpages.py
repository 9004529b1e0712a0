"""Plain-Python reference of the compiled user-pages kernel (``ext/userpages.pyx``).

Owns: UserPages (the frames of one registered backing object's pages, with a
reference count per page; ``pin`` / ``unpin`` in one call each way), buffer_address (the address of a
caller's buffer) and page_run_start (whether a page array is one run).  The contract is
``docs/core.md``; same checks, same order and same error types as the compiled
twin.  It reads the storage lengths through the pure FrameTable's ``_storage``
dict (both files are the reference backend).

Concurrency: none; an object belongs to one thread at a time.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import AddressError, BadParameters, DoubleFree, InternalError
from .alloc import FrameAllocator
from .smc import _in
from .tables import MAX_STORAGE_ID, FrameTable, as_page_array

PAGE_SIZE = 4096
MAX_PAGES = 1 << 30  # first_page + npages <= MAX_PAGES


def buffer_address(obj: Any) -> int:
    """The address of the first byte of the non-empty C-contiguous buffer ``obj`` exports.

    Errors: BadParameters (no buffer protocol, not C-contiguous, or empty).
    """
    try:
        view = memoryview(obj)
    except TypeError:
        raise BadParameters(f"{type(obj).__name__} is not a contiguous buffer") from None
    with view:
        if not view.c_contiguous:
            raise BadParameters(f"{type(obj).__name__} is not a contiguous buffer")
        if view.nbytes == 0:
            raise BadParameters(f"{type(obj).__name__} is an empty buffer")
        with view.cast("B") as flat:
            return int(np.frombuffer(flat, np.uint8).__array_interface__["data"][0])


def page_run_start(pages: Any) -> int | None:
    """``pages[0]`` when the page array holds consecutive frames, else None."""
    arr = [int(p) for p in as_page_array(pages)]
    if not arr:
        raise BadParameters("pages is empty")
    return arr[0] if all(p == arr[0] + i * PAGE_SIZE for i, p in enumerate(arr)) else None


class UserPages:
    """The frames of one backing object's pages, with a reference count per page."""

    def __init__(self, table: Any, frames: Any) -> None:
        if not isinstance(table, FrameTable):
            raise BadParameters(f"table must be a FrameTable, got {type(table).__name__}")
        if not isinstance(frames, FrameAllocator):
            raise BadParameters(f"frames must be a FrameAllocator, got {type(frames).__name__}")
        self._table = table
        self._frames = frames
        self._pa = np.zeros(0, np.uint64)
        self._refs = np.zeros(0, np.uint32)
        self._sid = np.zeros(0, np.int32)
        self._store: dict[int, int] = {}

    def _range(self, first_page: Any, npages: Any) -> tuple[int, int]:
        first = _in(first_page, 0, MAX_PAGES - 1)
        if first is None:
            raise BadParameters(f"first_page must be in 0..{MAX_PAGES - 1}, got {first_page!r}")
        n = _in(npages, 1, MAX_PAGES - first)
        if n is None:
            raise BadParameters(f"npages must be in 1..{MAX_PAGES - first}, got {npages!r}")
        return first, n

    def _grow(self, n: int) -> None:
        extra = n - len(self._pa)
        if extra > 0:
            self._pa = np.concatenate([self._pa, np.zeros(extra, np.uint64)])
            self._refs = np.concatenate([self._refs, np.zeros(extra, np.uint32)])
            self._sid = np.concatenate([self._sid, np.full(extra, -1, np.int32)])

    def pin(self, first_page: Any, npages: Any, storage_id: Any, storage_first: Any) -> np.ndarray:
        """One more reference to pages ``[first_page, first_page + npages)``; new pages
        get the lowest free frames, mapped to page ``p - storage_first`` of the storage."""
        first, n = self._range(first_page, npages)
        sid = _in(storage_id, 0, MAX_STORAGE_ID)
        if sid is None:
            raise BadParameters(f"storage id {storage_id!r} is not in 0..{MAX_STORAGE_ID}")
        sfirst = _in(storage_first, 0, first)
        if sfirst is None:
            raise BadParameters(f"storage_first must be in 0..{first}, got {storage_first!r}")
        end = first + n
        known = [p for p in range(first, min(end, len(self._pa))) if self._refs[p] == 0]
        fresh = known + list(range(max(first, len(self._pa)), end))
        if fresh:
            view = self._table._storage.get(sid)
            if view is None:
                raise AddressError(f"storage {sid} is not attached")
            if (end - sfirst) * PAGE_SIZE > len(view):
                raise AddressError(f"storage {sid} holds {len(view)} bytes; pages up to "
                                   f"{end - sfirst} need {(end - sfirst) * PAGE_SIZE}")
            taken = self._frames.alloc_scattered(len(fresh))
            for pa in taken.tolist():
                if self._table.region_index(pa) < 0 or self._table.is_mapped(pa):
                    self._frames.free_pages(taken)
                    self._table.map_pages(taken, sid, 0)
                    raise InternalError(f"frame {pa:#x} should not have been mappable")
            self._grow(end)
            for pa, p in zip(taken.tolist(), fresh):
                self._table.map_range(pa, 1, sid, p - sfirst)
                self._pa[p] = pa
                self._sid[p] = sid
            self._store[sid] = self._store.get(sid, 0) + len(fresh)
        self._refs[first:end] += 1
        return self._pa[first:end].copy()

    def unpin(self, first_page: Any, npages: Any) -> int:
        """One reference less to pages ``[first_page, first_page + npages)``; the frames
        of pages left with none are unmapped and freed.  Returns how many."""
        first, n = self._range(first_page, npages)
        if first + n > len(self._pa):
            raise DoubleFree(f"page {max(first, len(self._pa))} of the object is not pinned")
        for p in range(first, first + n):
            if self._refs[p] == 0:
                raise DoubleFree(f"page {p} of the object is not pinned")
        gone = [p for p in range(first, first + n) if self._refs[p] == 1]
        if gone:
            freed = self._pa[gone].copy()
            for j, pa in enumerate(freed.tolist()):
                if not self._table.is_mapped(pa):
                    self._table.unmap_pages(freed[:j + 1])
                    raise InternalError(f"frame {pa:#x} should not have been unmappable")
            self._frames.free_pages(freed)
            self._table.unmap_pages(freed)
            for p in gone:
                sid = int(self._sid[p])
                self._store[sid] -= 1
                self._pa[p] = 0
                self._sid[p] = -1
        self._refs[first:first + n] -= 1
        return len(gone)

    def storage_pages(self, storage_id: Any) -> int:
        """Pinned pages mapped to storage ``storage_id`` (0 for any other int)."""
        sid = _in(storage_id, 0, MAX_STORAGE_ID)
        return 0 if sid is None else self._store.get(sid, 0)

    def refs_array(self) -> np.ndarray:
        """The reference count of each page of the ledger (numpy uint32, a copy)."""
        return self._refs.copy()

    def frames_array(self) -> np.ndarray:
        """The frame of each page of the ledger, 0 when unpinned (numpy uint64, a copy)."""
        return self._pa.copy()

    @property
    def npages(self) -> int:
        """Pages the ledger covers (the highest page ever pinned, plus one)."""
        return len(self._pa)

    @property
    def pinned_pages(self) -> int:
        """Pages with a reference."""
        return int(np.count_nonzero(self._refs))

    @property
    def references(self) -> int:
        """The sum of the pages' references."""
        return int(self._refs.sum())


__all__ = ["UserPages", "buffer_address", "page_run_start"]
