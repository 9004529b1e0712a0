# alloc.pyx: RangeAllocator (the reserved static pool, genalloc semantics) and
# FrameAllocator (page frames of dynamic RAM, alloc_pages_exact semantics),
# both built on FreeMap (freemap.pyx).  Fields and invariants: alloc.pxd.
# Contract: docs/core.md; plain-Python twin: poolsvc/_pure/alloc.py.
#
# Concurrency: an allocator belongs to one thread at a time (the System
# serialises access); methods hold the GIL and take no locks.
#
# Every public method validates all of its arguments before it changes
# anything, so on any error the allocator is unchanged.  Integers from Python
# go through _arg_i64(), which reports values outside int64 instead of raising
# OverflowError, so huge or negative inputs get the contract's typed errors.
cimport cython
from cpython.long cimport PyLong_Check, PyLong_AsLongLongAndOverflow
from libc.stdlib cimport malloc, calloc, free as c_free
from libc.stdint cimport uint64_t, int64_t, int32_t, INT64_MAX

import operator as _operator
import numpy as _np

cdef enum:
    ARG_FITS = 0       # the value is in *out
    ARG_ABOVE = 1      # the value is > INT64_MAX
    ARG_BELOW = 2      # the value is < INT64_MIN

# Every address an allocator hands out or accepts is below this bound.
cdef int64_t ADDR_LIMIT = INT64_MAX


def _as_int(value, what):
    """operator.index(value), with a non-integer reported as BadParameters."""
    try:
        return _operator.index(value)
    except TypeError:
        raise BadParameters(
            f"{what} must be an int, got {type(value).__name__}") from None


cdef inline int _arg_i64(object value, int64_t* out, str what) except -1:
    """Convert a Python integer for C use.

    Returns ARG_FITS (value stored in out[0]), ARG_ABOVE or ARG_BELOW.
    Errors: BadParameters if value is not an integer (no __index__).
    """
    cdef int overflow = 0
    cdef long long x
    if not PyLong_Check(value):
        value = _as_int(value, what)
    x = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        return ARG_ABOVE
    if overflow < 0:
        return ARG_BELOW
    out[0] = x
    return ARG_FITS


def _hex(value):
    """value in hex for an error message (value is known to be an integer)."""
    return f"{_operator.index(value):#x}"


def _as_page_array(pages):
    """pages as a 1-D C-contiguous uint64 array (no copy if already one).

    Errors: BadParameters if pages is not 1-D or holds anything other than
    non-negative integers below 2**64.
    """
    if isinstance(pages, _np.ndarray) and pages.dtype == _np.uint64 and pages.ndim == 1:
        return _np.ascontiguousarray(pages)
    try:
        arr = _np.asarray(pages)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadParameters(f"pages is not an array of page addresses: {exc}") from None
    if arr.ndim != 1:
        raise BadParameters(f"pages must be 1-D, got {arr.ndim} dimensions")
    if arr.size == 0:
        return _np.empty(0, dtype=_np.uint64)
    if arr.dtype.kind == "i":
        if (arr < 0).any():
            raise BadParameters(f"pages holds a negative address: {int(arr.min())}")
    elif arr.dtype.kind != "u":
        raise BadParameters(f"pages must hold integers, got dtype {arr.dtype}")
    return _np.ascontiguousarray(arr, dtype=_np.uint64)


# ---------------------------------------------------------------------------
# RangeAllocator
# ---------------------------------------------------------------------------

@cython.auto_pickle(False)
cdef class RangeAllocator:
    """The reserved static pool, allocated as the kernel's genalloc does.

    RangeAllocator(base, size, min_order=9, policy="first-fit")

    Parameters:
        base, size -- the pool [base, base + size): ints, multiples of
            1 << min_order, size > 0, base + size <= 2**63.
        min_order -- log2 of the chunk size, 0..20 (genalloc's
            min_alloc_order; the TEE subsystem uses 9, 512-byte chunks).
        policy -- "first-fit" (lowest address, genalloc's default) or
            "best-fit" (shortest free run that fits; O(free runs) per call).
    Errors: BadParameters (AlignmentError for a misaligned base) for any
    parameter outside those ranges.
    """

    def __cinit__(self, base, size, min_order=9, policy="first-fit"):
        cdef int64_t b = 0, s = 0, mo = 0, chunk
        cdef int rb = _arg_i64(base, &b, "base")
        cdef int rs = _arg_i64(size, &s, "size")
        cdef int rm = _arg_i64(min_order, &mo, "min_order")
        if rm != ARG_FITS or mo < 0 or mo > 20:
            raise BadParameters(f"min_order must be in 0..20, got {min_order}")
        if not isinstance(policy, str) or policy not in ("first-fit", "best-fit"):
            raise BadParameters(f"policy must be 'first-fit' or 'best-fit', got {policy!r}")
        chunk = <int64_t>1 << mo
        if rs == ARG_BELOW or (rs == ARG_FITS and s <= 0):
            raise BadParameters(f"pool size must be > 0, got {size}")
        if rs == ARG_ABOVE or rb != ARG_FITS or b < 0 or s > ADDR_LIMIT - b:
            raise BadParameters(
                f"pool [{_hex(base)}, +{_hex(size)}) must lie in [0, 2**63)")
        if s & (chunk - 1):
            raise BadParameters(f"pool size {s:#x} is not a multiple of the chunk {chunk:#x}")
        if b & (chunk - 1):
            raise AlignmentError(f"pool base {b:#x} is not a multiple of the chunk {chunk:#x}")
        if (s >> mo) > FM_MAX_BITS:
            raise BadParameters(
                f"pool of {s >> mo} chunks exceeds the limit of {FM_MAX_BITS} chunks")
        self.base_ = b
        self.size_ = s
        self.min_order_ = <int>mo
        self.nchunks = s >> mo
        self.base_chunk = b >> mo
        self.fit = ALLOC_FIT_FIRST if policy == "first-fit" else ALLOC_FIT_BEST
        self.nlive = 0
        self.alloc_len = <int32_t*>calloc(<size_t>self.nchunks, sizeof(int32_t))
        if self.alloc_len == NULL:
            raise MemoryError()
        self.fm = FreeMap(self.nchunks)

    def __dealloc__(self):
        c_free(self.alloc_len)

    def __repr__(self):
        return (f"RangeAllocator(base={self.base_:#x}, size={self.size_:#x}, "
                f"min_order={self.min_order_}, policy={self.policy!r}, "
                f"used={self.used_bytes:#x})")

    # ---- placement policies ------------------------------------------------

    cdef int64_t _place(self, int64_t n, int64_t a_units) noexcept nogil:
        """Chunk index for n chunks aligned to a_units chunks, or -1."""
        if self.fit == ALLOC_FIT_BEST:
            return self._place_best(n, a_units)
        return self._place_first(n, a_units)

    cdef int64_t _place_first(self, int64_t n, int64_t a_units) noexcept nogil:
        """Lowest aligned chunk c with [c, c+n) free, or -1.

        Loop: p = find(n, from); s = align_up(p).  Any aligned fit q >= from
        has q >= p (p is the lowest fit) and so q >= s; thus s == p is the
        answer, and otherwise searching again from s loses nothing.  `from`
        grows every turn, so the loop ends; each turn is O(log N).
        """
        cdef int64_t frm = 0, p, s
        cdef int64_t mask = a_units - 1
        if a_units <= 1:
            return self.fm.find(n, 0)
        while True:
            p = self.fm.find(n, frm)
            if p < 0:
                return -1
            s = ((self.base_chunk + p + mask) & ~mask) - self.base_chunk
            if s == p:
                return p
            frm = s

    cdef int64_t _place_best(self, int64_t n, int64_t a_units) noexcept nogil:
        """Best fit: the lowest aligned chunk in the shortest maximal free
        run that can hold n aligned chunks (ties: lowest run), or -1.

        Visits only the free runs of length >= n (find() skips the others),
        so it costs O(such runs * (log N + run/64)); stops early on a run
        of exactly n.
        """
        cdef int64_t pos = 0, p, e, s, best = -1, best_len = INT64_MAX
        cdef int64_t mask = a_units - 1
        while pos < self.nchunks:
            # p starts a maximal run: pos is 0 or a used chunk (the last end)
            p = self.fm.find(n, pos)
            if p < 0:
                break
            e = self.fm.first_used(p + n, self.nchunks - (p + n))
            if e < 0:
                e = self.nchunks
            s = ((self.base_chunk + p + mask) & ~mask) - self.base_chunk
            if s + n <= e and e - p < best_len:
                best = s
                best_len = e - p
                if best_len == n:
                    break
            pos = e
        return best

    # ---- public API --------------------------------------------------------

    def alloc(self, size, align=0):
        """Allocate size bytes at an address that is a multiple of the alignment.

        Parameters:
            size -- bytes, > 0; rounded up to a multiple of
                a = max(align, chunk_size).
            align -- 0 or a power of two (bytes); the address (absolute,
                not pool-relative) is a multiple of a.
        Returns: the address (int); the allocation's length is the rounded
            size (see free()).
        Errors: BadParameters (align not 0 or a power of two, size <= 0,
            non-integers); OutOfMemory if no aligned free range fits.
        """
        cdef int64_t sz = 0, al = 0, a, n, a_units, p
        cdef int a_shift
        cdef int rs = _arg_i64(size, &sz, "size")
        cdef int ra = _arg_i64(align, &al, "align")
        if ra == ARG_BELOW or (ra == ARG_FITS and (al < 0 or (al & (al - 1)))) or \
                (ra == ARG_ABOVE and (align & (align - 1))):
            raise BadParameters(f"align must be 0 or a power of two, got {_hex(align)}")
        if rs == ARG_BELOW or (rs == ARG_FITS and sz <= 0):
            raise BadParameters(f"allocation size must be > 0, got {size}")
        a = al if al > (<int64_t>1 << self.min_order_) else (<int64_t>1 << self.min_order_)
        if rs != ARG_FITS or ra != ARG_FITS or sz > self.size_ or a > self.size_:
            self._no_room(size, align)
        a_shift = poolsvc_ctz64(<uint64_t>a)
        a_units = a >> self.min_order_
        n = (((sz - 1) >> a_shift) + 1) * a_units      # roundup(sz, a) in chunks
        if n > self.fm.nfree:
            self._no_room(size, align)
        p = self._place(n, a_units)
        if p < 0:
            self._no_room(size, align)
        self.fm.set_range(p, n)
        self.alloc_len[p] = <int32_t>n
        self.nlive += 1
        return self.base_ + (p << self.min_order_)

    def _no_room(self, size, align):
        a = max(align, 1 << self.min_order_)
        raise OutOfMemory(
            f"no room for {size} bytes (align {a:#x}) in the pool at "
            f"{self.base_:#x}: {self.fm.nfree << self.min_order_} bytes free, "
            f"longest free run {self.fm.longest() << self.min_order_} bytes")

    def free(self, addr, size=None):
        """Release the allocation that starts at addr.

        Parameters:
            addr -- the address alloc() returned.
            size -- optional; if given, roundup(size, chunk_size) must equal
                the allocation's length.
        Returns: the allocation's (rounded) length in bytes.
        Errors: AddressError if addr is outside the pool; DoubleFree if no
            live allocation starts at addr; BadParameters if size is given
            and does not match (or an argument is not an integer).
        """
        cdef int64_t x = 0, sz = 0, c, n, off
        cdef int64_t chunk = <int64_t>1 << self.min_order_
        cdef int rx = _arg_i64(addr, &x, "addr")
        cdef int rs = ARG_FITS
        if size is not None:
            rs = _arg_i64(size, &sz, "size")
        if rx != ARG_FITS or x < self.base_ or x - self.base_ >= self.size_:
            raise AddressError(
                f"address {_hex(addr)} is outside the pool "
                f"[{self.base_:#x}, {self.base_ + self.size_:#x})")
        off = x - self.base_
        c = off >> self.min_order_
        if (off & (chunk - 1)) or self.alloc_len[c] == 0:
            raise DoubleFree(f"no live allocation starts at {x:#x}")
        n = self.alloc_len[c]
        if size is not None:
            if rs != ARG_FITS or sz <= 0 or sz > self.size_ or \
                    ((sz - 1) >> self.min_order_) + 1 != n:
                raise BadParameters(
                    f"size {_hex(size)} does not match the allocation at {x:#x} "
                    f"of {n << self.min_order_:#x} bytes")
        self.fm.clear_range(c, n)
        self.alloc_len[c] = 0
        self.nlive -= 1
        return n << self.min_order_

    def allocation_at(self, addr):
        """The live allocation containing addr.

        Returns: (start, length) in bytes, or None if addr is free or
            outside the pool.
        Errors: BadParameters if addr is not an integer; CorruptionError if
            the bookkeeping is inconsistent (a bug).
        """
        cdef int64_t x = 0, c
        cdef int rx = _arg_i64(addr, &x, "addr")
        if rx != ARG_FITS or x < self.base_ or x - self.base_ >= self.size_:
            return None
        c = (x - self.base_) >> self.min_order_
        if not self.fm.test(c):
            return None
        # the chunks after an allocation's first have alloc_len == 0, so the
        # nearest start at or below c is the allocation holding c
        while c >= 0 and self.alloc_len[c] == 0:
            c -= 1
        if c < 0:
            raise CorruptionError(f"used chunk at {x:#x} belongs to no allocation")
        return (self.base_ + (c << self.min_order_),
                <int64_t>self.alloc_len[c] << self.min_order_)

    def allocations(self):
        """Every live allocation as (start, length) in bytes, ascending.

        Returns: list of tuples.  O(number of chunks).
        """
        cdef int64_t c = 0
        out = []
        while c < self.nchunks:
            if self.alloc_len[c]:
                out.append((self.base_ + (c << self.min_order_),
                            <int64_t>self.alloc_len[c] << self.min_order_))
                c += self.alloc_len[c]
            else:
                c += 1
        return out

    def _check(self):
        """Verify the bookkeeping against the bitmap (tests).

        Errors: CorruptionError naming the first inconsistency.
        """
        cdef int64_t c = 0, used = 0, nlive = 0, n, k
        self.fm.check()
        while c < self.nchunks:
            n = self.alloc_len[c]
            if n:
                if n < 0 or n > self.nchunks - c or self.fm.first_free(c, n) >= 0:
                    raise CorruptionError(f"allocation at chunk {c} of {n} chunks is not all used")
                for k in range(c + 1, c + n):
                    if self.alloc_len[k]:
                        raise CorruptionError(f"allocations overlap at chunk {k}")
                used += n
                nlive += 1
                c += n
            else:
                if self.fm.test(c):
                    raise CorruptionError(f"chunk {c} is used but belongs to no allocation")
                c += 1
        if used != self.nchunks - self.fm.nfree or nlive != self.nlive:
            raise CorruptionError("allocation totals disagree with the bitmap")

    @property
    def base(self):
        """First address of the pool."""
        return self.base_

    @property
    def size(self):
        """Size of the pool in bytes."""
        return self.size_

    @property
    def min_order(self):
        """log2 of the chunk size."""
        return self.min_order_

    @property
    def chunk_size(self):
        """The allocation granule, 1 << min_order bytes."""
        return <int64_t>1 << self.min_order_

    @property
    def policy(self):
        """'first-fit' or 'best-fit'."""
        return "best-fit" if self.fit == ALLOC_FIT_BEST else "first-fit"

    @property
    def free_bytes(self):
        """Bytes not in any allocation; free_bytes + used_bytes == size."""
        return self.fm.nfree << self.min_order_

    @property
    def used_bytes(self):
        """Bytes in live allocations (their rounded lengths)."""
        return (self.nchunks - self.fm.nfree) << self.min_order_

    @property
    def largest_free(self):
        """Length in bytes of the longest free run."""
        return self.fm.longest() << self.min_order_

    @property
    def count(self):
        """Number of live allocations."""
        return self.nlive


# ---------------------------------------------------------------------------
# FrameAllocator
# ---------------------------------------------------------------------------

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
        cdef int rb = _arg_i64(base_pa, &b, "base_pa")
        cdef int rn = _arg_i64(nframes, &n, "nframes")
        cdef int rm = _arg_i64(max_order, &mo, "max_order")
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
                f"frames [{_hex(base_pa)}, +{nframes} pages) must lie below 2**63")
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
        cdef int r = _arg_i64(pa, &x, "pa")
        if r != ARG_FITS:
            if pa & PSV_PAGE_MASK:
                raise AlignmentError(f"frame address {_hex(pa)} is not page-aligned")
            raise AddressError(f"frame address {_hex(pa)} is outside the frames "
                               f"[{self.base_pa_:#x}, {self._end():#x})")
        if x & PSV_PAGE_MASK:
            raise AlignmentError(f"frame address {_hex(pa)} is not page-aligned")
        if x < self.base_pa_ or ((x - self.base_pa_) >> PSV_PAGE_SHIFT) >= self.nframes_:
            raise AddressError(f"frame address {_hex(pa)} is outside the frames "
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
        cdef int rk = _arg_i64(npages, &k, "npages")
        if not PyLong_Check(pa):
            pa = _as_int(pa, "pa")
        if rk == ARG_BELOW or (rk == ARG_FITS and k <= 0):
            raise BadParameters(f"npages must be > 0, got {npages}")
        self._frame_index(pa, index)
        if rk != ARG_FITS or k > self.nframes_ - index[0]:
            raise AddressError(f"run of {npages} pages at {_hex(pa)} ends past the frames "
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
        cdef int r = _arg_i64(npages, &n, "npages")
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
        cdef int64_t n = 0, k = 0, pos = 0, p, w, nw = 0, bit
        cdef uint64_t x, taken
        cdef uint64_t* out
        cdef int64_t* widx
        cdef int r = _arg_i64(npages, &n, "npages")
        if r == ARG_BELOW or (r == ARG_FITS and n <= 0):
            raise BadParameters(f"npages must be > 0, got {npages}")
        if r == ARG_ABOVE or n > self.fm.nfree:
            raise OutOfMemory(f"{npages} frames requested, {self.fm.nfree} free")
        result = _np.empty(n, dtype=_np.uint64)
        out = <uint64_t*>cnp.PyArray_DATA(result)
        widx = <int64_t*>malloc(<size_t>n * sizeof(int64_t))
        if widx == NULL:
            raise MemoryError()
        try:
            while k < n:
                # skip used regions through the tree: it is stale for the
                # words taken so far, but find(1, pos) reads only nodes that
                # lie wholly at or after pos, and those are untouched
                p = self.fm.find(1, pos)
                if p < 0:
                    raise InternalError("free frame count disagrees with the bitmap")
                w = p >> 6
                x = ~self.fm.words[w] & ((<uint64_t>0xFFFFFFFFFFFFFFFF) << (p & 63))
                taken = 0
                while x and k < n:
                    bit = poolsvc_ctz64(x)
                    taken |= (<uint64_t>1) << bit
                    x &= x - 1
                    out[k] = <uint64_t>(self.base_pa_ + (((w << 6) + bit) << PSV_PAGE_SHIFT))
                    k += 1
                self.fm.words[w] |= taken
                self.fm.nfree -= poolsvc_popcount64(taken)
                widx[nw] = w
                nw += 1
                pos = (w + 1) << 6
            self.fm._fix_words(widx, nw)
        finally:
            c_free(widx)
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
        arr = _as_page_array(pages)
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
            self.fm._fix_words(widx, k)
        finally:
            c_free(widx)
        return None

    def _bad_page(self, arr, i):
        """Raise the error for entry i of a page array (all state restored)."""
        pa = int(arr[i])
        if pa & PSV_PAGE_MASK:
            raise AlignmentError(f"page {i} is {_hex(pa)}, not 4 KiB-aligned")
        if pa < self.base_pa_ or pa >= self._end():
            raise AddressError(f"page {i} ({_hex(pa)}) is outside the frames "
                               f"[{self.base_pa_:#x}, {self._end():#x})")
        earlier = _np.flatnonzero(arr[:i] == arr[i])
        if earlier.size:
            raise DoubleFree(f"page {i} ({_hex(pa)}) repeats page {int(earlier[0])}")
        raise DoubleFree(f"page {i} ({_hex(pa)}) is not in use")

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
        counts = _np.zeros(self.max_order_ + 1, dtype=_np.int64)
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
        cdef int64_t i
        result = _np.empty(self.nframes_, dtype=_np.uint8)
        cdef unsigned char* out = <unsigned char*>cnp.PyArray_DATA(result)
        for i in range(self.nframes_):
            out[i] = (self.fm.words[i >> 6] >> (i & 63)) & 1
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
