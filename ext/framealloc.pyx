# framealloc.pyx: FrameAllocator, page frames of dynamic RAM allocated with
# alloc_pages_exact semantics (first-fit by frame number), on a FreeMap
# (freemap.pyx) of one unit per frame.  Fields, invariants and the inline
# helpers other kernels take and give frames with (arena.pyx,
# smc_driver.pyx): framealloc.pxd.  Contract: docs/core.md; plain-Python
# twin: poolsvc/_pure/alloc.py.
#
# Concurrency: an allocator belongs to one thread at a time (the System
# serialises access); methods hold the GIL and take no locks.
#
# Every public method validates all of its arguments before it changes
# anything, so on any error the allocator is unchanged (arguments go through
# arg_i64(), convert.pyx).
cimport cython
from cpython.long cimport PyLong_Check
from libc.stdlib cimport malloc, free as c_free
from libc.stdint cimport uint64_t, int64_t

import numpy as np


@cython.auto_pickle(False)
cdef class FrameAllocator:
    """Page frames of dynamic RAM, allocated first-fit by frame number.

    FrameAllocator(base_pa, nframes, max_order=10)

    Parameters:
        base_pa -- PA of frame 0, page-aligned, >= 0.
        nframes -- number of 4 KiB frames, 1..2**30; the range must end at
            or below 2**63.
        max_order -- log2 of the largest contiguous block (0..30), as the
            buddy allocator's MAX_ORDER limits alloc_pages_exact.
    Errors: BadParameters (AlignmentError for a misaligned base_pa).
    """

    def __cinit__(self, base_pa, nframes, max_order=10):
        cdef int64_t b = 0, n = 0, mo = 0
        cdef int rb = arg_i64(base_pa, &b, "base_pa")
        cdef int rn = arg_i64(nframes, &n, "nframes")
        cdef int rm = arg_i64(max_order, &mo, "max_order")
        if rm != ARG_FITS or mo < 0 or mo > 30:
            raise BadParameters(f"max_order must be in 0..30, got {max_order}")
        if rn == ARG_BELOW or (rn == ARG_FITS and n <= 0):
            raise BadParameters(f"nframes must be > 0, got {nframes}")
        if rn == ARG_ABOVE or n > FM_MAX_BITS:
            raise BadParameters(f"nframes {nframes} exceeds the limit of {FM_MAX_BITS}")
        if rb == ARG_BELOW or (rb == ARG_FITS and b < 0):
            raise BadParameters(f"base_pa must be >= 0, got {base_pa}")
        if rb == ARG_ABOVE or b > ADDR_LIMIT - (n << PSV_PAGE_SHIFT):
            raise BadParameters(
                f"frames [{hex_of(base_pa)}, +{nframes} pages) must lie below 2**63")
        if b & PSV_PAGE_MASK:
            raise AlignmentError(f"base_pa {b:#x} is not page-aligned")
        self.base_pa_ = b
        self.nframes_ = n
        self.base_pfn = b >> PSV_PAGE_SHIFT
        self.max_order_ = <int>mo
        self.fm = FreeMap(n)

    def __repr__(self):
        return (f"FrameAllocator(base_pa={self.base_pa_:#x}, nframes={self.nframes_}, "
                f"max_order={self.max_order_}, free={self.fm.nfree})")

    cdef int _frame_index(self, object pa, int64_t* index) except -1:
        """index[0] = frame number of pa.

        Errors: BadParameters (not an int), AlignmentError (not
        page-aligned), AddressError (outside the frames) -- in that order.
        """
        cdef int64_t x = 0
        cdef int r = arg_i64(pa, &x, "pa")
        if r != ARG_FITS:
            if pa & PSV_PAGE_MASK:
                raise AlignmentError(f"frame address {hex_of(pa)} is not page-aligned")
            raise AddressError(f"frame address {hex_of(pa)} is outside the frames "
                               f"[{self.base_pa_:#x}, {self._end():#x})")
        if x & PSV_PAGE_MASK:
            raise AlignmentError(f"frame address {hex_of(pa)} is not page-aligned")
        if x < self.base_pa_ or ((x - self.base_pa_) >> PSV_PAGE_SHIFT) >= self.nframes_:
            raise AddressError(f"frame address {hex_of(pa)} is outside the frames "
                               f"[{self.base_pa_:#x}, {self._end():#x})")
        index[0] = (x - self.base_pa_) >> PSV_PAGE_SHIFT
        return 0

    cdef int _run_index(self, object pa, object npages, int64_t* index,
                        int64_t* n) except -1:
        """index[0], n[0] = first frame and length of the run (pa, npages).

        Errors, in this order: BadParameters (not ints, npages <= 0),
        AlignmentError (pa), AddressError (pa or the run's end outside).
        """
        cdef int64_t k = 0
        cdef int rk = arg_i64(npages, &k, "npages")
        if not PyLong_Check(pa):
            pa = as_int(pa, "pa")
        if rk == ARG_BELOW or (rk == ARG_FITS and k <= 0):
            raise BadParameters(f"npages must be > 0, got {npages}")
        self._frame_index(pa, index)
        if rk != ARG_FITS or k > self.nframes_ - index[0]:
            raise AddressError(f"run of {npages} pages at {hex_of(pa)} ends past the frames "
                               f"[{self.base_pa_:#x}, {self._end():#x})")
        n[0] = k
        return 0

    def _end(self):
        return self.base_pa_ + (self.nframes_ << PSV_PAGE_SHIFT)

    def alloc_contig(self, npages):
        """Take the lowest run of npages free frames (first-fit).

        Parameters: npages -- number of contiguous 4 KiB frames, > 0.
        Returns: the PA of the run's first frame.
        Errors: BadParameters (npages <= 0 or not an int); OutOfMemory if
            npages > 1 << max_order or no free run is long enough.
        """
        cdef int64_t n = 0, p
        cdef int r = arg_i64(npages, &n, "npages")
        if r == ARG_BELOW or (r == ARG_FITS and n <= 0):
            raise BadParameters(f"npages must be > 0, got {npages}")
        if r == ARG_ABOVE or n > (<int64_t>1 << self.max_order_):
            raise OutOfMemory(f"{npages} pages exceeds the largest contiguous block, "
                              f"order {self.max_order_} ({1 << self.max_order_} pages)")
        p = self.fm.find(n, 0)
        if p < 0:
            raise OutOfMemory(f"no run of {n} free frames: {self.fm.nfree} free, "
                              f"longest run {self.fm.longest()}")
        self.fm.set_range(p, n)
        return self.base_pa_ + (p << PSV_PAGE_SHIFT)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def alloc_scattered(self, npages):
        """Take the npages lowest free frames, contiguous or not.

        Parameters: npages -- number of frames, > 0.
        Returns: numpy uint64 array of their PAs, ascending.
        Errors: BadParameters (npages <= 0 or not an int); OutOfMemory if
            fewer than npages frames are free (nothing is taken).
        """
        cdef int64_t n = 0
        cdef int r = arg_i64(npages, &n, "npages")
        if r == ARG_BELOW or (r == ARG_FITS and n <= 0):
            raise BadParameters(f"npages must be > 0, got {npages}")
        if r == ARG_ABOVE or n > self.fm.nfree:
            raise OutOfMemory(f"{npages} frames requested, {self.fm.nfree} free")
        result = np.empty(n, dtype=np.uint64)
        self.fm.take_lowest(n, <uint64_t*>cnp.PyArray_DATA(result),
                            <uint64_t>self.base_pa_, PSV_PAGE_SHIFT)
        return result

    def claim(self, pa, npages):
        """Mark exactly the frames [pa, pa + npages * 4096) used.

        For holes in RAM, tests and replay.
        Returns: None.
        Errors: BadParameters (npages <= 0, not ints, or a frame already in
            use -- the message names it); AlignmentError (pa misaligned);
            AddressError (run outside the frames).
        """
        cdef int64_t i = 0, n = 0, q
        self._run_index(pa, npages, &i, &n)
        q = self.fm.first_used(i, n)
        if q >= 0:
            raise BadParameters(
                f"frame {self.base_pa_ + (q << PSV_PAGE_SHIFT):#x} already in use")
        self.fm.set_range(i, n)

    def free_contig(self, pa, npages):
        """Free the run of npages frames starting at pa.

        Returns: None.
        Errors: BadParameters (npages <= 0, not ints); AlignmentError (pa
            misaligned); AddressError (run outside the frames); DoubleFree
            (a frame of the run is not in use -- the message names it).
        """
        cdef int64_t i = 0, n = 0, q
        self._run_index(pa, npages, &i, &n)
        q = self.fm.first_free(i, n)
        if q >= 0:
            raise DoubleFree(
                f"frame {self.base_pa_ + (q << PSV_PAGE_SHIFT):#x} is not in use")
        self.fm.clear_range(i, n)

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def free_pages(self, pages):
        """Free the frames of a page array, in any order; all or nothing.

        Parameters: pages -- 1-D array-like of page PAs (uint64 avoids a copy).
        Returns: None.
        Errors, for the first bad entry in array order: AlignmentError,
            AddressError, DoubleFree (not in use, or listed twice);
            BadParameters if pages is not a 1-D integer array.  On error no
            frame is freed.
        """
        cdef uint64_t pa
        cdef uint64_t base = <uint64_t>self.base_pa_
        cdef uint64_t nfr = <uint64_t>self.nframes_
        cdef const uint64_t* data
        cdef int64_t k, i, j, idx
        cdef int64_t* widx
        arr = as_page_array_nonneg(pages)
        k = arr.shape[0]
        if k == 0:
            return None
        data = <const uint64_t*>cnp.PyArray_DATA(arr)
        widx = <int64_t*>malloc(<size_t>k * sizeof(int64_t))
        if widx == NULL:
            raise MemoryError()
        try:
            for i in range(k):
                pa = data[i]
                if (pa & PSV_PAGE_MASK) or pa < base or ((pa - base) >> PSV_PAGE_SHIFT) >= nfr \
                        or not self.fm.test(<int64_t>((pa - base) >> PSV_PAGE_SHIFT)):
                    # undo the bits cleared so far (the tree was not touched)
                    for j in range(i):
                        self.fm.mark(<int64_t>((data[j] - base) >> PSV_PAGE_SHIFT), True)
                    self._bad_page(arr, i)
                idx = <int64_t>((pa - base) >> PSV_PAGE_SHIFT)
                self.fm.mark(idx, False)
                widx[i] = idx >> 6
            self.fm.fix_words(widx, k)
        finally:
            c_free(widx)
        return None

    def _bad_page(self, arr, i):
        """Raise the error for entry i of a page array (all state restored)."""
        pa = int(arr[i])
        if pa & PSV_PAGE_MASK:
            raise AlignmentError(f"page {i} is {hex_of(pa)}, not 4 KiB-aligned")
        if pa < self.base_pa_ or pa >= self._end():
            raise AddressError(f"page {i} ({hex_of(pa)}) is outside the frames "
                               f"[{self.base_pa_:#x}, {self._end():#x})")
        earlier = np.flatnonzero(arr[:i] == arr[i])
        if earlier.size:
            raise DoubleFree(f"page {i} ({hex_of(pa)}) repeats page {int(earlier[0])}")
        raise DoubleFree(f"page {i} ({hex_of(pa)}) is not in use")

    def is_free(self, pa):
        """True if the frame at pa is free.

        Errors: AlignmentError (pa misaligned), AddressError (outside).
        """
        cdef int64_t i = 0
        self._frame_index(pa, &i)
        return not self.fm.test(i)

    def free_blocks_per_order(self):
        """Free frames as a fully merged buddy allocator would hold them.

        Each maximal free run is cut greedily from its start into naturally
        aligned blocks (alignment by absolute pfn), each of the largest order
        <= max_order that is aligned at the current pfn and fits.
        Returns: numpy int64 array of length max_order + 1, count per order;
            sum(count[k] << k) == free_frames.
        """
        cdef int64_t pos = 0, s, e = 0, cur, end, left
        cdef int k, fit
        counts = np.zeros(self.max_order_ + 1, dtype=np.int64)
        cdef int64_t[::1] cnt = counts
        while True:
            s = self.fm.next_run(pos, &e)
            if s < 0:
                break
            cur = self.base_pfn + s
            end = self.base_pfn + e
            while cur < end:
                k = poolsvc_ctz64(<uint64_t>cur) if cur else 63
                left = end - cur
                fit = 63 - poolsvc_clz64(<uint64_t>left)
                if fit < k:
                    k = fit
                if self.max_order_ < k:
                    k = self.max_order_
                cnt[k] += 1
                cur += <int64_t>1 << k
            pos = e
        return counts

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def used_map(self):
        """numpy uint8 array of length nframes: 1 where the frame is used."""
        result = np.empty(self.nframes_, dtype=np.uint8)
        self.fm.used_bytes(<unsigned char*>cnp.PyArray_DATA(result))
        return result

    def _check(self):
        """Verify the free-run index against the bitmap (tests).

        Errors: CorruptionError naming the first inconsistency.
        """
        self.fm.check()

    @property
    def base_pa(self):
        """PA of frame 0."""
        return self.base_pa_

    @property
    def nframes(self):
        """Number of frames."""
        return self.nframes_

    @property
    def max_order(self):
        """log2 of the largest contiguous allocation."""
        return self.max_order_

    @property
    def free_frames(self):
        """Free frames; free_frames + used_frames == nframes."""
        return self.fm.nfree

    @property
    def used_frames(self):
        """Used frames."""
        return self.nframes_ - self.fm.nfree

    @property
    def largest_free_run(self):
        """Length in frames of the longest free run."""
        return self.fm.longest()
