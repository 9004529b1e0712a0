# alloc.pxd: typed fields of RangeAllocator and FrameAllocator (logic in
# alloc.pyx).  Included textually from _core.pxd after freemap.pxd.
#
# Concurrency: each allocator belongs to one thread at a time; no locks.
from libc.stdint cimport uint64_t, int64_t, int32_t

# Addresses handled by the allocators stay below 2**63 so that every
# address, size and unit index fits an int64 (checked by the constructors).
cdef enum:
    ALLOC_FIT_FIRST = 0
    ALLOC_FIT_BEST = 1


cdef class RangeAllocator:
    # The static pool [base, base + size), cut into chunks of 1 << min_order
    # bytes; fm has one unit per chunk.  Invariants:
    #   nchunks == size >> min_order;  chunk c is at base + (c << min_order)
    #   alloc_len[c] > 0  <=>  a live allocation starts at chunk c, and then
    #       chunks [c, c + alloc_len[c]) are used and belong to it alone
    #   sum(alloc_len) == nchunks - fm.nfree         (used chunks)
    #   nlive == number of c with alloc_len[c] > 0
    cdef FreeMap fm
    cdef int32_t* alloc_len
    cdef int64_t base_
    cdef int64_t size_
    cdef int64_t nchunks
    cdef int64_t base_chunk      # base >> min_order: absolute alignment
    cdef int min_order_
    cdef int fit
    cdef int64_t nlive

    cdef int64_t _place(self, int64_t n, int64_t a_units) noexcept nogil
    cdef int64_t _place_first(self, int64_t n, int64_t a_units) noexcept nogil
    cdef int64_t _place_best(self, int64_t n, int64_t a_units) noexcept nogil


cdef class FrameAllocator:
    # Frames [base_pa, base_pa + nframes * 4096); fm has one unit per frame.
    # Invariants:
    #   frame i is at base_pa + (i << 12), pfn base_pfn + i
    #   fm.nfree + used_frames == nframes
    cdef FreeMap fm
    cdef int64_t base_pa_
    cdef int64_t nframes_
    cdef int64_t base_pfn
    cdef int max_order_

    cdef int _frame_index(self, object pa, int64_t* index) except -1
    cdef int _run_index(self, object pa, object npages, int64_t* index,
                        int64_t* n) except -1
