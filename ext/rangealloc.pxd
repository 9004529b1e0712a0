# rangealloc.pxd: typed fields of RangeAllocator (logic in rangealloc.pyx).
#
# Concurrency: an allocator belongs to one thread at a time; no locks.
from libc.stdint cimport int64_t, int32_t

# Addresses handled by the allocators stay below 2**63 (ADDR_LIMIT,
# convert.pyx) so that every address, size and unit index fits an int64
# (checked by the constructors).
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

    # typed entries (alloc / free / the length of an allocation, for checked arguments)
    cdef int64_t take(self, int64_t size, int64_t align, object size_obj, object align_obj) except -1
    cdef int64_t release(self, int64_t addr) except -1
    cdef int64_t length_at(self, int64_t addr) noexcept

    cdef int64_t _place(self, int64_t n, int64_t a_units) noexcept nogil
    cdef int64_t _place_first(self, int64_t n, int64_t a_units) noexcept nogil
    cdef int64_t _place_best(self, int64_t n, int64_t a_units) noexcept nogil
