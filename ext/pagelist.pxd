# pagelist.pxd: declarations of the page-list kernels (C bodies in
# psv_pagelist.h, Cython in pagelist.pyx) and the non-secure range checks
# that pagelist.pyx and smc_entry.pyx share.
#
# A list page (4096 bytes) holds PL_ENTRIES (511) little-endian u64 page
# addresses at byte 8*i, then one u64 ``next`` at byte PL_NEXT_OFFSET (4088).
#
# Concurrency: pure functions of their arguments; nogil.
from libc.stdint cimport uint64_t

cdef extern from "psv_pagelist.h" nogil:
    enum:
        PL_ENTRIES "PSV_PL_ENTRIES"
        PL_NEXT_OFFSET "PSV_PL_NEXT_OFFSET"
    void psv_pl_close_page(char *dst, Py_ssize_t chunk, unsigned long long page_pa) noexcept
    unsigned long long psv_or_reduce(const unsigned long long *src, Py_ssize_t n) noexcept
    unsigned long long psv_or_min_max(const unsigned long long *src, Py_ssize_t n,
                                      unsigned long long *lo, unsigned long long *hi) noexcept
    void psv_fill_page_list(char *dst, const unsigned long long *entries, Py_ssize_t n,
                            unsigned long long list_pa) noexcept
    unsigned long long psv_fill_page_list_or(char *dst, const unsigned long long *entries,
                                             Py_ssize_t n, unsigned long long list_pa) noexcept


cdef struct pl_range:
    uint64_t base          # a non-empty non-secure range [base, last], both included
    uint64_t last          # (an inclusive end: a range may reach 2**64, e.g. (0, 1 << 64))


cdef inline bint pl_page_inside(const pl_range *ranges, Py_ssize_t nranges,
                                uint64_t pa) noexcept nogil:
    """True if ``[pa, pa + 4096)`` lies within one of the ranges."""
    cdef Py_ssize_t r
    for r in range(nranges):
        if (pa >= ranges[r].base and ranges[r].last >= 4095
                and pa <= ranges[r].last - 4095):
            return True
    return False


cdef inline bint pl_span_inside(const pl_range *ranges, Py_ssize_t nranges,
                                uint64_t lo, uint64_t hi) noexcept nogil:
    """True if the pages ``lo`` .. ``hi`` (both included) lie within one range,
    so that every page between them does too."""
    cdef Py_ssize_t r
    for r in range(nranges):
        if (lo >= ranges[r].base and ranges[r].last >= 4095
                and hi >= lo and hi <= ranges[r].last - 4095):
            return True
    return False
