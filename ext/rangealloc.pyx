# rangealloc.pyx: RangeAllocator, the reserved static pool allocated with
# genalloc semantics, on a FreeMap (freemap.pyx) of one unit per chunk.
# Fields and invariants: rangealloc.pxd.  Contract: docs/core.md;
# plain-Python twin: poolsvc/_pure/alloc.py.
#
# Concurrency: an allocator belongs to one thread at a time (the System
# serialises access); methods hold the GIL and take no locks.
#
# Every public method validates all of its arguments before it changes
# anything, so on any error the allocator is unchanged.  Integers from Python
# go through arg_i64() (convert.pyx), which reports values outside int64
# instead of raising OverflowError, so huge or negative inputs get the
# contract's typed errors.
cimport cython
from libc.stdlib cimport calloc, free as c_free
from libc.stdint cimport uint64_t, int64_t, int32_t, INT64_MAX


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
        cdef int rb = arg_i64(base, &b, "base")
        cdef int rs = arg_i64(size, &s, "size")
        cdef int rm = arg_i64(min_order, &mo, "min_order")
        if rm != ARG_FITS or mo < 0 or mo > 20:
            raise BadParameters(f"min_order must be in 0..20, got {min_order}")
        if not isinstance(policy, str) or policy not in ("first-fit", "best-fit"):
            raise BadParameters(f"policy must be 'first-fit' or 'best-fit', got {policy!r}")
        chunk = <int64_t>1 << mo
        if rs == ARG_BELOW or (rs == ARG_FITS and s <= 0):
            raise BadParameters(f"pool size must be > 0, got {size}")
        if rs == ARG_ABOVE or rb != ARG_FITS or b < 0 or s > ADDR_LIMIT - b:
            raise BadParameters(
                f"pool [{hex_of(base)}, +{hex_of(size)}) must lie in [0, 2**63)")
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
        cdef int64_t sz = 0, al = 0
        cdef int rs = arg_i64(size, &sz, "size")
        cdef int ra = arg_i64(align, &al, "align")
        if ra == ARG_BELOW or (ra == ARG_FITS and (al < 0 or (al & (al - 1)))) or \
                (ra == ARG_ABOVE and (align & (align - 1))):
            raise BadParameters(f"align must be 0 or a power of two, got {hex_of(align)}")
        if rs == ARG_BELOW or (rs == ARG_FITS and sz <= 0):
            raise BadParameters(f"allocation size must be > 0, got {size}")
        if rs != ARG_FITS or ra != ARG_FITS:
            self._no_room(size, align)
        return self.take(sz, al, size, align)

    cdef int64_t take(self, int64_t sz, int64_t al, object size, object align) except -1:
        """``alloc(size, align)`` with both checked (``sz`` > 0, ``al`` 0 or a power of
        two): the address; OutOfMemory (naming ``size`` and ``align``) when nothing fits."""
        cdef int64_t a, n, a_units, p
        cdef int a_shift
        a = al if al > (<int64_t>1 << self.min_order_) else (<int64_t>1 << self.min_order_)
        if sz > self.size_ or a > self.size_:
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
        cdef int64_t x = 0, sz = 0, n
        cdef int rx = arg_i64(addr, &x, "addr")
        cdef int rs = ARG_FITS
        if size is not None:
            rs = arg_i64(size, &sz, "size")
        if rx != ARG_FITS:
            raise AddressError(
                f"address {hex_of(addr)} is outside the pool "
                f"[{self.base_:#x}, {self.base_ + self.size_:#x})")
        n = self.length_at(x) >> self.min_order_
        if size is not None and n:   # (no allocation there: release raises why, first)
            if rs != ARG_FITS or sz <= 0 or sz > self.size_ or \
                    ((sz - 1) >> self.min_order_) + 1 != n:
                raise BadParameters(
                    f"size {hex_of(size)} does not match the allocation at {x:#x} "
                    f"of {n << self.min_order_:#x} bytes")
        return self.release(x)

    cdef int64_t length_at(self, int64_t x) noexcept:
        """Bytes of the live allocation that starts at ``x``; 0 when none does there."""
        cdef int64_t off = x - self.base_
        if x < self.base_ or off >= self.size_ or off & ((<int64_t>1 << self.min_order_) - 1):
            return 0
        return <int64_t>self.alloc_len[off >> self.min_order_] << self.min_order_

    cdef int64_t release(self, int64_t x) except -1:
        """``free(x)``: the allocation's length; AddressError outside the pool,
        DoubleFree when no live allocation starts at ``x``."""
        cdef int64_t c, n
        if x < self.base_ or x - self.base_ >= self.size_:
            raise AddressError(
                f"address {x:#x} is outside the pool "
                f"[{self.base_:#x}, {self.base_ + self.size_:#x})")
        n = self.length_at(x) >> self.min_order_
        if n == 0:
            raise DoubleFree(f"no live allocation starts at {x:#x}")
        c = (x - self.base_) >> self.min_order_
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
        cdef int rx = arg_i64(addr, &x, "addr")
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
