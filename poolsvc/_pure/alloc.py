"""Plain-Python reference allocators: RangeAllocator and FrameAllocator.

Owns the oracle twins of ``ext/rangealloc.pyx`` and ``ext/framealloc.pyx``
(contract: ``docs/core.md``).  The state is a ``bytearray`` with one byte
per unit (chunk or frame), 0 = free, 1 = used; first fit is
``bytearray.find(b"\\0" * n, start)``, which is by definition the lowest run
of n free units at or after ``start`` -- exactly what a plain first-fit scan
returns, only done by a C loop, so a 262,144-frame pool stays usable.
Written to be obviously correct rather than fast.

Concurrency: an allocator belongs to one thread at a time; no locks.

Every method validates all of its arguments (in the same order as the
compiled core, so both raise the same error type) before it changes anything.
"""
from __future__ import annotations

import operator
from typing import Iterator

import numpy as np

from ..errors import (
    AddressError,
    AlignmentError,
    BadParameters,
    CorruptionError,
    DoubleFree,
    OutOfMemory,
)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: Largest number of units (chunks or frames) one allocator manages.
MAX_UNITS = 1 << 30
#: Every address an allocator manages is below this bound.
ADDR_LIMIT = (1 << 63) - 1

FREE = 0
USED = 1


def _int(value, what: str) -> int:
    """value as an int; a non-integer is BadParameters."""
    try:
        return operator.index(value)
    except TypeError:
        raise BadParameters(f"{what} must be an int, got {type(value).__name__}") from None


def _as_page_array(pages) -> np.ndarray:
    """pages as a 1-D uint64 array.

    Errors: BadParameters if pages is not 1-D or holds anything other than
    non-negative integers below 2**64.
    """
    if isinstance(pages, np.ndarray) and pages.dtype == np.uint64 and pages.ndim == 1:
        return pages
    try:
        arr = np.asarray(pages)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadParameters(f"pages is not an array of page addresses: {exc}") from None
    if arr.ndim != 1:
        raise BadParameters(f"pages must be 1-D, got {arr.ndim} dimensions")
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    if arr.dtype.kind == "i":
        if (arr < 0).any():
            raise BadParameters(f"pages holds a negative address: {int(arr.min())}")
    elif arr.dtype.kind != "u":
        raise BadParameters(f"pages must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.uint64)


def _free_runs(used: bytearray, n_min: int = 1) -> Iterator[tuple[int, int]]:
    """Yield (start, end) of every maximal free run of >= n_min units, ascending."""
    pos = 0
    want = bytes(n_min)
    while True:
        start = used.find(want, pos)
        if start < 0:
            return
        end = used.find(b"\x01", start)
        if end < 0:
            end = len(used)
        yield start, end
        pos = end


class RangeAllocator:
    """The reserved static pool, allocated as the kernel's genalloc does.

    RangeAllocator(base, size, min_order=9, policy="first-fit")

    Parameters:
        base, size -- the pool [base, base + size): ints, multiples of
            1 << min_order, size > 0, base + size <= 2**63.
        min_order -- log2 of the chunk size, 0..20.
        policy -- "first-fit" (lowest address) or "best-fit" (shortest free
            run that fits; O(free runs) per call).
    Errors: BadParameters (AlignmentError for a misaligned base).
    """

    # _used[c]: chunk c, 0 free / 1 used.
    # _alloc_len[c]: chunks of the live allocation starting at c, else absent.
    # Invariants: sum(_alloc_len.values()) == _used.count(1)
    #             the runs [c, c + _alloc_len[c]) are disjoint and cover
    #             exactly the used chunks.

    def __init__(self, base, size, min_order=9, policy="first-fit") -> None:
        b = _int(base, "base")
        s = _int(size, "size")
        mo = _int(min_order, "min_order")
        if not 0 <= mo <= 20:
            raise BadParameters(f"min_order must be in 0..20, got {min_order}")
        if not isinstance(policy, str) or policy not in ("first-fit", "best-fit"):
            raise BadParameters(f"policy must be 'first-fit' or 'best-fit', got {policy!r}")
        chunk = 1 << mo
        if s <= 0:
            raise BadParameters(f"pool size must be > 0, got {size}")
        if b < 0 or b + s > ADDR_LIMIT:
            raise BadParameters(f"pool [{b:#x}, +{s:#x}) must lie in [0, 2**63)")
        if s % chunk:
            raise BadParameters(f"pool size {s:#x} is not a multiple of the chunk {chunk:#x}")
        if b % chunk:
            raise AlignmentError(f"pool base {b:#x} is not a multiple of the chunk {chunk:#x}")
        if s // chunk > MAX_UNITS:
            raise BadParameters(
                f"pool of {s // chunk} chunks exceeds the limit of {MAX_UNITS} chunks")
        self._base = b
        self._size = s
        self._min_order = mo
        self._chunk = chunk
        self._policy = policy
        self._used = bytearray(s // chunk)
        self._alloc_len: dict[int, int] = {}

    def __repr__(self) -> str:
        return (f"RangeAllocator(base={self._base:#x}, size={self._size:#x}, "
                f"min_order={self._min_order}, policy={self._policy!r}, "
                f"used={self.used_bytes:#x})")

    def _align_up(self, c: int, a_units: int) -> int:
        """Smallest chunk index >= c whose absolute address is a multiple of the alignment."""
        absolute = self._base // self._chunk + c
        return -(-absolute // a_units) * a_units - self._base // self._chunk

    def _place_first(self, n: int, a_units: int) -> int:
        # The lowest fit p from `frm`; any aligned fit q >= frm has q >= p,
        # so q >= align_up(p): if that is p we are done, else look from there.
        frm = 0
        want = bytes(n)
        while True:
            p = self._used.find(want, frm)
            if p < 0:
                return -1
            s = self._align_up(p, a_units)
            if s == p:
                return p
            frm = s

    def _place_best(self, n: int, a_units: int) -> int:
        best, best_len = -1, None
        for start, end in _free_runs(self._used):
            s = self._align_up(start, a_units)
            if s + n <= end and (best_len is None or end - start < best_len):
                best, best_len = s, end - start
        return best

    def alloc(self, size, align=0) -> int:
        """Allocate size bytes at an address that is a multiple of the alignment.

        Parameters:
            size -- bytes, > 0; rounded up to a multiple of
                a = max(align, chunk_size).
            align -- 0 or a power of two (bytes); the absolute address is a
                multiple of a.
        Returns: the address; the allocation's length is the rounded size.
        Errors: BadParameters (align not 0 or a power of two, size <= 0);
            OutOfMemory if no aligned free range fits.
        """
        sz = _int(size, "size")
        al = _int(align, "align")
        if al < 0 or al & (al - 1):
            raise BadParameters(f"align must be 0 or a power of two, got {al:#x}")
        if sz <= 0:
            raise BadParameters(f"allocation size must be > 0, got {sz}")
        a = max(al, self._chunk)
        length = -(-sz // a) * a
        n = length // self._chunk
        a_units = a // self._chunk
        p = -1
        if n <= len(self._used):
            if self._policy == "best-fit":
                p = self._place_best(n, a_units)
            else:
                p = self._place_first(n, a_units)
        if p < 0:
            raise OutOfMemory(
                f"no room for {sz} bytes (align {a:#x}) in the pool at {self._base:#x}: "
                f"{self.free_bytes} bytes free, longest free run {self.largest_free} bytes")
        self._used[p:p + n] = b"\x01" * n
        self._alloc_len[p] = n
        return self._base + p * self._chunk

    def free(self, addr, size=None) -> int:
        """Release the allocation that starts at addr.

        Parameters:
            addr -- the address alloc() returned.
            size -- optional; roundup(size, chunk_size) must equal the
                allocation's length.
        Returns: the allocation's (rounded) length in bytes.
        Errors: AddressError (addr outside the pool); DoubleFree (no live
            allocation starts at addr); BadParameters (size mismatch).
        """
        x = _int(addr, "addr")
        sz = None if size is None else _int(size, "size")
        if not self._base <= x < self._base + self._size:
            raise AddressError(f"address {x:#x} is outside the pool "
                               f"[{self._base:#x}, {self._base + self._size:#x})")
        off = x - self._base
        c = off // self._chunk
        if off % self._chunk or c not in self._alloc_len:
            raise DoubleFree(f"no live allocation starts at {x:#x}")
        n = self._alloc_len[c]
        if sz is not None and -(-sz // self._chunk) * self._chunk != n * self._chunk:
            raise BadParameters(f"size {sz:#x} does not match the allocation at {x:#x} "
                                f"of {n * self._chunk:#x} bytes")
        self._used[c:c + n] = bytes(n)
        del self._alloc_len[c]
        return n * self._chunk

    def allocation_at(self, addr) -> tuple[int, int] | None:
        """The live allocation containing addr: (start, length), or None."""
        x = _int(addr, "addr")
        for c, n in self._alloc_len.items():
            start = self._base + c * self._chunk
            if start <= x < start + n * self._chunk:
                return (start, n * self._chunk)
        return None

    def allocations(self) -> list[tuple[int, int]]:
        """Every live allocation as (start, length) in bytes, ascending."""
        return [(self._base + c * self._chunk, n * self._chunk)
                for c, n in sorted(self._alloc_len.items())]

    def _check(self) -> None:
        """Verify the allocation table against the byte map (tests)."""
        expect = bytearray(len(self._used))
        for c, n in self._alloc_len.items():
            if expect[c:c + n] != bytes(n):
                raise CorruptionError(f"allocations overlap at chunk {c}")
            expect[c:c + n] = b"\x01" * n
        if expect != self._used:
            raise CorruptionError("allocation table disagrees with the byte map")

    @property
    def base(self) -> int:
        """First address of the pool."""
        return self._base

    @property
    def size(self) -> int:
        """Size of the pool in bytes."""
        return self._size

    @property
    def min_order(self) -> int:
        """log2 of the chunk size."""
        return self._min_order

    @property
    def chunk_size(self) -> int:
        """The allocation granule, 1 << min_order bytes."""
        return self._chunk

    @property
    def policy(self) -> str:
        """'first-fit' or 'best-fit'."""
        return self._policy

    @property
    def free_bytes(self) -> int:
        """Bytes not in any allocation."""
        return self._used.count(FREE) * self._chunk

    @property
    def used_bytes(self) -> int:
        """Bytes in live allocations."""
        return self._used.count(USED) * self._chunk

    @property
    def largest_free(self) -> int:
        """Length in bytes of the longest free run."""
        return max((e - s for s, e in _free_runs(self._used)), default=0) * self._chunk

    @property
    def count(self) -> int:
        """Number of live allocations."""
        return len(self._alloc_len)


class FrameAllocator:
    """Page frames of dynamic RAM, allocated first-fit by frame number.

    FrameAllocator(base_pa, nframes, max_order=10)

    Parameters:
        base_pa -- PA of frame 0, page-aligned, >= 0.
        nframes -- number of 4 KiB frames, 1..2**30, ending below 2**63.
        max_order -- log2 of the largest contiguous block, 0..30.
    Errors: BadParameters (AlignmentError for a misaligned base_pa).
    """

    # _used[i]: frame i (PA base_pa + i * 4096), 0 free / 1 used.
    # Invariant: free_frames + used_frames == nframes == len(_used).

    def __init__(self, base_pa, nframes, max_order=10) -> None:
        b = _int(base_pa, "base_pa")
        n = _int(nframes, "nframes")
        mo = _int(max_order, "max_order")
        if not 0 <= mo <= 30:
            raise BadParameters(f"max_order must be in 0..30, got {mo}")
        if n <= 0:
            raise BadParameters(f"nframes must be > 0, got {n}")
        if n > MAX_UNITS:
            raise BadParameters(f"nframes {n} exceeds the limit of {MAX_UNITS}")
        if b < 0:
            raise BadParameters(f"base_pa must be >= 0, got {b}")
        if b + n * PAGE_SIZE > ADDR_LIMIT:
            raise BadParameters(f"frames [{b:#x}, +{n} pages) must lie below 2**63")
        if b % PAGE_SIZE:
            raise AlignmentError(f"base_pa {b:#x} is not page-aligned")
        self._base_pa = b
        self._nframes = n
        self._max_order = mo
        self._used = bytearray(n)

    def __repr__(self) -> str:
        return (f"FrameAllocator(base_pa={self._base_pa:#x}, nframes={self._nframes}, "
                f"max_order={self._max_order}, free={self.free_frames})")

    def _end(self) -> int:
        return self._base_pa + self._nframes * PAGE_SIZE

    def _frame_index(self, pa) -> int:
        """Frame number of pa.  Errors: AlignmentError, then AddressError."""
        x = _int(pa, "pa")
        if x % PAGE_SIZE:
            raise AlignmentError(f"frame address {x:#x} is not page-aligned")
        if not self._base_pa <= x < self._end():
            raise AddressError(f"frame address {x:#x} is outside the frames "
                               f"[{self._base_pa:#x}, {self._end():#x})")
        return (x - self._base_pa) // PAGE_SIZE

    def _run_index(self, pa, npages) -> tuple[int, int]:
        """(first frame, length) of the run.  Errors: BadParameters
        (npages <= 0), AlignmentError, AddressError (start or end outside)."""
        k = _int(npages, "npages")
        x = _int(pa, "pa")
        if k <= 0:
            raise BadParameters(f"npages must be > 0, got {k}")
        i = self._frame_index(x)
        if k > self._nframes - i:
            raise AddressError(f"run of {k} pages at {x:#x} ends past the frames "
                               f"[{self._base_pa:#x}, {self._end():#x})")
        return i, k

    def alloc_contig(self, npages) -> int:
        """Take the lowest run of npages free frames (first-fit).

        Returns: the PA of the first frame.
        Errors: BadParameters (npages <= 0); OutOfMemory (npages above
            1 << max_order, or no free run long enough).
        """
        n = _int(npages, "npages")
        if n <= 0:
            raise BadParameters(f"npages must be > 0, got {n}")
        if n > 1 << self._max_order:
            raise OutOfMemory(f"{n} pages exceeds the largest contiguous block, "
                              f"order {self._max_order} ({1 << self._max_order} pages)")
        p = self._used.find(bytes(n))
        if p < 0:
            raise OutOfMemory(f"no run of {n} free frames: {self.free_frames} free, "
                              f"longest run {self.largest_free_run}")
        self._used[p:p + n] = b"\x01" * n
        return self._base_pa + p * PAGE_SIZE

    def alloc_scattered(self, npages) -> np.ndarray:
        """Take the npages lowest free frames.

        Returns: numpy uint64 array of their PAs, ascending.
        Errors: BadParameters (npages <= 0); OutOfMemory if fewer are free.
        """
        n = _int(npages, "npages")
        if n <= 0:
            raise BadParameters(f"npages must be > 0, got {n}")
        if n > self.free_frames:
            raise OutOfMemory(f"{n} frames requested, {self.free_frames} free")
        taken: list[int] = []
        pos = 0
        while len(taken) < n:
            i = self._used.find(b"\x00", pos)
            taken.append(i)
            pos = i + 1
        for i in taken:
            self._used[i] = USED
        return np.array([self._base_pa + i * PAGE_SIZE for i in taken], dtype=np.uint64)

    def claim(self, pa, npages) -> None:
        """Mark exactly the frames [pa, pa + npages * 4096) used.

        Errors: BadParameters (npages <= 0, or a frame already in use);
            AlignmentError; AddressError.
        """
        i, n = self._run_index(pa, npages)
        q = self._used.find(b"\x01", i, i + n)
        if q >= 0:
            raise BadParameters(f"frame {self._base_pa + q * PAGE_SIZE:#x} already in use")
        self._used[i:i + n] = b"\x01" * n

    def free_contig(self, pa, npages) -> None:
        """Free the run of npages frames starting at pa.

        Errors: BadParameters (npages <= 0); AlignmentError; AddressError;
            DoubleFree (a frame of the run is not in use).
        """
        i, n = self._run_index(pa, npages)
        q = self._used.find(b"\x00", i, i + n)
        if q >= 0:
            raise DoubleFree(f"frame {self._base_pa + q * PAGE_SIZE:#x} is not in use")
        self._used[i:i + n] = bytes(n)

    def free_pages(self, pages) -> None:
        """Free the frames of a page array (any order); all or nothing.

        Errors, for the first bad entry: AlignmentError, AddressError,
            DoubleFree (not in use or listed twice); BadParameters if pages
            is not a 1-D integer array.
        """
        arr = _as_page_array(pages)
        seen: dict[int, int] = {}
        for pos, value in enumerate(arr.tolist()):
            if value % PAGE_SIZE:
                raise AlignmentError(f"page {pos} is {value:#x}, not 4 KiB-aligned")
            if not self._base_pa <= value < self._end():
                raise AddressError(f"page {pos} ({value:#x}) is outside the frames "
                                   f"[{self._base_pa:#x}, {self._end():#x})")
            if value in seen:
                raise DoubleFree(f"page {pos} ({value:#x}) repeats page {seen[value]}")
            if self._used[(value - self._base_pa) // PAGE_SIZE] != USED:
                raise DoubleFree(f"page {pos} ({value:#x}) is not in use")
            seen[value] = pos
        for value in seen:
            self._used[(value - self._base_pa) // PAGE_SIZE] = FREE

    def is_free(self, pa) -> bool:
        """True if the frame at pa is free.  Errors: AlignmentError, AddressError."""
        return self._used[self._frame_index(pa)] == FREE

    def free_blocks_per_order(self) -> np.ndarray:
        """Free frames cut, run by run, into naturally aligned buddy blocks.

        Returns: numpy int64 array of length max_order + 1;
            sum(count[k] << k) == free_frames.
        """
        counts = np.zeros(self._max_order + 1, dtype=np.int64)
        base_pfn = self._base_pa >> PAGE_SHIFT
        for start, end in _free_runs(self._used):
            pfn, end_pfn = base_pfn + start, base_pfn + end
            while pfn < end_pfn:
                order = self._max_order
                while order > 0 and (pfn % (1 << order) or pfn + (1 << order) > end_pfn):
                    order -= 1
                counts[order] += 1
                pfn += 1 << order
        return counts

    def used_map(self) -> np.ndarray:
        """numpy uint8 array of length nframes: 1 where the frame is used."""
        return np.frombuffer(bytes(self._used), dtype=np.uint8).copy()

    def _check(self) -> None:
        """Nothing derived to verify: the byte map is the whole state."""

    @property
    def base_pa(self) -> int:
        """PA of frame 0."""
        return self._base_pa

    @property
    def nframes(self) -> int:
        """Number of frames."""
        return self._nframes

    @property
    def max_order(self) -> int:
        """log2 of the largest contiguous allocation."""
        return self._max_order

    @property
    def free_frames(self) -> int:
        """Free frames."""
        return self._used.count(FREE)

    @property
    def used_frames(self) -> int:
        """Used frames."""
        return self._used.count(USED)

    @property
    def largest_free_run(self) -> int:
        """Length in frames of the longest free run."""
        return max((e - s for s, e in _free_runs(self._used)), default=0)
