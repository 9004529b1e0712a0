# Tiny hot helpers shared by every kernel: bit scans and page arithmetic.
# All are inline, nogil and branch-light.
from libc.stdint cimport uint64_t, int64_t, uint32_t, int32_t

cdef extern from *:
    """
    static inline int poolsvc_ctz64(unsigned long long x) { return x ? __builtin_ctzll(x) : 64; }
    static inline int poolsvc_clz64(unsigned long long x) { return x ? __builtin_clzll(x) : 64; }
    static inline int poolsvc_popcount64(unsigned long long x) { return __builtin_popcountll(x); }
    """
    int poolsvc_ctz64(unsigned long long x) nogil
    int poolsvc_clz64(unsigned long long x) nogil
    int poolsvc_popcount64(unsigned long long x) nogil

cdef enum:
    PSV_PAGE_SHIFT = 12
    PSV_PAGE_SIZE = 4096
    PSV_PAGE_MASK = 4095
    PSV_LIST_ENTRIES = 511

cdef inline uint64_t pfn_of(uint64_t pa) noexcept nogil:
    return pa >> PSV_PAGE_SHIFT

cdef inline bint page_aligned(uint64_t pa) noexcept nogil:
    return (pa & PSV_PAGE_MASK) == 0
